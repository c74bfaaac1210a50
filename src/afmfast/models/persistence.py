"""Saving and loading models as one ``.npz`` file.

The archive holds the model's float32 arrays and ``__header__``, a uint8 array of UTF-8
JSON: ``{"format": "afmfast-model", "version": 1, "class": ..., "params": ...,
"n_features": ..., "best_epoch": ..., "history": [...], "feature_map": JSON or null,
"field_names": [...] or null, "extras": {...}}``; with ``field_names`` (a model fitted on
a Dataset with fields) the int32 member ``fields`` holds each feature's field. Nothing
is pickled.

``load`` trusts nothing in the file. Before it reads (let alone allocates) what the file
asks for, it checks:

- the zip directory: every member stored or deflated, not encrypted, named once, and
  declaring no more bytes than deflate can expand its compressed bytes to, so a small
  file cannot make ``load`` allocate a huge array;
- ``__header__``: a 1-D uint8 ``.npy`` of at most ``MAX_HEADER_BYTES`` bytes of UTF-8 JSON
  nested at most ``MAX_JSON_DEPTH`` deep (checked before parsing), then its schema: the
  known keys only; ``format`` and ``version``; ``class`` one of FM, AFM, FMClassifier,
  AFMClassifier; ``params`` that class's parameter names with JSON scalar values (a list
  for AFM's ``keep``) that the estimator's own validation accepts, and ``n_threads`` as
  ``afmfast.kernels.threads.resolve_threads`` reads it (a count above this machine's limit is
  clamped with a warning); ``n_features`` an integer >= 0; ``history`` a list of records
  with number or null values; ``best_epoch`` an integer in [0, len(history)];
  ``feature_map`` null or the JSON of a ``FeatureMap`` of ``n_features`` features;
  ``field_names`` null or a list of strings, and then a ``fields`` member of
  ``n_features`` int32 fields in [-1, len(field_names));
  ``extras`` an object, whose ``classes`` for a classifier are two distinct JSON scalars
  and whose ``n_samples`` for an ``FM(solver="mcmc")`` is the kept sample count (its V
  holds that many samples side by side, ``afmfast.models.mcmc``); a regressor's
  ``y_range``, when present, is the [low, high] of its training labels (``evaluate``'s
  default clip);
- the other members: exactly the arrays that the class and parameters imply, each
  declaring the size of a small ``.npy`` header plus its float32 data; then each
  ``.npy`` header (read with ``numpy.lib.format``) must give float32 and the expected
  shape before any data is read; then the data, the zip CRC and finite values.

Anything wrong raises ``ValueError`` whose message starts with the path (a missing file
raises ``FileNotFoundError``). Saving writes a temporary file beside the target, gives it
mode ``0o666 & ~umask`` as ``open`` would, and renames it over the target, so a failed
save leaves an existing file untouched.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import reprlib
import tempfile
import threading
import zipfile
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib import format as npy_format

from afmfast.data.dataset import _check_fields
from afmfast.data.encoding import FeatureMap

if TYPE_CHECKING:  # annotations only (the models import this module, not the reverse)
    from afmfast.models.base import FactorizationModel
from afmfast.kernels.threads import resolve_threads

FORMAT = "afmfast-model"
VERSION = 1
_HEADER = "__header__"

#: The most bytes of JSON header that ``save`` writes and ``load`` reads.
MAX_HEADER_BYTES = 64 << 20
#: The deepest JSON nesting ``load`` parses (afmfast writes 3 levels), far below Python's
#: recursion limit.
MAX_JSON_DEPTH = 32

_REQUIRED_KEYS = ("format", "version", "class", "params", "n_features", "best_epoch",
                  "history")
_OPTIONAL_KEYS = ("feature_map", "extras", "field_names")  # absent in earlier files
# A member's .npy header (magic, length, padded dict); numpy writes 64 or 128 bytes.
_NPY_HEADER_MAX = 4096
# Deflate codes at most 258 output bytes in 2 bits, so no stream expands further.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 22
_JSON_SCALARS = (str, int, float, bool, type(None))
# A JSON string, or an unterminated one up to the end (json.loads stops there), matched
# in linear time: the two repeated classes are disjoint.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_PROC_STATUS = "/proc/self/status"
_umask_lock = threading.Lock()


class _Reject(Exception):
    """What is wrong with a model file, worded without its path (``load`` adds it)."""


# The class saved under each "class" name. The estimator classes register themselves
# (``FactorizationModel.__init_subclass__``), so that this module imports no model: the
# models depend on persistence, never the other way.
_MODEL_CLASSES = {}


def register_model_class(cls):
    """Make ``cls`` loadable from files whose "class" is ``cls._kind``.

    Examples
    --------
    >>> import afmfast
    >>> register_model_class(afmfast.FM)  # done when FM was defined
    >>> _MODEL_CLASSES["FM"] is afmfast.FM
    True
    """
    _MODEL_CLASSES[cls._kind] = cls


def _umask():
    """The process umask, read without changing it where /proc tells it; otherwise set
    and restored under a lock (other threads of afmfast never see the temporary 0)."""
    try:
        with open(_PROC_STATUS) as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def save_model(model, path):
    """Write ``model`` to ``path`` atomically (see the module docstring); what
    ``model.save(path)`` calls, without its check that the model is fitted.

    Examples
    --------
    >>> import os, tempfile, numpy as np, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=500, seed=0)
    >>> model = afmfast.FM(n_factors=4, n_epochs=1, n_threads=1, verbose=0).fit(data.train)
    >>> path = os.path.join(tempfile.mkdtemp(), "fm.npz")
    >>> save_model(model, path)
    >>> sorted(np.load(path).files)
    ['V', '__header__', 'bn_stats', 'dense', 'w']
    """
    path = os.fspath(path)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "class": model._kind,
        "params": model.get_params(),
        "n_features": int(model.n_features_in_),
        "best_epoch": int(getattr(model, "best_epoch_", 0)),
        "history": list(getattr(model, "history_", [])),
        "feature_map": (model.feature_map_.to_json() if hasattr(model, "feature_map_")
                        else None),
        "extras": model._header_extras(),
        "field_names": getattr(model, "field_names_", None),
    }
    text = json.dumps(header).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: the model's header (feature map and history) is "
                         f"{len(text)} bytes of JSON, more than afmfast.load reads "
                         f"({MAX_HEADER_BYTES}); nothing was written")
    arrays = dict(model._arrays())
    if hasattr(model, "fields_"):
        arrays["fields"] = model.fields_
    arrays[_HEADER] = np.frombuffer(text, dtype=np.uint8)
    mode = 0o666 & ~_umask()  # mkstemp creates 0600; a saved model is an ordinary file
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".afmfast-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str | os.PathLike) -> FactorizationModel:
    """Load a model saved with ``model.save(path)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError``, its message
    starting with the path, for anything that is not an intact afmfast model file (the
    module docstring lists what is checked).

    Examples
    --------
    >>> import os, tempfile, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=500, seed=0)
    >>> model = afmfast.FM(n_factors=4, n_epochs=1, verbose=0).fit(data.train)
    >>> path = os.path.join(tempfile.mkdtemp(), "fm.npz")
    >>> model.save(path)
    >>> bool((afmfast.load(path).predict(data.valid) == model.predict(data.valid)).all())
    True
    >>> csv = os.path.join(os.path.dirname(path), "x.csv")
    >>> with open(csv, "w") as fh:
    ...     _ = fh.write("a,b\\n1,2\\n")
    >>> try:
    ...     afmfast.load(csv)
    ... except ValueError as exc:
    ...     print(str(exc).replace(csv, "x.csv"))
    x.csv: not an afmfast model file (no zip archive; model.save writes .npz archives)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        return _load(path)
    except _Reject as exc:
        raise ValueError(f"{path}: {exc}") from exc.__cause__


# ----- the archive -------------------------------------------------------------------


def _why(exc):
    """An exception from library code on bad bytes, as one short line."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_archive(path):
    """The open ``ZipFile`` and the file's size; a file that is no zip archive (a
    ``.npy`` array, a text file) is rejected with a line saying what it is."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise _Reject(f"cannot read the file ({_why(exc)})") from exc
    try:
        return zipfile.ZipFile(path), size
    except Exception as exc:  # zipfile raises many types on bad bytes
        if magic == b"\x93NUMPY":
            what = "a single NumPy array (.npy)"
        elif magic.startswith(b"PK"):
            what = f"a damaged zip archive: {_why(exc)}"
        else:
            what = "no zip archive"
        raise _Reject(f"not an afmfast model file ({what}; model.save writes .npz "
                      f"archives)") from None


def _members(zf, file_size):
    """Name -> ZipInfo of every member, after the checks that need no decompression."""
    members = {}
    for info in zf.infolist():
        name = info.filename
        if name in members:
            raise _Reject(f"member {name!r} appears twice in the zip directory")
        if info.flag_bits & 0x1:
            raise _Reject(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Reject(f"member {name!r} uses zip compression method "
                          f"{info.compress_type}; model files are stored or deflated")
        stored = info.compress_type == zipfile.ZIP_STORED
        if (info.compress_size > file_size
                or (stored and info.file_size != info.compress_size)
                or info.file_size > _DEFLATE_MAX_RATIO * info.compress_size):
            raise _Reject(f"member {name!r} declares {info.file_size} bytes from "
                          f"{info.compress_size} compressed bytes, impossible in a "
                          f"{file_size}-byte file")
        members[name] = info
    return members


def _read_npy_header(buf):
    """(shape, fortran_order, dtype, header length) of the .npy bytes in ``buf``."""
    version = npy_format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
    else:
        raise _Reject(f".npy format version {version} (afmfast writes 1.0)")
    return shape, fortran, dtype, buf.tell()


def _read_member(zf, info, dtype, shape):
    """The array in member ``info``. Its .npy header must give ``dtype`` and ``shape``
    (None: any 1-D shape of at most MAX_HEADER_BYTES items) and, with the header's own
    length, the member's declared size, all before any data is read."""
    name = info.filename
    try:
        with zf.open(info) as fh:
            head = fh.read(min(info.file_size, _NPY_HEADER_MAX))
            try:
                got_shape, fortran, got_dtype, start = _read_npy_header(io.BytesIO(head))
            except _Reject as exc:
                raise _Reject(f"member {name!r}: {exc}") from None
            wanted = (f"1-D of at most {MAX_HEADER_BYTES}" if shape is None
                      else f"shape {shape}")
            ok = got_dtype == dtype and all(n >= 0 for n in got_shape) and (
                got_shape == shape if shape is not None
                else len(got_shape) == 1 and got_shape[0] <= MAX_HEADER_BYTES)
            if not ok:
                raise _Reject(f"member {name!r} holds {got_dtype} of shape {got_shape}, "
                              f"expected {np.dtype(dtype)} {wanted}")
            nbytes = math.prod(got_shape) * got_dtype.itemsize
            if start + nbytes != info.file_size:
                raise _Reject(f"member {name!r} declares {info.file_size} bytes, its "
                              f".npy header {start + nbytes}")
            data = np.empty(nbytes, np.uint8)
            done = len(head) - start
            data[:done] = np.frombuffer(head[start:], np.uint8)
            while done < nbytes:
                chunk = fh.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    raise _Reject(f"member {name!r} ends after {done} of {nbytes} bytes")
                data[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                done += len(chunk)
            if fh.read(1):  # reading to the end also makes zipfile check the CRC
                raise _Reject(f"member {name!r} holds more bytes than it declares")
    except _Reject:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many types on bad bytes
        raise _Reject(f"member {name!r} is unreadable ({_why(exc)})") from exc
    array = data.view(dtype)
    return array.reshape(got_shape[::-1]).T if fortran else array.reshape(got_shape)


def _load(path):
    zf, file_size = _open_archive(path)
    with zf:
        members = _members(zf, file_size)
        info = members.pop(_HEADER + ".npy", None)
        if info is None:
            raise _Reject(f"not an afmfast model file (no {_HEADER} member; members "
                          f"{reprlib.repr(sorted(members))})")
        header = _parse_json(_read_member(zf, info, np.uint8, None).tobytes(),
                             "the model header")
        model, fmap = _model_from_header(header)
        n_features = model.n_features_in_
        fields = _fields_member(zf, members, header.get("field_names"), n_features)
        shapes = model._array_shapes(n_features)
        expected = {name + ".npy": (name, shape) for name, shape in shapes.items()}
        if set(members) != set(expected):
            raise _Reject(f"wrong members for a {type(model).__name__} (missing "
                          f"{sorted(set(expected) - set(members))}, extra "
                          f"{reprlib.repr(sorted(set(members) - set(expected)))})")
        for member, (name, shape) in expected.items():
            extra = members[member].file_size - 4 * math.prod(shape)
            if not 0 < extra <= _NPY_HEADER_MAX:
                raise _Reject(f"member {member!r} declares {members[member].file_size} "
                              f"bytes, not those of a float32 array of shape {shape}")
        arrays = {}
        for member, (name, shape) in expected.items():
            a = _read_member(zf, members[member], np.float32, shape)
            if not np.all(np.isfinite(a)):
                raise _Reject(f"array {name!r} holds NaN or infinite values")
            arrays[name] = a
    if fmap is not None:
        model.feature_map_ = fmap
    if fields is not None:
        model.fields_, model.field_names_ = fields
    model._set_arrays(arrays)
    return model


def _fields_member(zf, members, names, n_features):
    """(fields, names) of a model with field names (its ``fields`` member popped from
    ``members``), or None."""
    if names is None:
        return None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _bad("field_names", names, "null or a list of strings")
    info = members.pop("fields.npy", None)
    if info is None:
        raise _Reject("the header has field_names but the file no fields member")
    fields = _read_member(zf, info, np.dtype("<i4"), (n_features,))
    try:
        _check_fields(fields, names, n_features)
    except ValueError as exc:
        raise _Reject(f"member 'fields.npy': {exc}") from None
    return fields, names


# ----- the JSON header ---------------------------------------------------------------


def _json_depth(raw):
    """How deep the JSON text ``raw`` (bytes) nests, without parsing it: brackets
    outside strings, counted in chunks of bounded memory."""
    codes = np.frombuffer(_JSON_STRING.sub(b"", raw), np.uint8)
    depth = deepest = 0
    for lo in range(0, len(codes), _CHUNK):
        run = np.cumsum(_BRACKET_STEP[codes[lo:lo + _CHUNK]], dtype=np.int64) + depth
        deepest, depth = max(deepest, int(run.max())), int(run[-1])
    return deepest


def _parse_json(raw, what):
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise _Reject(f"{what} is JSON nested {depth} deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, too many digits
        raise _Reject(f"{what} is not valid UTF-8 JSON ({_why(exc)})") from exc


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(field, value, expected):
    return _Reject(f"corrupt model header: {field} is {reprlib.repr(value)}, expected "
                   f"{expected}")


def _model_from_header(header):
    """A model of the header's class and parameters with ``n_features_in_``,
    ``best_epoch_``, ``history_`` and the extras set, and its FeatureMap or None."""
    if not isinstance(header, dict):
        raise _Reject(f"corrupt model header (a JSON {type(header).__name__}, not an "
                      f"object)")
    if header.get("format") != FORMAT:
        raise _Reject(f"not an afmfast model file (format "
                      f"{reprlib.repr(header.get('format'))})")
    version = header.get("version")
    if not (_is_int(version) and version == VERSION):
        raise _Reject(f"model file version {reprlib.repr(version)} is not supported "
                      f"(this afmfast reads version {VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in header]
    unknown = sorted(set(header) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise _Reject(f"corrupt model header (missing keys {missing}, unknown keys "
                      f"{reprlib.repr(unknown)})")
    cls = _MODEL_CLASSES.get(header["class"]) if isinstance(header["class"], str) else None
    if cls is None:
        raise _Reject(f"unknown model class {reprlib.repr(header['class'])} (known: "
                      f"{', '.join(sorted(_MODEL_CLASSES))})")
    model = _model_with_params(cls, header["params"])
    n_features = header["n_features"]
    if not (_is_int(n_features) and n_features >= 0):
        raise _bad("n_features", n_features, "an integer >= 0")
    history = header["history"]
    if not (isinstance(history, list) and all(
            isinstance(r, dict) and all(v is None or _is_number(v) for v in r.values())
            for r in history)):
        raise _bad("history", history, "a list of records of numbers or nulls")
    best_epoch = header["best_epoch"]
    if not (_is_int(best_epoch) and 0 <= best_epoch <= len(history)):
        raise _bad("best_epoch", best_epoch, f"an integer in [0, {len(history)}]")
    extras = header.get("extras")
    extras = {} if extras is None else extras
    if not isinstance(extras, dict):
        raise _bad("extras", extras, "an object")
    if cls._is_classifier:
        _check_classes(extras.get("classes"))
    try:
        model._load_header_extras(extras)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise _Reject(f"corrupt model header ({_why(exc)})") from exc
    model.n_features_in_ = n_features
    model.best_epoch_ = best_epoch
    model.history_ = history
    fmap = header.get("feature_map")
    return model, (None if fmap is None else _feature_map(fmap, n_features))


def _model_with_params(cls, params):
    """``cls(**params)`` once every value passed the estimator's own validation."""
    if not isinstance(params, dict):
        raise _bad("params", params, "an object")
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise _Reject(f"corrupt model header: unknown parameters {reprlib.repr(unknown)} "
                      f"for {cls.__name__}")
    params = dict(params)
    for name, value in params.items():
        if name == "keep" and isinstance(value, list):
            value = params[name] = tuple(value)  # JSON has no tuples
            if not all(isinstance(v, _JSON_SCALARS) for v in value):
                raise _bad("params.keep", list(value), "numbers")
        elif not isinstance(value, _JSON_SCALARS):
            raise _bad(f"params.{name}", value, "a JSON scalar")
    model = cls(**params)
    try:
        model._validate()
        if model.n_threads is not None:
            model._threads = resolve_threads(model.n_threads)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise _Reject(f"corrupt model header: bad parameters ({_why(exc)})") from exc
    return model


def _check_classes(classes):
    """A classifier's ``classes``: two distinct JSON scalars (numbers, strings, bools)."""
    ok = isinstance(classes, list) and len(classes) == 2 and all(
        isinstance(c, (str, int)) or (isinstance(c, float) and math.isfinite(c))
        for c in classes) and classes[0] != classes[1]
    if not ok:
        raise _bad("extras.classes", classes, "two distinct numbers, strings or booleans")


def _feature_map(text, n_features):
    if not isinstance(text, str):
        raise _bad("feature_map", text, "null or a JSON string")
    data = _parse_json(text.encode("utf-8", "surrogatepass"), "the feature map")
    columns = data.get("columns") if isinstance(data, dict) else None
    categories = data.get("categories") if isinstance(data, dict) else None
    ok = (isinstance(columns, list) and all(isinstance(c, str) for c in columns)
          and isinstance(categories, list) and len(categories) == len(columns)
          and all(c is None or (isinstance(c, list) and all(isinstance(s, str) for s in c))
                  for c in categories))
    if not ok:
        raise _bad("feature_map", data, "columns (strings) and categories (null or "
                                        "lists of strings), one per column")
    fmap = FeatureMap(columns, categories)
    if fmap.n_features != n_features:
        raise _Reject(f"corrupt model header: the feature map has {fmap.n_features} "
                      f"features, the model {n_features}")
    return fmap
