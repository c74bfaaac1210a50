# cython: language_level=3
"""Cython FM kernels: the ``afmfast.kernels.api`` contract for float32 and float64.

Functions (shapes with M features, k factors, B = len(rows)):
    fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype) -> FMWorkspace
        Scratch for one fit: every buffer a step needs, allocated once.
    fm_step(X, y, rows, params, state, cfg, ws) -> float
        X = (indptr int64 (n_rows+1,), indices int32 (nnz,), values DTYPE (nnz,)),
        y DTYPE (n_rows,), rows int64 (B,), params FMParams, state FMOptState, cfg
        StepConfig, ws from fm_workspace with the same dtype, k and M.
        Mutates params.V / params.w (touched rows only), params.dense, params.bn_stats
        (when cfg.batch_norm), the matching entries of state, and ws. Returns the batch
        loss before the update. Raises ValueError for an out-of-range row or feature id,
        or a batch larger than the workspace.
    fm_steps(X, y, rows, batch_size, params, state, cfg, ws, losses) -> int
        fm_step on rows[i batch_size:(i + 1) batch_size] at step cfg.step + i for each
        of the len(losses) batches, in one loop without the GIL; losses float64 receives
        their losses. Stops after a non-finite loss; returns the batches run.
    fm_predict(X, params, batch_norm, n_threads, out)
        Writes out (n_rows,) DTYPE; feature ids outside [0, M) are skipped. Mutates only out.
    shuffled_rows(n_rows, seed, epoch, n_threads) -> int64 (n_rows,): kernels.api's epoch
        order.
DTYPE is the dtype of params.V (float32 or float64); every other float array must match.

How a step runs (every sum over the rows of the batch has one fixed order, so the result
is bit-identical for any n_threads):
    1. serial: batch-local nonzero offsets (rows and their indptr spans validated; for
       rows of one width, X.row_width, no indptr entry is read).
    2. prange over rows: the row's nonzeros are copied to contiguous batch-order
       buffers (ids validated).
    3. one thread: a stable counting sort groups the batch's nonzeros by feature id
       (``feature_group`` maps a feature to its group, -1 when untouched, reset after use),
       giving the touched features and, for each, its occurrences in row order;
       meanwhile the other threads start (and the sorting thread joins when done) a
       dynamic loop over rows: s = sum v x, f = 1/2 (s^2 - sum (v x)^2), linear term.
       Then batch-norm mean and biased variance (double): prange over fixed blocks of
       rows, the blocks' partial sums added in block order.
    4. prange over rows: normalisation, dropout mask, prediction, residual r, row loss.
    5. serial in row order: loss, gradient of w0; the batch-norm sums (gradients of gamma
       and beta) by blocks as in 3.
    6. prange over rows: df (dloss/df) per row. Skipped without batch norm and dropout,
       where df is the residual r in every column and step 7 reads r instead.
    7. prange over touched features: gradient of V row and w entry summed over the
       feature's occurrences in row order, + l2 v, then the optimiser. Features are
       independent, so this loop may be load-balanced dynamically without changing bits.
    8. serial: optimiser on dense, running batch-norm statistics.

Built with -fno-math-errno (setup.py): sqrt then never sets errno, which is what lets the
Adagrad/Adam loops vectorise; IEEE results are unchanged.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from openmp cimport omp_get_max_threads, omp_get_thread_num, omp_get_wtime
from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free

from _batch cimport (
    ERR_FEATURE, ERR_ROW, BatchErr, aligned_zeros as _alloc, batch_offsets, check_batches,
    check_step_arrays,
    check_workspace_sizes, copy_row, feature_item_start, feature_items, feature_tail,
    group_by_feature, marks_pointer, raise_batch_error, scatter_groups, prefetch_table_rows,
    feature_prefetch_distance, state_prefetch_distance, shuffled_rows_array, CURSOR_STRIDE,
    next_item_near, reset_cursors, GRAD_SPAN, prefetch_row, __builtin_prefetch, batch_recorded,
    checked_row_width, row_first, check_indptr,
)
from _common cimport (
    OPT_ADAGRAD, OPT_ADAM, OPT_MOMENTUM, OPT_SGD, OptCfg, as_u64, dropout_kept,
    dropout_row_key, dropout_threshold, fill_dropout_mask, loss_code_from, opt_cfg_from,
    dot_d, opt_elem, opt_vec, row_data_loss, ftz_enter, ftz_leave, mxcsr_read,
    HAVE_MXCSR, FTZ_DAZ_BITS, ftz_enter_caller, team_size,
)

from afmfast.kernels import api as _api

# read once at import: a step should not pay module attribute lookups
cdef double BN_EPS = _api.BN_EPS
cdef double BN_DECAY = _api.BN_DECAY
cdef double MOMENTUM_COEF = _api.MOMENTUM_COEF
cdef double ADAM_BETA1 = _api.ADAM_BETA1
cdef double ADAM_BETA2 = _api.ADAM_BETA2
cdef double ADAM_EPS = _api.ADAM_EPS

cdef enum:
    # rows ahead whose nonzeros (and label) the batch-order copy prefetches: a shuffled
    # batch's rows are cache misses of their own, most of them in DRAM
    PREFETCH_ROWS = 16
    # rows ahead whose V rows the forward pass prefetches (their ids were copied
    # earlier): short rows (V rows of at most SHORT_V_ROW_BYTES) four times as far, as
    # a row's arithmetic then takes too little time to cover a miss two rows ahead
    # (docs/performance.md, "Prefetching")
    PREFETCH_V_ROWS = 2
    PREFETCH_SHORT_V_ROWS = 8
    SHORT_V_ROW_BYTES = 256
    # rows a thread takes at a time in the forward pass (dynamic: the thread that sorts
    # joins late)
    FORWARD_CHUNK = 64
    # the widest k whose V-row gradients the feature updates sum 16 columns at a time in
    # registers (afmfast_grad16): each block is a pass over the feature's occurrences,
    # and at larger k those passes (Frappe's popular features occur hundreds of times
    # a batch) cost more than the register sums save (docs/performance.md)
    GRAD16_MAX_K = 32
    # rows a thread takes at a time in the output pass (_output_rows)
    OUTPUT_CHUNK = 32
    # With several threads, the feature updates read the S (and df) rows of a feature's
    # occurrences, which the other threads wrote in the row passes: each such read is a
    # line fetched from another core, which an update of one or two occurrences
    # (ml-tag-like batches) cannot hide. The rows of the occurrences this many ahead in
    # the grouped order are prefetched, at most this many a feature, so that a popular
    # feature (Frappe-like batches) does not flood the fill buffers (docs/performance.md,
    # "Occurrence rows prefetched across threads").
    OCC_PREFETCH = 16


cdef enum:
    # rows of FMWorkspace.factor_vectors, the DTYPE k-vectors the row loops read
    FV_MEAN = 0        # batch-norm mean of f
    FV_INV_STD = 1     # 1 / sqrt(var + BN_EPS)
    FV_INV_STD_B = 2   # that over B
    FV_SUM_DFH = 3     # sum_b dfh = gamma * sum_b dz
    FV_SUM_DFH_FH = 4  # sum_b dfh fh = gamma * sum_b dz fh
    FV_ONES = 5        # 1: the factors of z without batch norm or dropout
    FV_ZEROS = 6       # 0
    FV_ROWS = 7


include "_fm_batchnorm.pxi"


cdef class FMWorkspace:
    """Scratch of fm_step for one fit (see the module docstring); opaque to callers."""
    cdef readonly Py_ssize_t batch_size, max_batch_nnz, n_features, n_factors, u_cap
    cdef readonly object dtype
    # seconds from the start of the last step to the end of each of its PHASES; per
    # workspace, so that concurrent fits do not write each other's
    cdef double phase_t[6]
    # integer buffers; an occurrence is one nonzero of the batch, numbered in batch order
    # (row by row), a group the occurrences of one touched feature
    cdef long long* cursors       # (threads, CURSOR_STRIDE) next_item_near's cursors
    cdef int cursor_threads
    cdef int64_t* row_start       # (B + 1,) row b's occurrences: row_start[b]:row_start[b+1]
    cdef int32_t* feature_group   # (M,) feature -> its group, -1 when untouched (kept so
                                  # between steps)
    cdef int32_t* occ_feature     # (nnz,) feature id of each occurrence
    cdef int32_t* occ_group       # (nnz,) its group
    cdef int32_t* row_bad         # (B,) position in the row of its first feature id
                                  # outside [0, M), -1 when there is none
    cdef int32_t* group_feature   # (u_cap,) feature id of each group
    cdef int64_t* group_start     # (u_cap + 1,) group g's occurrences (in grp_row and
                                  # grp_x): group_start[g]:group_start[g + 1]
    cdef int64_t* group_cursor    # (u_cap,) the counting sort's fill positions
    cdef int32_t* grp_row         # (nnz,) batch row of each occurrence, grouped by feature
    cdef uint8_t* touched         # (M,) marks of the touched features, or NULL
    cdef object touched_owner     # the array behind touched
    # double buffers
    cdef double* residual         # (B,) y_hat - y
    cdef double* row_loss         # (B,)
    cdef double* group_sqnorm     # (u_cap,) ||V_row||^2 of each touched row, before the
                                  # update
    cdef double* bn_mean          # (k,) batch mean of f
    cdef double* bn_var           # (k,) batch biased variance of f
    cdef double* bn_inv_std       # (k,) 1 / sqrt(var + BN_EPS)
    cdef double* sum_dz           # (k,) sum_b dz (= gradient of beta)
    cdef double* sum_dzfh         # (k,) sum_b dz fh (= gradient of gamma)
    cdef double* bn_part          # (row blocks, 2k) per-block partial sums of the batch norm
    # DTYPE buffers (element size self.itemsize)
    cdef void* grp_x              # (nnz,) value of each occurrence, grouped by feature
    cdef void* occ_x              # (nnz,) value of each occurrence
    cdef void* row_s              # (B, k) s = sum v x
    cdef void* row_f              # (B, k) f, then f-hat, then df
    cdef void* dropout_scale      # (B, k) 0 or 1/keep
    cdef void* row_linear         # (B,) linear term
    cdef void* factor_vectors     # (FV_ROWS, k) DTYPE k-vectors of a step (rows FV_*)
    cdef void* grad_dense         # (1 + 2k,) gradient of dense
    cdef Py_ssize_t itemsize

    def __cinit__(self, Py_ssize_t batch_size, Py_ssize_t max_batch_nnz,
                  Py_ssize_t n_features, Py_ssize_t n_factors, dtype):
        cdef Py_ssize_t i, B, N, M, k, U, isz
        dt = np.dtype(dtype)
        check_workspace_sizes(dt, (("batch_size", batch_size),
                                   ("max_batch_nnz", max_batch_nnz),
                                   ("n_features", n_features), ("n_factors", n_factors)),
                              n_features, max_batch_nnz)
        B, N, M, k = batch_size, max_batch_nnz, n_features, n_factors
        U = min(M, N)
        self.batch_size, self.max_batch_nnz, self.n_features, self.n_factors = B, N, M, k
        self.u_cap = U
        self.dtype = dt
        isz = dt.itemsize
        self.itemsize = isz
        self.row_start = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.feature_group = <int32_t*>_alloc(M * sizeof(int32_t))
        for i in range(M):
            self.feature_group[i] = -1
        self.occ_feature = <int32_t*>_alloc(N * sizeof(int32_t))
        self.occ_group = <int32_t*>_alloc(N * sizeof(int32_t))
        self.row_bad = <int32_t*>_alloc(B * sizeof(int32_t))
        self.group_feature = <int32_t*>_alloc((U + 1) * sizeof(int32_t))
        self.group_start = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.group_cursor = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.grp_row = <int32_t*>_alloc(N * sizeof(int32_t))
        self.residual = <double*>_alloc(B * sizeof(double))
        self.row_loss = <double*>_alloc(B * sizeof(double))
        self.group_sqnorm = <double*>_alloc(U * sizeof(double))
        self.bn_mean = <double*>_alloc(k * sizeof(double))
        self.bn_var = <double*>_alloc(k * sizeof(double))
        self.bn_inv_std = <double*>_alloc(k * sizeof(double))
        self.sum_dz = <double*>_alloc(k * sizeof(double))
        self.sum_dzfh = <double*>_alloc(k * sizeof(double))
        self.bn_part = <double*>_alloc(((B + BN_BLOCK - 1) // BN_BLOCK) * 2 * k * sizeof(double))
        self.grp_x = _alloc(N * isz)
        self.occ_x = _alloc(N * isz)
        self.row_s = _alloc(B * k * isz)
        self.row_f = _alloc(B * k * isz)
        self.dropout_scale = _alloc(B * k * isz)
        self.row_linear = _alloc(B * isz)
        self.factor_vectors = _alloc(FV_ROWS * k * isz)
        self.grad_dense = _alloc((1 + 2 * k) * isz)

    def track_touched(self, marks):
        """See the module's ``track_touched``."""
        self.touched = marks_pointer(marks, self.n_features)
        self.touched_owner = marks

    def __dealloc__(self):
        # free(NULL) is a no-op, so a half-built workspace is fine too.
        free(self.row_start); free(self.feature_group); free(self.occ_feature)
        free(self.occ_group); free(self.row_bad); free(self.group_feature)
        free(self.cursors); free(self.group_start); free(self.group_cursor)
        free(self.grp_row); free(self.residual); free(self.row_loss)
        free(self.group_sqnorm); free(self.bn_mean); free(self.bn_var)
        free(self.bn_inv_std); free(self.sum_dz); free(self.sum_dzfh)
        free(self.bn_part); free(self.grp_x); free(self.occ_x); free(self.row_s)
        free(self.row_f); free(self.dropout_scale); free(self.row_linear)
        free(self.factor_vectors); free(self.grad_dense)

    cdef void _ensure_threads(self, int n_threads) except *:
        """next_item_near's cursors for n_threads (grown once, kept for the fit)."""
        if n_threads <= self.cursor_threads:
            return
        free(self.cursors)
        self.cursors = NULL
        self.cursor_threads = 0
        self.cursors = <long long*>_alloc(n_threads * CURSOR_STRIDE * sizeof(long long))
        self.cursor_threads = n_threads

    def __repr__(self):
        return (f"FMWorkspace(batch_size={self.batch_size}, max_batch_nnz="
                f"{self.max_batch_nnz}, n_features={self.n_features}, "
                f"n_factors={self.n_factors}, dtype={self.dtype})")


def fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype):
    """Scratch for the fm_step calls of one fit.

    batch_size and max_batch_nnz bound len(rows) and the batch's nonzero count;
    n_features (M), n_factors (k) and dtype must match the parameters.

    Example: ws = fm_workspace(4096, 4096 * 10, 5382, 16, np.float32)
    """
    return FMWorkspace(batch_size, max_batch_nnz, n_features, n_factors, dtype)


# Scalars and raw pointers of one step; the DTYPE arrays travel as memoryviews.
ctypedef struct StepArgs:
    Py_ssize_t B, k, M, n_rows, nnz_cap
    int64_t row_width  # X's (checked_row_width), 0: rows located through indptr
    Py_ssize_t n_touched  # touched features (groups) of the batch
    int n_threads, batch_norm, use_dropout, loss, prefetch_v, prefetch_rows
    int prefetch_features
    int prefetch_occurrences  # this step's feature updates prefetch (OCC_PREFETCH)
    int df_is_r  # df = r in every column (no batch norm or dropout): _df_row is skipped
    Py_ssize_t n_occ  # the batch's nonzeros
    int prefetch_state  # the optimiser state's rows: state_prefetch_distance
    double l2, inv_keep
    uint64_t seed, step
    uint32_t threshold
    const int64_t* indptr
    const int32_t* indices
    const int64_t* rows
    OptCfg opt
    BatchErr err


cdef extern from "fm_vec16.h":
    # r not NULL: df is r[b] in every column and DF is not read (fm_vec16.h)
    void afmfast_grad16_f(const int32_t* rows, const float* xs, Py_ssize_t p0,
                          Py_ssize_t p1, const float* S, const float* DF, const double* r,
                          Py_ssize_t k, const float* v, float* g) noexcept nogil
    void afmfast_grad16_d(const int32_t* rows, const double* xs, Py_ssize_t p0,
                          Py_ssize_t p1, const double* S, const double* DF, const double* r,
                          Py_ssize_t k, const double* v, double* g) noexcept nogil
    void afmfast_pairwise16_f(const int32_t* ids, const float* xs, Py_ssize_t n,
                              Py_ssize_t M, const float* V, Py_ssize_t k, float* s,
                              float* f) noexcept nogil
    void afmfast_pairwise16_d(const int32_t* ids, const double* xs, Py_ssize_t n,
                              Py_ssize_t M, const double* V, Py_ssize_t k, double* s,
                              double* f) noexcept nogil


cdef inline floating _pairwise(Py_ssize_t k, Py_ssize_t M, const int32_t* ids,
                               const floating* xs, Py_ssize_t n, const floating* V,
                               const floating* w, floating* s, floating* sq) noexcept nogil:
    """s = sum v x and sq <- f = 1/2 (s^2 - sum (v x)^2) over the n nonzeros (ids, xs;
    xs NULL: every value is 1), ids outside [0, M) skipped; returns the linear term
    sum w x."""
    cdef Py_ssize_t f, t, f0 = 0
    cdef const floating* v
    cdef floating x, tv, acc = 0
    cdef int32_t j
    while f0 + 16 <= k:
        if floating is float:
            afmfast_pairwise16_f(ids, xs, n, M, V + f0, k, s + f0, sq + f0)
        else:
            afmfast_pairwise16_d(ids, xs, n, M, V + f0, k, s + f0, sq + f0)
        f0 += 16
    for f in range(f0, k):
        s[f] = 0
        sq[f] = 0
    for t in range(n):
        j = ids[t]
        if j < 0 or j >= M:
            continue
        x = xs[t] if xs != NULL else 1
        v = V + <Py_ssize_t>j * k
        acc = acc + w[j] * x
        for f in range(f0, k):
            tv = v[f] * x
            s[f] = s[f] + tv
            sq[f] = sq[f] + tv * tv
    for f in range(f0, k):
        sq[f] = <floating>0.5 * (s[f] * s[f] - sq[f])
    return acc


cdef inline void _copy_batch_row(const StepArgs* a, Py_ssize_t b, const int64_t* row_start,
                                 const floating* values, const floating* y, double* r,
                                 int32_t* occ_feature, floating* occ_x,
                                 int32_t* row_bad) noexcept nogil:
    """Row b's nonzeros to the batch-order buffers occ_feature/occ_x (ids validated into
    row_bad[b]) and its label to r[b]: the grouping and the row arithmetic then read
    contiguous memory instead of the shuffled rows of X."""
    cdef int64_t start
    if b + PREFETCH_ROWS < a.B:
        # the rows of a shuffled batch are scattered over X: start the next misses early
        start = row_first(a.indptr, a.row_width, a.rows[b + PREFETCH_ROWS])
        __builtin_prefetch(a.indices + start)
        if values != NULL:
            __builtin_prefetch(values + start)
        __builtin_prefetch(y + a.rows[b + PREFETCH_ROWS])
    r[b] = <double>y[a.rows[b]]  # the label, until _output_rows turns it into the residual
    row_bad[b] = <int32_t>copy_row(a.indices, values,
                                   row_first(a.indptr, a.row_width, a.rows[b]),
                                   row_start[b + 1] - row_start[b], a.M,
                                   occ_feature + row_start[b], occ_x + row_start[b])


cdef inline void _forward_row(const StepArgs* a, Py_ssize_t b, const int64_t* row_start,
                              const floating* V, const floating* w, floating* S,
                              floating* F, floating* row_linear, const int32_t* occ_feature,
                              const floating* occ_x) noexcept nogil:
    """s, f and the linear term of row b from its copied (valid) nonzeros."""
    cdef int64_t q = row_start[b], p
    cdef Py_ssize_t n = row_start[b + 1] - q
    cdef int32_t j
    if a.prefetch_v and b + a.prefetch_rows < a.B:
        for p in range(row_start[b + a.prefetch_rows], row_start[b + a.prefetch_rows + 1]):
            j = occ_feature[p]
            prefetch_row(V + <Py_ssize_t>j * a.k, a.k * sizeof(floating))
            __builtin_prefetch(w + j)
    # F[b] holds sum (v x)^2 until f replaces it
    row_linear[b] = _pairwise(a.k, a.M, occ_feature + q, occ_x + q, n, V, w, S + b * a.k,
                              F + b * a.k)


cdef void _group_batch(StepArgs* a, FMWorkspace ws, const floating* occ_x,
                       floating* grp_x) noexcept nogil:
    """The batch's nonzeros grouped by feature (stable counting sort): a.n_touched,
    group_feature, group_start, grp_row, grp_x. occ_group (the group of each nonzero) is
    its own buffer, as the row arithmetic reads occ_feature at the same time."""
    a.n_touched = group_by_feature(ws.row_start[a.B], ws.occ_feature, ws.occ_group,
                                   ws.feature_group, ws.group_feature, ws.group_cursor,
                                   ws.group_start, ws.touched)
    scatter_groups(a.B, ws.row_start, ws.occ_group, ws.group_cursor, ws.grp_row, NULL, occ_x, grp_x)
    a.n_occ = ws.row_start[a.B]


cdef inline void _zparts(Py_ssize_t k, const floating* fr, const floating* sc,
                         const floating* gamma, const floating* beta,
                         floating* part) noexcept nogil:
    """The 16 interleaved partial sums of sum_f (gamma_f fr_f + beta_f) sc_f (lane l sums
    the columns f = l mod 16), which _output_rows adds up in lane order: a fixed order (so
    still thread-count independent) that vectorises, where one running sum would be a
    chain of k dependent scalar adds."""
    cdef Py_ssize_t f0 = 0, l
    for l in range(16):
        part[l] = 0
    while f0 + 16 <= k:
        for l in range(16):
            part[l] = part[l] + (gamma[f0 + l] * fr[f0 + l] + beta[f0 + l]) * sc[f0 + l]
        f0 += 16
    for l in range(k - f0):
        part[l] = part[l] + (gamma[f0 + l] * fr[f0 + l] + beta[f0 + l]) * sc[f0 + l]


cdef inline floating _lane_total(const floating* part) noexcept nogil:
    """The 16 partial sums of _zparts added up in lane order."""
    cdef floating total = 0
    cdef Py_ssize_t l
    for l in range(16):
        total = total + part[l]
    return total


cdef inline floating _zsum(Py_ssize_t k, const floating* fr, const floating* sc,
                           const floating* gamma, const floating* beta) noexcept nogil:
    """sum_f (gamma_f fr_f + beta_f) sc_f: _zparts, then _lane_total."""
    cdef floating part[16]
    _zparts(k, fr, sc, gamma, beta, part)
    return _lane_total(part)


cdef inline void _output_parts(const StepArgs* a, Py_ssize_t b, const floating* dense,
                               floating* F, floating* SC, const floating* factor_vectors,
                               floating* part) noexcept nogil:
    """Row b's dropout scales (SC[b]), f-hat under batch norm (F[b]) and the partial sums
    of its z (_zparts)."""
    cdef Py_ssize_t k = a.k, f
    cdef floating* fr = F + b * k
    cdef floating* sc = SC + b * k
    cdef const floating* mu_t = factor_vectors + FV_MEAN * k
    cdef const floating* inv_t = factor_vectors + FV_INV_STD * k
    cdef const floating* ones = factor_vectors + FV_ONES * k
    cdef const floating* zeros = factor_vectors + FV_ZEROS * k
    cdef floating inv_keep = <floating>a.inv_keep
    cdef uint64_t key
    cdef uint32_t thr
    if a.use_dropout:
        key = dropout_row_key(a.seed, 0, a.step, <uint64_t>a.rows[b])
        thr = a.threshold  # a local: the stores into sc could alias a field of *a
        for f in range(k):
            sc[f] = inv_keep if dropout_kept(key, <uint32_t>f, thr) else 0
    if a.batch_norm:
        for f in range(k):
            fr[f] = (fr[f] - mu_t[f]) * inv_t[f]
    # Absent batch norm or dropout, their factors are 1 and 0: exact, so z is bit for bit
    # f, gamma fh + beta, f sc or (gamma fh + beta) sc as the contract defines it.
    cdef const floating* zsc = ones
    cdef const floating* zgamma = ones
    cdef const floating* zbeta = zeros
    if a.use_dropout:
        zsc = sc
    if a.batch_norm:
        zgamma = dense + 1
        zbeta = dense + 1 + k
    _zparts(k, fr, zsc, zgamma, zbeta, part)


cdef inline void _output_rows(const StepArgs* a, Py_ssize_t b0, Py_ssize_t b1,
                              const floating* dense, floating* F, floating* SC,
                              const floating* row_linear, const floating* factor_vectors,
                              double* r, double* row_loss) noexcept nogil:
    """Rows b0 <= b < b1 (at most OUTPUT_CHUNK): prediction, loss and residual r[b]. The
    partial sums of all the rows first, then their lane-order totals: the totals are
    chains of 16 dependent adds, and a loop of nothing else keeps several rows' chains in
    flight, where one loop doing everything held one or two."""
    cdef floating part[OUTPUT_CHUNK * 16]
    cdef Py_ssize_t b
    cdef double yhat
    for b in range(b0, b1):
        _output_parts(a, b, dense, F, SC, factor_vectors, part + (b - b0) * 16)
    for b in range(b0, b1):
        yhat = (<double>dense[0] + <double>row_linear[b]
                + <double>_lane_total(part + (b - b0) * 16))
        row_loss[b] = row_data_loss(a.loss, yhat, r[b], &r[b])


cdef inline void _df_row(const StepArgs* a, Py_ssize_t b, const double* r,
                         const floating* dense, floating* F, const floating* SC,
                         const floating* factor_vectors) noexcept nogil:
    """F[b] (f-hat under batch norm) becomes df = dloss/df of row b."""
    cdef Py_ssize_t k = a.k, f
    cdef floating* fr = F + b * k
    cdef const floating* sc = SC + b * k
    cdef const floating* gamma = dense + 1
    cdef const floating* inv_b = factor_vectors + FV_INV_STD_B * k
    cdef const floating* s1 = factor_vectors + FV_SUM_DFH * k
    cdef const floating* s2 = factor_vectors + FV_SUM_DFH_FH * k
    cdef floating rb = <floating>r[b]
    cdef floating nb = <floating>a.B
    cdef floating dz
    for f in range(k):
        dz = rb * sc[f] if a.use_dropout else rb
        if a.batch_norm:
            fr[f] = inv_b[f] * (nb * (dz * gamma[f]) - s1[f] - fr[f] * s2[f])
        else:
            fr[f] = dz
    

cdef inline void _feature_update(const StepArgs* a, Py_ssize_t u, const int32_t* group_feature,
                                 const int64_t* group_start, const int32_t* grp_row,
                                 const floating* grp_x, const floating* S,
                                 const floating* DF, const double* r, double* grp_sq,
                                 floating* V, floating* w, floating* sV0, floating* sV1,
                                 floating* sw0, floating* sw1, bint df_is_r) noexcept nogil:
    """Touched feature u: its V row's gradient summed over its occurrences in row order,
    + l2 v, then the optimiser: at k <= GRAD16_MAX_K 16 columns at a time (the sum in
    registers), else and for the last k mod 16 GRAD_SPAN at a time; ||v||^2 before the
    update into grp_sq[u] (0 when l2 = 0); then its w entry."""
    cdef Py_ssize_t k = a.k, f, f0, nf, p, j = group_feature[u]
    cdef Py_ssize_t p0 = group_start[u], p1 = group_start[u + 1]
    cdef floating* v = V + j * k
    cdef floating g[GRAD_SPAN]
    cdef const floating* s
    cdef const floating* d
    cdef floating x, dx, gw = 0
    cdef floating l2 = <floating>a.l2
    cdef Py_ssize_t b, j_next
    if a.prefetch_v and u + a.prefetch_features < a.n_touched:
        j_next = group_feature[u + a.prefetch_features]
        prefetch_row(V + j_next * k, k * sizeof(floating))
        if a.opt.code == OPT_ADAM or a.opt.code == OPT_MOMENTUM:
            prefetch_row(sV1 + j_next * k, k * sizeof(floating))
        __builtin_prefetch(w + j_next)
    if a.prefetch_v and u + a.prefetch_state < a.n_touched:
        j_next = group_feature[u + a.prefetch_state]
        prefetch_row(sV0 + j_next * k, k * sizeof(floating))
        __builtin_prefetch(sw0 + j_next)
    if a.prefetch_occurrences:  # see OCC_PREFETCH
        for p in range(p0 + OCC_PREFETCH, min(min(p1, p0 + OCC_PREFETCH) + OCC_PREFETCH,
                                              a.n_occ)):
            b = grp_row[p]
            prefetch_row(S + b * k, k * sizeof(floating))
            if not df_is_r:
                prefetch_row(DF + b * k, k * sizeof(floating))
    # the l2 terms only when l2 > 0: at l2 = 0 they would cost a pass over the row for
    # nothing
    grp_sq[u] = dot_d(v, v, k) if l2 != 0 else 0.0
    f0 = 0
    while k <= GRAD16_MAX_K and f0 + 16 <= k:
        if floating is float:
            afmfast_grad16_f(grp_row, grp_x, p0, p1, S + f0, DF + f0,
                             r if df_is_r else NULL, k, v + f0, g)
        else:
            afmfast_grad16_d(grp_row, grp_x, p0, p1, S + f0, DF + f0,
                             r if df_is_r else NULL, k, v + f0, g)
        if l2 != 0:
            for f in range(16):
                g[f] = g[f] + l2 * v[f0 + f]
        opt_vec(&a.opt, v + f0, sV0 + j * k + f0, sV1 + j * k + f0, g, 16, False)
        f0 += 16
    while f0 < k:
        nf = k - f0 if k - f0 < GRAD_SPAN else GRAD_SPAN
        for f in range(nf):
            g[f] = 0
        for p in range(p0, p1):
            b = grp_row[p]
            x = grp_x[p]
            s = S + b * k + f0
            if df_is_r:
                dx = <floating>r[b] * x
                for f in range(nf):
                    g[f] = g[f] + dx * (s[f] - v[f0 + f] * x)
            else:
                d = DF + b * k + f0
                for f in range(nf):
                    g[f] = g[f] + d[f] * x * (s[f] - v[f0 + f] * x)
        if l2 != 0:
            for f in range(nf):
                g[f] = g[f] + l2 * v[f0 + f]
        opt_vec(&a.opt, v + f0, sV0 + j * k + f0, sV1 + j * k + f0, g, nf, False)
        f0 += nf
    for p in range(p0, p1):
        gw = gw + <floating>r[grp_row[p]] * grp_x[p]
    opt_elem(&a.opt, w + j, sw0 + j, sw1 + j, gw)


# The phases of a step, in order: FMWorkspace.phase_t holds the wall-clock seconds from
# the start of the workspace's last step to the end of each (_phase_times names them).
PHASES = ("prepare", "group_forward", "output", "df", "feature_updates", "dense_updates")


def _phase_times(FMWorkspace ws):
    """{phase: seconds} of the last fm_step run with ``ws``, phases named by PHASES (for
    profiling: bench/profile_phases.py)."""
    return _phase_seconds(ws.phase_t)


cdef int _step_nogil(StepArgs* a, FMWorkspace ws, const floating* values,
                     const floating* y, floating* V, floating* w, floating* dense,
                     floating* bn, floating* sV, floating* sw, floating* sd,
                     double* loss_out) noexcept nogil:
    cdef Py_ssize_t B = a.B, k = a.k, M = a.M, b, b1, c, f, u, U = 0, q, it, tail, n_items
    cdef int nt = a.n_threads, err, rank
    cdef Py_ssize_t n_fwd = (B + FORWARD_CHUNK - 1) // FORWARD_CHUNK
    cdef Py_ssize_t n_out = (B + OUTPUT_CHUNK - 1) // OUTPUT_CHUNK
    cdef floating* S = <floating*>ws.row_s
    cdef floating* F = <floating*>ws.row_f
    cdef floating* SC = <floating*>ws.dropout_scale
    cdef floating* row_linear = <floating*>ws.row_linear
    cdef floating* grp_x = <floating*>ws.grp_x
    cdef floating* factor_vectors = <floating*>ws.factor_vectors
    cdef floating* grad_dense = <floating*>ws.grad_dense
    cdef double* r = ws.residual
    cdef double* mu = ws.bn_mean
    cdef double* var = ws.bn_var
    cdef double* inv = ws.bn_inv_std
    cdef double* sdz = ws.sum_dz
    cdef double* sdzfh = ws.sum_dzfh
    cdef double loss = 0, gw0 = 0, d, rb
    cdef floating* fr
    cdef unsigned int csr
    cdef double t0 = omp_get_wtime()

    err = batch_offsets(a.rows, B, a.n_rows, a.indptr, a.row_width, ws.row_start, a.nnz_cap,
                        nt, &a.err)
    if err:
        return err

    with parallel(num_threads=nt):
        csr = ftz_enter()
        for b in prange(B, schedule="static"):
            _copy_batch_row(a, b, ws.row_start, values, y, r, ws.occ_feature, <floating*>ws.occ_x,
                            ws.row_bad)
        ftz_leave(csr)
    for b in range(B):
        if ws.row_bad[b] >= 0:
            a.err.pos = row_first(a.indptr, a.row_width, a.rows[b]) + ws.row_bad[b]
            a.err.value = ws.occ_feature[ws.row_start[b] + ws.row_bad[b]]
            return ERR_FEATURE
    ws.phase_t[0] = omp_get_wtime() - t0

    # The grouping is serial and only the feature updates need it: one thread sorts
    # while the others start on the rows, and it joins them when done (next_item_near:
    # a prange would hold the others back until it arrives). Its home ranges of rows
    # are the static halves of the output and df loops below.
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        if threadid() == 0:
            _group_batch(a, ws, <floating*>ws.occ_x, grp_x)
        c = next_item_near(ws.cursors, n_fwd, nt, threadid(), &rank)
        while c < n_fwd:
            b = c * FORWARD_CHUNK
            b1 = b + FORWARD_CHUNK if b + FORWARD_CHUNK < B else B
            while b < b1:
                _forward_row(a, b, ws.row_start, V, w, S, F, row_linear, ws.occ_feature,
                             <floating*>ws.occ_x)
                b = b + 1
            c = next_item_near(ws.cursors, n_fwd, nt, threadid(), &rank)
        ftz_leave(csr)
    U = a.n_touched
    a.prefetch_occurrences = nt > 1 and a.prefetch_v
    ws.phase_t[1] = omp_get_wtime() - t0

    if a.batch_norm:
        _bn_sums(a, BN_MEAN, F, SC, r, mu, ws.bn_part, mu, NULL)
        for f in range(k):
            mu[f] = mu[f] / B
        _bn_sums(a, BN_VAR, F, SC, r, mu, ws.bn_part, var, NULL)
        for f in range(k):
            var[f] = var[f] / B
            inv[f] = 1.0 / sqrt(var[f] + BN_EPS)
            factor_vectors[FV_MEAN * k + f] = <floating>mu[f]
            factor_vectors[FV_INV_STD * k + f] = <floating>inv[f]
            factor_vectors[FV_INV_STD_B * k + f] = <floating>(inv[f] / B)

    for f in range(k):
        factor_vectors[FV_ONES * k + f] = 1
        factor_vectors[FV_ZEROS * k + f] = 0
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for c in prange(n_out, schedule="static"):
            b = c * OUTPUT_CHUNK
            _output_rows(a, b, b + OUTPUT_CHUNK if b + OUTPUT_CHUNK < B else B, dense, F,
                         SC, row_linear, factor_vectors, r, ws.row_loss)
        ftz_leave(csr)

    for b in range(B):
        loss += ws.row_loss[b]
        gw0 += r[b]
    if a.batch_norm:
        _bn_sums(a, BN_DZ, F, SC, r, mu, ws.bn_part, sdz, sdzfh)
        for f in range(k):
            factor_vectors[FV_SUM_DFH * k + f] = <floating>(<double>dense[1 + f] * sdz[f])
            factor_vectors[FV_SUM_DFH_FH * k + f] = <floating>(<double>dense[1 + f] * sdzfh[f])
    ws.phase_t[2] = omp_get_wtime() - t0

    if not a.df_is_r:
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for b in prange(B, schedule="static"):
                _df_row(a, b, r, dense, F, SC, factor_vectors)
            ftz_leave(csr)
    ws.phase_t[3] = omp_get_wtime() - t0

    # Popular features have many occurrences: items handed out dynamically balance the
    # threads, and each feature's arithmetic is the same whichever thread runs it. Each
    # thread starts on its home range (next_item_near): features first seen in its rows.
    tail = feature_tail(k * <Py_ssize_t>sizeof(floating))
    n_items = feature_items(U, tail)
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        it = next_item_near(ws.cursors, n_items, nt, threadid(), &rank)
        while it < n_items:
            for u in range(feature_item_start(it, U, tail),
                           feature_item_start(it + 1, U, tail)):
                # df_is_r a constant at each call, so that the compiler specialises the
                # function: as a field read in it, the reference settings ran more
                # instructions than before the plain path existed
                if a.df_is_r:
                    _feature_update(a, u, ws.group_feature, ws.group_start, ws.grp_row, grp_x,
                                    S, F, r, ws.group_sqnorm, V, w, sV, sV + M * k, sw, sw + M,
                                    True)
                else:
                    _feature_update(a, u, ws.group_feature, ws.group_start, ws.grp_row, grp_x,
                                    S, F, r, ws.group_sqnorm, V, w, sV, sV + M * k, sw, sw + M,
                                    False)
            it = next_item_near(ws.cursors, n_items, nt, threadid(), &rank)
        ftz_leave(csr)

    d = 0
    for u in range(U):
        d += ws.group_sqnorm[u]
    loss += 0.5 * a.l2 * d
    ws.phase_t[4] = omp_get_wtime() - t0

    grad_dense[0] = <floating>gw0
    for f in range(k):
        if a.batch_norm:
            grad_dense[1 + f] = <floating>sdzfh[f]
            grad_dense[1 + k + f] = <floating>sdz[f]
        else:
            grad_dense[1 + f] = 0
            grad_dense[1 + k + f] = 0
    opt_vec(&a.opt, dense, sd, sd + 1 + 2 * k, grad_dense, 1 + 2 * k, True)
    ws.phase_t[5] = omp_get_wtime() - t0

    if a.batch_norm:
        for f in range(k):
            bn[f] = <floating>(BN_DECAY * <double>bn[f] + (1.0 - BN_DECAY) * mu[f])
            bn[k + f] = <floating>(BN_DECAY * <double>bn[k + f] + (1.0 - BN_DECAY) * var[f])
    loss_out[0] = loss
    return 0


cdef Py_ssize_t _steps_typed(floating[:, ::1] V, X, y_arr, rows_arr, batch_size,
                             double[::1] losses, params, state, cfg, FMWorkspace ws,
                             bint single) except -1:
    """Batches rows[i batch_size:(i + 1) batch_size] at steps cfg.step + i, losses[i] =
    their losses; stops after the first non-finite loss. Returns the batches run.
    single: called by fm_step (see check_batches)."""
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] y = y_arr
    cdef const int64_t[::1] rows = rows_arr
    cdef floating[::1] w = params.w
    cdef floating[::1] dense = params.dense
    cdef floating[:, ::1] bn = params.bn_stats
    cdef floating[:, :, ::1] sV = state.V
    cdef floating[:, ::1] sw = state.w
    cdef floating[:, ::1] sd = state.dense
    cdef StepArgs a
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1]
    cdef Py_ssize_t i, n_batches = losses.shape[0], n_done = 0, first, bs
    cdef unsigned int csr
    cdef uint64_t step0
    cdef double loss = 0
    cdef int err = 0
    cdef double keep = cfg.keep
    cdef int n_threads = team_size(cfg.n_threads)

    if ws.itemsize != sizeof(floating) or ws.n_factors != k or ws.n_features != M:
        raise ValueError(
            f"workspace {ws!r} does not fit parameters V {V.shape[0], V.shape[1]} "
            f"{params.V.dtype}: build it with fm_workspace(..., n_features={M}, "
            f"n_factors={k}, dtype={params.V.dtype})")
    check_batches(rows.shape[0], batch_size, n_batches, ws.batch_size, single)
    bs = batch_size
    check_step_arrays(min(bs, rows.shape[0]), ws.batch_size, indptr.shape[0], y.shape[0],
                      indices.shape[0], values.shape[0],
                      indptr[indptr.shape[0] - 1] if indptr.shape[0] > 0 else 0, n_threads)
    if (w.shape[0] != M or dense.shape[0] != 1 + 2 * k or bn.shape[0] != 2
            or bn.shape[1] != k or sV.shape[0] != 2 or sV.shape[1] != M
            or sV.shape[2] != k or sw.shape[0] != 2 or sw.shape[1] != M
            or sd.shape[0] != 2 or sd.shape[1] != 1 + 2 * k):
        raise ValueError("params/state shapes are inconsistent with V of shape "
                         f"{(M, k)}: see afmfast.kernels.api")
    _check_keep("cfg.keep", keep)

    a.k = k
    a.M = M
    a.prefetch_v = prefetch_table_rows(M * k * <Py_ssize_t>sizeof(floating), n_threads)
    a.prefetch_rows = (PREFETCH_SHORT_V_ROWS if k * <Py_ssize_t>sizeof(floating)
                       <= SHORT_V_ROW_BYTES else PREFETCH_V_ROWS)
    a.prefetch_features = feature_prefetch_distance(k * <Py_ssize_t>sizeof(floating))
    a.prefetch_state = state_prefetch_distance(k * <Py_ssize_t>sizeof(floating), n_threads)
    a.n_rows = indptr.shape[0] - 1
    a.nnz_cap = ws.max_batch_nnz
    a.n_threads = n_threads
    a.batch_norm = 1 if cfg.batch_norm else 0
    a.loss = loss_code_from(cfg)
    a.use_dropout = 1 if keep < 1.0 else 0
    a.df_is_r = 1 if not a.use_dropout and not a.batch_norm else 0
    a.l2 = cfg.l2
    a.inv_keep = 1.0 / keep
    a.seed = as_u64(cfg.seed)
    step0 = as_u64(cfg.step)
    a.threshold = dropout_threshold(keep)
    a.indptr = &indptr[0]
    a.row_width = checked_row_width(X, indptr)
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    a.opt = opt_cfg_from(cfg, _api)
    ws._ensure_threads(n_threads)

    with nogil:
        csr = ftz_enter_caller(a.n_threads)
        for i in range(n_batches):
            first = i * bs
            a.B = min(bs, rows.shape[0] - first)
            a.rows = &rows[first]
            a.step = step0 + <uint64_t>i
            err = _step_nogil(&a, ws, &values[0] if values.shape[0] > 0 else NULL, &y[0],
                              &V[0, 0], &w[0], &dense[0], &bn[0, 0], &sV[0, 0, 0],
                              &sw[0, 0], &sd[0, 0], &loss)
            if not batch_recorded(err, &a.err, first, loss, &losses[0], &n_done):
                break
        ftz_leave(csr)
    raise_batch_error(err, &a.err, a.n_rows, M, ws.max_batch_nnz, 0)
    return n_done


def fm_step(X, y, rows, params, state, cfg, FMWorkspace ws):
    """One training step on the batch ``rows`` of (X, y); see the module docstring.

    Returns the batch loss 1/2 sum (y - y_hat)^2 + l2/2 sum_touched ||V_row||^2 at the
    parameters before the update; mutates params, state and ws.

    Example: loss = fm_step(X, y, perm[:4096], params, state, cfg, ws)
    """
    return _one_step(X, y, rows, params, state, cfg, ws)


def fm_steps(X, y, rows, batch_size, params, state, cfg, FMWorkspace ws, losses):
    """Training steps on the batches rows[i batch_size:(i + 1) batch_size] at steps
    cfg.step + i, losses[i] their losses, in one loop without the GIL (kernels.api's
    fm_steps). Returns the batches run.

    Example: n_done = fm_steps(X, y, perm[:40960], 4096, params, state, cfg, ws, np.empty(10))
    """
    return _steps(X, y, rows, batch_size, params, state, cfg, ws, losses, False)


include "_entry_common.pxi"


cdef inline floating _predict_row(Py_ssize_t i, Py_ssize_t k, Py_ssize_t M,
                                  const int64_t* indptr, const int32_t* indices,
                                  const floating* values, const floating* V,
                                  const floating* w, const floating* dense,
                                  const floating* mu, const floating* inv,
                                  const floating* zeros, bint batch_norm, floating* s,
                                  floating* sq) noexcept nogil:
    cdef Py_ssize_t f
    cdef const floating* gamma = dense + 1
    cdef const floating* beta = dense + 1 + k
    cdef floating acc, zsum
    acc = _pairwise(k, M, indices + indptr[i], values + indptr[i] if values != NULL else NULL,
                    indptr[i + 1] - indptr[i], V, w, sq, s)
    # s now holds f; sq becomes ones: z = (gamma fh + beta) * 1, or f * 1 + 0 without
    # batch norm (exact)
    for f in range(k):
        if batch_norm:
            s[f] = (s[f] - mu[f]) * inv[f]
        sq[f] = 1
    if batch_norm:
        zsum = _zsum(k, s, sq, gamma, beta)
    else:
        zsum = _zsum(k, s, sq, sq, zeros)
    return <floating>(<double>dense[0] + <double>acc + <double>zsum)


cdef void _fm_predict_typed(floating[:, ::1] V, X, params, bint batch_norm, int n_threads,
                            out_arr) except *:
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] w = params.w
    cdef const floating[::1] dense = params.dense
    cdef floating[::1] out = out_arr
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], n = indptr.shape[0] - 1, i
    cdef floating[::1] mu, inv, zeros
    stats = np.asarray(params.bn_stats, dtype=np.float64)
    mu = np.ascontiguousarray(stats[0], dtype=params.V.dtype)
    inv = (1.0 / np.sqrt(stats[1] + _api.BN_EPS)).astype(params.V.dtype)
    zeros = np.zeros(k, dtype=params.V.dtype)
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} entries, X has {n} rows")
    if w.shape[0] != M or dense.shape[0] != 1 + 2 * k or mu.shape[0] != k:
        raise ValueError("params shapes are inconsistent: see afmfast.kernels.api")
    check_indptr(indptr, indices.shape[0])
    if indices.shape[0] != values.shape[0] and values.shape[0] != 0:
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    if n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    if n == 0:
        return
    # values of length 0: every value is 1 (kernels.api)
    cdef const floating* values_ptr = &values[0] if values.shape[0] > 0 else NULL
    # per-thread scratch for a row's two k-vectors, indexed by OpenMP thread number
    scratch_arr = np.empty((n_threads, 2 * k), dtype=params.V.dtype)
    cdef floating[:, ::1] scratch = scratch_arr
    cdef int tid
    cdef unsigned int csr
    with nogil, parallel(num_threads=n_threads):
        csr = ftz_enter()
        for i in prange(n, schedule="static"):
            tid = omp_get_thread_num()
            out[i] = _predict_row(i, k, M, &indptr[0], &indices[0], values_ptr, &V[0, 0],
                                  &w[0], &dense[0], &mu[0], &inv[0], &zeros[0], batch_norm,
                                  &scratch[tid, 0], &scratch[tid, k])
        ftz_leave(csr)


def fm_predict(X, params, batch_norm, n_threads, out):
    """Raw scores of every row of X into ``out`` (n_rows,) of params' dtype: no dropout,
    batch norm (when ``batch_norm``) with the running statistics, ids >= M skipped.

    Example: out = np.empty(n_rows, np.float32); fm_predict(X, params, 1, 2, out)
    """
    dt = params.V.dtype
    if dt == np.float32:
        _fm_predict_typed[float](params.V, X, params, bool(batch_norm), team_size(n_threads), out)
    elif dt == np.float64:
        _fm_predict_typed[double](params.V, X, params, bool(batch_norm), team_size(n_threads), out)
    else:
        raise ValueError(f"params.V must be float32 or float64, got {dt}")


def _mxcsr_for_test():
    """The calling thread's MXCSR (0 where the machine has none), for tests that check a
    kernel call leaves it as it found it."""
    return mxcsr_read()


def _thread_mxcsrs_for_test(int n_threads):
    """{OpenMP thread number: its MXCSR} read by each thread of a parallel region of
    n_threads (where a kernel's workers run), for tests that check the kernels put back
    every worker's MXCSR; FTZ_DAZ_BITS and HAVE_MXCSR are in ``_constants()``."""
    cdef Py_ssize_t th
    cdef unsigned int[::1] seen = np.zeros(n_threads, dtype=np.uint32)
    cdef int[::1] ran = np.zeros(n_threads, dtype=np.int32)
    with nogil:
        for th in prange(n_threads, schedule="static", num_threads=n_threads):
            seen[omp_get_thread_num()] = mxcsr_read()
            ran[omp_get_thread_num()] = 1
    return {i: int(seen[i]) for i in range(n_threads) if ran[i]}


def _constants():
    """The constants this module hard-codes (to test them against kernels.api)."""
    return dict(ADAGRAD=OPT_ADAGRAD, SGD=OPT_SGD, MOMENTUM=OPT_MOMENTUM, ADAM=OPT_ADAM,
                BN_EPS=BN_EPS, BN_DECAY=BN_DECAY, MOMENTUM_COEF=MOMENTUM_COEF,
                ADAM_BETA1=ADAM_BETA1, ADAM_BETA2=ADAM_BETA2, ADAM_EPS=ADAM_EPS,
                HAVE_MXCSR=bool(HAVE_MXCSR), FTZ_DAZ_BITS=FTZ_DAZ_BITS)


def openmp_max_threads():
    """omp_get_max_threads() of the OpenMP runtime these kernels run on: OMP_NUM_THREADS,
    or what ``threadpoolctl.threadpool_limits(n, user_api="openmp")`` set, for the
    calling thread (afmfast.kernels.threads' default count takes it into account)."""
    return omp_get_max_threads()
