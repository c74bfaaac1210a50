"""Saving and loading models as one ``.npz`` file.

The archive holds the model's float32 arrays and ``__header__``, a uint8 array of UTF-8
JSON: ``{"format": "afmfast-model", "version": 1, "class": ..., "params": ...,
"n_features": ..., "best_epoch": ..., "history": [...], "feature_map": JSON or null}``. Nothing is pickled: files are
read with ``allow_pickle=False`` and every array's name, dtype and shape is checked, so a
truncated, tampered or foreign file raises ``ValueError`` naming the file. Saving writes
a temporary file beside the target and renames it, so a failed save leaves an existing
file untouched.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

from .encoding import FeatureMap

FORMAT = "afmfast-model"
VERSION = 1
_HEADER = "__header__"


def _model_classes():
    from .afm import AFM, AFMClassifier
    from .fm import FM, FMClassifier

    return {cls._kind: cls for cls in (FM, AFM, FMClassifier, AFMClassifier)}


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
    }
    arrays = dict(model._arrays())
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".afmfast-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path):
    """Load a model saved with ``model.save(path)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    anything that is not an intact afmfast model file.

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
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("not an .npz archive")
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable afmfast model file ({exc})") from exc
    header_bytes = arrays.pop(_HEADER, None)
    if header_bytes is None or header_bytes.dtype != np.uint8 or header_bytes.ndim != 1:
        raise ValueError(f"{path}: not an afmfast model file (no header)")
    try:
        header = json.loads(header_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt model header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not an afmfast model file (format {header.get('format')!r})"
                         if isinstance(header, dict) else f"{path}: corrupt model header")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: model file version {header.get('version')!r} is not "
                         f"supported (this afmfast reads version {VERSION})")
    classes = _model_classes()
    cls = classes.get(header.get("class"))
    if cls is None:
        raise ValueError(f"{path}: unknown model class {header.get('class')!r}")
    try:
        params = header["params"]
        if isinstance(params, dict) and isinstance(params.get("keep"), list):
            params["keep"] = tuple(params["keep"])  # JSON has no tuples
        model = cls(**params)
        model._validate()
        n_features = header["n_features"]
        if not isinstance(n_features, int) or n_features < 0:
            raise ValueError(f"n_features {n_features!r} is not a count")
        expected = model._array_shapes(n_features)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt model header ({exc})") from exc
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        raise ValueError(f"{path}: wrong arrays in model file (missing {missing}, extra {extra})")
    for name, shape in expected.items():
        a = arrays[name]
        if a.dtype != np.float32 or a.shape != shape:
            raise ValueError(f"{path}: array {name!r} has dtype {a.dtype} and shape {a.shape}, "
                             f"expected float32 {shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: array {name!r} holds NaN or infinite values")
        arrays[name] = np.ascontiguousarray(a)
    model.n_features_in_ = n_features
    model.best_epoch_ = int(header.get("best_epoch", 0))
    model.history_ = list(header.get("history", []))
    try:
        model._load_header_extras(header.get("extras") or {})
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: corrupt model header ({exc})") from exc
    if header.get("feature_map") is not None:
        try:
            fmap = FeatureMap.from_json(header["feature_map"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: corrupt feature map ({exc})") from exc
        if fmap.n_features != n_features:
            raise ValueError(f"{path}: the feature map has {fmap.n_features} features, the "
                             f"model {n_features}")
        model.feature_map_ = fmap
    model._set_arrays(arrays)
    return model
