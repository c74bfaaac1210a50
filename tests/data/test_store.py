"""Binary stores (``afmfast.data.store``): ``convert`` gives what ``load_libfm`` gives,
whatever the chunking, input compression or parser; stores are written atomically;
``open_store`` memory-maps them and refuses a corrupt one with an error naming the file;
the estimators train from a store as from the same rows in memory."""
import gzip
import json
import os
import shutil
import threading

import numpy as np
import pytest

import afmfast
from afmfast.data import libfm, libfm_numba, store
from afmfast.data.store import convert, open_store, write_store
from afmfast.demo import make_demo_data

PARSERS = {"numba": libfm_numba}
try:
    from afmfast import _reader as _compiled_reader
    PARSERS["compiled"] = _compiled_reader
except ImportError:  # installed without a C compiler
    pass

TEXT = (b"\xef\xbb\xbf1 0:1 3:0.5\r\n-1 2:1\n0.5\n2.5 7:1 1:2 5:1\n"
        + b"".join(b"%d %d:1 %d:1\n" % (i % 3, i % 11, 11 + i % 5) for i in range(300)))


@pytest.fixture(params=sorted(PARSERS))
def parser(request, monkeypatch):
    """Every conversion test runs with each parser (the compiled one and its Numba twin)."""
    chosen = PARSERS[request.param]
    monkeypatch.setattr(store, "_parser", lambda: chosen)
    monkeypatch.setattr(libfm, "_parser", lambda: chosen)
    return chosen


def same_rows(a, b):
    for name in ("indptr", "indices", "values", "y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.n_features == b.n_features


@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
@pytest.mark.parametrize("compressed", [False, True])
def test_convert_gives_what_load_libfm_gives(tmp_path, parser, monkeypatch, chunk_bytes,
                                             compressed):
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", chunk_bytes)
    plain = tmp_path / "d.libfm"
    plain.write_bytes(TEXT)
    source = plain
    if compressed:
        source = tmp_path / "d.libfm.gz"
        source.write_bytes(gzip.compress(TEXT))
    header = convert(source, tmp_path / "d.store")
    data = open_store(tmp_path / "d.store")
    assert (header["n_rows"], header["nnz"]) == (data.n_rows, data.nnz)
    same_rows(data, afmfast.load_libfm(plain))
    assert data.n_features_explicit
    assert (tmp_path / "d.store" / "values.npy").exists()  # 0.5 and 2 are stored


def test_a_slow_writer_never_sees_its_buffers_refilled(tmp_path, parser, monkeypatch):
    # parse fills one set of buffers while the writer thread writes the other: a writer
    # that lags behind must still write each block as it was parsed
    import time
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", 64)
    real_write = store._StoreWriter._write

    def slow_write(self, *args):
        time.sleep(0.005)
        return real_write(self, *args)

    monkeypatch.setattr(store._StoreWriter, "_write", slow_write)
    src = tmp_path / "d.libfm"
    src.write_bytes(TEXT)
    convert(src, tmp_path / "s")
    same_rows(open_store(tmp_path / "s"), afmfast.load_libfm(src))


def test_values_after_a_one_hot_start_are_stored_with_their_ones(tmp_path, parser,
                                                                   monkeypatch):
    # the values column is created when the first value other than 1 arrives, with the
    # ones of every nonzero before it
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", 40)
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1 4:1\n" * 30 + b"0 1:2.5\n" + b"1 2:1\n" * 5)
    convert(src, tmp_path / "s")
    same_rows(open_store(tmp_path / "s"), afmfast.load_libfm(src))
    assert json.loads((tmp_path / "s" / "header.json").read_text())["values"] == "stored"


def test_one_hot_stores_no_values_and_inputs_concatenate(tmp_path, parser):
    a, b = tmp_path / "a.libfm", tmp_path / "b.libfm"
    a.write_bytes(b"1 0:1 4:1\n0 1:1\n")
    b.write_bytes(b"1 2:1 3:1")  # no newline at the end
    convert([a, b], tmp_path / "s")
    data = open_store(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == ["header.json", "indices.npy",
                                                  "indptr.npy", "y.npy"]
    assert json.loads((tmp_path / "s" / "header.json").read_text())["values"] == "ones"
    assert data.indptr.tolist() == [0, 2, 3, 5] and data.indices.tolist() == [0, 4, 1, 2, 3]
    assert data.values.tolist() == [1.0] * 5 and data.y.tolist() == [1, 0, 1]
    assert data.n_features == 5


@pytest.mark.parametrize("compressed", [False, True])
def test_errors_name_the_file_and_line_across_chunks(tmp_path, parser, monkeypatch,
                                                     compressed):
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", 32)
    good = tmp_path / "good.libfm"
    good.write_bytes(b"1 0:1\n" * 20)
    bad = tmp_path / "bad.libfm"
    text = b"1 0:1\n" * 40 + b"1 3:x\n" + b"1 0:1\n"
    if compressed:
        bad = tmp_path / "bad.libfm.gz"
        text = gzip.compress(text)
    bad.write_bytes(text)
    with pytest.raises(ValueError, match=rf"{bad.name}: line 41: value is not a number"):
        convert([good, bad], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, bad.name])


def test_n_features_bounds_the_ids(tmp_path, parser):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1\n1 5:1\n")
    with pytest.raises(ValueError, match=r"d.libfm: line 2: feature id >= n_features = 5"):
        convert(src, tmp_path / "s", n_features=5)
    assert convert(src, tmp_path / "s", n_features=9)["n_features"] == 9
    assert open_store(tmp_path / "s").n_features == 9


def test_a_failed_conversion_leaves_the_old_store_and_no_temporary(tmp_path, parser):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1\n")
    convert(src, tmp_path / "s")
    src.write_bytes(b"1 0:1\nnot a row\n")
    with pytest.raises(ValueError, match="line 2"):
        convert(src, tmp_path / "s")
    assert open_store(tmp_path / "s").n_rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm", "s"]
    src.write_bytes(b"1 0:1\n0 1:1\n")
    assert convert(src, tmp_path / "s")["n_rows"] == 2  # a complete one replaces it
    store._wait_for_deletions()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm", "s"]


def test_the_replaced_store_is_deleted_in_the_background(tmp_path, monkeypatch):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1\n")
    convert(src, tmp_path / "s")
    release, real_rmtree = threading.Event(), shutil.rmtree

    def slow_rmtree(path, **kwargs):
        release.wait(10)
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    src.write_bytes(b"1 0:1\n0 1:1\n")
    assert convert(src, tmp_path / "s")["n_rows"] == 2  # returns before the deletion
    assert open_store(tmp_path / "s").n_rows == 2
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.old.")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "store" / "header.json").exists()
    release.set()
    store._wait_for_deletions()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm", "s"]


def test_an_interrupted_conversion_leaves_nothing(tmp_path, parser, monkeypatch):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1\n" * 100)
    monkeypatch.setattr(store, "CONVERT_CHUNK_BYTES", 60)
    real_parse = store._StoreWriter.parse
    calls = []

    def interrupt_on_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_parse(self, *args)

    monkeypatch.setattr(store._StoreWriter, "parse", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm"]


def test_convert_refuses_bad_arguments(tmp_path):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1\n")
    with pytest.raises(ValueError, match="format must be"):
        convert(src, tmp_path / "s", format="svmlight")
    with pytest.raises(ValueError, match="no input files"):
        convert([], tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="missing.libfm"):
        convert(tmp_path / "missing.libfm", tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="parent directory"):
        convert(src, tmp_path / "no" / "such" / "s")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileExistsError, match="not an afmfast store"):
        convert(src, tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm", "plain"]


@pytest.mark.parametrize("durable", [True, False])
def test_durable_conversion_syncs_and_the_other_does_not(tmp_path, monkeypatch, durable):
    """durable=True syncs every file it writes (columns and header); durable=False syncs
    none, and writes the same store."""
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1 5:2\n-1 3:1\n" * 100)
    synced = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd),
                                                     real_fdatasync(fd)))
    monkeypatch.setattr(store._ColumnFile, "SYNC_BYTES", 64)  # sync as the columns grow
    convert(src, tmp_path / "s", durable=durable)
    n_files = len(list((tmp_path / "s").iterdir()))  # 4 columns and the header
    assert n_files == 5
    assert (len(synced) > n_files) if durable else not synced
    same_rows(open_store(tmp_path / "s"), afmfast.load_libfm(str(src)))
    with pytest.raises(ValueError, match="durable must be True or False"):
        convert(src, tmp_path / "t", durable="no")


def test_a_failed_background_sync_fails_the_conversion(tmp_path, monkeypatch):
    # durable conversions sync the columns on a thread of their own as they grow: an
    # error there (a disk failing) must reach the caller, and leave no store behind
    import errno
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1 5:1\n-1 3:1\n" * 100)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    monkeypatch.setattr(store._ColumnFile, "SYNC_BYTES", 64)
    with pytest.raises(OSError, match="Input/output error"):
        convert(src, tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.libfm"]


# ----- open_store: memory maps, and every kind of corruption named --------------------
@pytest.fixture(params=["plain", "with fields"])
def stored(tmp_path, request):
    data = afmfast.Dataset([0, 2, 3, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0, 0.0])
    if request.param == "with fields":  # a fields.npy column and names in the header
        data = data.with_fields([0, 1, 1, -1], ["a", "b"])
    path = tmp_path / "s"
    write_store(data, path)
    return data, path


def test_open_store_maps_the_columns_read_only(stored):
    data, path = stored
    opened = open_store(path)
    same_rows(opened, data)
    for name in ("indptr", "indices", "values", "y"):
        array = getattr(opened, name)
        assert not array.flags.writeable
        assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap) or \
            isinstance(getattr(array.base, "base", None), np.memmap), name


def _edit_header(path, **changes):
    header = json.loads((path / "header.json").read_text())
    header.update(changes)
    (path / "header.json").write_text(json.dumps(header))


CORRUPTIONS = {
    "truncated column": (lambda p: (p / "indices.npy").write_bytes(
        (p / "indices.npy").read_bytes()[:-4]), "indices.npy"),
    "missing column": (lambda p: (p / "y.npy").unlink(), "y.npy: missing"),
    "not npy": (lambda p: (p / "indptr.npy").write_bytes(b"garbage" * 30), "indptr.npy"),
    "wrong dtype": (lambda p: np.save(p / "y.npy", np.zeros(3, np.float64)), "y.npy"),
    "header row count": (lambda p: _edit_header(p, n_rows=4), "indptr.npy"),
    "header nnz": (lambda p: _edit_header(p, nnz=2), "indices.npy"),
    "header version": (lambda p: _edit_header(p, version=99), "version 99"),
    "header format": (lambda p: _edit_header(p, format="other"), "header.json"),
    "header values": (lambda p: _edit_header(p, values="maybe"), "header.json"),
    "header count type": (lambda p: _edit_header(p, n_features="4"), "n_features"),
    "header json": (lambda p: (p / "header.json").write_bytes(b"{\xff"), "header.json"),
    "missing header": (lambda p: (p / "header.json").unlink(), "header.json: missing"),
    "ids beyond n_features": (lambda p: _edit_header(p, n_features=2), "corrupt store"),
    "falling indptr": (lambda p: np.save(p / "indptr.npy", np.array([0, 2, 1, 3])),
                       "corrupt store: indptr must be non-decreasing"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_store_is_refused_naming_the_file(stored, kind):
    _, path = stored
    corrupt, message = CORRUPTIONS[kind]
    corrupt(path)
    with pytest.raises(ValueError, match=message) as info:
        open_store(path)
    assert str(path) in str(info.value)


def test_random_bytes_in_any_file_never_crash(stored):
    _, path = stored
    rng = np.random.default_rng(0)
    names = sorted(os.listdir(path))
    originals = {n: (path / n).read_bytes() for n in names}
    for trial in range(200):
        name = names[trial % len(names)]
        data = bytearray(originals[name])
        for _ in range(1 + trial % 4):
            data[rng.integers(len(data))] = rng.integers(256)
        (path / name).write_bytes(bytes(data))
        try:
            opened = open_store(path)
        except ValueError as exc:
            assert str(path) in str(exc)
        else:  # a flip that kept the store valid opens to valid rows
            opened.validate()
        (path / name).write_bytes(originals[name])


def test_open_store_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_store(tmp_path / "nowhere")


# ----- training from a store ----------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(afmfast.FM, {}), (afmfast.AFM, {"attention_size": 4}),
                                    (afmfast.FMClassifier, {})])
def test_models_train_from_a_store_as_from_memory(tmp_path, monkeypatch, cls, kw):
    # with the in-memory epoch order (a store's own, windowed order is tested below),
    # a store trains and predicts bit for bit as its rows in memory
    monkeypatch.setattr(afmfast.Dataset, "memory_mapped", property(lambda self: False))
    demo = make_demo_data(n_rows=1200, seed=2)
    middle = np.median(demo.train.y)

    def labelled(data):  # clicks for the classifier
        if cls is not afmfast.FMClassifier:
            return data
        return data.with_labels((data.y > middle).astype(np.float32))

    train, valid = labelled(demo.train), labelled(demo.valid)
    write_store(train, tmp_path / "train")
    write_store(valid, tmp_path / "valid")
    params = dict(n_factors=4, n_epochs=2, batch_size=128, n_threads=1, verbose=0, **kw)
    from_store = cls(**params).fit(open_store(tmp_path / "train"),
                                   validation=open_store(tmp_path / "valid"))
    in_memory = cls(**params).fit(train, validation=valid)
    np.testing.assert_array_equal(from_store.predict(open_store(tmp_path / "valid")),
                                  in_memory.predict(valid))
    assert from_store.history_ == [{**h, "seconds": s["seconds"]} for h, s in
                                   zip(in_memory.history_, from_store.history_)]


# ----- the windowed epoch order of memory-mapped data -----------------------------------
from afmfast.kernels.backends import available_backends, get_backend  # noqa: E402
from afmfast.models import epoch_order  # noqa: E402
from afmfast.models.training import Trainer, _whole_batches  # noqa: E402
from helpers.paths import FRAPPE  # noqa: E402



def test_memory_mapped_tells_stores_from_memory(stored):
    data, path = stored
    opened = open_store(path)
    assert opened.memory_mapped and not data.memory_mapped
    assert opened.with_labels(opened.y * 2).memory_mapped
    assert not opened[[0, 1]].memory_mapped  # a selection copies its rows


@pytest.mark.parametrize("n_rows", [0, 1, 7, 64, 1000])
def test_windowed_order_is_a_permutation_for_any_threads_and_backend(n_rows):
    data = afmfast.Dataset(np.zeros(n_rows + 1, np.int64), [], [], np.zeros(n_rows))
    orders = []
    for name in available_backends():
        for threads in (1, 2):
            shuffle = (lambda b, t: lambda n, seed, key: get_backend(name, "fm")
                       .shuffled_rows(n, seed, key, t))(name, threads)
            windows = list(epoch_order.windowed_order(data, 7, 3, shuffle, block_rows=16,
                                                      window_blocks=3))
            assert all(len(w) <= 48 for w in windows)
            orders.append(np.concatenate(windows) if windows else np.zeros(0, np.int64))
    assert sorted(orders[0].tolist()) == list(range(n_rows))
    for other in orders[1:]:
        np.testing.assert_array_equal(other, orders[0])
    if n_rows >= 64:  # another epoch, another order
        again = np.concatenate(list(epoch_order.windowed_order(
            data, 7, 4, shuffle, block_rows=16, window_blocks=3)))
        assert not np.array_equal(again, orders[0])


def _runs(order):
    """The runs of consecutive numbers, in order, that ``order`` is made of (their
    lengths): a run ends where the next number is not one more."""
    if len(order) == 0:
        return np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    return np.diff(np.concatenate([[0], breaks, [len(order)]]))


@pytest.mark.parametrize("n,unit", [(0, 4), (1, 4), (3, 4), (64, 4), (1000, 16), (1001, 16),
                                    (999, 7), (50, 1)])
def test_shuffled_units_keep_runs_of_consecutive_rows(n, unit):
    orders = []
    for name in available_backends():
        module = get_backend(name, "fm")
        for threads in (1, 2):
            def shuffle(m, seed, key, out=None, t=threads):
                return module.shuffled_rows(m, seed, key, t, out=out)

            order = epoch_order.shuffled_units(n, unit, 7, 3, shuffle)
            # into buffers, as the windowed order's reuse does: the same order
            out = np.full(-(-n // unit) * unit + 5, -1, np.int64)
            scratch = np.full(-(-n // unit) + 3, -1, np.int64)
            np.testing.assert_array_equal(epoch_order.shuffled_units(
                n, unit, 7, 3, shuffle, out=out, scratch=scratch), order)
            orders.append(order)
    order = orders[0]
    for other in orders[1:]:  # any backend, any thread count
        np.testing.assert_array_equal(other, order)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
    if unit == 1:
        np.testing.assert_array_equal(order, shuffle(n, 7, 3))
        return
    # each run starts at a multiple of the unit and holds the unit's rows in order
    # (runs that happen to follow each other count as one longer run)
    lengths = _runs(order)
    starts = np.cumsum(lengths) - lengths
    assert all(order[s] % unit == 0 for s in starts)
    assert all(length % unit == 0 or order[s] + length == n
               for s, length in zip(starts, lengths))
    if n >= 64:  # shuffled: not in file order, and another key, another order
        assert len(lengths) > 1
        assert not np.array_equal(epoch_order.shuffled_units(n, unit, 7, 4, shuffle), order)


@pytest.mark.parametrize("n_rows", [7, 100, 1000])
def test_the_windowed_order_in_units(n_rows):
    """Every row once; each window's rows in runs of the unit (blocks of 16 rows, units
    of 4); unit 1 is the plain windowed order; reused buffers give the same order."""
    data = afmfast.Dataset(np.zeros(n_rows + 1, np.int64), [], [], np.zeros(n_rows))
    module = get_backend(available_backends()[0], "fm")

    def shuffle(n, seed, key, out=None):
        return module.shuffled_rows(n, seed, key, 1, out=out)

    def order(unit, reuse=False):
        return [w.copy() for w in epoch_order.windowed_order(
            data, 7, 3, shuffle, block_rows=16, window_blocks=3, unit=unit, reuse=reuse)]

    plain = np.concatenate(order(1))
    np.testing.assert_array_equal(plain, np.concatenate(list(epoch_order.windowed_order(
        data, 7, 3, shuffle, block_rows=16, window_blocks=3))))
    windows = order(4)
    whole = np.concatenate(windows)
    assert sorted(whole.tolist()) == list(range(n_rows))
    assert [len(w) for w in windows] == [len(w) for w in order(1)]
    for window in windows:
        lengths = _runs(window)
        assert all(length % 4 == 0 or window[s] + length == n_rows
                   for s, length in zip(np.cumsum(lengths) - lengths, lengths))
    assert all(np.array_equal(a, b) for a, b in zip(windows, order(4, reuse=True)))
    if n_rows >= 100:
        assert not np.array_equal(whole, plain)


def test_shuffle_unit_trains_along_its_order_and_is_the_same_for_any_threads(tmp_path):
    """A fit with shuffle_unit trains along the order epoch_segments gives (bit for bit,
    on 1 and 2 threads), from a store and from memory; shuffle_unit 1 is the default."""
    demo = make_demo_data(n_rows=3000, seed=5)
    write_store(demo.train, tmp_path / "s")
    params = dict(n_factors=4, batch_size=128, verbose=0, n_epochs=2, adaptive_threads=False)
    for train in (open_store(tmp_path / "s"), demo.train):
        fits = [afmfast.FM(shuffle_unit=8, n_threads=t, **params).fit(train) for t in (1, 2)]
        np.testing.assert_array_equal(fits[0].V_, fits[1].V_)
        model = afmfast.FM(shuffle_unit=8, n_threads=1, **params)
        model._validate()
        trainer = Trainer(model, demo.train)
        step = 0
        for epoch in (1, 2):
            whole = np.concatenate(list(trainer.epoch_segments(train, epoch)))
            assert sorted(whole.tolist()) == list(range(train.n_rows))
            assert np.median(_runs(whole)) >= 8
            step, _ = trainer.train_epoch(demo.train.X, demo.train.y, whole, step)
        np.testing.assert_array_equal(fits[0].V_, trainer.params.V)
        default = afmfast.FM(n_threads=1, **params).fit(train)
        np.testing.assert_array_equal(
            default.V_, afmfast.FM(shuffle_unit=1, n_threads=1, **params).fit(train).V_)
        assert not np.array_equal(default.V_, fits[0].V_)


def test_a_shuffle_unit_beyond_the_rows_is_one_run(tmp_path):
    """A unit larger than the data (or a window) keeps the rows of a window in their
    stored order and sizes no buffer by the unit."""
    module = get_backend(available_backends()[0], "fm")

    def shuffle(n, seed, key, out=None):
        return module.shuffled_rows(n, seed, key, 1, out=out)

    huge = 10**15
    assert epoch_order.shuffled_units(7, huge, 1, 1, shuffle).tolist() == list(range(7))
    data = afmfast.Dataset(np.zeros(41, np.int64), [], [], np.zeros(40))
    windows = list(epoch_order.windowed_order(data, 7, 3, shuffle, block_rows=16,
                                              window_blocks=2, unit=huge, reuse=True))
    assert sorted(np.concatenate(windows).tolist()) == list(range(40))
    # each window: its blocks (two at most) each in stored order
    assert all(len(_runs(w)) <= 2 for w in windows)
    demo = make_demo_data(n_rows=500, seed=0).train
    write_store(demo, tmp_path / "s")
    for train in (demo, open_store(tmp_path / "s")):
        afmfast.FM(shuffle_unit=huge, n_epochs=1, verbose=0).fit(train)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None, "8"])
def test_a_bad_shuffle_unit_is_named(bad):
    with pytest.raises(ValueError, match="shuffle_unit must be an integer >= 1"):
        afmfast.FM(shuffle_unit=bad, verbose=0).fit(make_demo_data(n_rows=200, seed=0).train)


@pytest.mark.parametrize("n_rows", [1, 47, 1000])
def test_windows_in_reused_buffers_are_the_same_order(n_rows):
    """reuse=True writes the windows into three buffers: each window, taken when the
    generator yields it, is the one reuse=False gives; and the batches regrouped
    across the windows' ends (_whole_batches) survive the buffers' reuse."""
    data = afmfast.Dataset(np.zeros(n_rows + 1, np.int64), [], [], np.zeros(n_rows))
    module = get_backend(available_backends()[0], "fm")

    def shuffle(n, seed, key, out=None):
        return module.shuffled_rows(n, seed, key, 1, out=out)

    def windows(reuse):
        return epoch_order.windowed_order(data, 7, 3, shuffle, block_rows=10,
                                          window_blocks=3, reuse=reuse)

    fresh = list(windows(False))
    reused = [w.copy() for w in windows(True)]
    assert len(fresh) == len(reused)
    assert all(np.array_equal(a, b) for a, b in zip(fresh, reused))
    whole = np.concatenate(fresh)
    for batch in (1, 7, 16, 64):
        pieces = [p.copy() for p in _whole_batches(windows(True), batch)]
        assert all(len(p) % batch == 0 for p in pieces[:-1])
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("backend", available_backends())
def test_a_store_trains_its_windows_as_one_order_would(tmp_path, monkeypatch, backend):
    # batches run across the windows' ends: the epoch is the one the concatenated
    # windowed order gives, batch for batch, bit for bit
    monkeypatch.setattr(epoch_order, "BLOCK_ROWS", 100)
    monkeypatch.setattr(epoch_order, "WINDOW_BLOCKS", 3)
    demo = make_demo_data(n_rows=2000, seed=4)
    write_store(demo.train, tmp_path / "s")
    opened = open_store(tmp_path / "s")
    params = dict(n_factors=4, batch_size=128, n_threads=2, backend=backend, verbose=0,
                  n_epochs=2, adaptive_threads=False)
    fitted = afmfast.FM(**params).fit(opened)

    model = afmfast.FM(**params)
    model._validate()
    trainer = Trainer(model, demo.train)
    step = 0
    for epoch in (1, 2):
        whole = np.concatenate(list(trainer.epoch_segments(opened, epoch)))
        assert len(whole) == demo.train.n_rows
        step, _ = trainer.train_epoch(demo.train.X, demo.train.y, whole, step)
    np.testing.assert_array_equal(fitted.V_, trainer.params.V)
    np.testing.assert_array_equal(fitted.w_, trainer.params.w)


def test_the_windowed_order_reaches_the_full_shuffles_accuracy(tmp_path, monkeypatch):
    """frappe-mini, FM with the reference settings, 20 epochs: the windowed order (blocks
    of 512 rows, windows of 8 blocks, so a batch of 4096 rows is one window), also with
    shuffle_unit 64, reaches the test RMSE of the full shuffle within 0.005, as a mean
    over three seeds (one seed's RMSE moves by about 0.01 from seed to seed with either
    order)."""
    if not FRAPPE.exists():
        pytest.skip(f"{FRAPPE} is not present")
    data = afmfast.load_libfm(FRAPPE)
    is_valid = (np.arange(1, len(data) + 1) % 5) == 0
    train, valid = data[~is_valid], data[is_valid]
    write_store(train, tmp_path / "train")
    monkeypatch.setattr(epoch_order, "BLOCK_ROWS", 512)
    monkeypatch.setattr(epoch_order, "WINDOW_BLOCKS", 8)
    params = dict(n_factors=16, learning_rate=0.01, batch_size=4096, n_epochs=20, keep=0.7,
                  batch_norm=True, early_stopping=False, verbose=0)
    full, windowed, in_runs = [], [], []
    for seed in (2016, 1, 2):
        model = afmfast.FM(**params, random_state=seed)
        full.append(model.fit(train).evaluate(valid)["rmse"])
        windowed.append(model.fit(open_store(tmp_path / "train")).evaluate(valid)["rmse"])
        model = afmfast.FM(**params, random_state=seed, shuffle_unit=64)
        in_runs.append(model.fit(open_store(tmp_path / "train")).evaluate(valid)["rmse"])
    assert abs(np.mean(windowed) - np.mean(full)) <= 0.005, (windowed, full)
    # the file's rows are in random order: runs of 64 of them (a batch, 64 runs) too
    assert abs(np.mean(in_runs) - np.mean(full)) <= 0.005, (in_runs, full)


# ----- the command line -------------------------------------------------------------------
def test_cli_converts_and_trains_from_stores(tmp_path, monkeypatch, capsys):
    from afmfast.cli import main

    monkeypatch.chdir(tmp_path)
    demo = make_demo_data(n_rows=1500, seed=1)
    for name, data in (("train", demo.train), ("valid", demo.valid)):
        lines = [" ".join([f"{y:g}"] + [f"{i}:{v:g}" for i, v in zip(
            data.indices[a:b], data.values[a:b])]) for y, a, b in zip(
            data.y, data.indptr[:-1], data.indptr[1:])]
        (tmp_path / f"{name}.libfm").write_text("\n".join(lines) + "\n")
    assert main(["convert", "train.libfm", "-o", "train.store"]) == 0
    assert "train.store: 1200 rows" in capsys.readouterr().out
    assert main(["convert", "valid.libfm", "-o", "valid.store", "--threads", "1"]) == 0
    code = main(["fm", "--train", "train.store", "--validation", "valid.store",
                 "--hidden_factor", "4", "--epoch", "2", "--pretrain", "0", "--save", "m.npz"])
    assert code == 0 and "Best Iter(validation)" in capsys.readouterr().out
    assert main(["fm", "--process", "evaluate", "--test", "valid.store", "--save",
                 "m.npz"]) == 0
    assert "Test RMSE" in capsys.readouterr().out
    (tmp_path / "bad.libfm").write_text("1 0:1\n1 x:1\n")
    assert main(["convert", "bad.libfm", "-o", "bad.store"]) == 1
    assert "bad.libfm: line 2" in capsys.readouterr().err
    assert not (tmp_path / "bad.store").exists()


# ----- one-hot rows without values (values=None), the kernels' implied ones ----------------
def test_a_one_hot_store_opens_without_values(tmp_path):
    src = tmp_path / "d.libfm"
    src.write_bytes(b"1 0:1 4:1\n0 1:1\n")
    convert(src, tmp_path / "s")
    data = open_store(tmp_path / "s")
    assert data.X[2].size == 0  # nothing of O(nnz) in memory for the values
    assert data.values.tolist() == [1.0, 1.0, 1.0] and not data.values.flags.writeable
    for part in (data[[1]], data[:1], data[::-1], data.with_labels([2.0, 3.0]),
                 data.with_n_features(9)):
        assert part.X[2].size == 0 and part.values.tolist() == [1.0] * part.nnz
    write_store(data[[1, 0]], tmp_path / "again")
    assert not (tmp_path / "again" / "values.npy").exists()
    same_rows(open_store(tmp_path / "again"), afmfast.load_libfm(src)[[1, 0]])


def test_values_none_is_validated_and_pickles():
    import pickle

    data = afmfast.Dataset([0, 2, 3], [0, 3, 2], None, [1.0, -1.0])
    assert data.validate() is data and data.first_nonfinite_row() is None
    again = pickle.loads(pickle.dumps(data))
    assert again.X[2].size == 0 and again.indices.tolist() == [0, 3, 2]
    with pytest.raises(ValueError, match="indptr must end at nnz"):
        afmfast.Dataset([0, 2, 4], [0, 3, 2], None, [1.0, -1.0])


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("cls,kw", [(afmfast.FM, {}), (afmfast.AFM, {"attention_size": 4}),
                                    (afmfast.AFMClassifier, {"attention_size": 4})])
def test_implied_ones_train_and_predict_as_stored_ones(backend, cls, kw):
    # the same model bit for bit, whether the ones are stored or implied; unseen ids
    # (at or above n_features) are dropped alike in predict and explain
    demo = make_demo_data(n_rows=1500, seed=3)

    def as_one_hot(data, implied, y=None):
        values = None if implied else np.ones(data.nnz, np.float32)
        return afmfast.Dataset(data.indptr, data.indices, values,
                               data.y if y is None else y, n_features=data.n_features)

    y = (demo.train.y > np.median(demo.train.y)).astype(np.float32) \
        if cls is afmfast.AFMClassifier else None
    fitted = [cls(n_factors=4, n_epochs=2, verbose=0, backend=backend, **kw).fit(
        as_one_hot(demo.train, implied, y)) for implied in (False, True)]
    np.testing.assert_array_equal(fitted[0].V_, fitted[1].V_)
    wide = afmfast.Dataset(demo.valid.indptr, demo.valid.indices + (
        np.arange(demo.valid.nnz) % 7 == 0) * demo.valid.n_features, None, demo.valid.y)
    stored = afmfast.Dataset(wide.indptr, wide.indices, np.ones(wide.nnz, np.float32),
                             wide.y)
    np.testing.assert_array_equal(fitted[0].decision_function(stored) if y is not None
                                  else fitted[0].predict(stored),
                                  fitted[0].decision_function(wide) if y is not None
                                  else fitted[0].predict(wide))
    if cls is not afmfast.FM:
        for a, b in zip(fitted[0].explain(stored[:40]), fitted[0].explain(wide[:40])):
            np.testing.assert_array_equal(a, b)


def test_the_reference_reads_empty_values_as_ones():
    from afmfast.kernels import reference
    from afmfast.kernels.api import new_fm_params

    params = new_fm_params(6, 3, np.random.default_rng(0))
    indptr, indices = np.array([0, 2, 3]), np.array([0, 5, 2], np.int32)
    implied = reference.fm_predict((indptr, indices, np.zeros(0, np.float32)), params, 1)
    stored = reference.fm_predict((indptr, indices, np.ones(3, np.float32)), params, 1)
    np.testing.assert_array_equal(implied, stored)
