"""Tests of ``afmfast.data.dataset.Dataset``: dtype conversion, validation errors that name
the argument, row selection (integer arrays, masks, slices) against a per-row
reference, ``from_csr`` with scipy (skipped without scipy) and ``with_n_features``."""
import re

import numpy as np
import pytest

from afmfast.data.dataset import Dataset


def small():
    # rows: [0:1, 2:2], [], [1:3], [3:4, 0:5, 2:6]
    return Dataset([0, 2, 2, 3, 6], [0, 2, 1, 3, 0, 2], [1, 2, 3, 4, 5, 6],
                   [1.0, -1.0, 0.5, 2.0])


def rows_of(ds):
    return [(ds.indices[a:b].tolist(), ds.values[a:b].tolist(), float(ds.y[i]))
            for i, (a, b) in enumerate(zip(ds.indptr[:-1], ds.indptr[1:]))]


def test_construction_converts_dtypes():
    ds = small()
    assert ds.indptr.dtype == np.int64 and ds.indices.dtype == np.int32
    assert ds.values.dtype == np.float32 and ds.y.dtype == np.float32
    for a in (ds.indptr, ds.indices, ds.values, ds.y):
        assert a.flags.c_contiguous
    assert len(ds) == ds.n_rows == 4 and ds.nnz == 6
    assert ds.n_features == 4 and ds.max_row_nnz == 3
    assert ds.X == (ds.indptr, ds.indices, ds.values)
    assert "n_rows=4" in repr(ds) and "n_features=4" in repr(ds)


def test_no_copy_when_dtypes_already_right():
    # the caller's arrays are shared through read-only views; their own flags stay
    indptr = np.array([0, 1], np.int64)
    indices = np.array([3], np.int32)
    values = np.array([1], np.float32)
    y = np.array([1], np.float32)
    ds = Dataset(indptr, indices, values, y)
    for mine, held in ((indptr, ds.indptr), (indices, ds.indices), (values, ds.values),
                       (y, ds.y)):
        assert held.base is mine and not held.flags.writeable and mine.flags.writeable
    frozen = np.array([0, 1], np.int64)
    frozen.flags.writeable = False
    assert Dataset(frozen, indices, values, y).indptr is frozen  # nothing to protect


def every_kind_of_dataset(tmp_path):
    """A Dataset of each way one is made: from lists, from arrays it shares, from_csr,
    the selections, with_n_features, load_libfm, as_dataset with new labels, a pickled
    copy."""
    import pickle

    from afmfast import load_libfm
    from afmfast.models.base import as_dataset

    path = tmp_path / "d.libfm"
    path.write_text("1 0:1 3:0.5\n-1 2:1\n0\n2 1:2\n")
    ds = small()
    shared = Dataset(np.array([0, 2, 3], np.int64), np.array([0, 3, 2], np.int32),
                     np.ones(3, np.float32), np.zeros(2, np.float32))
    kinds = {"lists": ds, "shared": shared, "slice": ds[1:3], "step": ds[::2],
             "rows": ds[[3, 0]], "mask": ds[np.array([True, False, True, True])],
             "wide": ds.with_n_features(9), "libfm": load_libfm(path),
             "relabelled": as_dataset(shared, [5, 6]),
             "pickled": pickle.loads(pickle.dumps(ds))}
    try:
        import scipy.sparse as sp
    except ImportError:
        return kinds
    kinds["csr"] = Dataset.from_csr(sp.csr_matrix(np.eye(3, dtype=np.float32)), [1, 2, 3])
    return kinds


def test_every_dataset_is_read_only(tmp_path):
    for kind, ds in every_kind_of_dataset(tmp_path).items():
        for name in ("indptr", "indices", "values", "y"):
            a = getattr(ds, name)
            assert not a.flags.writeable, (kind, name)
            if a.size:
                with pytest.raises(ValueError, match="read-only"):
                    a[0] = a[0]
            with pytest.raises(AttributeError):
                setattr(ds, name, a.copy())
        assert all(a is b for a, b in zip(ds.X, (ds.indptr, ds.indices, ds.values)))
        with pytest.raises(AttributeError):
            ds.n_features = 1
        assert not ds.row_length_counts().flags.writeable


def test_pickled_dataset_keeps_its_rows():
    import pickle

    ds = small()
    copy = pickle.loads(pickle.dumps(ds))
    assert rows_of(copy) == rows_of(ds) and copy.n_features == ds.n_features
    assert copy.n_features_explicit == ds.n_features_explicit


def shared_arrays():
    """(arrays, the Dataset sharing them): the caller can change the Dataset's rows."""
    arrays = (np.array([0, 2, 2, 3, 6], np.int64), np.array([0, 2, 1, 3, 0, 2], np.int32),
              np.arange(1, 7, dtype=np.float32), np.array([1, -1, 0.5, 2], np.float32))
    return arrays, Dataset(*arrays)


@pytest.mark.parametrize("which,pos,value,words", [
    (0, 0, 1, "X: indptr must start at 0, got 1"),
    (0, 2, -10**9, "X: indptr must be non-decreasing, but indptr[2] = -1000000000 < "
                   "indptr[1] = 2"),
    (0, 1, 10**9, "X: indptr must be non-decreasing, but indptr[2] = 2 < indptr[1] = "
                  "1000000000"),
    (0, 4, 5, "X: indptr must end at nnz = len(indices) = 6, got 5"),
    (1, 3, -10**9, "X: indices must be >= 0, got -1000000000"),
    (1, 0, 4, "X: n_features = 4 is too small: indices holds id 4"),
])
def test_validate_catches_changes_through_shared_arrays(which, pos, value, words):
    arrays, ds = shared_arrays()
    assert ds.validate() is ds
    arrays[which][pos] = value
    with pytest.raises(ValueError, match=re.escape(words)):
        ds.validate()


def test_validate_catches_changes_after_writeable_is_set_back():
    ds = small()[[0, 1, 2, 3]]  # a selection: its arrays are its own
    ds.indices.flags.writeable = True
    ds.indices[1] = -5
    with pytest.raises(ValueError, match="valid: indices must be >= 0, got -5"):
        ds.validate("valid")


@pytest.mark.parametrize("change,words", [
    (lambda a: a.reshape(-1, 1), "indptr must be a C-contiguous 1-D int64 array"),
    (lambda a: a.astype(np.int32), "indptr must be a C-contiguous 1-D int64 array"),
    (lambda a: np.repeat(a, 2)[::2], "C-contiguous: False"),
    (lambda a: a.tolist(), "indptr must be a C-contiguous 1-D int64 array, got a list"),
])
def test_validate_checks_dtype_and_layout(change, words):
    # the attributes cannot be assigned; the private slots can, past the API
    ds = small()
    ds._indptr = change(ds.indptr)
    with pytest.raises(ValueError, match=re.escape(words)):
        ds.validate()


def test_validate_recounts_row_lengths():
    # fit sizes its work space from the cached histogram: a change of the row lengths
    # must not leave it stale
    arrays, ds = shared_arrays()
    assert ds.max_row_nnz == 3
    arrays[0][1:4] = [0, 0, 0]  # row 3 now holds all 6 nonzeros
    assert ds.validate().max_row_nnz == 6


def test_empty_dataset():
    ds = Dataset([0], [], [], [])
    assert len(ds) == 0 and ds.nnz == 0 and ds.n_features == 0 and ds.max_row_nnz == 0
    assert Dataset([0], [], [], [], n_features=5).n_features == 5
    ds = Dataset([0, 0, 0], [], [], [1, 2])
    assert ds.n_features == 0 and ds.max_row_nnz == 0


@pytest.mark.parametrize("args,kw,words", [
    (([1, 2], [0], [1.0], [1.0]), {}, "indptr must start at 0"),
    (([0, 2, 1], [0, 1], [1, 1], [1, 1]), {}, "indptr must be non-decreasing"),
    (([0, 1], [0, 1], [1, 1], [1]), {}, "indptr must end at nnz"),
    (([0, 2], [0, 1], [1], [1]), {}, "values must have"),
    (([0, 2], [0, 1], [1, 1], [1, 2]), {}, "y must have"),
    (([0, 1], [-1], [1], [1]), {}, "indices must be >= 0"),
    (([0, 1], [5], [1], [1]), {"n_features": 5}, "n_features = 5 is too small"),
    (([0, 1], [5], [1], [1]), {"n_features": -1}, "n_features must be >= 0"),
    (([0, 1], [5], [1], [1]), {"n_features": 2.5}, "n_features must be an int"),
    (([], [], [], []), {}, "indptr must have n_rows + 1"),
    (([[0, 1]], [5], [1], [1]), {}, "indptr must be 1-D"),
    (([0, 1], [0.5], [1], [1]), {}, "indices must hold integers"),
    (([0.0, 1.0], [0], [1], [1]), {}, "indptr must hold integers"),
    (([0, 1], [2**40], [1], [1]), {}, "indices has entries outside the int32 range"),
    (([0, 1], [1], ["a"], [1]), {}, "values must be numeric"),
])
def test_validation_errors_name_argument(args, kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Dataset(*args, **kw)


@pytest.mark.parametrize("idx", [
    [2, 0, 0, 3], np.array([3, 1], np.int32), [-1, -4], [], np.array([], np.int64),
    np.array([True, False, True, True]), slice(1, 3), slice(None), slice(None, None, -1),
    slice(0, 4, 2), slice(3, 1), slice(-2, None),
])
def test_selection_matches_per_row_reference(idx):
    ds = small()
    sub = ds[idx]
    want_rows = np.arange(4)[idx]
    full = rows_of(ds)
    assert rows_of(sub) == [full[r] for r in want_rows]
    assert sub.n_features == ds.n_features
    for a, dt in ((sub.indptr, np.int64), (sub.indices, np.int32),
                  (sub.values, np.float32), (sub.y, np.float32)):
        assert a.dtype == dt and a.flags.c_contiguous
    assert sub.indptr[0] == 0 and sub.indptr[-1] == sub.nnz
    assert sub.max_row_nnz == (max((len(full[r][0]) for r in want_rows), default=0))


def test_selection_errors():
    ds = small()
    with pytest.raises(IndexError):
        ds[[4]]
    with pytest.raises(IndexError):
        ds[[-5]]
    with pytest.raises(IndexError):
        ds[np.array([True, False])]
    with pytest.raises(IndexError):
        ds[np.array([0.5])]
    with pytest.raises(TypeError):
        ds[1]


def test_selection_on_larger_random_data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 7, size=500)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    ds = Dataset(indptr, rng.integers(0, 100, indptr[-1]), rng.normal(size=indptr[-1]),
                 rng.normal(size=500), n_features=120)
    perm = rng.permutation(500)
    sub = ds[perm[:200]]
    full = rows_of(ds)
    assert rows_of(sub) == [full[r] for r in perm[:200]]
    assert sub.n_features == 120


def test_from_csr_with_scipy():
    sp = pytest.importorskip("scipy.sparse")
    X = sp.random(30, 17, density=0.2, format="csr", random_state=0)
    y = np.arange(30, dtype=np.float64)
    ds = Dataset.from_csr(X, y)
    assert ds.n_features == 17 and len(ds) == 30 and ds.nnz == X.nnz
    np.testing.assert_array_equal(ds.indptr, X.indptr)
    np.testing.assert_array_equal(ds.indices, X.indices)
    np.testing.assert_array_equal(ds.values, X.data.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y.astype(np.float32))
    assert Dataset.from_csr(X, y, n_features=40).n_features == 40
    with pytest.raises(ValueError, match="y is required"):
        Dataset.from_csr(X)
    with pytest.raises(ValueError, match="y must have"):
        Dataset.from_csr(X, y[:-1])


def test_from_csr_copies_only_when_needed():
    sp = pytest.importorskip("scipy.sparse")
    X = sp.csr_matrix(np.array([[0, 1.0, 0], [2.0, 0, 3.0]], dtype=np.float32))
    X.indptr = X.indptr.astype(np.int64)
    y = np.array([1, 0], np.float32)
    ds = Dataset.from_csr(X, y)
    assert np.shares_memory(ds.indptr, X.indptr)
    assert np.shares_memory(ds.indices, X.indices)
    assert np.shares_memory(ds.values, X.data)
    assert np.shares_memory(ds.y, y)


def test_from_csr_rejects_non_csr():
    with pytest.raises(ValueError, match="no 'indptr'"):
        Dataset.from_csr(np.zeros((2, 2)), [1, 2])


def test_with_n_features_shares_arrays():
    ds = small()
    big = ds.with_n_features(100)
    assert big.n_features == 100 and ds.n_features == 4
    assert big.indices is ds.indices and big.values is ds.values
    assert big.indptr is ds.indptr and big.y is ds.y
    assert ds.with_n_features(4).n_features == 4
    with pytest.raises(ValueError, match="n_features = 3 is too small"):
        ds.with_n_features(3)


def test_with_n_features_of_a_selection_uses_its_own_ids():
    # a selection inherits its parent's largest id as a bound; narrowing it checks the
    # selected rows' ids, and an error names an id they hold
    ds = small()  # ids 0-3; rows 0 and 2 hold 0, 1, 2
    sub = ds[[0, 2]]
    assert sub.with_n_features(3).n_features == 3
    assert sub.with_n_features(None).n_features == 3
    with pytest.raises(ValueError, match="n_features = 2 is too small: indices holds id 2"):
        sub.with_n_features(2)
    assert ds[[1]].with_n_features(0).n_features == 0  # an empty row holds no id


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_row_length_counts_and_largest_batch_totals(monkeypatch, chunk):
    # the histogram is counted in chunks of rows; fit sizes its work space from it: the
    # nonzeros and pairs of the batch_size longest rows
    from afmfast.data import dataset
    from afmfast.models.base import _largest_batch_total
    monkeypatch.setattr(dataset, "LENGTH_CHUNK_ROWS", chunk)
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 9, size=40)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    ds = Dataset(indptr, np.zeros(indptr[-1], int), np.ones(indptr[-1]), np.zeros(40))
    assert ds.row_length_counts().tolist() == np.bincount(lengths).tolist()
    assert ds.max_row_nnz == lengths.max()
    for b in (1, 5, 40, 4096):
        longest = np.sort(lengths)[::-1][:b]
        assert _largest_batch_total(ds, b, lambda n: n) == longest.sum()
        assert _largest_batch_total(ds, b, lambda n: n * (n - 1) // 2) == \
            (longest * (longest - 1) // 2).sum()
    empty = Dataset([0], [], [], [])
    assert empty.row_length_counts().tolist() == [0] and empty.max_row_nnz == 0
    assert _largest_batch_total(empty, 8, lambda n: n) == 0


def test_row_width_and_kernel_x():
    """Rows of one width give it (and the kernels' X carries it); ragged or empty data
    give 0; a selection has its own; KernelX unpacks and pickles as the triple."""
    import pickle

    from afmfast.kernels.api import KernelX
    fixed = Dataset([0, 3, 6, 9], [0, 1, 2, 3, 4, 5, 0, 2, 4], None, [1.0, 0.0, 1.0])
    assert fixed.row_width == 3
    assert isinstance(fixed.X, KernelX) and fixed.X.row_width == 3
    indptr, indices, values = fixed.X
    assert indptr is fixed.indptr and values.size == 0
    assert small().row_width == 0 and small().X.row_width == 0
    assert small()[[1]].row_width == 0  # one empty row: no width to skip a read with
    assert small()[[0, 3]].row_width == 0 and small()[[2]].row_width == 1
    assert Dataset([0], [], None, []).row_width == 0
    back = pickle.loads(pickle.dumps(fixed.X))
    assert isinstance(back, KernelX) and back.row_width == 3
    assert all(np.array_equal(a, b) for a, b in zip(back, fixed.X))

