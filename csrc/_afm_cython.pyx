# cython: language_level=3
"""Cython AFM kernels: the AFM part of the ``afmfast.kernels.api`` contract, float32 and
float64 (chosen by params.V's dtype; every other float array must match it).

Functions (M features, k factors, t attention size, B = len(rows), P = pairs of a batch,
a row of n nonzeros having n(n-1)/2 pairs p < q in row order):
    afm_workspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                  attention_size, dtype) -> AFMWorkspace
        Scratch for one fit, allocated once: O(max_batch_pairs * (k + t)) elements for the
        pair products and attention activations, O(max_batch_nnz * k) per occurrence,
        O(batch_size * (k + t)) per row.
    afm_step(X, y, rows, params, state, cfg, ws) -> float
        X = (indptr int64 (n_rows+1,), indices int32 (nnz,), values DTYPE (nnz,)),
        y DTYPE (n_rows,), rows int64 (B,), params AFMParams, state AFMOptState,
        cfg AFMStepConfig. Mutates params.V / params.w (touched rows, unless freeze_fm),
        params.W (when attention), params.dense ([w0 unless freeze_fm, p, b and h when
        attention]), the matching entries of state, and ws. Returns the batch loss at the
        parameters before the update. ValueError for an out-of-range row or feature id,
        or a batch larger than the workspace.
    afm_steps(X, y, rows, batch_size, params, state, cfg, ws, losses) -> int
        afm_step on rows[i batch_size:(i + 1) batch_size] at step cfg.step + i for each
        of the len(losses) batches, in one loop without the GIL; losses float64 receives
        their losses. Stops after a non-finite loss; returns the batches run.
    afm_predict(X, params, attention, activation, n_threads, out)
        out (n_rows,) DTYPE receives the raw scores (no dropout); ids outside [0, M) are
        skipped. Mutates only out. Returns the number of distinct pairs evaluated.
    afm_explain(X, params, attention, activation, n_threads, pair_indptr, i_out, j_out,
                weight_out, contribution_out)
        Per pair of every row (ids outside [0, M) skipped): feature ids i < j positions in
        row order (int64), weight a_pq (1 without attention) and contribution
        a_pq p . e_pq (DTYPE), at pair_indptr[row] + pair index. Mutates only the outputs.
    shuffled_rows(n_rows, seed, epoch, n_threads) -> int64 (n_rows,): kernels.api's epoch
        order.

Distinct pairs (docs/design.md): a pair's e = (v_p x_p)(v_q x_q), u = act(W e + b), its
logit h . u and h act'(u) depend only on its two (feature, value) classes, and in one-hot
data the same pair recurs in many rows of a batch (a Frappe batch of 4096 rows has ~40,000
distinct pairs among its 184,320). The attention MLP therefore runs once per distinct pair,
forward and backward: with DS_d the sum of ds over the pairs of distinct pair d,
du_d = DS_d h act'(u_d), dW = sum_d du_d e_d^T, and a pair's de = a' dg + ds W^T(h act'(u_d)).
The second term goes to the pair's two occurrences as ds C_d v_other with C_d = W^T(h act'(u_d)),
and v_other is the same for every pair of d: its sum over d's pairs, C'_d v_other with
C'_d = W^T du_d, is added once, to the occurrences of d's representative pair (its first
pair in batch order). The feature's gradient sums its occurrences, so this is exact; it
reads C' once per distinct pair instead of C once per pair.

How a step runs (no floating sum over rows or pairs depends on the thread count, so the
result is bit-identical for any n_threads). The loops over chunks of rows, distinct-pair
blocks and backward groups hand their items out with next_item_near (_batch.pxd: a home
range per thread, then help); the others are pranges.
    0. serial: row/pair offsets (rows validated), a copy of the batch's nonzeros in batch
       order (prange; ids validated), a split of the batch into chunks of consecutive rows
       (the split depends on the data only). Then one thread sorts the nonzeros by
       feature id (stable counting sort) and, with attention, gives each occurrence its
       class (its group when its value equals the group's first value, else its own),
       while the others compute v x per occurrence and the linear term per row (step
       1a, chunks of rows), joined by the sorting thread when done. With
       attention, the distinct pairs: a pair (i < i2 in its row) belongs to the bucket of
       class(i); prange over classes numbers each bucket's distinct upper classes (one
       dedup table per thread); the bucket counts are prefix-summed into slots, and a
       prange over rows lists each row's representative pairs. The distinct pairs' ids
       follow first appearance (row by row), so that the passes over them read v x and
       C' in batch order; the ds sums, done per bucket, work in slots. (Rows that list
       the same two classes in opposite orders give two distinct pairs with equal values:
       correct, only less shared. libFM rows list fields in one order.) Then W^T.
    1. over fixed blocks of DBLOCK distinct pairs: e, U = E W^T + b
       (register-tiled GEMM), act, the logit (double) and h act'(u). Over chunks,
       per row: softmax of the row's logits, dropout masks, g, y_hat, residual r, dg, da,
       ds per pair (row kernels in C, DTYPE vectors).
       prange over classes: DS per distinct pair, its pairs summed in bucket order.
    2. over backward groups (consecutive rows, so their distinct pairs are
       consecutive ids, at most DBLOCK of them unless one row has more; the split
       depends on the data only): du = DS h act'(u) (over U) and the group's sums for the
       gradients of b and h; unless freeze_fm, C' = du W (GEMM) into a per-thread
       buffer, then per row de = a' dg per pair (+ C'_d for the representative pair of
       d), accumulated into the gradient of each occurrence's v x. C' is read while
       still in cache and never stored for the whole batch.
       Serial in row order: loss, gradient of w0; that of p from the chunks' sums of
       r g' (summed in row order by step 1's chunk loop), in chunk order; b and h in
       group order.
    3. prange over touched features: the feature's occurrences summed in batch order,
       + l2 v, optimiser on the V row and w entry (||V_row||^2 for the loss before).
    4. (attention) over DW_CHUNKS fixed chunks of the distinct pairs, each thread
       taking the chunks of its home range: each chunk's dW = DU^T E over its pairs in
       order, blocked so that the blocks of E and DU stay in cache; then prange over
       W's entries: dW = the chunks' sum in double, in chunk order. (After the feature
       updates, which read de's gradient rows while they are still cached.)
    5. serial: optimiser on dense and W.
The attention products (steps 1, 2 and 4: 6 D k t flops for D distinct pairs) run in one GEMM
routine written in C below with GCC vector extensions: a register tile of 6 x 64 (float32,
AVX-512) or 12 x 16/32 outputs accumulated with FMAs over the inner dimension, B's rows
read contiguously.
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from openmp cimport omp_get_thread_num, omp_get_wtime
from libc.math cimport exp, expf, sqrt, tanh, tanhf, INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free

from _batch cimport (
    ERR_FEATURE, ERR_PAIRS, ERR_ROW, BatchErr, check_batches, aligned_empty,
    aligned_zeros as _alloc, batch_offsets,
    check_step_arrays, check_workspace_sizes, copy_row, group_by_feature, marks_pointer,
    raise_batch_error, scatter_groups, feature_items, feature_item_start, feature_tail,
    prefetch_table_rows, feature_prefetch_distance, shuffled_rows_array,
    CURSOR_STRIDE, next_item_near, reset_cursors, GRAD_SPAN, prefetch_row,
    __builtin_prefetch, batch_recorded, checked_row_width, row_first, check_indptr,
)
from _common cimport (
    OPT_ADAGRAD, OPT_ADAM, OPT_MOMENTUM, OPT_SGD, OptCfg, as_u64, dropout_kept,
    dropout_row_key, dropout_threshold, fill_dropout_mask, loss_code_from, opt_cfg_from,
    dot_d, floating2, opt_elem, opt_vec, row_data_loss, ftz_enter, ftz_leave,
    mxcsr_read, HAVE_MXCSR, FTZ_DAZ_BITS, ftz_enter_caller, team_size,
)

from afmfast.kernels import api as _api

cdef extern from "afm_gemm.h":
    void afm_gemm_f(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float* A,
                    Py_ssize_t lda, Py_ssize_t sa, const float* B, Py_ssize_t ldb,
                    const float* Bp, float* C, Py_ssize_t ldc) noexcept nogil
    void afm_gemm_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double* A,
                    Py_ssize_t lda, Py_ssize_t sa, const double* B, Py_ssize_t ldb,
                    const double* Bp, double* C, Py_ssize_t ldc) noexcept nogil
    void afm_pack_b_f(Py_ssize_t N, Py_ssize_t K, const float* B, Py_ssize_t ldb,
                      float* Bp) noexcept nogil
    void afm_pack_b_d(Py_ssize_t N, Py_ssize_t K, const double* B, Py_ssize_t ldb,
                      double* Bp) noexcept nogil
    int AFM_VBYTES
    int AFM_PREFETCH
    void afm_pool_row_f(const float* vx, const double* au, Py_ssize_t n, Py_ssize_t k,
                        double* g) noexcept nogil
    void afm_pool_row_d(const double* vx, const double* au, Py_ssize_t n, Py_ssize_t k,
                        double* g) noexcept nogil
    void afm_da_row_f(const float* vx, const double* dg, Py_ssize_t n, Py_ssize_t k,
                      float* tv, double* scale) noexcept nogil
    void afm_da_row_d(const double* vx, const double* dg, Py_ssize_t n, Py_ssize_t k,
                      double* tv, double* scale) noexcept nogil
    void afm_pair_grad_row_f(const float* vx, const float* dg, const double* au,
                             Py_ssize_t n, Py_ssize_t k, float* dvx) noexcept nogil
    void afm_pair_grad_row_d(const double* vx, const double* dg, const double* au,
                             Py_ssize_t n, Py_ssize_t k, double* dvx) noexcept nogil
    void afm_rep_grad_f(const float* vx, Py_ssize_t nrep, const int32_t* rq, Py_ssize_t q0,
                        const float* C, Py_ssize_t k, float* dvx) noexcept nogil
    void afm_rep_grad_d(const double* vx, Py_ssize_t nrep, const int32_t* rq, Py_ssize_t q0,
                        const double* C, Py_ssize_t k, double* dvx) noexcept nogil


# Activation codes (kernels.api.RELU ...).
cdef enum:
    ACT_RELU = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_IDENTITY = 3

cdef enum:
    # rows ahead whose nonzeros are prefetched while copying a batch
    ROW_PREFETCH = 4


# A row's softmax uses numerators exp(s - the batch's largest logit) when their sum is at
# least this: the terms lost to underflow are then below 1e-26 of the sum.
cdef double SOFTMAX_MIN_SUM = 1e-280

cdef enum:
    # distinct pairs per block of the per-distinct-pair passes (fixed, so that the block
    # partial sums and their order do not depend on the thread count)
    DBLOCK = 256
    # classes per work item of the bucket numbering and the ds sums after the
    # HEAD_FEATURES most popular (feature_items): a class's work there does not grow
    # with k, and most of a one-hot batch's classes have only a few occurrences
    CLASS_TAIL = 128
    # rows at most per backward group (the de of its rows is one work item)
    GROUP_ROWS = 256
    # columns of h act'(u) that the distinct backward forms at a time (a stack buffer)
    HD_SPAN = 256
    # chunks of the distinct pairs whose W gradients are summed (in double, in chunk
    # order) into the batch's: a fixed number, so that the sum does not depend on the
    # thread count, and one that 2, 3, 4, 6, 8, 12 and 24 threads share evenly
    DW_CHUNKS = 24
    # elements of the W gradient that the chunk sum adds up at a time (a stack buffer)
    DW_SUM_SPAN = 256
    # row stride of E (bytes) from which the W gradient packs E's blocks (_dw_block)
    DW_PACK_MIN_BYTES = 512


cdef inline void _gemm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating* A,
                       Py_ssize_t lda, Py_ssize_t sa, const floating* B, Py_ssize_t ldb,
                       const floating* Bp, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C (M, N) += A B, A[i, kk] = A[i lda + kk sa]; Bp NULL or B packed by _pack_b (the
    same arithmetic either way)."""
    if M <= 0 or N <= 0 or K <= 0:
        return
    if floating is float:
        afm_gemm_f(M, N, K, A, lda, sa, B, ldb, Bp, C, ldc)
    else:
        afm_gemm_d(M, N, K, A, lda, sa, B, ldb, Bp, C, ldc)


cdef inline void _pack_b(Py_ssize_t N, Py_ssize_t K, const floating* B, Py_ssize_t ldb,
                         floating* Bp) noexcept nogil:
    """Bp = B (K, N) in the GEMM's panel layout (at most K N elements)."""
    if floating is float:
        afm_pack_b_f(N, K, B, ldb, Bp)
    else:
        afm_pack_b_d(N, K, B, ldb, Bp)


cdef inline Py_ssize_t _gemm_vector(Py_ssize_t itemsize) noexcept nogil:
    """Columns of one vector of the GEMM (afm_gemm.h)."""
    return AFM_VBYTES // itemsize


cdef inline Py_ssize_t _dw_pairs(Py_ssize_t k, Py_ssize_t t, Py_ssize_t itemsize) noexcept nogil:
    """Distinct pairs per block of the W gradient: a block's rows of E and DU together
    take about 128 KiB, so that they stay in L2 across the thread's share of W."""
    cdef Py_ssize_t PB = 131072 // ((k + t) * itemsize)
    return PB if PB > 16 else 16


cdef inline void _pool_row(const floating* vx, const double* au, Py_ssize_t n,
                           Py_ssize_t k, double* g) noexcept nogil:
    if floating is float:
        afm_pool_row_f(vx, au, n, k, g)
    else:
        afm_pool_row_d(vx, au, n, k, g)


cdef inline void _da_row(const floating* vx, const double* dg, Py_ssize_t n, Py_ssize_t k,
                         floating* tv, double* scale) noexcept nogil:
    if floating is float:
        afm_da_row_f(vx, dg, n, k, tv, scale)
    else:
        afm_da_row_d(vx, dg, n, k, tv, scale)


cdef inline void _pair_grad_row(const floating* vx, const floating* dg, const double* au,
                                Py_ssize_t n, Py_ssize_t k, floating* dvx) noexcept nogil:
    if floating is float:
        afm_pair_grad_row_f(vx, dg, au, n, k, dvx)
    else:
        afm_pair_grad_row_d(vx, dg, au, n, k, dvx)


cdef inline void _rep_grad(const floating* vx, Py_ssize_t nrep, const int32_t* rq,
                           Py_ssize_t q0, const floating* C, Py_ssize_t k,
                           floating* dvx) noexcept nogil:
    if floating is float:
        afm_rep_grad_f(vx, nrep, rq, q0, C, k, dvx)
    else:
        afm_rep_grad_d(vx, nrep, rq, q0, C, k, dvx)


cdef inline void _activate(floating* u, Py_ssize_t n, int code) noexcept nogil:
    """u <- act(u) in place (the switch outside the loops, so relu/identity vectorise)."""
    cdef Py_ssize_t j
    if code == ACT_RELU:
        for j in range(n):
            u[j] = u[j] if u[j] > 0 else 0
    elif code == ACT_SIGMOID:
        for j in range(n):
            if floating is float:
                u[j] = 1 / (1 + expf(-u[j]))
            else:
                u[j] = 1 / (1 + exp(-u[j]))
    elif code == ACT_TANH:
        for j in range(n):
            if floating is float:
                u[j] = tanhf(u[j])
            else:
                u[j] = tanh(u[j])


cdef inline void _softmax_inplace(double* a, Py_ssize_t n) noexcept nogil:
    """a <- softmax(a), the maximum subtracted before exp."""
    cdef Py_ssize_t P
    cdef double smax = -INFINITY, ssum = 0
    for P in range(n):
        if a[P] > smax:
            smax = a[P]
    for P in range(n):
        a[P] = exp(a[P] - smax)
        ssum += a[P]
    for P in range(n):
        a[P] = a[P] / ssum


cdef inline void _softmax(const floating* U, const floating* h, Py_ssize_t n_pairs,
                          Py_ssize_t t, int code, floating* H, double* a) noexcept nogil:
    """H rows (n_pairs, t): act(U) in place (U == H) -> logits s = h . act -> a = softmax."""
    cdef Py_ssize_t P
    for P in range(n_pairs):
        _activate(H + P * t, t, code)
        a[P] = dot_d(h, H + P * t, t)
    _softmax_inplace(a, n_pairs)


cdef inline void _act_grad_h(const floating* h, const floating* hv, floating* out,
                             Py_ssize_t n, int code) noexcept nogil:
    """out = h act'(u) elementwise, from the activation values hv = act(u) (ReLU:
    hv > 0, sigmoid: hv (1 - hv), tanh: 1 - hv^2, identity: 1), the switch outside the
    loop so that it vectorises."""
    cdef Py_ssize_t j
    if code == ACT_RELU:
        for j in range(n):
            out[j] = h[j] if hv[j] > 0 else 0
    elif code == ACT_SIGMOID:
        for j in range(n):
            out[j] = <floating>(<double>h[j] * (<double>hv[j] * (1 - <double>hv[j])))
    elif code == ACT_TANH:
        for j in range(n):
            out[j] = <floating>(<double>h[j] * (1 - <double>hv[j] * <double>hv[j]))
    else:
        for j in range(n):
            out[j] = h[j]


cdef inline void _pair_products(const floating* vx, Py_ssize_t n, Py_ssize_t k,
                                floating* E) noexcept nogil:
    """E rows (n(n-1)/2, k): e = vx_p * vx_q for the pairs p < q of the n rows of vx."""
    cdef Py_ssize_t i, i2, f
    cdef const floating* v1
    cdef const floating* v2
    for i in range(n):
        v1 = vx + i * k
        for i2 in range(i + 1, n):
            v2 = vx + i2 * k
            for f in range(k):
                E[f] = v1[f] * v2[f]
            E += k


cdef inline void _preactivation(const floating* E, Py_ssize_t n_pairs, Py_ssize_t k,
                                Py_ssize_t t, const floating* bias, const floating* WT,
                                const floating* WTp, floating* U) noexcept nogil:
    """U rows (n_pairs, t) = E W^T + b (WTp: NULL or WT packed by _pack_b)."""
    cdef Py_ssize_t P, jj
    for P in range(n_pairs):
        for jj in range(t):
            U[P * t + jj] = bias[jj]
    _gemm(n_pairs, t, k, E, k, 1, WT, t, WTp, U, t)


cdef inline void _pool(const double* au, const floating* E, Py_ssize_t n_pairs,
                       Py_ssize_t k, double* g) noexcept nogil:
    """g (k,) = sum_P au[P] e_P in pair order, in double."""
    cdef Py_ssize_t P, f
    cdef const floating* e
    for f in range(k):
        g[f] = 0
    for P in range(n_pairs):
        e = E + P * k
        for f in range(k):
            g[f] = g[f] + au[P] * <double>e[f]


include "_afm_workspace.pxi"
include "_afm_forward.pxi"
include "_afm_backward.pxi"
include "_afm_step.pxi"
include "_entry_common.pxi"
include "_afm_infer.pxi"
include "_afm_testing.pxi"
