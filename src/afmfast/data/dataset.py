"""In-memory sparse data set (``Dataset``); libFM text is read by ``afmfast.data.libfm``.

Contract (other modules code against it):

- ``Dataset`` holds a CSR matrix and targets as C-contiguous, read-only arrays with fixed
  dtypes: ``indptr`` int64 (n_rows + 1), ``indices`` int32 (nnz), ``values`` float32
  (nnz), ``y`` float32 (n_rows), plus ``n_features`` (int). The constructor converts
  dtypes once and validates the structure, raising ``ValueError`` that names the
  argument and the problem. ``Dataset.validate`` repeats the structural checks (O(n_rows
  + nnz) vectorised NumPy); the estimators call it before any kernel sees the arrays
  (see ``afmfast.kernels.api``), since arrays shared with the caller, or made writeable
  again, can change after construction. Row selection (``ds[idx]``) and ``from_csr``
  are vectorised NumPy, never a Python loop over rows.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from afmfast.kernels.api import KernelX, read_only

__all__ = ["Dataset"]

_INT32_MAX = 2**31 - 1
# rows per pass of Dataset.row_length_counts (its scratch: 8 MB of row lengths)
LENGTH_CHUNK_ROWS = 1 << 20


def _as_1d(arr, dtype, name):
    """``arr`` as a read-only C-contiguous 1-D array of ``dtype``; copies only when
    needed. A copy is made read-only; an array used as it is is shared through a
    read-only view, so that the caller's own array keeps its flags."""
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if np.issubdtype(dtype, np.integer):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        if a.size and a.dtype.itemsize > np.dtype(dtype).itemsize:
            # a silent wrap-around on the cast would turn a bad id into a valid one
            lo, hi = int(a.min()), int(a.max())
            info = np.iinfo(dtype)
            if lo < info.min or hi > info.max:
                raise ValueError(f"{name} has entries outside the {np.dtype(dtype)} range "
                                 f"([{lo}, {hi}])")
    elif a.size and not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    out = np.ascontiguousarray(a, dtype=dtype)
    if out is a:
        return read_only(out)
    out.flags.writeable = False
    return out


#: the kernels' values array of rows whose every value is 1 (``Dataset(..., values=None)``)
_NO_VALUES = np.empty(0, np.float32)
_NO_VALUES.flags.writeable = False

# (attribute, dtype) of the arrays a Dataset holds, in the kernels' order
_ARRAYS = (("indptr", np.int64), ("indices", np.int32), ("values", np.float32),
           ("y", np.float32))


def _check_arrays(arrays, where=""):
    """Raise ``ValueError`` (its message starts with ``where``) unless ``arrays`` =
    (indptr, indices, values, y) are C-contiguous 1-D arrays of the Dataset dtypes that
    form CSR rows with one label each: indptr starts at 0, never decreases and ends at
    nnz, ids are >= 0. ``values`` None stands for ones. Returns the largest id (-1
    without nonzeros). Vectorised NumPy, O(n_rows + nnz)."""
    for (name, dtype), a in zip(_ARRAYS, arrays):
        if a is None and name == "values":
            continue
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 1
                and a.flags.c_contiguous):
            got = (f"{a.dtype} array of shape {a.shape}, C-contiguous: "
                   f"{a.flags.c_contiguous}" if isinstance(a, np.ndarray)
                   else type(a).__name__)
            raise ValueError(f"{where}{name} must be a C-contiguous 1-D {np.dtype(dtype)} "
                             f"array, got a {got}")
    indptr, indices, values, y = arrays
    if indptr.size == 0:
        raise ValueError(f"{where}indptr must have n_rows + 1 entries, got an empty array")
    if indptr[0] != 0:
        raise ValueError(f"{where}indptr must start at 0, got {indptr[0]}")
    # in chunks: a memory-mapped Dataset larger than memory needs no O(n_rows) scratch
    for lo in range(0, indptr.size - 1, LENGTH_CHUNK_ROWS):
        part = indptr[lo:lo + LENGTH_CHUNK_ROWS + 1]
        falls = part[1:] < part[:-1]
        if falls.any():
            r = lo + int(falls.argmax())
            raise ValueError(f"{where}indptr must be non-decreasing, but indptr[{r + 1}] = "
                             f"{indptr[r + 1]} < indptr[{r}] = {indptr[r]}")
    if indptr[-1] != indices.size:
        raise ValueError(f"{where}indptr must end at nnz = len(indices) = {indices.size}, "
                         f"got {indptr[-1]}")
    if values is not None and values.size != indices.size:
        raise ValueError(f"{where}values must have len(indices) = {indices.size} entries, "
                         f"got {values.size}")
    if y.size != indptr.size - 1:
        raise ValueError(f"{where}y must have n_rows = len(indptr) - 1 = {indptr.size - 1} "
                         f"entries, got {y.size}")
    if not indices.size:
        return -1
    lo, max_id = int(indices.min()), int(indices.max())
    if lo < 0:
        raise ValueError(f"{where}indices must be >= 0, got {lo}")
    return max_id


class Dataset:
    """Sparse rows (CSR) and targets, ready for the kernels.

    Parameters
    ----------
    indptr : int array (n_rows + 1,), starts at 0, non-decreasing, ends at nnz.
    indices : int array (nnz,), feature ids in [0, n_features).
    values : float array (nnz,), or None when every value is 1 (one-hot rows): the
        kernels then read no values at all (``afmfast.open_store`` of a one-hot store).
    y : float array (n_rows,).
    n_features : int, optional; defaults to max id + 1 (0 without nonzeros).

    ``n_features_explicit`` tells whether the feature count was given (here, to
    ``from_csr`` through the matrix's shape, or to ``load_libfm``) rather than derived
    from the largest id: estimators refuse to allocate huge parameter tables for a derived
    count (see ``afmfast.models.base.MAX_PARAMETER_BYTES``).

    Attributes ``indptr`` (int64), ``indices`` (int32), ``values`` (float32), ``y``
    (float32) are C-contiguous and read-only: writing into them raises ``ValueError``,
    and none of them, nor ``n_features``, can be assigned (``with_n_features`` gives
    another feature count). Selections and ``with_n_features`` share them. An array the
    Dataset copied (to convert its dtype, or a selection's) is its own; an array passed
    in with the right dtype and layout is shared, not copied, through a read-only view:
    changes made through the caller's own reference show in the Dataset. The estimators
    therefore check the arrays again (``validate``) before every fit, predict, evaluate
    and explain, and raise ``ValueError`` rather than hand the kernels rows that point
    outside the arrays, whatever was written into them (also after someone set
    ``flags.writeable`` back to True). Do not change the arrays while a call that uses
    the Dataset runs in another thread.

    Examples
    --------
    >>> ds = Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0])
    >>> len(ds), ds.n_features, ds[[1]].indices.tolist()
    (2, 4, [2])
    >>> ds.values[0] = 2.0
    Traceback (most recent call last):
    ...
    ValueError: assignment destination is read-only
    """

    __slots__ = ("_indptr", "_indices", "_values", "_y", "_n_features",
                 "n_features_explicit", "_max_id", "_length_counts", "_fields")

    def __init__(self, indptr: ArrayLike, indices: ArrayLike, values: ArrayLike | None,
                 y: ArrayLike, n_features: int | None = None) -> None:
        arrays = tuple(None if a is None and name == "values" else _as_1d(a, dtype, name)
                       for a, (name, dtype) in zip((indptr, indices, values, y), _ARRAYS))
        max_id = _check_arrays(arrays)
        explicit = n_features is not None
        n_features = _check_n_features(n_features, max_id, "indices")
        self._set(*arrays, n_features, max_id, explicit)

    def _set(self, indptr, indices, values, y, n_features, max_id, explicit, fields=None):
        self._fields = fields  # (int32 field of each id, names) or None
        self._indptr = indptr
        self._indices = indices
        self._values = values
        self._y = y
        self._n_features = n_features
        self.n_features_explicit = explicit
        self._max_id = max_id
        self._length_counts = None

    @classmethod
    def _trusted(cls, indptr, indices, values, y, n_features, max_id, explicit,
                 fields=None):
        # For arrays that are valid by construction (reader output, selections): skips
        # the O(nnz) checks of __init__. They are new arrays or views of a Dataset's
        # (read-only already), so they are made read-only in place.
        for a in (indptr, indices, values, y):
            if a is not None:
                a.flags.writeable = False
        ds = cls.__new__(cls)
        ds._set(indptr, indices, values, y, n_features, max_id, explicit, fields)
        return ds

    def __reduce__(self):
        return (Dataset._trusted, (self._indptr, self._indices, self._values, self._y,
                                   self._n_features, self._max_id, self.n_features_explicit,
                                   self._fields))

    def validate(self, name="X"):
        """Check the arrays again as the constructor did, and return ``self``: raises
        ``ValueError`` starting with ``name`` when they no longer form valid rows (changed
        through an array shared with the caller, or after ``flags.writeable`` was set
        back to True, or reshaped or retyped in place). The estimators call it on every
        Dataset they are handed and before every epoch of fit; it costs O(n_rows + nnz)
        vectorised NumPy, little against a prediction.

        Examples
        --------
        >>> import numpy as np
        >>> indptr = np.array([0, 2, 3], dtype=np.int64)
        >>> ds = Dataset(indptr, [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0])
        >>> indptr[1] = 5  # the caller's array is shared with the Dataset
        >>> ds.validate("test")
        Traceback (most recent call last):
        ...
        ValueError: test: indptr must be non-decreasing, but indptr[2] = 3 < indptr[1] = 5
        """
        where = f"{name}: "
        max_id = _check_arrays((self._indptr, self._indices, self._values, self._y), where)
        _check_n_features(self._n_features, max_id, "indices", where)
        self._max_id = max_id
        self._length_counts = None  # the row lengths may have changed
        return self

    @classmethod
    def from_csr(cls, X, y: ArrayLike | None = None,
                 n_features: int | None = None) -> Dataset:
        """Dataset from any CSR-like ``X`` with ``indptr``, ``indices``, ``data`` and
        ``shape`` (e.g. ``scipy.sparse.csr_matrix``) and targets ``y`` (required).
        ``n_features`` defaults to ``X.shape[1]``. Arrays are copied only when their
        dtype or layout differs from the Dataset's.

        Examples
        --------
        >>> import numpy as np, scipy.sparse
        >>> X = scipy.sparse.csr_matrix(np.array([[1.0, 0, 2.0, 0], [0, 0, 0, 0]]))
        >>> ds = Dataset.from_csr(X, [1.0, 0.0])
        >>> ds, ds.n_features_explicit
        (Dataset(n_rows=2, n_features=4, nnz=2, max_row_nnz=2), True)
        """
        if y is None:
            raise ValueError("y is required: a Dataset holds targets for every row")
        for attr in ("indptr", "indices", "data", "shape"):
            if not hasattr(X, attr):
                raise ValueError(f"X must be CSR-like with indptr/indices/data/shape; it "
                                 f"has no {attr!r} ({type(X).__name__})")
        n_rows = int(X.shape[0])
        if len(X.indptr) != n_rows + 1:
            raise ValueError(f"X.indptr must have X.shape[0] + 1 = {n_rows + 1} entries, "
                             f"got {len(X.indptr)}")
        if n_features is None:
            n_features = int(X.shape[1])
        return cls(X.indptr, X.indices, X.data, y, n_features=n_features)

    # ------------------------------------------------------------------ properties
    @property
    def indptr(self):
        """Row offsets, int64 (n_rows + 1,), read-only.

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).indptr
        array([0, 2, 3])
        """
        return self._indptr

    @property
    def indices(self):
        """Feature ids, int32 (nnz,), read-only.

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).indices
        array([0, 3, 2], dtype=int32)
        """
        return self._indices

    @property
    def values(self):
        """Feature values, float32 (nnz,), read-only.

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).values
        array([1. , 0.5, 1. ], dtype=float32)
        """
        if self._values is None:  # one-hot rows: ones made on demand, not kept
            ones = np.ones(self.nnz, np.float32)
            ones.flags.writeable = False
            return ones
        return self._values

    @property
    def y(self):
        """Targets, float32 (n_rows,), read-only.

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).y
        array([ 1., -1.], dtype=float32)
        """
        return self._y

    @property
    def n_features(self):
        """Number of features (ids are below it).

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).n_features
        4
        """
        return self._n_features

    @property
    def n_rows(self):
        """Number of rows (also ``len(ds)``).

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).n_rows
        2
        """
        return self.y.shape[0]

    def __len__(self):
        return self.y.shape[0]

    @property
    def nnz(self):
        """Number of stored nonzeros.

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).nnz
        3
        """
        return self.indices.shape[0]

    @property
    def X(self):
        """``(indptr, indices, values)``, the kernels' X (the arrays themselves); values
        is empty for one-hot rows built with ``values=None`` (the kernels' contract:
        every value is then 1). A ``kernels.api.KernelX`` carrying ``row_width``.

        Examples
        --------
        >>> indptr, indices, values = Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0],
        ...                                   [1.0, -1.0]).X
        >>> indptr.dtype, indices.dtype, values.dtype
        (dtype('int64'), dtype('int32'), dtype('float32'))
        >>> Dataset([0, 2, 3], [0, 3, 2], None, [1.0, -1.0]).X[2].size
        0
        """
        return KernelX(self._indptr, self._indices,
                       _NO_VALUES if self._values is None else self._values, self.row_width)

    @property
    def row_width(self) -> int:
        """The number of nonzeros of every row when all rows have the same (one-hot
        data with one id per field), else 0; from ``row_length_counts`` (cached). The
        kernels then find a row of a shuffled batch without reading its indptr entry.

        Examples
        --------
        >>> Dataset([0, 2, 4], [0, 3, 2, 1], None, [1.0, -1.0]).row_width
        2
        >>> Dataset([0, 2, 3], [0, 3, 2], None, [1.0, -1.0]).row_width
        0
        """
        counts = self.row_length_counts()
        width = len(counts) - 1
        return width if width > 0 and counts[width] == self.n_rows else 0

    @property
    def max_row_nnz(self):
        """Largest number of nonzeros in one row (0 for an empty Dataset).

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).max_row_nnz
        2
        """
        return len(self.row_length_counts()) - 1

    def first_nonfinite_row(self) -> int | None:
        """The first row holding a NaN or infinite value, or None. Checked a chunk of
        values at a time (no O(nnz) scratch).

        Examples
        --------
        >>> Dataset([0, 1, 2], [0, 1], [1.0, float("nan")], [1.0, 0.0]).first_nonfinite_row()
        1
        """
        step = LENGTH_CHUNK_ROWS * 4
        for lo in range(0, self.nnz if self._values is not None else 0, step):
            bad = np.flatnonzero(~np.isfinite(self._values[lo:lo + step]))
            if bad.size:
                return int(np.searchsorted(self._indptr, lo + bad[0], side="right")) - 1
        return None

    @property
    def memory_mapped(self) -> bool:
        """Whether the rows are read from memory-mapped files (``afmfast.open_store``, or
        arrays of ``numpy.load(..., mmap_mode="r")``) rather than held in memory. ``fit``
        then reads them in a windowed order (``afmfast.models.epoch_order``).

        Examples
        --------
        >>> Dataset([0, 1], [0], [1.0], [1.0]).memory_mapped
        False
        """
        return _is_memory_mapped(self._indices)

    def row_length_counts(self):
        """``counts[n]`` = the number of rows with n nonzeros: int64, ``max_row_nnz + 1``
        entries (cached, read-only). Counted LENGTH_CHUNK_ROWS rows at a time, so
        that a data set of any size needs no O(n_rows) scratch (fit sizes its work space
        from it).

        Examples
        --------
        >>> Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0]).row_length_counts()
        array([0, 1, 1])
        """
        if self._length_counts is None:
            counts = np.zeros(1, dtype=np.int64)
            for lo in range(0, self.n_rows, LENGTH_CHUNK_ROWS):
                part = np.bincount(np.diff(self.indptr[lo:lo + LENGTH_CHUNK_ROWS + 1]))
                if len(part) > len(counts):
                    counts = np.concatenate([counts, np.zeros(len(part) - len(counts),
                                                              dtype=np.int64)])
                counts[:len(part)] += part
            counts.flags.writeable = False
            self._length_counts = counts
        return self._length_counts

    def __repr__(self):
        return (f"Dataset(n_rows={self.n_rows}, n_features={self.n_features}, "
                f"nnz={self.nnz}, max_row_nnz={self.max_row_nnz})")

    # ------------------------------------------------------------------ selection
    def __getitem__(self, idx):
        """Rows ``idx`` (integer array, boolean mask of length n_rows, or slice) as a new
        Dataset with the same ``n_features``. A slice of step 1 shares ``indices``,
        ``values`` and ``y`` with this Dataset; other selections copy. A single integer
        raises ``TypeError`` (write ``ds[[i]]``).

        Examples
        --------
        >>> import numpy as np
        >>> ds = Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0])
        >>> ds[:1]
        Dataset(n_rows=1, n_features=4, nnz=2, max_row_nnz=2)
        >>> ds[::-1].indices.tolist(), ds[np.array([False, True])].y.tolist()
        ([2, 0, 3], [-1.0])
        """
        n = self.n_rows
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1:
                stop = max(stop, start)
                lo, hi = self.indptr[start], self.indptr[stop]
                return Dataset._trusted(self.indptr[start:stop + 1] - lo,
                                        self.indices[lo:hi], self._some_values(lo, hi),
                                        self.y[start:stop], self.n_features, self._max_id,
                                        self.n_features_explicit, self._fields)
            rows = np.arange(start, stop, step, dtype=np.int64)
        else:
            if np.isscalar(idx) or (isinstance(idx, np.ndarray) and idx.ndim == 0):
                raise TypeError("Dataset rows are selected with an array, mask or slice; "
                                f"use ds[[{idx}]] for a single row")
            rows = np.asarray(idx)
            if rows.dtype == np.bool_:
                if rows.shape != (n,):
                    raise IndexError(f"boolean mask must have shape ({n},), got {rows.shape}")
                rows = np.flatnonzero(rows)
            elif rows.size == 0:
                rows = np.zeros(0, dtype=np.int64)
            elif not np.issubdtype(rows.dtype, np.integer):
                raise IndexError(f"row indices must be integers or booleans, got dtype "
                                 f"{rows.dtype}")
            elif rows.ndim != 1:
                raise IndexError(f"row indices must be 1-D, got shape {rows.shape}")
            else:
                rows = rows.astype(np.int64, copy=False)
                if rows.min() < -n or rows.max() >= n:
                    raise IndexError(f"row index out of range for a Dataset of {n} rows "
                                     f"(got min {rows.min()}, max {rows.max()})")
                rows = np.where(rows < 0, rows + n, rows)
        return self._take(rows)

    def _some_values(self, lo, hi):
        return None if self._values is None else self._values[lo:hi]

    def _take(self, rows):
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        total = int(indptr[-1])
        # source position of output nonzero j = starts[row(j)] + (j - indptr[row(j)])
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(total, dtype=np.int64)
        values = None if self._values is None else self._values[pos]
        return Dataset._trusted(indptr, self.indices[pos], values, self.y[rows],
                                self.n_features, self._max_id, self.n_features_explicit,
                                self._fields)

    def with_n_features(self, n_features):
        """The same rows (arrays shared, not copied) with feature count ``n_features``,
        e.g. to align a test set with a training set's larger id space. It keeps
        ``n_features_explicit``: aligning counts does not vouch for them.

        Examples
        --------
        >>> ds = Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0])
        >>> wide = ds.with_n_features(10)
        >>> wide.n_features, wide.indices is ds.indices
        (10, True)
        """
        max_id = self._max_id  # a selection inherits its parent's: an upper bound
        if n_features is None or _is_int(n_features) and n_features <= max_id:
            max_id = int(self.indices.max()) if self.nnz else -1
        n_features = _check_n_features(n_features, max_id, "indices")
        fields = self._fields
        if fields is not None and fields[0].size != n_features:  # ids beyond: no field
            ids = np.full(n_features, -1, np.int32)
            ids[:min(n_features, fields[0].size)] = fields[0][:n_features]
            ids.flags.writeable = False
            fields = (ids, fields[1])
        return Dataset._trusted(self.indptr, self.indices, self._values, self.y,
                                n_features, max_id, self.n_features_explicit, fields)

    def with_labels(self, y):
        """The same rows (arrays shared, not copied) with labels ``y`` (converted to
        float32, one per row); the rows are not checked again.

        Examples
        --------
        >>> ds = Dataset([0, 2, 3], [0, 3, 2], [1.0, 0.5, 1.0], [1.0, -1.0])
        >>> relabelled = ds.with_labels([0, 1])
        >>> relabelled.y.tolist(), relabelled.indices is ds.indices
        ([0.0, 1.0], True)
        """
        y = _as_1d(y, np.float32, "y")
        if y.size != self.n_rows:
            raise ValueError(f"y must have n_rows = {self.n_rows} entries, got {y.size}")
        return Dataset._trusted(self.indptr, self.indices, self._values, y,
                                self.n_features, self._max_id, self.n_features_explicit,
                                self._fields)

    @property
    def fields(self):
        """The field of each feature id, int32 (n_features,), read-only: -1 for an id
        of no field; or None when the Dataset has none (``with_fields`` gives them;
        stores of raw logs converted with hashing have them). ``AFM.field_attention``
        of a model fitted on the Dataset uses them.

        Examples
        --------
        >>> ds = Dataset([0, 2, 3], [0, 3, 2], None, [1.0, -1.0])
        >>> ds.fields is None, ds.with_fields([0, 1, 1, -1], ["user", "item"]).fields
        (True, array([ 0,  1,  1, -1], dtype=int32))
        """
        return None if self._fields is None else self._fields[0]

    @property
    def field_names(self):
        """The names of the fields (a list), or None without fields.

        Examples
        --------
        >>> ds = Dataset([0, 1], [1], None, [1.0]).with_fields([0, 1], ["a", "b"])
        >>> ds.field_names
        ['a', 'b']
        """
        return None if self._fields is None else list(self._fields[1])

    def with_fields(self, fields: ArrayLike, names=None) -> Dataset:
        """The same rows (arrays shared) with the field of each feature id: ``fields``
        holds n_features ints in [-1, number of fields), -1 marking an id of no field;
        ``names`` (default "0", "1", ...) one name per field.

        Examples
        --------
        >>> ds = Dataset([0, 2, 3], [0, 3, 2], None, [1.0, -1.0])
        >>> ds.with_fields([0, 0, 1, 1]).field_names
        ['0', '1']
        """
        ids = _as_1d(fields, np.int32, "fields")
        if names is None:
            names = [str(f) for f in range(int(ids.max()) + 1 if ids.size else 0)]
        names = [str(n) for n in names]
        _check_fields(ids, names, self.n_features)
        return self._with_checked_fields(ids, names)

    def _with_checked_fields(self, ids, names):
        return Dataset._trusted(self.indptr, self.indices, self._values, self.y,
                                self.n_features, self._max_id, self.n_features_explicit,
                                (read_only(ids), tuple(names)))


def _is_memory_mapped(array):
    """Whether ``array`` is a view of a ``numpy.memmap`` or of an ``mmap.mmap``."""
    import mmap

    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_fields(ids, names, n_features):
    """Raise ``ValueError`` unless ``ids`` (int32, n_features) hold fields in
    [-1, len(names)); checked a block at a time (no O(n_features) scratch)."""
    if ids.shape != (n_features,):
        raise ValueError(f"fields must hold one field per feature id (n_features = "
                         f"{n_features}), got shape {ids.shape}")
    for lo in range(0, ids.size, LENGTH_CHUNK_ROWS):
        block = ids[lo:lo + LENGTH_CHUNK_ROWS]
        if block.min() < -1 or block.max() >= len(names):
            bad = lo + int(np.flatnonzero((block < -1) | (block >= len(names)))[0])
            raise ValueError(f"fields[{bad}] = {ids[bad]} is not a field: fields are in "
                             f"[-1, {len(names)}) ({len(names)} names)")


def _check_n_features(n_features, max_id, what, where=""):
    if n_features is None:
        return max_id + 1
    if not _is_int(n_features):
        raise ValueError(f"{where}n_features must be an int, got {n_features!r}")
    n_features = int(n_features)
    if n_features < 0:
        raise ValueError(f"{where}n_features must be >= 0, got {n_features}")
    if max_id >= n_features:
        raise ValueError(f"{where}n_features = {n_features} is too small: {what} holds id "
                         f"{max_id}")
    return n_features


# ---------------------------------------------------------------------- libFM reader
