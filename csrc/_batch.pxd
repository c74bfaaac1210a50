# cython: language_level=3
"""Batch preparation shared by afmfast's Cython kernels (``_fm_cython``, ``_afm_cython``).

- Workspace: ``aligned_zeros`` / ``aligned_empty`` (64-byte aligned buffers, zeroed or
  not) and ``check_workspace_sizes`` (the arguments every ``*_workspace`` constructor
  validates).
- Arguments of a step: ``check_step_arrays`` validates what is common to fm_step and
  afm_step (batch size against the workspace, y against X, the CSR triple, n_threads),
  ``check_batches`` what fm_steps and afm_steps add (batch_size, len(losses)),
  ``checked_row_width`` X's row width (kernels.api.KernelX); ``check_indptr`` the whole
  indptr, for the kernels that read whole rows of X (scoring).
- Gathering a batch without the GIL: ``batch_offsets`` (batch-local nonzero offsets,
  rows and their indptr spans validated; a parallel loop of its own), ``row_first``
  (where a row starts: its indptr entry, or from the row width), ``copy_row`` (a row's
  nonzeros into contiguous batch-order buffers, ids checked), ``group_by_feature`` and
  ``scatter_groups`` (a stable counting sort of the batch's nonzeros by feature id: the
  touched features and, for each, its occurrences in batch order).
- Prefetching: ``prefetch_row`` (the cache lines of a row); ``prefetch_table_rows`` says
  whether a step should prefetch the rows of V (and its optimiser state) that it
  reaches through feature ids, ``feature_prefetch_distance`` how far ahead the
  feature updates do, ``state_prefetch_distance`` how far for the state's rows in FM's.
  GRAD_SPAN: the columns of a V row's gradient formed at a time.
- Work items of loops over the touched features: ``feature_items`` /
  ``feature_item_start`` (the popular features one by one, the rest in runs of
  ``feature_tail``).
- Epoch order: ``shuffled_rows_array`` computes kernels.api's epoch order (a permutation
  of the rows from a counter-based hash, the same for any thread count) in parallel.
- ``next_item_near`` (with ``reset_cursors``): dynamic scheduling by hand inside ``with
  parallel`` blocks, each thread starting on a home range of its own.
- The *_steps loops: ``batch_recorded`` records a batch's loss and says whether to go on.
- Errors: the nogil code returns an ERR_* code with the details in a ``BatchErr``;
  ``raise_batch_error`` turns it into a ValueError that names the offending entry.

Everything except the ``check_*`` functions, ``checked_row_width``,
``raise_batch_error`` and ``shuffled_rows_array`` is ``nogil``, allocates nothing and
holds no state, so it may run inside ``prange`` bodies; except ``batch_offsets``, which
runs its own ``prange`` (call it outside one).
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free
from libc.math cimport isfinite
from libc.string cimport memset
from cython.parallel cimport prange
from cython cimport floating

from _common cimport golden64, mix64

cdef extern from *:
    void __builtin_prefetch(const void* addr) noexcept nogil

cdef enum:
    # columns of a V row's gradient that the feature updates form at a time (stack
    # buffers: a per-feature buffer would leave u_cap x k dirty lines to write back)
    GRAD_SPAN = 256
    # rows ahead whose indptr entries batch_offsets prefetches (a shuffled batch's rows
    # are scattered over X), and the parts it splits the batch into with several threads
    OFFSET_PREFETCH = 16
    OFFSET_PARTS = 8
    # nonzeros ahead whose slot entries group_by_feature prefetches
    GROUP_PREFETCH = 16
    # work items of the feature updates (see feature_items and feature_tail)
    HEAD_FEATURES = 64
    TAIL_CHUNK = 32
    TAIL_BYTES = 8192
    # parts of the row range that count and scatter the epoch order's buckets in
    # parallel (any number gives the same order: the scatter is stable)
    SHUFFLE_PARTS = 16

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from *:
    """
    /* Claims the next item of a cursor shared by the threads (next_item_near). */
    static inline long long afmfast_grab(long long* cursor) {
        return __atomic_fetch_add(cursor, 1, __ATOMIC_RELAXED);
    }
    """
    long long afmfast_grab(long long* cursor) noexcept nogil


cdef enum:
    # long longs between the cursors of next_item_near (one cache line each)
    CURSOR_STRIDE = 8


cdef inline void reset_cursors(long long* cursors, int n_threads) noexcept nogil:
    """Zero the n_threads cursors of next_item_near (before its ``with parallel``)."""
    cdef int r
    for r in range(n_threads):
        cursors[r * CURSOR_STRIDE] = 0


cdef inline Py_ssize_t next_item_near(long long* cursors, Py_ssize_t n, int n_threads,
                                      int th, int* rank) noexcept nogil:
    """The next item for thread th of a loop over n items that the threads of a ``with
    parallel`` block hand out themselves: n_threads contiguous ranges, range r through
    cursors[r * CURSOR_STRIDE] (reset_cursors before the block); th takes its own
    range's items in order, then helps with the others' (th + 1, th + 2, ...). Returns
    n when none is left; rank (0 before th's first call) is where th has got to.
    - A thread works on the same part of the batch in every phase and every step,
      where the data it wrote (E, U, a row's buffers) is still in its own caches, and
      the loop stays balanced when a thread falls behind (docs/performance.md, "Home
      ranges against a dynamic schedule").
    - A thread that does other work first (the grouping by feature) joins late without
      holding the others back: a ``prange`` inside the block would, since GCC puts a
      barrier before a worksharing loop whose variable is firstprivate and lastprivate
      of a shared one, as Cython's always is."""
    cdef Py_ssize_t r, i
    while rank[0] < n_threads:
        r = (th + rank[0]) % n_threads
        i = r * n // n_threads + <Py_ssize_t>afmfast_grab(cursors + r * CURSOR_STRIDE)
        if i < (r + 1) * n // n_threads:
            return i
        rank[0] += 1
    return n


cdef inline void prefetch_row(const void* p, Py_ssize_t nbytes) noexcept nogil:
    """Prefetch the cache lines of nbytes at p (a row of V or of its optimiser state,
    reached through a feature id)."""
    cdef Py_ssize_t offset = 0
    while offset < nbytes:
        __builtin_prefetch(<const char*>p + offset)
        offset += 64


cdef inline bint prefetch_table_rows(Py_ssize_t table_bytes, int n_threads) noexcept nogil:
    """Whether to prefetch the rows of a table (V and its optimiser state) reached through
    feature ids: when it is larger than the caches, or when more than one thread
    updates it, since a row was then last written by the other core in the previous
    step's feature updates. A table that fits in one core's caches (Frappe's 5,382 x 16
    floats) gains nothing on one thread (docs/performance.md, "Prefetching")."""
    return n_threads > 1 or table_bytes > 2 * 1024 * 1024


cdef inline int feature_prefetch_distance(Py_ssize_t row_bytes) noexcept nogil:
    """How many touched features ahead the feature updates prefetch V's and the optimiser
    state's rows: 6 for rows of at most 128 bytes (k <= 32 in float32), whose update is
    too short to cover a miss two features ahead, else 2: longer rows gain nothing from
    more (docs/performance.md, "Prefetching")."""
    return 6 if row_bytes <= 128 else 2


cdef inline int state_prefetch_distance(Py_ssize_t row_bytes, int n_threads) noexcept nogil:
    """How many touched features ahead the FM feature updates prefetch the optimiser
    state's rows: on one thread twice feature_prefetch_distance, as the forward pass has
    left most of a batch's V rows in cache but not their state rows; on more threads the
    same distance as the V rows, where the longer one measured slower
    (docs/performance.md, "Accumulator rows prefetched further ahead")."""
    cdef int d = feature_prefetch_distance(row_bytes)
    return 2 * d if n_threads == 1 else d


# Error codes of the nogil step functions (0 = success).
cdef enum:
    ERR_ROW = 1       # a batch row id outside [0, n_rows)
    ERR_FEATURE = 2   # a feature id outside [0, M)
    ERR_NNZ = 3       # more nonzeros than the workspace's max_batch_nnz
    ERR_PAIRS = 4     # more pairs than the workspace's max_batch_pairs (AFM)
    ERR_INDPTR = 5    # a batch row whose indptr entries are not a range of X.indices


ctypedef struct BatchErr:
    Py_ssize_t pos    # index into rows (ERR_ROW) or into X.indices (ERR_FEATURE)
    int64_t value     # the offending value, or the count that exceeds a bound


cdef inline void* aligned_empty(size_t nbytes) except NULL:
    """64-byte aligned, not initialised (a large one is mapped lazily: its pages count
    in the RSS only once written); release with free()."""
    cdef void* p = NULL
    if nbytes == 0:
        nbytes = 64
    if posix_memalign(&p, 64, nbytes) != 0:
        raise MemoryError(f"afmfast: could not allocate {nbytes} bytes of kernel workspace")
    return p


cdef inline void* aligned_zeros(size_t nbytes) except NULL:
    """64-byte aligned (one AVX-512 vector / cache line), zeroed; release with free()."""
    cdef void* p = NULL
    if nbytes == 0:
        nbytes = 64
    if posix_memalign(&p, 64, nbytes) != 0:
        raise MemoryError(f"afmfast: could not allocate {nbytes} bytes of kernel workspace")
    memset(p, 0, nbytes)
    return p


cdef inline int check_workspace_sizes(dt, sizes, Py_ssize_t n_features,
                                      Py_ssize_t max_batch_nnz) except -1:
    """dt a NumPy dtype; sizes ((name, value), ...) must all be positive."""
    if dt.kind != "f" or dt.itemsize not in (4, 8):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    for name, v in sizes:
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if n_features > 2147483647 or max_batch_nnz > 2147483647:
        raise ValueError("n_features and max_batch_nnz must fit in int32")
    return 0


cdef inline int check_step_arrays(Py_ssize_t B, Py_ssize_t batch_cap, Py_ssize_t n_indptr,
                                  Py_ssize_t n_y, Py_ssize_t n_indices,
                                  Py_ssize_t n_values, int64_t last_indptr,
                                  int n_threads) except -1:
    """What fm_step and afm_step both validate before going nogil."""
    if B < 1 or B > batch_cap:
        raise ValueError(f"len(rows) must be in [1, {batch_cap}] (the workspace's "
                         f"batch_size), got {B}")
    if n_indptr < 1 or n_y != n_indptr - 1:
        raise ValueError(f"y has {n_y} rows but X has {n_indptr - 1}")
    # values of length 0 with nonzeros: every value is 1 (kernels.api)
    if (n_values != n_indices and n_values != 0) or last_indptr > n_indices:
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    if n_threads < 1:
        raise ValueError(f"cfg.n_threads must be a positive integer, got {n_threads}")
    return 0


cdef inline int check_batches(Py_ssize_t n_rows_arg, batch_size, Py_ssize_t n_batches,
                              Py_ssize_t batch_cap, bint single) except -1:
    """What the *_steps functions validate besides check_step_arrays: batch_size in
    [1, batch_cap] and len(losses) = ceil(len(rows) / batch_size) >= 1. single: the
    call is one *_step, whose batch is all of rows (the errors then say so)."""
    if single and not 1 <= n_rows_arg <= batch_cap:
        raise ValueError(f"len(rows) must be in [1, {batch_cap}] (the workspace's "
                         f"batch_size), got {n_rows_arg}")
    if not 1 <= batch_size <= batch_cap:
        raise ValueError(f"batch_size must be in [1, {batch_cap}] (the workspace's "
                         f"batch_size), got {batch_size}")
    if n_rows_arg < 1:
        raise ValueError("rows must hold at least one row")
    if n_batches != (n_rows_arg + batch_size - 1) // batch_size:
        raise ValueError(f"losses has {n_batches} entries, but rows holds "
                         f"{(n_rows_arg + batch_size - 1) // batch_size} batches of "
                         f"batch_size = {batch_size}")
    return 0


cdef inline bint batch_recorded(int err, BatchErr* e, Py_ssize_t first, double loss,
                                double* losses, Py_ssize_t* n_done) noexcept nogil:
    """After a batch of a *_steps loop (its rows from rows[first]) whose step returned
    err and loss: its loss into losses[n_done[0]], counted. False when the loop stops
    there: at an error (nothing recorded; e.pos made an index into all of rows for
    ERR_ROW) or after a loss that is not finite."""
    if err:
        if err == ERR_ROW or err == ERR_INDPTR:
            e.pos += first
        return False
    losses[n_done[0]] = loss
    n_done[0] += 1
    return isfinite(loss)


cdef inline int raise_batch_error(int err, const BatchErr* e, Py_ssize_t n_rows,
                                  Py_ssize_t M, Py_ssize_t nnz_cap,
                                  Py_ssize_t pair_cap) except -1:
    """ValueError for a nonzero ERR_* code of a step; 0 for err == 0."""
    if err == ERR_ROW:
        raise ValueError(f"rows[{e.pos}] = {e.value} is not a row of X "
                         f"(it has {n_rows} rows)")
    if err == ERR_FEATURE:
        raise ValueError(f"X.indices[{e.pos}] = {e.value} is not a feature id in "
                         f"[0, {M}) (n_features); raise n_features or fix the data")
    if err == ERR_NNZ:
        raise ValueError(f"the batch has {e.value} nonzeros, more than the workspace's "
                         f"max_batch_nnz = {nnz_cap}")
    if err == ERR_PAIRS:
        raise ValueError(f"the batch has {e.value} pairs of nonzeros, more than the "
                         f"workspace's max_batch_pairs = {pair_cap}")
    if err == ERR_INDPTR:
        raise ValueError(f"X is not a valid CSR triple: indptr[{e.value}]:indptr"
                         f"[{e.value + 1}], the nonzeros of rows[{e.pos}], is not a range "
                         f"of X.indices (indptr must rise from 0 to at most len(indices))")
    return 0


cdef inline void _row_lengths(const int64_t* rows, Py_ssize_t b0, Py_ssize_t b1,
                              Py_ssize_t n_rows, const int64_t* indptr, int64_t nnz,
                              int64_t* row_start, int64_t* total, int64_t* bad,
                              int* bad_code) noexcept nogil:
    """row_start[b + 1] = the length of row b for b in [b0, b1), their sum in total[0];
    bad[0] = the first b whose row id is outside [0, n_rows) (bad_code ERR_ROW) or
    whose indptr entries are not a range of [0, nnz) (ERR_INDPTR), then stops;
    else -1. Checking each row's span here, where its entries are read anyway, is what
    keeps a malformed indptr from sending the copy outside X or past the workspace."""
    cdef Py_ssize_t b
    cdef int64_t row, sum_len = 0, start, end
    bad[0] = -1
    for b in range(b0, b1):
        if b + OFFSET_PREFETCH < b1:
            row = rows[b + OFFSET_PREFETCH]
            if 0 <= row < n_rows:
                __builtin_prefetch(indptr + row)
        row = rows[b]
        if row < 0 or row >= n_rows:
            bad[0] = b
            bad_code[0] = ERR_ROW
            break
        start = indptr[row]
        end = indptr[row + 1]
        if start < 0 or end < start or end > nnz:
            bad[0] = b
            bad_code[0] = ERR_INDPTR
            break
        row_start[b + 1] = end - start
        sum_len += end - start
    total[0] = sum_len


cdef inline int check_indptr(const int64_t[::1] indptr, Py_ssize_t n_indices) except -1:
    """ValueError unless indptr starts at 0 or more, never falls, and ends at most at
    n_indices (len(X.indices)): every row is then a range of X.indices. For the kernels
    that read whole rows of X (scoring, explanations); one pass, no scratch."""
    cdef Py_ssize_t i, n = indptr.shape[0], bad = -1
    if n < 1:
        raise ValueError("X is not a valid CSR triple: indptr is empty")
    with nogil:
        if indptr[0] < 0:
            bad = 0
        else:
            for i in range(1, n):
                if indptr[i] < indptr[i - 1]:
                    bad = i
                    break
    if bad == 0:
        raise ValueError(f"X is not a valid CSR triple: indptr[0] = {indptr[0]} < 0")
    if bad > 0:
        raise ValueError(f"X is not a valid CSR triple: indptr[{bad}] = {indptr[bad]} < "
                         f"indptr[{bad - 1}] = {indptr[bad - 1]}")
    if indptr[n - 1] > n_indices:
        raise ValueError(f"X is not a valid CSR triple: indptr[-1] = {indptr[n - 1]} > "
                         f"len(indices) = {n_indices}")
    return 0


cdef inline int64_t checked_row_width(X, const int64_t[::1] indptr) except -1:
    """X's row_width (kernels.api.KernelX; 0 for a plain tuple), checked against
    indptr's first and last entries (ValueError when they disagree)."""
    cdef object width = getattr(X, "row_width", 0)
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef int64_t w
    try:
        w = width
    except (TypeError, OverflowError):
        raise ValueError(f"X.row_width must be an integer >= 0, got {width!r}") from None
    if w < 0:
        raise ValueError(f"X.row_width must be an integer >= 0, got {width!r}")
    if w == 0 or n < 0:
        return w
    if indptr[0] < 0:
        raise ValueError(f"X is not a valid CSR triple: indptr[0] = {indptr[0]} < 0")
    # by division: n * w could overflow for an absurd w
    if (indptr[n] - indptr[0]) % w != 0 or (indptr[n] - indptr[0]) // w != n:
        raise ValueError(f"X.row_width = {w} does not fit indptr: {n} rows of {w} "
                         f"nonzeros would end at indptr[0] + {n * w} = "
                         f"{indptr[0] + n * w}, indptr[-1] is {indptr[n]}")
    return w


cdef inline int64_t row_first(const int64_t* indptr, int64_t row_width,
                              int64_t row) noexcept nogil:
    """Where row ``row`` starts in X's indices: from its indptr entry, or for rows of
    row_width nonzeros each (row_width > 0) from indptr[0] alone, which spares the
    cache miss of a shuffled row's entry."""
    return indptr[0] + row * row_width if row_width > 0 else indptr[row]


cdef inline int batch_offsets(const int64_t* rows, Py_ssize_t B, Py_ssize_t n_rows,
                              const int64_t* indptr, int64_t row_width, int64_t* row_start,
                              int64_t nnz_cap, int n_threads, BatchErr* e) noexcept nogil:
    """row_start (B + 1,): batch-local nonzero offsets of the rows; ERR_ROW or
    ERR_INDPTR (the first invalid row in batch order) / ERR_NNZ. Rows of row_width
    nonzeros each (> 0; checked_row_width made their spans lie in X) need
    no lengths read. Else the rows' lengths are read in OFFSET_PARTS contiguous parts
    in parallel: a shuffled batch's indptr entries are cache misses, and one thread
    waiting for all of them was a serial part of every step."""
    cdef int64_t part_len[OFFSET_PARTS]
    cdef int64_t part_bad[OFFSET_PARTS]
    cdef int part_code[OFFSET_PARTS]
    cdef Py_ssize_t n_parts = OFFSET_PARTS if n_threads > 1 else 1, p, b, b0, b1
    # check_step_arrays made indptr[n_rows] at most len(X.indices)
    cdef int64_t base = 0, n, nnz = indptr[n_rows]
    if row_width > 0:
        for b in range(B):
            if rows[b] < 0 or rows[b] >= n_rows:
                e.pos = b
                e.value = rows[b]
                return ERR_ROW
            row_start[b] = b * row_width
        row_start[B] = B * row_width
        if row_start[B] > nnz_cap:
            e.value = row_start[B]
            return ERR_NNZ
        return 0
    if n_parts > B:  # B >= 1 (check_step_arrays)
        n_parts = B
    if n_parts == 1:
        _row_lengths(rows, 0, B, n_rows, indptr, nnz, row_start, &part_len[0],
                     &part_bad[0], &part_code[0])
    else:
        for p in prange(n_parts, schedule="static", num_threads=n_threads):
            _row_lengths(rows, p * B // n_parts, (p + 1) * B // n_parts, n_rows, indptr,
                         nnz, row_start, &part_len[p], &part_bad[p], &part_code[p])
    row_start[0] = 0
    for p in range(n_parts):
        if part_bad[p] >= 0:
            e.pos = part_bad[p]
            e.value = rows[part_bad[p]]
            return part_code[p]
    for p in range(n_parts):
        b0 = p * B // n_parts
        b1 = (p + 1) * B // n_parts
        for b in range(b0, b1):
            n = row_start[b + 1]
            row_start[b + 1] = base + n
            base += n
    if row_start[B] > nnz_cap:
        e.value = row_start[B]
        return ERR_NNZ
    return 0


cdef inline Py_ssize_t copy_row(const int32_t* indices, const floating* values,
                                int64_t start, Py_ssize_t n, Py_ssize_t M,
                                int32_t* occ_feature, floating* occ_x) noexcept nogil:
    """Copies the n nonzeros at X[start:start + n] to occ_feature/occ_x (values NULL:
    every value is 1); returns the position (in the row) of the first feature id
    outside [0, M), or -1 when all are valid."""
    cdef Py_ssize_t i, bad = -1
    cdef int32_t j
    for i in range(n):
        j = indices[start + i]
        occ_feature[i] = j
        occ_x[i] = values[start + i] if values != NULL else 1
        if (j < 0 or j >= M) and bad < 0:
            bad = i
    return bad


cdef inline Py_ssize_t group_by_feature(Py_ssize_t nnz, const int32_t* occ_feature,
                                        int32_t* occ_group, int32_t* feature_group,
                                        int32_t* group_feature, int64_t* group_cursor,
                                        int64_t* group_start,
                                        uint8_t* touched) noexcept nogil:
    """First half of the stable counting sort of the nonzeros occ_feature (feature ids,
    batch order): occ_group[q] = group of nonzero q (occ_group may be occ_feature
    itself), group_feature[u] = feature of group u in order of first occurrence,
    group_start (U + 1,) the groups' bounds, group_cursor[u] = group_start[u].
    feature_group (M,) must be all -1 on entry and is all -1 again on return; touched
    (M,), when not NULL, gets a 1 at each touched feature (``marks_pointer``). Returns
    U, the number of touched features."""
    cdef Py_ssize_t q, u, U = 0
    cdef int32_t j
    cdef bint new
    for q in range(nnz):
        if q + GROUP_PREFETCH < nnz:
            # feature_group is indexed by feature id: a large M's table is not in cache
            __builtin_prefetch(feature_group + occ_feature[q + GROUP_PREFETCH])
        j = occ_feature[q]
        u = feature_group[j]
        # Without a branch: whether a nonzero opens a group is as good as random (most
        # features of a batch occur once), and a mispredicted branch cost more than the
        # stores below, which a nonzero of an open group makes into slot U, still free
        # (group_feature and group_cursor have u_cap + 1 entries for that).
        new = u < 0
        if new:
            u = U
        group_feature[U] = j
        group_cursor[U] = 0
        feature_group[j] = <int32_t>u
        U += new
        group_cursor[u] += 1
        occ_group[q] = <int32_t>u
    group_start[0] = 0
    for u in range(U):
        group_start[u + 1] = group_start[u] + group_cursor[u]
        group_cursor[u] = group_start[u]
        feature_group[group_feature[u]] = -1
    if touched != NULL:
        for u in range(U):
            touched[group_feature[u]] = 1
    return U


cdef inline uint8_t* marks_pointer(object marks, Py_ssize_t n_features) except? NULL:
    """The buffer of ``marks``, a writable C-contiguous uint8 array of ``n_features``
    entries in which the training batches mark the features they touch (kernels.api's
    ``track_touched``); NULL for None."""
    cdef uint8_t[::1] view
    if marks is None:
        return NULL
    try:
        view = marks
    except (ValueError, TypeError, BufferError) as exc:
        raise ValueError(f"track_touched: marks must be a writable C-contiguous uint8 "
                         f"array ({exc})") from None
    if view.shape[0] != n_features:
        raise ValueError(f"track_touched: marks has {view.shape[0]} entries, the "
                         f"workspace {n_features} features")
    return &view[0]


cdef inline void scatter_groups(Py_ssize_t B, const int64_t* row_start,
                                const int32_t* occ_group, int64_t* group_cursor,
                                int32_t* grp_row, int32_t* grp_occ,
                                const floating* occ_x, floating* grp_x) noexcept nogil:
    """Second half: the occurrences of each group in batch order, as their batch row
    (grp_row), and when not NULL their batch-order index (grp_occ) and value (grp_x,
    from occ_x)."""
    cdef Py_ssize_t b, q, u
    cdef int64_t pos
    for b in range(B):
        for q in range(row_start[b], row_start[b + 1]):
            u = occ_group[q]
            pos = group_cursor[u]
            group_cursor[u] = pos + 1
            grp_row[pos] = <int32_t>b
            if grp_occ != NULL:
                grp_occ[pos] = <int32_t>q
            if grp_x != NULL:
                grp_x[pos] = occ_x[q]


cdef inline Py_ssize_t feature_tail(Py_ssize_t row_bytes) noexcept nogil:
    """Features per work item after the HEAD_FEATURES most popular (see feature_items):
    TAIL_CHUNK, or as many as hold TAIL_BYTES of V row when that is more. Each item is
    a grab of a counter shared by the threads, whose cache line crosses between cores;
    short rows (k = 16: 128 a grab) would otherwise pay about as much for the grabs as
    for the work, while large items of long rows leave the last items unbalanced
    (docs/performance.md, "Work items of the feature updates")."""
    cdef Py_ssize_t n = TAIL_BYTES // row_bytes if row_bytes > 0 else TAIL_CHUNK
    return n if n > TAIL_CHUNK else TAIL_CHUNK


cdef inline Py_ssize_t feature_items(Py_ssize_t U, Py_ssize_t tail) noexcept nogil:
    """Work items of a loop over the U touched features, which come in order of first
    occurrence, so the popular ones (most occurrences, most work) first: the first
    HEAD_FEATURES are an item each, the rest tail to an item. A loop that hands out
    items dynamically then keeps the threads balanced without paying for an atomic per
    rare feature. Items are [feature_item_start(i), feature_item_start(i + 1))."""
    if U <= HEAD_FEATURES:
        return U
    return HEAD_FEATURES + (U - HEAD_FEATURES + tail - 1) // tail


cdef inline Py_ssize_t feature_item_start(Py_ssize_t item, Py_ssize_t U,
                                          Py_ssize_t tail) noexcept nogil:
    cdef Py_ssize_t u = item if item <= HEAD_FEATURES else (
        HEAD_FEATURES + (item - HEAD_FEATURES) * tail)
    return u if u < U else U


cdef inline int64_t _shuffle_bucket(uint64_t kb, int64_t i, uint64_t R) noexcept nogil:
    return <int64_t>(((mix64(kb + <uint64_t>i * golden64()) >> 32) * R) >> 32)


cdef inline void _count_buckets(int64_t lo, int64_t hi, uint64_t kb, int64_t R,
                                int64_t* counts) noexcept nogil:
    cdef int64_t i
    memset(counts, 0, R * sizeof(int64_t))
    for i in range(lo, hi):
        counts[_shuffle_bucket(kb, i, R)] += 1


cdef inline void _scatter_buckets(int64_t lo, int64_t hi, uint64_t kb, int64_t R,
                                  int64_t* cursor, int64_t* out) noexcept nogil:
    cdef int64_t i, r
    for i in range(lo, hi):
        r = _shuffle_bucket(kb, i, R)
        out[cursor[r]] = i
        cursor[r] += 1


cdef inline void _shuffle_bucket_rows(int64_t o, int64_t m, uint64_t ks,
                                      int64_t* out) noexcept nogil:
    """Fisher-Yates on out[o:o + m] with draws from the hash of the position."""
    cdef int64_t pos, j, tmp
    for pos in range(m - 1, 0, -1):
        j = <int64_t>(((mix64(ks + <uint64_t>(o + pos) * golden64()) >> 32)
                       * <uint64_t>(pos + 1)) >> 32)
        tmp = out[o + pos]
        out[o + pos] = out[o + j]
        out[o + j] = tmp


cdef inline object shuffled_rows_array(n_rows, seed, epoch, int n_threads, api,
                                       out_given=None):
    """kernels.api's epoch order of (seed, epoch): int64 (n_rows,) (api is the module
    afmfast.kernels.api, which defines the keys and the bucket count, and allocates or
    checks ``out_given``, the caller's buffer).
    Parallel over SHUFFLE_PARTS parts of the rows (count, then scatter into buckets),
    then over the buckets (Fisher-Yates in cache): any n_threads gives the same order."""
    cdef int64_t n = n_rows, R, p, r, pos, c
    cdef uint64_t kb, ks
    cdef int64_t* counts
    cdef int64_t* bounds
    cdef int64_t[::1] out
    if n < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    out_array = api.order_buffer(out_given, n)
    if n == 0:
        return out_array
    out = out_array
    R = api.shuffle_buckets(n)
    kb_py, ks_py = api.shuffle_keys(seed, epoch)
    kb = kb_py
    ks = ks_py
    counts = <int64_t*>aligned_empty((SHUFFLE_PARTS * R + R + 1) * sizeof(int64_t))
    bounds = counts + SHUFFLE_PARTS * R
    with nogil:
        for p in prange(SHUFFLE_PARTS, schedule="static", num_threads=n_threads):
            _count_buckets(p * n // SHUFFLE_PARTS, (p + 1) * n // SHUFFLE_PARTS, kb, R,
                           counts + p * R)
        pos = 0
        for r in range(R):
            bounds[r] = pos
            for p in range(SHUFFLE_PARTS):
                c = counts[p * R + r]
                counts[p * R + r] = pos
                pos += c
        bounds[R] = pos
        for p in prange(SHUFFLE_PARTS, schedule="static", num_threads=n_threads):
            _scatter_buckets(p * n // SHUFFLE_PARTS, (p + 1) * n // SHUFFLE_PARTS, kb, R,
                             counts + p * R, &out[0])
        for r in prange(R, schedule="dynamic", num_threads=n_threads):
            _shuffle_bucket_rows(bounds[r], bounds[r + 1] - bounds[r], ks, &out[0])
    free(counts)
    return out_array
