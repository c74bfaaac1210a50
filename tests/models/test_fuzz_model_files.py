"""Corrupt model files: ``afmfast.load`` either returns a model that predicts or raises
``ValueError`` (``FileNotFoundError``) whose message starts with the path; never another
exception, never a hang.

(a) Hand-made corruptions, one or more per way a file used to break that promise: a
``.npy`` file, wrongly typed or out-of-range header fields, non-finite numbers, deeply
nested JSON, a broken ``.npy`` header, an unknown compression method, members declaring
huge arrays, a text file. (b) Seeded random mutations of small saved FM, AFM and
FMClassifier files (one stored with a feature map, one deflated): bytes flipped, inserted
and deleted in the raw file; header fields replaced by values of random types, deleted,
added, or nested deeply, then re-zipped.
"""
import contextlib
import io
import json
import signal
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import afmfast
from afmfast.models import persistence
from afmfast.demo import make_demo_data
from afmfast.data.encoding import FeatureMap


class _Hang(BaseException):
    """Not an Exception, so that no ``except Exception`` in load can swallow it."""


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging (POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _Hang(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of small saved models, and a few rows to predict."""
    d = tmp_path_factory.mktemp("models")
    data = make_demo_data(n_rows=300, seed=1)
    clicks = (data.train.y > np.median(data.train.y)).astype(int)
    small = dict(n_factors=2, n_epochs=1, batch_size=64, n_threads=1, verbose=0)
    models = {
        "fm": afmfast.FM(**small).fit(data.train, validation=data.valid),
        "afm": afmfast.AFM(attention_size=2, **small).fit(data.train),
        "clf": afmfast.FMClassifier(**small).fit(data.train, clicks),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = d / f"{name}.npz"
        model.save(paths[name])
    arrays = _arrays(paths["fm"])
    paths["fm_deflated"] = d / "fm_deflated.npz"
    np.savez_compressed(paths["fm_deflated"], **arrays)
    n = models["fm"].n_features_in_
    fmap = FeatureMap([f"c{i}" for i in range(n)], [None] * n)
    paths["fm_fmap"] = d / "fm_fmap.npz"
    _write(paths["fm_fmap"], arrays,
           json.dumps({**_header(arrays), "feature_map": fmap.to_json()}).encode())
    for path in paths.values():
        afmfast.load(path)  # every starting point is intact
    return paths, data.valid[:5]


def _arrays(path):
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files}


def _header(arrays):
    return json.loads(arrays["__header__"].tobytes())


def _write(path, arrays, header_text):
    arrays = {**arrays, "__header__": np.frombuffer(header_text, dtype=np.uint8)}
    np.savez(path, **arrays)


def _npy_head(text):
    """A .npy 1.0 header around the dict ``text`` (bytes), padded as numpy pads it."""
    text = text + b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _float32_head(shape):
    return _npy_head(repr({"descr": "<f4", "fortran_order": False,
                           "shape": tuple(shape)}).encode())


def _npy(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array))
    return buf.getvalue()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)


def _central_entries(raw):
    """(offset, name) of each central directory entry of the zip bytes ``raw``."""
    end = raw.rfind(b"PK\x05\x06")
    count, _, offset = struct.unpack_from("<HII", raw, end + 10)
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, offset + 28)
        yield offset, raw[offset + 46:offset + 46 + name_len].decode()
        offset += 46 + name_len + extra_len + comment_len


def _patch_central(raw, member, field_offset, fmt, value):
    raw = bytearray(raw)
    for offset, name in _central_entries(bytes(raw)):
        if name == member:
            struct.pack_into(fmt, raw, offset + field_offset, value)
    return bytes(raw)


def assert_rejected(path):
    with _deadline(30), pytest.raises(ValueError) as info:
        afmfast.load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert "\n" not in text and "allow_pickle" not in text, text
    return text


# ----- (a) hand-made corruptions ------------------------------------------------------

def _with_header(**changes):
    def build(good, bad):
        arrays = _arrays(good)
        _write(bad, arrays, json.dumps({**_header(arrays), **changes}).encode())
    return build


def _with_params(**changes):
    def build(good, bad):
        arrays = _arrays(good)
        header = _header(arrays)
        header["params"].update(changes)
        _write(bad, arrays, json.dumps(header).encode())
    return build


def _deep_json(good, bad):
    arrays = _arrays(good)
    text = json.dumps({**_header(arrays), "extras": "@@"})
    _write(bad, arrays, text.replace('"@@"', "[" * 100_000 + "]" * 100_000).encode())


def _npy_file(good, bad):
    np.save(bad, np.arange(3.0))


def _text_file(good, bad):
    bad.write_text("user,item,rating\n1,2,4.5\n")


def _broken_npy_header(good, bad):
    # an unclosed parenthesis: numpy's Python 2 header filter runs the tokenizer on it
    members = {f"{k}.npy": _npy(v) for k, v in _arrays(good).items()}
    members["w.npy"] = _npy_head(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,")
    _zip(bad, members)


def _compression_99(good, bad):
    bad.write_bytes(_patch_central(good.read_bytes(), "w.npy", 10, "<H", 99))


def _huge_member(good, bad):
    # a 2**40-element float32 w in a file of a few KB
    members = {f"{k}.npy": _npy(v) for k, v in _arrays(good).items()}
    members["w.npy"] = _float32_head((2**40,)) + b"\0" * 4096
    _zip(bad, members, zipfile.ZIP_DEFLATED)


def _huge_consistent_member(good, bad):
    # header, .npy headers and the zip directory all agree on 4 GiB of V and w, from a
    # few KB of deflated bytes: only deflate's expansion limit shows the lie
    arrays = _arrays(good)
    header = _header(arrays)
    n = 2**29
    header.update(n_features=n, params={**header["params"], "n_factors": 1})
    members = {"__header__.npy": _npy(np.frombuffer(json.dumps(header).encode(), np.uint8)),
               "dense.npy": _npy(np.zeros(3, np.float32)),
               "bn_stats.npy": _npy(np.zeros((2, 1), np.float32))}
    sizes = {}
    for name, shape in (("V.npy", (n, 1)), ("w.npy", (n,))):
        head = _float32_head(shape)
        members[name] = head + b"\0" * 1024
        sizes[name] = len(head) + 4 * n
    _zip(bad, members, zipfile.ZIP_DEFLATED)
    raw = bad.read_bytes()
    for name, size in sizes.items():
        raw = _patch_central(raw, name, 24, "<I", size)
    bad.write_bytes(raw)


CORRUPTIONS = {
    "npy_file": ("fm", _npy_file),
    "text_file": ("fm", _text_file),
    "best_epoch_null": ("fm", _with_header(best_epoch=None)),
    "best_epoch_dict": ("fm", _with_header(best_epoch={})),
    "best_epoch_inf": ("fm", _with_header(best_epoch=float("inf"))),
    "best_epoch_nan": ("fm", _with_header(best_epoch=float("nan"))),
    "best_epoch_str": ("fm", _with_header(best_epoch="x")),
    "best_epoch_after_history": ("fm", _with_header(best_epoch=2)),
    "history_int": ("fm", _with_header(history=3)),
    "history_record_str": ("fm", _with_header(history=[{"epoch": "one"}])),
    "class_list": ("fm", _with_header(**{"class": ["FM"]})),
    "version_true": ("fm", _with_header(version=True)),
    "n_features_bool": ("fm", _with_header(n_features=True)),
    "unknown_key": ("fm", _with_header(zzz=1)),
    "feature_map_not_json": ("fm", _with_header(feature_map="{nope")),
    "feature_map_wrong_types": ("fm", _with_header(feature_map='{"columns": [1], '
                                                               '"categories": [null]}')),
    "extras_list": ("fm", _with_header(extras=[])),
    "param_list": ("fm", _with_params(optimizer=["adagrad"])),
    "param_huge_int": ("fm", _with_params(learning_rate=10**400)),
    "n_threads_float": ("fm", _with_params(n_threads=2.0)),
    "n_threads_zero": ("fm", _with_params(n_threads=0)),
    "afm_keep_dict": ("afm", _with_params(keep=[{}, 1.0])),
    "classes_equal": ("clf", _with_header(extras={"classes": [1, 1]})),
    "classes_missing": ("clf", _with_header(extras={})),
    "deep_json": ("fm", _deep_json),
    "broken_npy_header": ("fm", _broken_npy_header),
    "compression_99": ("fm", _compression_99),
    "huge_member": ("fm", _huge_member),
    "huge_consistent_member": ("fm", _huge_consistent_member),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_hand_made_corruptions_raise_value_error_naming_the_file(files, tmp_path, name):
    paths, _ = files
    source, build = CORRUPTIONS[name]
    bad = tmp_path / (f"{name}.npy" if name == "npy_file" else f"{name}.npz")
    build(paths[source], bad)
    tracemalloc.start()
    try:
        assert_rejected(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # nothing the file declares was allocated


def test_messages_say_what_is_wrong(files, tmp_path):
    paths, _ = files
    cases = {"npy_file": "NumPy array (.npy)", "text_file": "no zip archive",
             "compression_99": "compression method 99", "deep_json": "nested",
             "huge_consistent_member": "compressed bytes", "best_epoch_inf": "best_epoch",
             "n_threads_float": "n_threads", "class_list": "unknown model class"}
    for name, words in cases.items():
        source, build = CORRUPTIONS[name]
        bad = tmp_path / (f"{name}.npy" if name == "npy_file" else f"{name}.npz")
        build(paths[source], bad)
        assert words in assert_rejected(bad)


# ----- (b) random mutations -----------------------------------------------------------

def _outcome(path, rows):
    """Load ``path``: True if it loaded (and then its predict must run), False if it was
    rejected as the promise allows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clamped n_threads warn
        try:
            model = afmfast.load(path)
        except (ValueError, FileNotFoundError) as exc:
            assert str(exc).startswith(f"{path}: "), repr(exc)
            return False
        scores = (model.decision_function(rows) if hasattr(model, "classes_")
                  else model.predict(rows))
        assert np.isfinite(scores).all()
        model.predict(rows)
    return True


def _mutate_bytes(rng, raw):
    raw = bytearray(raw)
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(len(raw) + 1))
        op = rng.integers(3)
        if op == 0 and pos < len(raw):
            raw[pos] ^= 1 << int(rng.integers(8))
        elif op == 1:
            raw[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
        else:
            del raw[pos:pos + int(rng.integers(1, 9))]
    return bytes(raw)


@pytest.mark.parametrize("source", ["fm", "afm", "clf", "fm_deflated"])
def test_random_byte_mutations(files, tmp_path, source):
    paths, rows = files
    raw = paths[source].read_bytes()
    rng = np.random.default_rng(sum(map(ord, source)))
    bad = tmp_path / f"bytes_{source}.npz"
    with _deadline(60):
        for _ in range(150):
            bad.write_bytes(_mutate_bytes(rng, raw))
            _outcome(bad, rows)


DEEP, DIGITS = "@@deep@@", "@@digits@@"


def _random_value(rng):
    pool = [None, True, False, 0, 1, -1, 3, 2**63, 10**400, 1e308, -0.5, float("nan"),
            float("inf"), float("-inf"), "", "x", "FM", "adagrad", [], {}, [1.0, 1.0],
            [None], {"a": 1}, {"classes": [0, 1]}, [{"epoch": 1}], DEEP, DIGITS]
    return pool[int(rng.integers(len(pool)))]


def _paths(node, prefix=()):
    """Every path (tuple of keys and indices) into a JSON tree, the root's () first."""
    yield prefix
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def _mutate_tree(rng, tree):
    """``tree`` with one random change: a value replaced, an entry deleted or added."""
    paths = list(_paths(tree))
    path = paths[int(rng.integers(len(paths)))]
    if not path:
        return _random_value(rng) if rng.random() < 0.2 else tree
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key, op = path[-1], rng.integers(4)
    if op == 0:
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent["zz"] = _random_value(rng)
    else:
        parent[key] = _random_value(rng)
    return tree


def _header_text(tree, rng):
    text = json.dumps(tree)
    depth = int(rng.choice([persistence.MAX_JSON_DEPTH - 3, 40, 5000, 200_000]))
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return text.replace(json.dumps(DIGITS), "9" * 5000).encode()


@pytest.mark.parametrize("source", ["fm", "afm", "clf", "fm_fmap"])
def test_random_header_mutations(files, tmp_path, source):
    paths, rows = files
    arrays = _arrays(paths[source])
    rng = np.random.default_rng(1000 + sum(map(ord, source)))
    bad = tmp_path / f"header_{source}.npz"
    loaded = 0
    with _deadline(60):
        for _ in range(150):
            tree = _header(arrays)
            if tree["feature_map"] is not None and rng.random() < 0.5:
                # the feature map is JSON inside a JSON string: mutate it inside
                tree["feature_map"] = json.dumps(
                    _mutate_tree(rng, json.loads(tree["feature_map"])))
            for _ in range(int(rng.integers(0, 3))):
                tree = _mutate_tree(rng, tree)
            _write(bad, arrays, _header_text(tree, rng))
            loaded += _outcome(bad, rows)
    assert 0 < loaded < 150  # the loop reaches both outcomes

