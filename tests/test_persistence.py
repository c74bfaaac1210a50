"""Saving and loading models: round trip, corrupt and foreign files, atomic saves."""
import json
import zipfile

import numpy as np
import pytest

import afmfast
from afmfast.demo import make_demo_data


@pytest.fixture(scope="module")
def fitted():
    data = make_demo_data(n_rows=2000, seed=5)
    model = afmfast.FM(n_factors=4, n_epochs=2, batch_size=256, verbose=0)
    model.fit(data.train, validation=data.valid)
    return model, data


def _rewrite(src, dst, change):
    """Copy an .npz archive, letting ``change(dict of arrays)`` edit it."""
    with np.load(src) as archive:
        arrays = {k: archive[k] for k in archive.files}
    change(arrays)
    np.savez(dst, **arrays)


def _header(arrays):
    return json.loads(arrays["__header__"].tobytes())


def _set_header(arrays, header):
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)


def test_round_trip_predicts_identically(fitted, tmp_path):
    model, data = fitted
    path = tmp_path / "fm.npz"
    model.save(path)
    loaded = afmfast.load(path)
    assert type(loaded) is afmfast.FM
    assert loaded.get_params() == model.get_params()
    assert loaded.n_features_in_ == model.n_features_in_
    assert loaded.best_epoch_ == model.best_epoch_
    assert loaded.history_ == model.history_
    np.testing.assert_array_equal(loaded.predict(data.valid), model.predict(data.valid))
    np.testing.assert_array_equal(loaded.V_, model.V_)


def test_parameter_tables_start_on_cache_lines(fitted, tmp_path):
    """kernel_api.aligned_empty: fitted and loaded models keep V and w (and fitting keeps
    the optimiser state) 64-byte aligned, so that no row of V shares a cache line with
    its neighbour's at k = 16."""
    model, _ = fitted
    arrays = [model._params.V, model._params.w, *model._state]
    assert all(a.ctypes.data % 64 == 0 for a in arrays)
    path = tmp_path / "fm.npz"
    model.save(path)
    loaded = afmfast.load(path)
    assert loaded._params.V.ctypes.data % 64 == 0 and loaded._params.w.ctypes.data % 64 == 0


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        afmfast.load(tmp_path / "nope.npz")


def test_truncated_file(fitted, tmp_path):
    path = tmp_path / "fm.npz"
    fitted[0].save(path)
    raw = path.read_bytes()
    for cut in (0, 10, len(raw) // 2, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.npz"):
            afmfast.load(bad)


def test_bit_flips_never_load_silently_wrong(fitted, tmp_path):
    model, data = fitted
    path = tmp_path / "fm.npz"
    model.save(path)
    raw = bytearray(path.read_bytes())
    expected = model.predict(data.valid)
    rng = np.random.default_rng(0)
    for trial in range(40):
        flipped = bytearray(raw)
        pos = int(rng.integers(len(raw)))
        flipped[pos] ^= 1 << int(rng.integers(8))
        bad = tmp_path / "flip.npz"
        bad.write_bytes(bytes(flipped))
        try:
            loaded = afmfast.load(bad)
        except ValueError as exc:
            assert "flip.npz" in str(exc)
            continue
        # a flip in zip metadata that does not touch the data may load: then it is intact
        np.testing.assert_array_equal(loaded.predict(data.valid), expected)


def test_foreign_and_tampered_archives(fitted, tmp_path):
    model, _ = fitted
    good = tmp_path / "fm.npz"
    model.save(good)
    cases = {
        "foreign": lambda a: a.clear() or a.update(x=np.arange(3)),
        "no_header": lambda a: a.pop("__header__"),
        "bad_json": lambda a: a.update(__header__=np.frombuffer(b"{nope", dtype=np.uint8)),
        "version": lambda a: _set_header(a, {**_header(a), "version": 99}),
        "format": lambda a: _set_header(a, {**_header(a), "format": "other"}),
        "class": lambda a: _set_header(a, {**_header(a), "class": "Evil"}),
        "bad_param": lambda a: _set_header(a, {**_header(a), "params": {
            **_header(a)["params"], "n_factors": -1}}),
        "unknown_param": lambda a: _set_header(a, {**_header(a), "params": {
            **_header(a)["params"], "zzz": 1}}),
        "missing_array": lambda a: a.pop("w"),
        "extra_array": lambda a: a.update(extra=np.zeros(2, np.float32)),
        "wrong_shape": lambda a: a.update(V=a["V"][:-1]),
        "wrong_dtype": lambda a: a.update(V=a["V"].astype(np.float64)),
        "nan": lambda a: a.update(w=np.full_like(a["w"], np.nan)),
    }
    for name, change in cases.items():
        bad = tmp_path / f"{name}.npz"
        _rewrite(good, bad, change)
        with pytest.raises(ValueError, match=f"{name}.npz"):
            afmfast.load(bad)


def test_pickled_object_arrays_are_refused(fitted, tmp_path):
    good = tmp_path / "fm.npz"
    fitted[0].save(good)
    bad = tmp_path / "pickle.npz"
    _rewrite(good, bad, lambda a: a.update(w=np.array([object()], dtype=object)))
    with pytest.raises(ValueError, match="pickle.npz"):
        afmfast.load(bad)


def test_not_a_zip(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        afmfast.load(bad)


def test_failed_save_leaves_the_old_file_intact(fitted, tmp_path, monkeypatch):
    model, data = fitted
    path = tmp_path / "fm.npz"
    model.save(path)
    before = path.read_bytes()

    def disk_full(fh, **arrays):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fm.npz"]  # no temporary left behind
    afmfast.load(path)


def test_save_into_missing_directory_raises(fitted, tmp_path):
    with pytest.raises(OSError):
        fitted[0].save(tmp_path / "no" / "such" / "dir.npz")


def test_saved_file_is_a_plain_npz(fitted, tmp_path):
    path = tmp_path / "fm.npz"
    fitted[0].save(path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(
            ["__header__.npy", "V.npy", "w.npy", "dense.npy", "bn_stats.npy"])


def test_permission_denied_on_rename_leaves_the_old_file_intact(fitted, tmp_path,
                                                                monkeypatch):
    import os

    model, _ = fitted
    path = tmp_path / "fm.npz"
    model.save(path)
    before = path.read_bytes()

    def denied(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fm.npz"]
