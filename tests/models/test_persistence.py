"""Saving and loading models: round trip, corrupt and foreign files, atomic saves, file
modes, header parameters checked at load (test_fuzz_model_files.py fuzzes load)."""
import contextlib
import json
import os
import stat
import zipfile

import numpy as np
import pytest

import afmfast
from afmfast.demo import make_demo_data
from afmfast.models.training import Trainer


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


@contextlib.contextmanager
def _save_fails_keeping_the_old_file(model, tmp_path):
    """``model`` saved as tmp_path/fm.npz, whose path the block gets to save over and
    fail: afterwards the file has the first save's bytes and is alone in tmp_path."""
    path = tmp_path / "fm.npz"
    model.save(path)
    before = path.read_bytes()
    yield path
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fm.npz"]  # no temporary left behind


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
    """kernels.api.aligned_empty: fitted and loaded models keep V and w (and fitting keeps
    the optimiser state) 64-byte aligned, so that no row of V shares a cache line with
    its neighbour's at k = 16."""
    model, data = fitted
    assert model._params.V.ctypes.data % 64 == 0 and model._params.w.ctypes.data % 64 == 0
    trainer = Trainer(afmfast.FM(n_factors=4, batch_size=256), data.train)
    assert all(a.ctypes.data % 64 == 0
               for a in [trainer.params.V, trainer.params.w, *trainer.state])
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
    model, _ = fitted

    def disk_full(fh, **arrays):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with _save_fails_keeping_the_old_file(model, tmp_path) as path:
        monkeypatch.setattr(np, "savez", disk_full)
        with pytest.raises(OSError, match="No space"):
            model.save(path)
        monkeypatch.undo()
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


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("proc", [True, False], ids=["proc", "os.umask"])
def test_saved_file_mode_honours_the_umask(fitted, tmp_path, monkeypatch, mask, proc):
    """A saved model gets 0o666 & ~umask, as a file opened for writing would, not the
    0o600 of the temporary file; the umask is read from /proc or, without it, set and
    restored."""
    from afmfast.models import persistence

    if not proc:
        monkeypatch.setattr(persistence, "_PROC_STATUS", str(tmp_path / "no-proc"))
    path = tmp_path / "fm.npz"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    old = os.umask(mask)
    try:
        fitted[0].save(path)
        assert os.umask(mask) == mask  # the umask is as it was
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    afmfast.load(path)


def _saved_with_n_threads(model, tmp_path, n_threads):
    good, bad = tmp_path / "fm.npz", tmp_path / "threads.npz"
    model.save(good)
    _rewrite(good, bad, lambda a: _set_header(a, {**_header(a), "params": {
        **_header(a)["params"], "n_threads": n_threads}}))
    return bad


def test_huge_n_threads_in_a_file_is_clamped_with_a_warning(fitted, tmp_path):
    model, data = fitted
    bad = _saved_with_n_threads(model, tmp_path, 100000)
    with pytest.warns(RuntimeWarning, match="n_threads=100000"):
        loaded = afmfast.load(bad)
    assert loaded.n_threads == 100000  # get_params keeps what the file says
    np.testing.assert_array_equal(loaded.predict(data.valid), model.predict(data.valid))


@pytest.mark.parametrize("n_threads", [0, -2, 2.0, "4", True, [2]])
def test_bad_n_threads_in_a_file_is_refused_at_load(fitted, tmp_path, n_threads):
    bad = _saved_with_n_threads(fitted[0], tmp_path, n_threads)
    with pytest.raises(ValueError, match=r"threads\.npz: .*n_threads"):
        afmfast.load(bad)


def test_save_refuses_a_header_load_would_refuse(fitted, tmp_path, monkeypatch):
    from afmfast.models import persistence

    model, _ = fitted
    with _save_fails_keeping_the_old_file(model, tmp_path) as path:
        monkeypatch.setattr(persistence, "MAX_HEADER_BYTES", 100)
        with pytest.raises(ValueError, match="fm.npz: .*more than afmfast.load reads"):
            model.save(path)


def test_deflated_and_big_endian_files(fitted, tmp_path):
    """Any archive numpy writes with the right members loads: deflated members and
    Fortran-ordered arrays; big-endian floats are refused (afmfast writes native)."""
    model, data = fitted
    good = tmp_path / "fm.npz"
    model.save(good)
    with np.load(good) as archive:
        arrays = {k: archive[k] for k in archive.files}
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    np.savez(tmp_path / "fortran.npz", **{**arrays, "V": np.asfortranarray(arrays["V"])})
    for name in ("deflated.npz", "fortran.npz"):
        np.testing.assert_array_equal(afmfast.load(tmp_path / name).predict(data.valid),
                                      model.predict(data.valid))
    np.savez(tmp_path / "big.npz", **{**arrays, "w": arrays["w"].astype(">f4")})
    with pytest.raises(ValueError, match="big.npz: member 'w.npy' holds >f4"):
        afmfast.load(tmp_path / "big.npz")
