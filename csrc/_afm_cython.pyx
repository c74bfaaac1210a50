# cython: language_level=3
"""Cython AFM kernels: the AFM part of the ``afmfast.kernel_api`` contract, float32 and
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
    shuffled_rows(n_rows, seed, epoch, n_threads) -> int64 (n_rows,): kernel_api's epoch
        order.

Distinct pairs (DESIGN section 3): a pair's e = (v_p x_p)(v_q x_q), u = act(W e + b), its
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
    4. prange over thread blocks of W's rows (attention): dW = DU^T E over the distinct
       pairs in order, blocked so that the blocks of E and DU stay in cache. (After the
       feature updates, which read de's gradient rows while they are still cached.)
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
from libc.math cimport exp, expf, isfinite, sqrt, tanh, tanhf, INFINITY
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free

from _batch cimport (
    ERR_FEATURE, ERR_PAIRS, ERR_ROW, BatchErr, check_batches, aligned_empty,
    aligned_zeros as _alloc, batch_offsets,
    check_step_arrays, check_workspace_sizes, copy_row, group_by_feature,
    raise_batch_error, scatter_groups, feature_items, feature_item_start, feature_tail,
    prefetch_table_rows, feature_prefetch_distance, shuffled_rows_array,
    CURSOR_STRIDE, next_item_near, reset_cursors,
)
from _common cimport (
    OPT_ADAGRAD, OPT_ADAM, OPT_MOMENTUM, OPT_SGD, OptCfg, as_u64, dropout_kept,
    dropout_row_key, dropout_threshold, fill_dropout_mask, loss_code_from, opt_cfg_from,
    dot_d, floating2, opt_elem, opt_vec, row_data_loss, ftz_enter, ftz_leave,
    mxcsr_read, HAVE_MXCSR, FTZ_DAZ_BITS, ftz_enter_caller, team_size,
)

from afmfast import kernel_api as _api

cdef extern from *:
    """
    /* ---- register-tiled GEMM: C (M x N, row stride ldc) += A @ B ----------------------
       A[i, kk] = A[i * lda + kk * sa] (so A may be read transposed), B (K x N) row stride
       ldb. Each output accumulates its K products in kk order with one FMA chain starting
       from C's value, whatever tile it falls in: the result does not depend on how M is
       split. Vectors are GCC vector extensions of the widest width -march allows. */
    #include <stddef.h>
    #if defined(__AVX512F__)
    #define AFM_VBYTES 64
    #define AFM_NVMAX 4
    #define AFM_R_WIDE 6
    #define AFM_R_NARROW 12
    #elif defined(__AVX__)
    #define AFM_VBYTES 32
    #define AFM_NVMAX 2
    #define AFM_R_WIDE 6
    #define AFM_R_NARROW 12
    #else
    #define AFM_VBYTES 16
    #define AFM_NVMAX 2
    #define AFM_R_WIDE 6
    #define AFM_R_NARROW 6
    #endif
    #define AFM_RMAX 12
    /* row blocks of a split of M that keeps every tile where the serial loop has it */
    #define AFM_ROW_ALIGN 12
    typedef float afm_vf __attribute__((vector_size(AFM_VBYTES)));
    typedef float afm_vfu __attribute__((vector_size(AFM_VBYTES), aligned(4), may_alias));
    typedef double afm_vd __attribute__((vector_size(AFM_VBYTES)));
    typedef double afm_vdu __attribute__((vector_size(AFM_VBYTES), aligned(8), may_alias));

    #define AFM_DEFINE_GEMM(T, SUF, VT, VTU)                                              \\
    static inline __attribute__((always_inline)) void afm_mk_##SUF(                      \\
        const int R, const int NV, ptrdiff_t K, const T* restrict A, ptrdiff_t lda,       \\
        ptrdiff_t sa, const T* restrict B, ptrdiff_t ldb, T* restrict C, ptrdiff_t ldc)   \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        VT acc[AFM_RMAX][AFM_NVMAX];                                                      \\
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++)                              \\
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \\
            acc[r][v] = *(const VTU*)(C + r * ldc + v * VL);                              \\
        for (ptrdiff_t kk = 0; kk < K; kk++) {                                            \\
            const T* b = B + kk * ldb;                                                    \\
            const T* a = A + kk * sa;                                                     \\
            VT bv[AFM_NVMAX];                                                             \\
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                          \\
                bv[v] = *(const VTU*)(b + v * VL);                                        \\
            _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                        \\
                T av = a[r * lda];                                                        \\
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                      \\
                    acc[r][v] += av * bv[v];                                              \\
            }                                                                             \\
        }                                                                                 \\
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++)                              \\
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \\
            *(VTU*)(C + r * ldc + v * VL) = acc[r][v];                                    \\
    }                                                                                     \\
    static void afm_mk_gen_##SUF(int R, int NV, ptrdiff_t K, const T* restrict A,         \\
        ptrdiff_t lda, ptrdiff_t sa, const T* restrict B, ptrdiff_t ldb, T* restrict C,   \\
        ptrdiff_t ldc) { afm_mk_##SUF(R, NV, K, A, lda, sa, B, ldb, C, ldc); }            \\
    static void afm_gemm_##SUF(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const T* A,         \\
        ptrdiff_t lda, ptrdiff_t sa, const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc)      \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        ptrdiff_t n0 = 0, i0;                                                             \\
        while (n0 + VL <= N) {                                                            \\
            int nv = (int)((N - n0) / VL);                                                \\
            if (nv > AFM_NVMAX) nv = AFM_NVMAX;                                           \\
            int R = (nv >= 3 || (nv == 2 && AFM_NVMAX == 2)) ? AFM_R_WIDE : AFM_R_NARROW; \\
            for (i0 = 0; i0 + R <= M; i0 += R) {                                          \\
                const T* a = A + i0 * lda; T* c = C + i0 * ldc + n0; const T* b = B + n0; \\
                if (nv == 4)                                                              \\
                    afm_mk_##SUF(AFM_R_WIDE, 4, K, a, lda, sa, b, ldb, c, ldc);           \\
                else if (nv == 3)                                                         \\
                    afm_mk_##SUF(AFM_R_WIDE, 3, K, a, lda, sa, b, ldb, c, ldc);           \\
                else if (nv == 2 && AFM_NVMAX == 2)                                       \\
                    afm_mk_##SUF(AFM_R_WIDE, 2, K, a, lda, sa, b, ldb, c, ldc);           \\
                else if (nv == 2)                                                         \\
                    afm_mk_##SUF(AFM_R_NARROW, 2, K, a, lda, sa, b, ldb, c, ldc);         \\
                else                                                                      \\
                    afm_mk_##SUF(AFM_R_NARROW, 1, K, a, lda, sa, b, ldb, c, ldc);         \\
            }                                                                             \\
            if (i0 < M)                                                                   \\
                afm_mk_gen_##SUF((int)(M - i0), nv, K, A + i0 * lda, lda, sa, B + n0,     \\
                                 ldb, C + i0 * ldc + n0, ldc);                            \\
            n0 += nv * VL;                                                                \\
        }                                                                                 \\
        for (i0 = 0; i0 < M; i0++)                                                        \\
            for (ptrdiff_t n = n0; n < N; n++) {                                          \\
                T acc = C[i0 * ldc + n];                                                  \\
                for (ptrdiff_t kk = 0; kk < K; kk++)                                      \\
                    acc += A[i0 * lda + kk * sa] * B[kk * ldb + n];                       \\
                C[i0 * ldc + n] = acc;                                                    \\
            }                                                                             \\
    }

    AFM_DEFINE_GEMM(float, f, afm_vf, afm_vfu)
    AFM_DEFINE_GEMM(double, d, afm_vd, afm_vdu)

    /* ---- row kernels of the pair loops (k-vectors of one row's occurrences) ------------
       Each walks the row's pairs (i < i2, row-major, P = 0, 1, ...) once per block of VL
       columns, accumulating in vector registers; columns past the last full block run
       the same arithmetic one at a time. The order of every sum depends on n and k only. */
    #define AFM_DEFINE_ROWS(T, SUF, VT, VTU)                                              \\
    /* g (k, double) = sum_P au_P v_i v_i2 = sum_i v_i (sum_i2 au_P v_i2), inner sum in T */ \\
    static void afm_pool_row_##SUF(const T* restrict vx, const double* restrict au,      \\
        ptrdiff_t n, ptrdiff_t k, double* restrict g)                                     \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        ptrdiff_t fb = 0, f, i, i2, P;                                                    \\
        for (f = 0; f < k; f++) g[f] = 0;                                                 \\
        for (; fb + VL <= k; fb += VL) {                                                  \\
            for (i = 0, P = 0; i + 1 < n; i++) {                                          \\
                VT acc = {0};                                                             \\
                for (i2 = i + 1; i2 < n; i2++, P++)                                       \\
                    acc += (T)au[P] * *(const VTU*)(vx + i2 * k + fb);                    \\
                VT prod = *(const VTU*)(vx + i * k + fb) * acc;                           \\
                for (int l = 0; l < VL; l++) g[fb + l] += (double)prod[l];                \\
            }                                                                             \\
        }                                                                                 \\
        for (f = fb; f < k; f++)                                                          \\
            for (i = 0, P = 0; i + 1 < n; i++) {                                          \\
                T acc = 0;                                                                \\
                for (i2 = i + 1; i2 < n; i2++, P++) acc += (T)au[P] * vx[i2 * k + f];     \\
                g[f] += (double)(vx[i * k + f] * acc);                                    \\
            }                                                                             \\
    }                                                                                     \\
    /* scale[P] *= (v_i dg) . v_i2 for the row's pairs; tv (k) is scratch */              \\
    static void afm_da_row_##SUF(const T* restrict vx, const double* restrict dg,         \\
        ptrdiff_t n, ptrdiff_t k, T* restrict tv, double* restrict scale)                 \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        ptrdiff_t i, i2, f, fb, P = 0;                                                    \\
        for (i = 0; i + 1 < n; i++) {                                                     \\
            for (f = 0; f < k; f++) tv[f] = (T)((double)vx[i * k + f] * dg[f]);           \\
            for (i2 = i + 1; i2 < n; i2++, P++) {                                         \\
                const T* v2 = vx + i2 * k;                                                \\
                VT acc = {0};                                                             \\
                for (fb = 0; fb + VL <= k; fb += VL)                                      \\
                    acc += *(const VTU*)(tv + fb) * *(const VTU*)(v2 + fb);               \\
                T tail = 0;                                                               \\
                for (f = fb; f < k; f++) tail += tv[f] * v2[f];                           \\
                scale[P] *= (double)(afm_hsum_##SUF(acc) + tail);                         \\
            }                                                                             \\
        }                                                                                 \\
    }                                                                                     \\
    /* dvx (n, k) = sum over the row's pairs of de v_other, de = au_P dg. The sum is     \\
       factorised, dvx_i = dg (sum_i2 au v_i2), so it needs no per-pair product with dg. */ \\
    static void afm_pair_grad_row_##SUF(const T* restrict vx, const T* restrict dg,       \\
        const double* restrict au, ptrdiff_t n, ptrdiff_t k, T* restrict dvx)             \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        ptrdiff_t i, i2, f, fb = 0, P;                                                    \\
        for (f = 0; f < n * k; f++) dvx[f] = 0;                                           \\
        for (; fb + VL <= k; fb += VL) {                                                  \\
            for (i = 0, P = 0; i < n; i++) {                                              \\
                VT v1 = *(const VTU*)(vx + i * k + fb), acc = {0};                        \\
                for (i2 = i + 1; i2 < n; i2++, P++) {                                     \\
                    T a = (T)au[P];                                                       \\
                    acc += a * *(const VTU*)(vx + i2 * k + fb);                           \\
                    *(VTU*)(dvx + i2 * k + fb) += a * v1;                                 \\
                }                                                                         \\
                *(VTU*)(dvx + i * k + fb) += acc;                                         \\
            }                                                                             \\
            VT dgv = *(const VTU*)(dg + fb);                                              \\
            for (i = 0; i < n; i++)                                                       \\
                *(VTU*)(dvx + i * k + fb) *= dgv;                                         \\
        }                                                                                 \\
        for (f = fb; f < k; f++) {                                                        \\
            for (i = 0, P = 0; i < n; i++) {                                              \\
                T acc = 0;                                                                \\
                for (i2 = i + 1; i2 < n; i2++, P++) {                                     \\
                    T a = (T)au[P];                                                       \\
                    acc += a * vx[i2 * k + f];                                            \\
                    dvx[i2 * k + f] += a * vx[i * k + f];                                 \\
                }                                                                         \\
                dvx[i * k + f] += acc;                                                    \\
            }                                                                             \\
            for (i = 0; i < n; i++) dvx[i * k + f] *= dg[f];                              \\
        }                                                                                 \\
    }                                                                                     \\
    /* dvx += C[r] v_other for nrep distinct pairs with C rows C[0], C[1], ... whose      \\
       representative pairs are of the row's occurrences (batch-wide) rq[2r], rq[2r + 1], \\
       q0 the row's first, in r order */                                                  \\
    static void afm_rep_grad_##SUF(const T* restrict vx, ptrdiff_t nrep,                  \\
        const int* restrict rq, ptrdiff_t q0, const T* restrict C, ptrdiff_t k,           \\
        T* restrict dvx)                                                                  \\
    {                                                                                     \\
        enum { VL = AFM_VBYTES / sizeof(T) };                                             \\
        ptrdiff_t f, fb, r;                                                               \\
        for (r = 0; r < nrep; r++) {                                                      \\
            const T* c = C + r * k;                                                       \\
            T* d1 = dvx + (rq[2 * r] - q0) * k;                                           \\
            T* d2 = dvx + (rq[2 * r + 1] - q0) * k;                                       \\
            const T* v1 = vx + (rq[2 * r] - q0) * k;                                      \\
            const T* v2 = vx + (rq[2 * r + 1] - q0) * k;                                  \\
            for (fb = 0; fb + VL <= k; fb += VL) {                                        \\
                VT cv = *(const VTU*)(c + fb);                                            \\
                *(VTU*)(d1 + fb) += cv * *(const VTU*)(v2 + fb);                          \\
                *(VTU*)(d2 + fb) += cv * *(const VTU*)(v1 + fb);                          \\
            }                                                                             \\
            for (f = fb; f < k; f++) {                                                    \\
                d1[f] += c[f] * v2[f];                                                    \\
                d2[f] += c[f] * v1[f];                                                    \\
            }                                                                             \\
        }                                                                                 \\
    }

    #define AFM_PREFETCH 8
    /* sum of a vector's lanes by a fixed tree (lane l + lane l ^ w, w = VL/2 ... 1), in
       registers: one shuffle and one add per level */
    typedef int afm_mf __attribute__((vector_size(AFM_VBYTES)));
    typedef long long afm_md __attribute__((vector_size(AFM_VBYTES)));
    #define AFM_HSUM_STEP(v, MT, ...) v += __builtin_shuffle(v, (MT){__VA_ARGS__})
    static inline __attribute__((always_inline)) float afm_hsum_f(afm_vf v) {
    #if AFM_VBYTES == 64
        AFM_HSUM_STEP(v, afm_mf, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
        AFM_HSUM_STEP(v, afm_mf, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
        AFM_HSUM_STEP(v, afm_mf, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
        AFM_HSUM_STEP(v, afm_mf, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    #elif AFM_VBYTES == 32
        AFM_HSUM_STEP(v, afm_mf, 4, 5, 6, 7, 0, 1, 2, 3);
        AFM_HSUM_STEP(v, afm_mf, 2, 3, 0, 1, 6, 7, 4, 5);
        AFM_HSUM_STEP(v, afm_mf, 1, 0, 3, 2, 5, 4, 7, 6);
    #else
        AFM_HSUM_STEP(v, afm_mf, 2, 3, 0, 1);
        AFM_HSUM_STEP(v, afm_mf, 1, 0, 3, 2);
    #endif
        return v[0];
    }
    static inline __attribute__((always_inline)) double afm_hsum_d(afm_vd v) {
    #if AFM_VBYTES == 64
        AFM_HSUM_STEP(v, afm_md, 4, 5, 6, 7, 0, 1, 2, 3);
        AFM_HSUM_STEP(v, afm_md, 2, 3, 0, 1, 6, 7, 4, 5);
        AFM_HSUM_STEP(v, afm_md, 1, 0, 3, 2, 5, 4, 7, 6);
    #elif AFM_VBYTES == 32
        AFM_HSUM_STEP(v, afm_md, 2, 3, 0, 1);
        AFM_HSUM_STEP(v, afm_md, 1, 0, 3, 2);
    #else
        AFM_HSUM_STEP(v, afm_md, 1, 0);
    #endif
        return v[0];
    }
    AFM_DEFINE_ROWS(float, f, afm_vf, afm_vfu)
    AFM_DEFINE_ROWS(double, d, afm_vd, afm_vdu)
    """
    void afm_gemm_f(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float* A,
                    Py_ssize_t lda, Py_ssize_t sa, const float* B, Py_ssize_t ldb,
                    float* C, Py_ssize_t ldc) noexcept nogil
    void afm_gemm_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double* A,
                    Py_ssize_t lda, Py_ssize_t sa, const double* B, Py_ssize_t ldb,
                    double* C, Py_ssize_t ldc) noexcept nogil
    int AFM_ROW_ALIGN
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


# Activation codes (kernel_api.RELU ...).
cdef enum:
    ACT_RELU = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_IDENTITY = 3

cdef extern from *:
    void __builtin_prefetch(const void* addr) noexcept nogil

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
    # columns of a V row's gradient that the feature update forms at a time (stack
    # buffers: a per-feature buffer would leave u_cap x k dirty lines to write back)
    GRAD_SPAN = 256


cdef inline void _gemm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating* A,
                       Py_ssize_t lda, Py_ssize_t sa, const floating* B, Py_ssize_t ldb,
                       floating* C, Py_ssize_t ldc) noexcept nogil:
    if M <= 0 or N <= 0 or K <= 0:
        return
    if floating is float:
        afm_gemm_f(M, N, K, A, lda, sa, B, ldb, C, ldc)
    else:
        afm_gemm_d(M, N, K, A, lda, sa, B, ldb, C, ldc)


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


cdef inline void _prefetch_row(const void* p, Py_ssize_t nbytes) noexcept nogil:
    """Prefetch the cache lines of nbytes at p."""
    cdef Py_ssize_t off = 0
    while off < nbytes:
        __builtin_prefetch(<const char*>p + off)
        off += 64


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


cdef inline double _du(double ds, double hj, double hv, int code) noexcept nogil:
    """du = ds h_j act'(u), act' from the activation value hv = act(u)."""
    if code == ACT_RELU:
        return ds * hj if hv > 0 else 0.0
    elif code == ACT_SIGMOID:
        return ds * hj * (hv * (1 - hv))
    elif code == ACT_TANH:
        return ds * hj * (1 - hv * hv)
    return ds * hj


cdef inline void _act_grad_h(const floating* h, const floating* hv, floating* out,
                             Py_ssize_t n, int code) noexcept nogil:
    """out = h act'(u) elementwise, from the activation values hv = act(u): _du(1, h_j,
    hv_j) with the switch outside the loop, so that it vectorises."""
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
                                floating* U) noexcept nogil:
    """U rows (n_pairs, t) = E W^T + b."""
    cdef Py_ssize_t P, jj
    for P in range(n_pairs):
        for jj in range(t):
            U[P * t + jj] = bias[jj]
    _gemm(n_pairs, t, k, E, k, 1, WT, t, U, t)


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


cdef class AFMWorkspace:
    """Scratch of afm_step for one fit (see the module docstring); opaque to callers."""
    cdef readonly Py_ssize_t batch_size, max_batch_nnz, max_batch_pairs, n_features
    cdef readonly Py_ssize_t n_factors, attention_size, u_cap
    cdef readonly object dtype
    cdef readonly bint forward_only  # for predict: E and U hold a block per thread
    cdef Py_ssize_t itemsize
    # integers
    cdef int64_t* off        # (B + 1,) batch-local nonzero offsets
    cdef int64_t* poff       # (B + 1,) batch-local pair offsets
    cdef int64_t* chunk      # (B + 1,) first row of each chunk
    cdef int32_t* slot       # (M,) feature -> group, -1 when untouched (so between steps)
    cdef int32_t* occ        # (nnz,) feature id of each nonzero in batch order
    cdef int32_t* grp        # (nnz,) group of each nonzero in batch order
    cdef int32_t* uniq       # (u_cap,) feature id of each group
    cdef int64_t* ustart     # (u_cap + 1,) group g's occurrences: ustart[g]:ustart[g+1]
    cdef int64_t* cursor     # (u_cap,)
    cdef int32_t* grp_occ    # (nnz,) batch-order index of each occurrence, grouped
    cdef int32_t* grp_row    # (nnz,) batch row of each occurrence, grouped
    # distinct pairs (attention): a class is a (feature, value) of the batch; pairs with
    # the same two classes share e, W e + b, act and the logit
    cdef int32_t* cls        # (nnz,) class of each occurrence (its group, or u_cap + q
                             # when its value differs from the group's first)
    cdef double* gx0         # (u_cap,) value of each group's first occurrence
    cdef int32_t* lp         # (nnz + 1,) first pair of each occurrence with the later
                             # occurrences of its row; lp[q + 1] - lp[q] of them
    cdef int32_t* row_bad    # (B,) position of a row's first invalid id, or -1
    # A distinct pair has two numbers. Its slot (dbase of its bucket + its number there)
    # is what the buckets and the ds sums work in. Its id d is the order of first
    # appearance in the batch: the distinct pairs whose representative pair (the first
    # of its pairs in batch order) is in row b are d = rbase[b], ... in pair order, so
    # the passes over distinct pairs read v x, and de reads C', in batch order.
    cdef int32_t* pd         # (pairs,) slot of each pair's distinct pair
    cdef int32_t* reps       # (pairs,) at poff[b] + r: the slot of distinct pair
                             # rbase[b] + r
    cdef int64_t* rbase      # (B + 1,) first distinct pair id of row b (rbase[b + 1] -
                             # rbase[b] have their representative pair in row b)
    cdef int32_t* brow       # (blocks,) row of the first distinct pair of each DBLOCK block
    cdef int64_t* bgrp       # (groups + 1,) first row of each backward group
                             # (_backward_groups)
    cdef int32_t* dq         # (2 pairs,) at 2 (poff[b] + r): the occurrences of distinct
                             # pair rbase[b] + r's representative pair
    cdef int32_t* stamp      # (threads, u_cap + nnz) dedup marks, one table per thread
    cdef int32_t* sid        # (threads, u_cap + nnz)
    cdef Py_ssize_t stamp_threads
    cdef void* rowbuf        # (threads, row_cap, k) a row's gradients of v x, per thread
    cdef void* cbuf          # (threads, DBLOCK, k) per thread, C' = W^T du of the distinct
                             # pairs its backward group is at
    cdef Py_ssize_t row_cap  # most nonzeros a row of a valid batch can have
    cdef int64_t* dbase      # (u_cap + nnz + 1,) first distinct pair of each class's bucket
                             # (set up to the last class in use)
    cdef double* DSD         # (pairs,) by slot: sum of ds over each distinct pair's pairs
    cdef double* SD          # (pairs,) by slot: logit of each distinct pair
    cdef double* ED          # (pairs,) by slot: exp(logit - the batch's largest logit)
    cdef double* BMAX        # (blocks,) largest logit of each block of distinct pairs
    cdef double* BDB         # (groups, t) per backward group: sum du over its pairs
    cdef double* BDH         # (groups, t) per backward group: sum ds act
    # doubles
    cdef double* r           # (B,) residual y_hat - y
    cdef double* row_loss    # (B,)
    cdef double* lin         # (B,) linear term
    cdef double* grp_sq      # (u_cap,) ||V_row||^2 before the update
    cdef double* pa          # (pairs,) softmax weight a
    cdef double* pau         # (pairs,) a' = a * attention mask / keep (1 without attention)
    cdef double* pds         # (pairs,) attention scale, then da, then ds
    cdef double* dsum        # (1 + k + 2t,) dense gradient sums
    # DTYPE
    cdef void* occ_x         # (nnz,) value of each nonzero in batch order
    cdef void* VX            # (nnz, k) v x per occurrence, then (step 2) the gradient of
                             # its V row from each occurrence
    cdef void* RT            # (B, k) dg of each row (DTYPE), from the row loop to de
    cdef void* E             # (pairs, k) by id: e of each distinct pair; forward_only:
                             # (threads, DBLOCK, k), a block's, the logits being all it keeps
    cdef void* U             # (pairs, t) by id: W e + b, then act, then du; forward_only:
                             # (threads, DBLOCK, t)
    cdef void* WT            # (k, t)
    cdef void* GW            # (t, k) gradient of W
    cdef double* CPS         # (B, k) at row c: sum over chunk c's rows of r g' (gradient
                             # of p), in row order
    cdef long long* cursors  # (threads, CURSOR_STRIDE) next_item_near's cursors
    cdef double* rowscr      # (threads, 3k) per thread, a row's: pooled g' (k), dg in
                             # double (k), da scratch (k DTYPE)
    cdef void* gdense        # (1 + k + 2t,)

    def __cinit__(self, Py_ssize_t batch_size, Py_ssize_t max_batch_nnz,
                  Py_ssize_t max_batch_pairs, Py_ssize_t n_features, Py_ssize_t n_factors,
                  Py_ssize_t attention_size, dtype, bint forward_only=False):
        cdef Py_ssize_t i, B, N, PP, M, k, t, U, isz, D, C, nblk, n
        dt = np.dtype(dtype)
        check_workspace_sizes(dt, (("batch_size", batch_size),
                                   ("max_batch_nnz", max_batch_nnz),
                                   ("n_features", n_features), ("n_factors", n_factors),
                                   ("attention_size", attention_size)),
                              n_features, max_batch_nnz)
        if max_batch_pairs < 0 or max_batch_pairs > 2147483647:
            raise ValueError(f"max_batch_pairs must be in [0, 2**31 - 1] (pairs are "
                             f"numbered in int32), got {max_batch_pairs}")
        B, N, M, k, t = batch_size, max_batch_nnz, n_features, n_factors, attention_size
        PP = max(max_batch_pairs, 1)
        U = min(M, N)
        D = 1 + k + 2 * t
        self.batch_size, self.max_batch_nnz, self.max_batch_pairs = B, N, max_batch_pairs
        self.n_features, self.n_factors, self.attention_size, self.u_cap = M, k, t, U
        self.dtype = dt
        self.forward_only = forward_only
        isz = dt.itemsize
        self.itemsize = isz
        self.off = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.poff = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.chunk = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.slot = <int32_t*>_alloc(M * sizeof(int32_t))
        for i in range(M):
            self.slot[i] = -1
        self.occ = <int32_t*>_alloc(N * sizeof(int32_t))
        self.grp = <int32_t*>_alloc(N * sizeof(int32_t))
        self.uniq = <int32_t*>_alloc(U * sizeof(int32_t))
        self.ustart = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.cursor = <int64_t*>_alloc(U * sizeof(int64_t))
        self.grp_occ = <int32_t*>_alloc(N * sizeof(int32_t))
        self.grp_row = <int32_t*>_alloc(N * sizeof(int32_t))
        self.r = <double*>_alloc(B * sizeof(double))
        self.row_loss = <double*>_alloc(B * sizeof(double))
        self.lin = <double*>_alloc(B * sizeof(double))
        self.grp_sq = <double*>_alloc(U * sizeof(double))
        self.pa = <double*>_alloc(PP * sizeof(double))
        self.pau = <double*>_alloc(PP * sizeof(double))
        self.pds = <double*>_alloc(PP * sizeof(double))
        self.dsum = <double*>_alloc(D * sizeof(double))
        self.occ_x = _alloc(N * isz)
        self.VX = _alloc(N * k * isz)
        self.RT = _alloc(B * k * isz)
        # the pair buffers (rows written before they are read) are left uninitialised:
        # only the rows of the distinct pairs are touched, so the RSS follows those
        if not forward_only:
            self.E = aligned_empty(PP * k * isz)
            self.U = aligned_empty(PP * t * isz)
        self.WT = _alloc(k * t * isz)
        self.GW = _alloc(t * k * isz)
        # only the rows of the chunks in use are touched (a chunk has at least one row)
        self.CPS = <double*>aligned_empty(B * k * sizeof(double))
        C = U + N
        self.cls = <int32_t*>_alloc(N * sizeof(int32_t))
        self.gx0 = <double*>_alloc(U * sizeof(double))
        self.lp = <int32_t*>_alloc((N + 1) * sizeof(int32_t))
        self.row_bad = <int32_t*>_alloc(B * sizeof(int32_t))
        self.pd = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.reps = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.rbase = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.brow = <int32_t*>_alloc(((PP + DBLOCK - 1) // DBLOCK) * sizeof(int32_t))
        self.bgrp = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.dq = <int32_t*>_alloc(2 * PP * sizeof(int32_t))
        self.stamp_threads = 0
        self.stamp = NULL
        self.sid = NULL
        self.rowbuf = NULL
        self.cbuf = NULL
        # a row of n nonzeros has n(n-1)/2 pairs, at most max_batch_pairs
        n = <Py_ssize_t>((1 + sqrt(1 + 8 * <double>PP)) / 2)
        while n > 1 and n * (n - 1) // 2 > PP:
            n -= 1
        while (n + 1) * n // 2 <= PP:
            n += 1
        self.row_cap = min(n, N)
        self.dbase = <int64_t*>_alloc((C + 1) * sizeof(int64_t))
        self.DSD = <double*>_alloc(PP * sizeof(double))
        self.SD = <double*>_alloc(PP * sizeof(double))
        self.ED = <double*>_alloc(PP * sizeof(double))
        nblk = (PP + DBLOCK - 1) // DBLOCK
        self.BMAX = <double*>_alloc(nblk * sizeof(double))
        # a group has a row: at most B of them (only those in use are touched)
        self.BDB = <double*>aligned_empty(B * t * sizeof(double))
        self.BDH = <double*>aligned_empty(B * t * sizeof(double))
        self.gdense = _alloc(D * isz)

    def __dealloc__(self):
        free(self.off); free(self.poff); free(self.chunk); free(self.slot); free(self.occ)
        free(self.grp); free(self.uniq); free(self.ustart); free(self.cursor)
        free(self.grp_occ); free(self.grp_row)
        free(self.r); free(self.row_loss); free(self.lin); free(self.grp_sq); free(self.pa)
        free(self.pau); free(self.pds); free(self.dsum)
        free(self.occ_x); free(self.VX); free(self.RT); free(self.E); free(self.U)
        free(self.WT); free(self.GW); free(self.CPS)
        free(self.gdense)
        free(self.cls); free(self.gx0); free(self.lp); free(self.row_bad); free(self.pd)
        free(self.reps)
        free(self.rbase); free(self.brow); free(self.bgrp); free(self.dq); free(self.stamp)
        free(self.sid); free(self.rowbuf); free(self.cbuf)
        free(self.rowscr); free(self.cursors)
        free(self.dbase); free(self.DSD); free(self.SD); free(self.ED); free(self.BMAX)
        free(self.BDB); free(self.BDH)

    cdef void _ensure_threads(self, Py_ssize_t n_threads) except *:
        """Per-thread dedup tables and row scratch for n_threads (grown once, kept for
        the fit)."""
        cdef Py_ssize_t C = self.u_cap + self.max_batch_nnz
        if n_threads <= self.stamp_threads:
            return
        free(self.stamp)
        free(self.sid)
        free(self.rowbuf)
        free(self.cbuf)
        free(self.rowscr)
        free(self.cursors)
        if self.forward_only:
            free(self.E)
            free(self.U)
            self.E = aligned_empty(n_threads * DBLOCK * self.n_factors * self.itemsize)
            self.U = aligned_empty(n_threads * DBLOCK * self.attention_size * self.itemsize)
        self.cursors = NULL
        self.stamp = NULL
        self.sid = NULL
        self.rowbuf = NULL
        self.cbuf = NULL
        self.rowscr = NULL
        self.stamp_threads = 0
        self.stamp = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.sid = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.rowbuf = aligned_empty(n_threads * self.row_cap * self.n_factors * self.itemsize)
        self.cbuf = aligned_empty(n_threads * DBLOCK * self.n_factors * self.itemsize)
        self.rowscr = <double*>aligned_empty(n_threads * 3 * self.n_factors * sizeof(double))
        self.cursors = <long long*>_alloc(n_threads * CURSOR_STRIDE * sizeof(long long))
        self.stamp_threads = n_threads

    def __repr__(self):
        return (f"AFMWorkspace(batch_size={self.batch_size}, max_batch_nnz="
                f"{self.max_batch_nnz}, max_batch_pairs={self.max_batch_pairs}, "
                f"n_features={self.n_features}, n_factors={self.n_factors}, "
                f"attention_size={self.attention_size}, dtype={self.dtype})")


def afm_workspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                  attention_size, dtype):
    """Scratch for the afm_step calls of one fit.

    batch_size, max_batch_nnz and max_batch_pairs bound len(rows), a batch's nonzero
    count and its pair count (sum over its rows of n(n-1)/2); n_features (M), n_factors
    (k), attention_size (t) and dtype must match the parameters.

    Example: ws = afm_workspace(4096, 40960, 184320, 5382, 64, 64, np.float32)
    """
    return AFMWorkspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                        attention_size, dtype)


# Scalars and raw pointers of one step.
ctypedef struct AFMArgs:
    Py_ssize_t B, k, t, M, n_rows, nnz_cap, pair_cap, n_chunks, U, n_classes, n_distinct
    Py_ssize_t n_groups
    Py_ssize_t n_own
    int n_threads, attention, activation, freeze_fm, drop_att, drop_pool, loss, prefetch_v
    int prefetch_features
    double l2, l2a, inv_keep_att, inv_keep_pool
    uint64_t seed, step
    uint32_t thr_att, thr_pool
    const int64_t* indptr
    const int32_t* indices
    const int64_t* rows
    OptCfg opt
    BatchErr err


cdef void _copy_row(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                    const floating* values) noexcept nogil:
    """Row b's nonzeros to the batch-order buffers (occ, occ_x, lp); row_bad[b] = the
    position of its first invalid id, or -1."""
    cdef int64_t start, q0 = ws.off[b], P0 = ws.poff[b]
    cdef Py_ssize_t i, n = ws.off[b + 1] - q0
    if b + ROW_PREFETCH < a.B:
        # the rows of a shuffled batch are scattered over X: start the next misses early
        start = a.indptr[a.rows[b + ROW_PREFETCH]]
        __builtin_prefetch(a.indices + start)
        __builtin_prefetch(values + start)
    start = a.indptr[a.rows[b]]
    ws.row_bad[b] = <int32_t>copy_row(a.indices, values, start, n, a.M, ws.occ + q0,
                                      <floating*>ws.occ_x + q0)
    for i in range(n):
        ws.lp[q0 + i] = <int32_t>(P0 + _pair_index(i, i + 1, n))


cdef void _group(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """Stable counting sort of the batch's nonzeros by feature id (slot is all -1 between
    steps): a.U, grp, uniq, ustart, grp_row, grp_occ."""
    a.U = group_by_feature(ws.off[a.B], ws.occ, ws.grp, ws.slot, ws.uniq, ws.cursor,
                           ws.ustart)
    scatter_groups(a.B, ws.off, ws.grp, ws.cursor, ws.grp_row, ws.grp_occ, <float*>NULL,
                   <float*>NULL)


# Wall-clock seconds from the start of the last afm_step to the end of each phase, for
# profiling (_phase_times() names them; PHASES is their order). The first three are
# _prepare's: gather (offsets, batch-order copy, chunks), group_vx (the grouping by
# feature and the classes on one thread while the others compute v x) and numbering
# (the distinct pairs, W^T).
PHASES = ("gather", "group_vx", "numbering", "distinct_forward", "row_forward", "ds_sums",
          "backward_de", "row_sums", "feature_updates", "dW", "dense_updates")
cdef double _phase_t[11]


cdef int _prepare(AFMArgs* a, AFMWorkspace ws, const floating* values, const floating* V,
                  const floating* w, const floating* W, double* times) noexcept nogil:
    """Step 0 and 1a: offsets, batch-order copy of the nonzeros, chunks; then the grouping
    by feature on one thread while the others compute v x per occurrence (which does
    not need it), the sorting thread joining them when done; the distinct pairs, W^T.
    times, unless NULL: omp_get_wtime() after the chunks and after v x."""
    cdef Py_ssize_t B = a.B, b, n, c, bad, j, f
    cdef int64_t start, cp
    cdef int64_t* off = ws.off
    cdef int64_t* poff = ws.poff
    cdef Py_ssize_t target, rows_in
    cdef int rank
    cdef unsigned int csr
    cdef int err = batch_offsets(a.rows, B, a.n_rows, a.indptr, off, a.nnz_cap,
                                 a.n_threads, &a.err)
    if err:
        return err
    poff[0] = 0
    for b in range(B):
        n = off[b + 1] - off[b]
        poff[b + 1] = poff[b] + n * (n - 1) // 2
    if poff[B] > a.pair_cap:
        a.err.value = poff[B]
        return ERR_PAIRS
    with parallel(num_threads=a.n_threads):
        csr = ftz_enter()
        for b in prange(B, schedule="static"):
            _copy_row(a, ws, b, values)
        ftz_leave(csr)
    ws.lp[off[B]] = <int32_t>poff[B]
    for b in range(B):
        if ws.row_bad[b] >= 0:
            a.err.pos = a.indptr[a.rows[b]] + ws.row_bad[b]
            a.err.value = ws.occ[off[b] + ws.row_bad[b]]
            return ERR_FEATURE
    # chunks of consecutive rows with about `target` pairs (<= 64 rows): E and U of a
    # chunk stay in cache between the GEMM and the row loop.
    target = 65536 // (a.k + a.t)
    if target < 48:
        target = 48
    c = 0
    ws.chunk[0] = 0
    cp = 0
    rows_in = 0
    for b in range(B):
        cp += poff[b + 1] - poff[b]
        rows_in += 1
        if cp >= target or rows_in >= 64:
            c += 1
            ws.chunk[c] = b + 1
            cp = 0
            rows_in = 0
    if rows_in > 0:
        c += 1
        ws.chunk[c] = B
    a.n_chunks = c
    if times:
        times[0] = omp_get_wtime()
    reset_cursors(ws.cursors, a.n_threads)
    with parallel(num_threads=a.n_threads):
        csr = ftz_enter()
        rank = 0
        if threadid() == 0:
            _group(a, ws)
            if a.attention:
                _classes(a, ws, <floating*>ws.occ_x)
        c = next_item_near(ws.cursors, a.n_chunks, a.n_threads, threadid(), &rank)
        while c < a.n_chunks:
            _vx_chunk(a, ws, c, V, w)
            c = next_item_near(ws.cursors, a.n_chunks, a.n_threads, threadid(), &rank)
        ftz_leave(csr)
    if times:
        times[1] = omp_get_wtime()
    if a.attention:
        _distinct_pairs(a, ws)
        for j in range(a.t):
            for f in range(a.k):
                (<floating*>ws.WT)[f * a.t + j] = W[j * a.k + f]
    return 0


cdef void _distinct_logits(AFMArgs* a, AFMWorkspace ws, const floating* dense) noexcept nogil:
    """Step 1b (attention): e, act(W e + b) and the logit of every distinct pair, then
    exp(logit - the batch's largest logit)."""
    cdef Py_ssize_t c, nblk = (a.n_distinct + DBLOCK - 1) // DBLOCK if a.attention else 0
    cdef double smax
    cdef int nt = a.n_threads, rank
    cdef unsigned int csr
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        c = next_item_near(ws.cursors, nblk, nt, threadid(), &rank)
        while c < nblk:
            _distinct_forward(a, ws, c, dense)
            c = next_item_near(ws.cursors, nblk, nt, threadid(), &rank)
        ftz_leave(csr)
    if nblk > 0:
        smax = ws.BMAX[0]
        for c in range(1, nblk):
            if ws.BMAX[c] > smax:
                smax = ws.BMAX[c]
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(nblk, schedule="dynamic"):
                _distinct_exp(a, ws, c, smax)
            ftz_leave(csr)


cdef inline Py_ssize_t _pair_index(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n) noexcept nogil:
    """Index of the pair (lo, hi), lo < hi, among a row's n(n-1)/2 pairs in row-major
    order (i < i2 loops)."""
    return lo * (2 * n - lo - 1) // 2 + (hi - lo - 1)


cdef inline Py_ssize_t _later_pairs(AFMWorkspace ws, Py_ssize_t q,
                                   Py_ssize_t* count) noexcept nogil:
    """The pairs of occurrence q with the later occurrences of its row: the first one's
    index P (batch-wide) and, in count, how many (they are P, P + 1, ...). The pairs of
    an occurrence end where the next occurrence's begin (a row's last occurrence has
    none, and the next row's pairs begin at poff of that row), so lp alone gives both."""
    cdef Py_ssize_t P = ws.lp[q]
    count[0] = ws.lp[q + 1] - P
    return P


cdef inline void _class_range(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                              Py_ssize_t* pos, Py_ssize_t* pos_end) noexcept nogil:
    """Candidate occurrences of class c: grp_occ[pos:pos_end] for a group class, the
    single occurrence c - u_cap for an own class (pos = 0, pos_end = 1), none else;
    an occurrence belongs to c only if cls[q] == c."""
    if c < a.U:
        pos[0] = ws.ustart[c]
        pos_end[0] = ws.ustart[c + 1]
    elif c >= ws.u_cap:
        pos[0] = 0
        pos_end[0] = 1
    else:
        pos[0] = 0
        pos_end[0] = 0


cdef Py_ssize_t _bucket(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c, int32_t* stamp,
                        int32_t* sid) noexcept nogil:
    """Number the distinct pairs of class c's bucket: the pairs i < i2 of a row whose
    class(i) is c, visited in a fixed order (c's occurrences in batch order, each with
    its row's later occurrences). pd[P] = the pair's distinct id local to the bucket
    (-1 - id for the first pair of each, its representative); stamp/sid are this
    thread's tables. Returns the bucket's distinct count."""
    cdef Py_ssize_t pos, pos_end, q, P, P_end, cnt, nd = 0
    cdef int32_t c2
    cdef const int32_t* cls = ws.cls
    _class_range(a, ws, c, &pos, &pos_end)
    while pos < pos_end:
        q = ws.grp_occ[pos] if c < ws.u_cap else c - ws.u_cap
        pos += 1
        if cls[q] != c:
            continue
        P = _later_pairs(ws, q, &cnt)
        P_end = P + cnt
        while P < P_end:
            c2 = cls[q + 1 + (P - (P_end - cnt))]
            if stamp[c2] != c:
                stamp[c2] = <int32_t>c
                sid[c2] = <int32_t>nd
                ws.pd[P] = <int32_t>(-1 - nd)
                nd += 1
            else:
                ws.pd[P] = sid[c2]
            P += 1
    return nd


cdef void _sum_ds(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c) noexcept nogil:
    """DSD[s] = sum of ds over the pairs of the distinct pair of each slot s of class c's
    bucket, in the bucket's visiting order (that of _bucket). The pairs of an occurrence are
    contiguous in pd/pds; those of the occurrence AFM_PREFETCH places ahead are
    prefetched."""
    cdef Py_ssize_t pos, pos_end, q, P, P_end, cnt, d
    _class_range(a, ws, c, &pos, &pos_end)
    for d in range(ws.dbase[c], ws.dbase[c + 1]):
        ws.DSD[d] = 0
    while pos < pos_end:
        if c < a.U and pos + AFM_PREFETCH < pos_end:
            P = _later_pairs(ws, ws.grp_occ[pos + AFM_PREFETCH], &cnt)
            __builtin_prefetch(ws.pd + P)
            __builtin_prefetch(ws.pds + P)
        q = ws.grp_occ[pos] if c < ws.u_cap else c - ws.u_cap
        pos += 1
        if ws.cls[q] != c:
            continue
        P = _later_pairs(ws, q, &cnt)
        for P in range(P, P + cnt):
            d = ws.pd[P]
            ws.DSD[d] = ws.DSD[d] + ws.pds[P]


cdef void _globalize_row(AFMWorkspace ws, Py_ssize_t b) noexcept nogil:
    """Row b's pairs: bucket-local distinct numbers to slots (dbase of the lower class),
    and the slot and occurrences of each distinct pair whose representative pair is in
    this row, in pair order."""
    cdef Py_ssize_t q0 = ws.off[b], n = ws.off[b + 1] - ws.off[b], P = ws.poff[b]
    cdef Py_ssize_t i, i2, d, R = ws.poff[b]
    cdef int32_t c1, l
    for i in range(n):
        c1 = ws.cls[q0 + i]
        for i2 in range(i + 1, n):
            l = ws.pd[P]
            if l < 0:
                d = ws.dbase[c1] + (-1 - l)
                ws.dq[2 * R] = <int32_t>(q0 + i)
                ws.dq[2 * R + 1] = <int32_t>(q0 + i2)
                ws.reps[R] = <int32_t>d
                R += 1
            else:
                d = ws.dbase[c1] + l
            ws.pd[P] = <int32_t>d
            P += 1
    ws.rbase[b + 1] = R - ws.poff[b]   # a count, prefix-summed once all rows are done


cdef inline Py_ssize_t _rep_position(AFMWorkspace ws, Py_ssize_t d,
                                     Py_ssize_t* b) noexcept nogil:
    """Position (in reps, and halved in dq) of distinct pair d, b its row or an earlier
    one on entry (rows are advanced past those with no later id)."""
    while ws.rbase[b[0] + 1] <= d:
        b[0] += 1
    return ws.poff[b[0]] + (d - ws.rbase[b[0]])


cdef void _classes(AFMArgs* a, AFMWorkspace ws, const floating* occ_x) noexcept nogil:
    """Class of each occurrence (attention): its group when its value equals the value of
    the group's first occurrence (and is not 0, whose sign would matter), else a class of
    its own (u_cap + q); a.n_own counts those. One pass in batch order, on the thread that
    sorted (while the others still compute v x): the groups' occurrences scattered over
    the batch would have the threads write cls entries that share cache lines."""
    cdef Py_ssize_t q, u, n_own = 0, nnz = ws.off[a.B]
    cdef double x
    for u in range(a.U):
        ws.gx0[u] = occ_x[ws.grp_occ[ws.ustart[u]]]
    for q in range(nnz):
        u = ws.grp[q]
        x = occ_x[q]
        if x == ws.gx0[u] and x != 0:
            ws.cls[q] = <int32_t>u
        else:
            ws.cls[q] = <int32_t>(ws.u_cap + q)
            n_own += 1
    a.n_own = n_own


cdef void _distinct_pairs(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """Step 0 (attention, after _classes): the batch's distinct pairs of classes. A
    pair's e, W e + b, act and logit depend only on its two (v x) (DESIGN section 3),
    so they are computed once per distinct pair. A pair belongs to the bucket of its
    lower class; buckets are numbered in parallel (one dedup table per thread), their
    counts prefix-summed into slots, each row's representative pairs listed (a prange
    over rows), and the ids numbered by first appearance (rbase, and brow per DBLOCK
    block). The numbering depends on the data only, not on the thread count."""
    cdef Py_ssize_t U = a.U, nnz = ws.off[a.B], C = ws.u_cap + nnz, c, b, th, hi, it
    cdef Py_ssize_t n_own = a.n_own
    cdef int nt = a.n_threads
    cdef unsigned int csr
    # the classes in use: groups [0, U), and own classes [u_cap, C) only when there are any
    hi = C if n_own > 0 else U
    for th in prange(nt, schedule="static", num_threads=nt):
        csr = ftz_enter()
        for c in range(hi):
            ws.stamp[th * C + c] = -1
        ftz_leave(csr)
    # Group classes are numbered by first occurrence, so the popular ones (the biggest
    # buckets) come first: feature_items hands them out one by one and the rest
    # CLASS_TAIL at a time, which keeps the threads balanced without a grab of the
    # shared loop counter per few small buckets. With 4 classes a grab, ml-tag k=16's ds
    # sums (the same loop shape) took 0.14 ms on 2 threads as on 1; now 0.06
    # (bench/profile_phases.py --k 16 --data mltag --rows 2000000, ds_sums). Own classes
    # (values that differ within a feature) are rare; one-hot data has none.
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for it in prange(feature_items(U, CLASS_TAIL), schedule="dynamic"):
            th = omp_get_thread_num()
            for c in range(feature_item_start(it, U, CLASS_TAIL),
                           feature_item_start(it + 1, U, CLASS_TAIL)):
                ws.dbase[c + 1] = _bucket(a, ws, c, ws.stamp + th * C, ws.sid + th * C)
        ftz_leave(csr)
    if n_own > 0:
        for c in range(U, C):
            ws.dbase[c + 1] = 0
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(ws.u_cap, C, schedule="dynamic", chunksize=256):
                th = omp_get_thread_num()
                ws.dbase[c + 1] = _bucket(a, ws, c, ws.stamp + th * C, ws.sid + th * C)
            ftz_leave(csr)
    ws.dbase[0] = 0
    for c in range(hi):
        ws.dbase[c + 1] += ws.dbase[c]
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for b in prange(a.B, schedule="static"):
            _globalize_row(ws, b)
        ftz_leave(csr)
    # ids in order of first appearance, and the row where each block of them starts
    ws.rbase[0] = 0
    it = 0
    for b in range(a.B):
        ws.rbase[b + 1] += ws.rbase[b]
        while it * DBLOCK < ws.rbase[b + 1]:
            ws.brow[it] = <int32_t>b
            it += 1
    a.n_classes = C
    a.n_distinct = ws.dbase[hi]


cdef void _vx_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c, const floating* V,
                    const floating* w) noexcept nogil:
    """Step 1a for the rows of chunk c: v x per occurrence, the linear term per row."""
    cdef Py_ssize_t k = a.k, b, i, f, n, q0
    cdef const int32_t* occ = ws.occ
    cdef const floating* occ_x = <floating*>ws.occ_x
    cdef floating* vx
    cdef const floating* v
    cdef floating x
    cdef double lin
    cdef Py_ssize_t q, q_end = ws.off[ws.chunk[c + 1]]
    for b in range(ws.chunk[c], ws.chunk[c + 1]):
        q0 = ws.off[b]
        n = ws.off[b + 1] - q0
        lin = 0
        if a.prefetch_v:
            for q in range(q0 + n, min(q0 + n + AFM_PREFETCH, q_end)):
                _prefetch_row(V + <Py_ssize_t>occ[q] * k, k * sizeof(floating))
                __builtin_prefetch(w + occ[q])
        for i in range(n):
            x = occ_x[q0 + i]
            v = V + <Py_ssize_t>occ[q0 + i] * k
            vx = <floating*>ws.VX + (q0 + i) * k
            for f in range(k):
                vx[f] = v[f] * x
            lin += <double>w[occ[q0 + i]] * <double>x
        ws.lin[b] = lin


cdef void _distinct_forward(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t blk,
                            const floating* dense) noexcept nogil:
    """Step 1b for distinct pairs [blk DBLOCK, ...): e, u = act(W e + b) and the logit
    s = h . u (double)."""
    cdef Py_ssize_t k = a.k, t = a.t, d, d0 = blk * DBLOCK, d1, f, R
    cdef Py_ssize_t b = ws.brow[blk]
    cdef const floating* VX = <floating*>ws.VX
    # a forward-only workspace keeps the logits only: the block's E and U are scratch
    cdef Py_ssize_t row0 = omp_get_thread_num() * DBLOCK if ws.forward_only else d0
    cdef floating* E = <floating*>ws.E + row0 * k        # the block's rows
    cdef floating* Uu = <floating*>ws.U + row0 * t
    cdef const floating* bias = dense + 1 + k
    cdef const floating* h = dense + 1 + k + t
    cdef const floating* v1
    cdef const floating* v2
    cdef floating* e
    cdef floating* u
    cdef double smax, s
    cdef int32_t slot[DBLOCK]
    cdef int code = a.activation
    d1 = d0 + DBLOCK if d0 + DBLOCK < a.n_distinct else a.n_distinct
    for d in range(d0, d1):
        R = _rep_position(ws, d, &b)
        slot[d - d0] = ws.reps[R]
        v1 = VX + <Py_ssize_t>ws.dq[2 * R] * k
        v2 = VX + <Py_ssize_t>ws.dq[2 * R + 1] * k
        e = E + (d - d0) * k
        for f in range(k):
            e[f] = v1[f] * v2[f]
    _preactivation(E, d1 - d0, k, t, bias, <floating*>ws.WT, Uu)
    smax = -INFINITY
    for d in range(d0, d1):
        u = Uu + (d - d0) * t
        _activate(u, t, code)
        s = dot_d(h, u, t)
        ws.SD[slot[d - d0]] = s
        if s > smax:
            smax = s
    ws.BMAX[blk] = smax


cdef void _distinct_exp(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t blk,
                        double smax) noexcept nogil:
    """ED = exp(logit - smax) for the slots [blk DBLOCK, ...), smax the batch's largest
    logit: the softmax numerators, once per distinct pair instead of once per pair."""
    cdef Py_ssize_t d, d1 = (blk + 1) * DBLOCK
    if d1 > a.n_distinct:
        d1 = a.n_distinct
    for d in range(blk * DBLOCK, d1):
        ws.ED[d] = exp(ws.SD[d] - smax)


cdef inline double _dot_pair_d(const floating* v1, const floating* v2, const double* b,
                               Py_ssize_t n) noexcept nogil:
    """dot_d(e, b, n) for e = v1 * v2 (rounded to DTYPE), without storing e."""
    cdef double acc[8]
    cdef double s = 0
    cdef Py_ssize_t i, l, n8 = n - n % 8
    for l in range(8):
        acc[l] = 0
    i = 0
    while i < n8:
        for l in range(8):
            acc[l] = acc[l] + <double>(v1[i + l] * v2[i + l]) * b[i + l]
        i = i + 8
    for l in range(n - n8):
        acc[l] = acc[l] + <double>(v1[n8 + l] * v2[n8 + l]) * b[n8 + l]
    for l in range(8):
        s = s + acc[l]
    return s


cdef inline void _row_softmax(AFMWorkspace ws, Py_ssize_t P0, Py_ssize_t P1) noexcept nogil:
    """pa[P0:P1] = softmax of a row's logits, from the numerators exp(s - the batch's
    largest logit) shared by distinct pair; a row whose sum underflows (logits far below
    the batch's largest) takes its own maximum instead."""
    cdef Py_ssize_t P
    cdef double ssum = 0
    cdef double* pa = ws.pa
    for P in range(P0, P1):
        pa[P] = ws.ED[ws.pd[P]]
        ssum += pa[P]
    if ssum >= SOFTMAX_MIN_SUM:
        for P in range(P0, P1):
            pa[P] = pa[P] / ssum
    else:
        for P in range(P0, P1):
            pa[P] = ws.SD[ws.pd[P]]
        _softmax_inplace(pa + P0, P1 - P0)


cdef void _forward_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                         const floating* y, const floating* dense) noexcept nogil:
    """Step 1c for the rows of chunk c: softmax of the row's logits (looked up by distinct
    pair), dropout masks, g, y_hat, residual r, dg, da and ds per pair.
    Pair sums are factorised per first occurrence i: g = sum_i v_i (sum_i2 a'_P v_i2)
    and da_P = (v_i dg) . v_i2, in DTYPE, so that each pair costs one vector FMA (g) and
    one dot (da) over k."""
    cdef Py_ssize_t k = a.k, b, i, i2, n, f, P, P0, P1, q0
    cdef const floating* VX = <floating*>ws.VX
    cdef const floating* v1
    cdef const floating* v2
    cdef floating* tv
    cdef double* pa = ws.pa
    cdef double* pau = ws.pau
    cdef double* pds = ws.pds
    cdef const floating* p_vec = dense + 1
    cdef double* gp = ws.rowscr + omp_get_thread_num() * 3 * k
    cdef double* dgd = gp + k
    cdef floating* dgo
    cdef double* cps = ws.CPS + c * k
    cdef double yhat, res, ada, da
    cdef uint64_t key
    cdef double inv_pool = a.inv_keep_pool
    cdef uint32_t thr_att = a.thr_att, thr_pool = a.thr_pool  # locals: stores could alias *a
    for f in range(k):
        cps[f] = 0
    for b in range(ws.chunk[c], ws.chunk[c + 1]):
        if b + ROW_PREFETCH < a.B:
            __builtin_prefetch(y + a.rows[b + ROW_PREFETCH])
        q0 = ws.off[b]
        n = ws.off[b + 1] - q0
        P0 = ws.poff[b]
        P1 = ws.poff[b + 1]
        tv = <floating*>(gp + 2 * k)
        if a.attention and P1 > P0:
            _row_softmax(ws, P0, P1)
            if a.drop_att:
                key = dropout_row_key(a.seed, 1, a.step, <uint64_t>a.rows[b])
                for P in range(P0, P1):
                    pds[P] = a.inv_keep_att if dropout_kept(key, <uint32_t>(P - P0),
                                                            thr_att) else 0.0
                    pau[P] = pa[P] * pds[P]
            else:
                for P in range(P0, P1):
                    pds[P] = 1.0
                    pau[P] = pa[P]
        else:
            for P in range(P0, P1):
                pau[P] = 1.0
        _pool_row(VX + q0 * k, pau + P0, n, k, gp)
        # pooled dropout scale (into dgd)
        if a.drop_pool:
            key = dropout_row_key(a.seed, 2, a.step, <uint64_t>a.rows[b])
            for f in range(k):
                dgd[f] = inv_pool if dropout_kept(key, <uint32_t>f, thr_pool) else 0
                gp[f] = gp[f] * dgd[f]
        else:
            for f in range(k):
                dgd[f] = 1
        yhat = dot_d(p_vec, gp, k)
        yhat = <double>dense[0] + ws.lin[b] + yhat
        ws.row_loss[b] = row_data_loss(a.loss, yhat, <double>y[a.rows[b]], &res)
        ws.r[b] = res
        dgo = <floating*>ws.RT + b * k
        for f in range(k):
            dgd[f] = res * <double>p_vec[f] * dgd[f]
            dgo[f] = <floating>dgd[f]
            cps[f] += res * gp[f]
        if a.attention and P1 > P0:
            # da = (v_i dg) . v_i2 times the attention dropout scale, then ds
            _da_row(VX + q0 * k, dgd, n, k, tv, pds + P0)
            ada = 0
            for P in range(P0, P1):
                ada += pa[P] * pds[P]
            for P in range(P0, P1):
                pds[P] = pa[P] * (pds[P] - ada)


cdef void _backward_groups(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """The split of the batch's rows into backward groups (bgrp, a.n_groups; training
    only): a row joins the group before it unless that would take the group past DBLOCK
    distinct pairs or GROUP_ROWS rows."""
    cdef Py_ssize_t b, g = 0
    ws.bgrp[0] = 0
    for b in range(1, a.B):
        if (ws.rbase[b + 1] - ws.rbase[ws.bgrp[g]] > DBLOCK
                or b - ws.bgrp[g] >= GROUP_ROWS):
            g += 1
            ws.bgrp[g] = b
    a.n_groups = g + 1 if a.B > 0 else 0
    ws.bgrp[a.n_groups] = a.B


cdef void _du_block(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t d0, Py_ssize_t d1,
                    Py_ssize_t b, const floating* dense, const floating* W, double* bdb,
                    double* bdh, floating* C) noexcept nogil:
    """Step 2 for distinct pairs [d0, d1) (at most DBLOCK; b the row of d0 or an earlier
    one): h act'(u) (HD_SPAN columns at a time, on the stack), du = DS h act'(u) (over U),
    its sums added to bdb (gradient of b) and those of DS act to bdh (gradient of h);
    unless C is NULL, C (d1 - d0, k) = W^T du."""
    cdef Py_ssize_t k = a.k, t = a.t, d, jj, j0, nj
    cdef floating* Uu = <floating*>ws.U
    cdef floating hd[HD_SPAN]
    cdef const floating* h = dense + 1 + k + t
    cdef floating* u
    cdef double ds, du
    for d in range(d0, d1):
        ds = ws.DSD[ws.reps[_rep_position(ws, d, &b)]]
        j0 = 0
        while j0 < t:
            u = Uu + d * t + j0
            nj = t - j0 if t - j0 < HD_SPAN else HD_SPAN
            _act_grad_h(h + j0, u, hd, nj, a.activation)
            for jj in range(nj):
                bdh[j0 + jj] = bdh[j0 + jj] + ds * <double>u[jj]
                du = ds * <double>hd[jj]
                bdb[j0 + jj] = bdb[j0 + jj] + du
                u[jj] = <floating>du
            j0 += nj
    if C == NULL:
        return
    for jj in range((d1 - d0) * k):
        C[jj] = 0
    _gemm(d1 - d0, k, t, Uu + d0 * t, t, 1, W, k, C, k)


cdef void _backward_group(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t g,
                          const floating* dense, const floating* W,
                          floating* VX) noexcept nogil:
    """Step 2 for backward group g: du (_du_block) of the group's distinct pairs,
    its sums into BDB/BDH row g; unless freeze_fm, per row de (_row_de) with C'_d added
    for the row's representative pairs, C' formed DBLOCK distinct pairs at a time into
    this thread's cbuf just before the rows that read it."""
    cdef Py_ssize_t k = a.k, t = a.t, b, b0 = ws.bgrp[g], b1 = ws.bgrp[g + 1], jj
    cdef Py_ssize_t d1 = ws.rbase[b1], s0 = ws.rbase[b0], s1 = s0, r, r_end, n, q0
    cdef int th = omp_get_thread_num()
    cdef floating* C = <floating*>ws.cbuf + th * DBLOCK * k
    cdef floating* dvx = <floating*>ws.rowbuf + th * ws.row_cap * k
    cdef double* bdb = ws.BDB + g * t
    cdef double* bdh = ws.BDH + g * t
    for jj in range(t):
        bdb[jj] = 0
        bdh[jj] = 0
    if a.freeze_fm:
        while s1 < d1:
            s0 = s1
            s1 = s0 + DBLOCK if s0 + DBLOCK < d1 else d1
            _du_block(a, ws, s0, s1, b0, dense, W, bdb, bdh, NULL)
        return
    for b in range(b0, b1):
        q0 = ws.off[b]
        _row_de(a, ws, b, VX, dvx)
        r = ws.rbase[b]
        r_end = ws.rbase[b + 1]
        while r < r_end:
            if r == s1:
                s0 = s1
                s1 = s0 + DBLOCK if s0 + DBLOCK < d1 else d1
                _du_block(a, ws, s0, s1, b, dense, W, bdb, bdh, C)
            n = (r_end if r_end < s1 else s1) - r
            _rep_grad(VX + q0 * k, n, ws.dq + 2 * (ws.poff[b] + r - ws.rbase[b]), q0,
                      C + (r - s0) * k, k, dvx)
            r += n
        _store_row_grad(a, ws, b, dvx, VX)


cdef void _dw_block(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t th, Py_ssize_t nth,
                    floating* GW) noexcept nogil:
    """Step 4 for W rows [j0, j1) of thread block th: GW[j] = sum_d du[d, j] e[d] over the
    distinct pairs in order. Blocks of pairs keep E's and DU's rows in cache across the W
    rows."""
    cdef Py_ssize_t k = a.k, t = a.t, nblk, j0, j1, P0, PB, P, n_pairs, f, j
    cdef const floating* E = <floating*>ws.E
    cdef const floating* DU = <floating*>ws.U
    nblk = (t + AFM_ROW_ALIGN - 1) // AFM_ROW_ALIGN
    j0 = (nblk * th // nth) * AFM_ROW_ALIGN
    j1 = (nblk * (th + 1) // nth) * AFM_ROW_ALIGN
    if j1 > t:
        j1 = t
    if j0 >= j1:
        return
    for j in range(j0 * k, j1 * k):
        GW[j] = 0
    n_pairs = a.n_distinct
    PB = 131072 // ((k + t) * sizeof(floating))
    if PB < 16:
        PB = 16
    P0 = 0
    while P0 < n_pairs:
        P = n_pairs - P0 if n_pairs - P0 < PB else PB
        _gemm(j1 - j0, k, P, DU + P0 * t + j0, 1, t, E + P0 * k, k, GW + j0 * k, k)
        P0 += P


cdef inline void _row_de(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                         const floating* VX, floating* dvx) noexcept nogil:
    """Step 2 for row b, without the C' terms: dvx (n, k) = sum over the row's pairs of
    de v_other, de = a' dg."""
    cdef Py_ssize_t k = a.k, q0 = ws.off[b]
    _pair_grad_row(VX + q0 * k, <floating*>ws.RT + b * k, ws.pau + ws.poff[b],
                   ws.off[b + 1] - q0, k, dvx)


cdef inline void _store_row_grad(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                                 const floating* dvx, floating* VX) noexcept nogil:
    """Row b's d(v x) scaled by x (each occurrence's contribution to its V row's
    gradient), over the row's v x in VX, which no later pass reads: the gradients stay in
    the cache lines just read."""
    cdef Py_ssize_t k = a.k, q0 = ws.off[b], i, f
    cdef floating x
    cdef floating* d1
    for i in range(ws.off[b + 1] - q0):
        x = (<floating*>ws.occ_x)[q0 + i]
        d1 = VX + (q0 + i) * k
        for f in range(k):
            d1[f] = dvx[i * k + f] * x


cdef void _backward_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                          floating* VX) noexcept nogil:
    """Step 2 without attention (de only), for the rows of chunk c."""
    cdef floating* dvx = <floating*>ws.rowbuf + omp_get_thread_num() * ws.row_cap * a.k
    cdef Py_ssize_t b
    for b in range(ws.chunk[c], ws.chunk[c + 1]):
        _row_de(a, ws, b, VX, dvx)
        _store_row_grad(a, ws, b, dvx, VX)


cdef void _feature_update(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t u, floating* V,
                          floating* w, floating* sV0, floating* sV1, floating* sw0,
                          floating* sw1) noexcept nogil:
    """Step 3 for touched feature u: gradient summed over its occurrences in batch order,
    + l2 v, then the optimiser (unless freeze_fm), GRAD_SPAN columns at a time;
    ||v||^2 before the update (0 when l2 = 0)."""
    cdef Py_ssize_t k = a.k, f, f0, nf, pos, q
    cdef Py_ssize_t j = ws.uniq[u]
    cdef floating* v = V + j * k
    cdef floating g[GRAD_SPAN]
    cdef double gd[GRAD_SPAN]
    cdef const floating* DVX = <floating*>ws.VX   # the occurrences' gradients since step 2
    cdef const floating* occ_x = <floating*>ws.occ_x
    cdef const floating* d
    cdef double gw = 0
    cdef double l2 = a.l2
    cdef Py_ssize_t nnz = ws.off[a.B], j_next
    if u + a.prefetch_features < a.U:
        # a later feature's rows (V and optimiser state are tables larger than cache)
        j_next = ws.uniq[u + a.prefetch_features]
        _prefetch_row(V + j_next * k, k * sizeof(floating))
        if not a.freeze_fm:
            _prefetch_row(sV0 + j_next * k, k * sizeof(floating))
            if a.opt.code == OPT_ADAM or a.opt.code == OPT_MOMENTUM:
                _prefetch_row(sV1 + j_next * k, k * sizeof(floating))
            if a.prefetch_v:
                __builtin_prefetch(w + j_next)
                __builtin_prefetch(sw0 + j_next)
    # the l2 terms only when l2 > 0: at l2 = 0 they cost a k = 256 step for nothing
    ws.grp_sq[u] = dot_d(v, v, k) if l2 != 0 else 0.0
    if a.freeze_fm:
        return
    if l2 == 0 and ws.ustart[u + 1] - ws.ustart[u] == 1:
        # One occurrence (most features of a sparse batch): its gradient row is the V
        # row's as it stands (a double sum of one term rounds back to it exactly).
        pos = ws.ustart[u]
        if pos + AFM_PREFETCH < nnz:
            _prefetch_row(DVX + ws.grp_occ[pos + AFM_PREFETCH] * k, k * sizeof(floating))
        opt_vec(&a.opt, v, sV0 + j * k, sV1 + j * k, DVX + ws.grp_occ[pos] * k, k, False)
    else:
        f0 = 0
        while f0 < k:
            nf = k - f0 if k - f0 < GRAD_SPAN else GRAD_SPAN
            for f in range(nf):
                gd[f] = 0
            for pos in range(ws.ustart[u], ws.ustart[u + 1]):
                if f0 == 0 and pos + AFM_PREFETCH < nnz:
                    _prefetch_row(DVX + ws.grp_occ[pos + AFM_PREFETCH] * k,
                                  k * sizeof(floating))
                d = DVX + ws.grp_occ[pos] * k + f0
                for f in range(nf):
                    gd[f] = gd[f] + d[f]
            if l2 != 0:
                for f in range(nf):
                    g[f] = <floating>(gd[f] + l2 * <double>v[f0 + f])
            else:
                for f in range(nf):
                    g[f] = <floating>gd[f]
            opt_vec(&a.opt, v + f0, sV0 + j * k + f0, sV1 + j * k + f0, g, nf, False)
            f0 += nf
    for pos in range(ws.ustart[u], ws.ustart[u + 1]):
        q = ws.grp_occ[pos]
        gw = gw + ws.r[ws.grp_row[pos]] * <double>occ_x[q]
    opt_elem(&a.opt, w + j, sw0 + j, sw1 + j, <floating>gw)


cdef int _step_nogil(AFMArgs* a, AFMWorkspace ws, const floating* values,
                     const floating* y, floating* V, floating* w, floating* W,
                     floating* dense, floating* sV, floating* sw, floating* sW,
                     floating* sd, double* loss_out) noexcept nogil:
    cdef Py_ssize_t B = a.B, k = a.k, t = a.t, M = a.M, D = 1 + a.k + 2 * a.t
    cdef Py_ssize_t b, f, j, c, u, lo, hi, th, it, tail
    cdef int nt = a.n_threads, err, rank
    cdef floating* GW = <floating*>ws.GW
    cdef floating* gd = <floating*>ws.gdense
    cdef const double* row
    cdef double* dsum = ws.dsum
    cdef double loss = 0, d
    cdef floating l2a = <floating>a.l2a
    cdef unsigned int csr

    cdef double t0 = omp_get_wtime()
    err = _prepare(a, ws, values, V, w, W, _phase_t)
    if err:
        return err
    _phase_t[0] -= t0
    _phase_t[1] -= t0
    _phase_t[2] = omp_get_wtime() - t0
    _distinct_logits(a, ws, dense)
    _phase_t[3] = omp_get_wtime() - t0
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        c = next_item_near(ws.cursors, a.n_chunks, nt, threadid(), &rank)
        while c < a.n_chunks:
            _forward_chunk(a, ws, c, y, dense)
            c = next_item_near(ws.cursors, a.n_chunks, nt, threadid(), &rank)
        ftz_leave(csr)
    _phase_t[4] = omp_get_wtime() - t0
    if a.attention:
        # as the numbering (_distinct_pairs): popular classes first, own classes rare
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for it in prange(feature_items(a.U, CLASS_TAIL), schedule="dynamic"):
                for c in range(feature_item_start(it, a.U, CLASS_TAIL),
                               feature_item_start(it + 1, a.U, CLASS_TAIL)):
                    _sum_ds(a, ws, c)
            ftz_leave(csr)
        if a.n_own > 0:
            with parallel(num_threads=nt):
                csr = ftz_enter()
                for c in prange(ws.u_cap, a.n_classes, schedule="dynamic", chunksize=256):
                    _sum_ds(a, ws, c)
                ftz_leave(csr)
    _phase_t[5] = omp_get_wtime() - t0
    if a.attention:
        _backward_groups(a, ws)
        reset_cursors(ws.cursors, nt)
        with parallel(num_threads=nt):
            csr = ftz_enter()
            rank = 0
            c = next_item_near(ws.cursors, a.n_groups, nt, threadid(), &rank)
            while c < a.n_groups:
                _backward_group(a, ws, c, dense, W, <floating*>ws.VX)
                c = next_item_near(ws.cursors, a.n_groups, nt, threadid(), &rank)
            ftz_leave(csr)
    elif not a.freeze_fm:
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(a.n_chunks, schedule="dynamic", chunksize=2):
                _backward_chunk(a, ws, c, <floating*>ws.VX)
            ftz_leave(csr)
    _phase_t[6] = omp_get_wtime() - t0

    # step 2, serial: row-order sums
    for j in range(D):
        dsum[j] = 0
    for b in range(B):
        loss += ws.row_loss[b]
        dsum[0] += ws.r[b]
    for c in range(a.n_chunks):
        row = ws.CPS + c * k
        for f in range(k):
            dsum[1 + f] += row[f]
    if a.attention:
        for c in range(a.n_groups):
            row = ws.BDB + c * t
            for j in range(t):
                dsum[1 + k + j] += row[j]
            row = ws.BDH + c * t
            for j in range(t):
                dsum[1 + k + t + j] += row[j]
    for j in range(D):
        gd[j] = <floating>dsum[j]
    _phase_t[7] = omp_get_wtime() - t0

    # Popular features have many occurrences: items handed out dynamically balance the
    # threads, and each feature's arithmetic is the same whichever thread runs it. They
    # run straight after de, whose gradient rows they read, and before dW (which does not
    # need them), whose stream of E and DU would evict those rows: with dW in between,
    # Frappe k=64 feature_updates took 1.34 ms against 1.12 on 1 thread
    # (bench/profile_phases.py --k 64 --epochs 10 --threads 1 2).
    tail = feature_tail(k * <Py_ssize_t>sizeof(floating))
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for it in prange(feature_items(a.U, tail), schedule="dynamic"):
            for u in range(feature_item_start(it, a.U, tail),
                           feature_item_start(it + 1, a.U, tail)):
                _feature_update(a, ws, u, V, w, sV, sV + M * k, sw, sw + M)
        ftz_leave(csr)
    _phase_t[8] = omp_get_wtime() - t0

    if a.attention:
        for th in prange(nt, schedule="static", num_threads=nt):
            csr = ftz_enter()
            _dw_block(a, ws, th, nt, GW)
            ftz_leave(csr)
        for j in range(t * k):
            GW[j] = GW[j] + l2a * W[j]
        loss += 0.5 * a.l2a * dot_d(W, W, t * k)
    d = 0
    for u in range(a.U):
        d += ws.grp_sq[u]
    loss += 0.5 * a.l2 * d
    _phase_t[9] = omp_get_wtime() - t0

    lo = 1 if a.freeze_fm else 0
    hi = D if a.attention else 1 + k
    opt_vec(&a.opt, dense + lo, sd + lo, sd + D + lo, gd + lo, hi - lo, True)
    if a.attention:
        opt_vec(&a.opt, W, sW, sW + t * k, GW, t * k, True)
    loss_out[0] = loss
    _phase_t[10] = omp_get_wtime() - t0
    return 0


def _check_activation(activation):
    if activation not in (ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_IDENTITY):
        raise ValueError(f"activation must be one of {sorted(_api.ACTIVATION_CODES.values())}"
                         f" (kernel_api codes), got {activation}")


def _check_keep(name, keep):
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {keep}")


cdef Py_ssize_t _afm_steps_typed(floating[:, ::1] V, X, y_arr, rows_arr, batch_size,
                                 double[::1] losses, params, state, cfg, AFMWorkspace ws,
                                 bint single) except -1:
    """Batches rows[i batch_size:(i + 1) batch_size] at steps cfg.step + i, losses[i] =
    their losses; stops after the first non-finite loss. Returns the batches run.
    single: called by afm_step (see check_batches)."""
    cdef unsigned int csr
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] y = y_arr
    cdef const int64_t[::1] rows = rows_arr
    cdef floating[::1] w = params.w
    cdef floating[:, ::1] W = params.W
    cdef floating[::1] dense = params.dense
    cdef floating[:, :, ::1] sV = state.V
    cdef floating[:, ::1] sw = state.w
    cdef floating[:, :, ::1] sW = state.W
    cdef floating[:, ::1] sd = state.dense
    cdef AFMArgs a
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], t = W.shape[0], D
    cdef Py_ssize_t i, n_batches = losses.shape[0], n_done = 0, first, bs
    cdef uint64_t step0
    cdef double loss = 0
    cdef int err = 0
    cdef double keep0 = cfg.keep_attention, keep1 = cfg.keep_pooled
    cdef int n_threads = team_size(cfg.n_threads)
    D = 1 + k + 2 * t

    if (ws.itemsize != sizeof(floating) or ws.n_factors != k or ws.n_features != M
            or ws.attention_size != t):
        raise ValueError(
            f"workspace {ws!r} does not fit parameters V {(M, k)}, W {(t, W.shape[1])} "
            f"{params.V.dtype}: build it with afm_workspace(..., n_features={M}, "
            f"n_factors={k}, attention_size={t}, dtype={params.V.dtype})")
    check_batches(rows.shape[0], batch_size, n_batches, ws.batch_size, single)
    bs = batch_size
    check_step_arrays(min(bs, rows.shape[0]), ws.batch_size, indptr.shape[0],
                      y.shape[0], indices.shape[0], values.shape[0],
                      indptr[indptr.shape[0] - 1] if indptr.shape[0] > 0 else 0, n_threads)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != D
            or sV.shape[0] != 2 or sV.shape[1] != M or sV.shape[2] != k
            or sw.shape[0] != 2 or sw.shape[1] != M or sW.shape[0] != 2
            or sW.shape[1] != t or sW.shape[2] != k or sd.shape[0] != 2
            or sd.shape[1] != D):
        raise ValueError(f"params/state shapes are inconsistent with V {(M, k)} and W "
                         f"{(t, k)}: see afmfast.kernel_api")
    _check_keep("cfg.keep_attention", keep0)
    _check_keep("cfg.keep_pooled", keep1)
    _check_activation(cfg.activation)

    a.k = k
    a.t = t
    a.M = M
    a.prefetch_v = prefetch_table_rows(M * k * <Py_ssize_t>sizeof(floating), n_threads)
    a.prefetch_features = feature_prefetch_distance(k * <Py_ssize_t>sizeof(floating))
    a.n_rows = indptr.shape[0] - 1
    a.nnz_cap = ws.max_batch_nnz
    a.pair_cap = ws.max_batch_pairs
    a.n_threads = n_threads
    a.attention = 1 if cfg.attention else 0
    a.loss = loss_code_from(cfg)
    a.activation = cfg.activation
    a.freeze_fm = 1 if cfg.freeze_fm else 0
    a.drop_att = 1 if (a.attention and keep0 < 1.0) else 0
    a.drop_pool = 1 if keep1 < 1.0 else 0
    a.l2 = cfg.l2
    a.l2a = cfg.l2_attention
    a.inv_keep_att = 1.0 / keep0
    a.inv_keep_pool = 1.0 / keep1
    a.seed = as_u64(cfg.seed)
    step0 = as_u64(cfg.step)
    a.thr_att = dropout_threshold(keep0)
    a.thr_pool = dropout_threshold(keep1)
    a.indptr = &indptr[0]
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    a.opt = opt_cfg_from(cfg, _api)
    a.err.pos = 0
    a.err.value = 0
    ws._ensure_threads(n_threads)

    with nogil:
        csr = ftz_enter_caller(a.n_threads)
        for i in range(n_batches):
            first = i * bs
            a.B = min(bs, rows.shape[0] - first)
            a.rows = &rows[first]
            a.step = step0 + <uint64_t>i
            err = _step_nogil(&a, ws, &values[0] if values.shape[0] > 0 else NULL, &y[0],
                              &V[0, 0], &w[0], &W[0, 0], &dense[0], &sV[0, 0, 0],
                              &sw[0, 0], &sW[0, 0, 0], &sd[0, 0], &loss)
            if err:
                if err == ERR_ROW:
                    a.err.pos += first
                break
            losses[i] = loss
            n_done += 1
            if not isfinite(loss):
                break
        ftz_leave(csr)
    raise_batch_error(err, &a.err, a.n_rows, M, ws.max_batch_nnz, ws.max_batch_pairs)
    return n_done


def afm_step(X, y, rows, params, state, cfg, AFMWorkspace ws):
    """One AFM training step on the batch ``rows`` of (X, y); see the module docstring.

    Returns the batch loss 1/2 sum (y - y_hat)^2 + l2_attention/2 ||W||^2 (attention on)
    + l2/2 sum_touched ||V_row||^2 at the parameters before the update; mutates params,
    state and ws.

    Example: loss = afm_step(X, y, perm[:4096], params, state, cfg, ws)
    """
    loss = np.empty(1)
    _afm_steps(X, y, rows, len(rows), params, state, cfg, ws, loss, True)
    return float(loss[0])


def afm_steps(X, y, rows, batch_size, params, state, cfg, AFMWorkspace ws, losses):
    """Training steps on the batches rows[i batch_size:(i + 1) batch_size] at steps
    cfg.step + i, losses[i] their losses, in one loop without the GIL (kernel_api's
    afm_steps). Returns the batches run.

    Example: n_done = afm_steps(X, y, perm[:40960], 4096, params, state, cfg, ws, np.empty(10))
    """
    return _afm_steps(X, y, rows, batch_size, params, state, cfg, ws, losses, False)


def _afm_steps(X, y, rows, batch_size, params, state, cfg, AFMWorkspace ws, losses,
               single):
    dt = params.V.dtype
    if dt == np.float32:
        return _afm_steps_typed[float](params.V, X, y, rows, batch_size, losses, params,
                                       state, cfg, ws, single)
    if dt == np.float64:
        return _afm_steps_typed[double](params.V, X, y, rows, batch_size, losses, params,
                                        state, cfg, ws, single)
    raise ValueError(f"params.V must be float32 or float64, got {dt}")


# ----- inference ------------------------------------------------------------------------
ctypedef struct InferArgs:
    Py_ssize_t k, t, M, max_n, max_pairs
    int attention, activation
    const int64_t* indptr
    const int32_t* indices
    const int64_t* pair_indptr     # NULL for predict


cdef floating _infer_row(const InferArgs* a, Py_ssize_t i, const floating* values,
                         const floating* V, const floating* w, const floating* WT,
                         const floating* dense, floating* vx_buf, int64_t* ids,
                         floating* E, floating* Uu, double* pa, double* g,
                         int64_t* i_out, int64_t* j_out, floating* weight_out,
                         floating* contrib_out) noexcept nogil:
    """Score of row i (no dropout), and its pairs when a.pair_indptr is set."""
    cdef Py_ssize_t k = a.k, t = a.t, n = 0, q, f, P, n_pairs, i1, i2, jj, base
    cdef int32_t j
    cdef double lin = 0
    cdef floating x
    cdef const floating* v
    cdef floating* vx
    cdef floating* e
    cdef floating* u
    cdef const floating* p_vec = dense + 1
    cdef const floating* bias = dense + 1 + k
    cdef const floating* h = dense + 1 + k + t
    cdef double au
    for q in range(a.indptr[i], a.indptr[i + 1]):
        j = a.indices[q]
        if j < 0 or j >= a.M:
            continue
        x = values[q]
        v = V + <Py_ssize_t>j * k
        vx = vx_buf + n * k
        for f in range(k):
            vx[f] = v[f] * x
        lin += <double>w[j] * <double>x
        ids[n] = j
        n += 1
    n_pairs = n * (n - 1) // 2
    _pair_products(vx_buf, n, k, E)
    if a.attention and n_pairs > 0:
        _preactivation(E, n_pairs, k, t, bias, WT, Uu)
        _softmax(Uu, h, n_pairs, t, a.activation, Uu, pa)
    else:
        for P in range(n_pairs):
            pa[P] = 1.0
    _pool(pa, E, n_pairs, k, g)
    if a.pair_indptr != NULL:
        base = a.pair_indptr[i]
        P = 0
        for i1 in range(n):
            for i2 in range(i1 + 1, n):
                i_out[base + P] = ids[i1]
                j_out[base + P] = ids[i2]
                weight_out[base + P] = <floating>pa[P]
                contrib_out[base + P] = <floating>(pa[P] * dot_d(p_vec, E + P * k, k))
                P += 1
    return <floating>(<double>dense[0] + lin + dot_d(p_vec, g, k))


cdef void _infer_typed(floating[:, ::1] V, X, params, attention, activation, n_threads,
                       pair_indptr_arr, i_arr, j_arr, weight_arr, contrib_arr) except *:
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] w = params.w
    cdef const floating[:, ::1] W = params.W
    cdef const floating[::1] dense = params.dense
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], t = W.shape[0]
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, max_n, max_pairs
    cdef int nt = n_threads, tid
    cdef unsigned int csr
    cdef InferArgs a
    cdef floating[::1] out
    cdef const int64_t[::1] pind
    cdef int64_t[::1] i_out, j_out
    cdef floating[::1] weight_out, contrib_out
    cdef int64_t* i_ptr = NULL
    cdef int64_t* j_ptr = NULL
    cdef floating* w_ptr = NULL
    cdef floating* c_ptr = NULL

    if nt < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    _check_activation(activation)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != 1 + k + 2 * t):
        raise ValueError("params shapes are inconsistent: see afmfast.kernel_api")
    if indptr.shape[0] < 1 or indices.shape[0] != values.shape[0] \
            or indptr[n] > indices.shape[0]:
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    lengths = np.diff(np.asarray(indptr))
    max_n = int(lengths.max()) if n > 0 else 0
    max_pairs = max_n * (max_n - 1) // 2
    pind = pair_indptr_arr
    i_out = i_arr
    j_out = j_arr
    weight_out = weight_arr
    contrib_out = contrib_arr
    if pind.shape[0] != n + 1:
        raise ValueError(f"pair_indptr has {pind.shape[0]} entries, X has {n} rows "
                         f"(it needs n_rows + 1)")
    # pair counts of the rows from their nonzeros with ids in [0, M)
    idx = np.asarray(indices)[:indptr[n]]
    known = (idx >= 0) & (idx < M)
    row_of = np.repeat(np.arange(n), lengths)
    cnt = np.bincount(row_of[known], minlength=n).astype(np.int64)
    expect = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt * (cnt - 1) // 2, out=expect[1:])
    if not np.array_equal(expect, np.asarray(pind)):
        raise ValueError("pair_indptr does not match X: entry r + 1 must be entry r "
                         "plus n(n-1)/2 for row r's count n of ids in [0, n_features)")
    for name, arr in (("i_out", i_out), ("j_out", j_out), ("weight_out", weight_out),
                      ("contribution_out", contrib_out)):
        if arr.shape[0] != expect[n]:
            raise ValueError(f"{name} has {arr.shape[0]} entries, the rows have "
                             f"{expect[n]} pairs (pair_indptr[-1])")
    if expect[n] > 0:
        i_ptr = &i_out[0]
        j_ptr = &j_out[0]
        w_ptr = &weight_out[0]
        c_ptr = &contrib_out[0]
    a.pair_indptr = &pind[0]
    if n == 0:
        return
    dt = params.V.dtype
    WT_arr = np.ascontiguousarray(np.asarray(params.W).T)
    cdef const floating[:, ::1] WT = WT_arr
    # per-thread scratch, indexed by the OpenMP thread number
    cdef floating[:, ::1] vx_s = np.empty((nt, max(max_n * k, 1)), dtype=dt)
    cdef int64_t[:, ::1] id_s = np.empty((nt, max(max_n, 1)), dtype=np.int64)
    cdef floating[:, ::1] e_s = np.empty((nt, max(max_pairs * k, 1)), dtype=dt)
    cdef floating[:, ::1] u_s = np.empty((nt, max(max_pairs * t if attention else 1, 1)),
                                         dtype=dt)
    cdef double[:, ::1] a_s = np.empty((nt, max(max_pairs, 1)), dtype=np.float64)
    cdef double[:, ::1] g_s = np.empty((nt, k), dtype=np.float64)
    a.k = k
    a.t = t
    a.M = M
    a.max_n = max_n
    a.max_pairs = max_pairs
    a.attention = 1 if attention else 0
    a.activation = activation
    a.indptr = &indptr[0]
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    with nogil, parallel(num_threads=nt):
        csr = ftz_enter()
        for i in prange(n, schedule="static"):
            tid = omp_get_thread_num()
            _infer_row(&a, i, &values[0] if values.shape[0] > 0 else NULL,
                       &V[0, 0], &w[0], &WT[0, 0], &dense[0], &vx_s[tid, 0],
                       &id_s[tid, 0], &e_s[tid, 0], &u_s[tid, 0], &a_s[tid, 0],
                       &g_s[tid, 0], i_ptr, j_ptr, w_ptr, c_ptr)
        ftz_leave(csr)


cdef void _infer_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                       const floating* dense, floating* out) noexcept nogil:
    """Prediction for the rows of chunk c (no dropout): softmax of the row's logits
    (looked up by distinct pair), pooled g, y_hat = w0 + w x + p . g into out[row]."""
    cdef Py_ssize_t k = a.k, b, n, P, P0, P1
    cdef double* pa = ws.pa
    cdef double* gp = ws.rowscr + omp_get_thread_num() * 3 * k
    for b in range(ws.chunk[c], ws.chunk[c + 1]):
        n = ws.off[b + 1] - ws.off[b]
        P0 = ws.poff[b]
        P1 = ws.poff[b + 1]
        if a.attention and P1 > P0:
            _row_softmax(ws, P0, P1)
        else:
            for P in range(P0, P1):
                pa[P] = 1.0
        _pool_row(<floating*>ws.VX + ws.off[b] * k, pa + P0, n, k, gp)
        out[a.rows[b]] = <floating>(<double>dense[0] + ws.lin[b] + dot_d(dense + 1, gp, k))


cdef int _predict_nogil(AFMArgs* a, AFMWorkspace ws, const floating* values,
                        const floating* V, const floating* w, const floating* W,
                        const floating* dense, floating* out) noexcept nogil:
    """The forward pass of a step on the rows a.rows (no dropout, no update), with the
    attention MLP once per distinct pair: scores into out[row]."""
    cdef Py_ssize_t c
    cdef int nt = a.n_threads, err
    cdef unsigned int csr
    err = _prepare(a, ws, values, V, w, W, NULL)
    if err:
        return err
    _distinct_logits(a, ws, dense)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for c in prange(a.n_chunks, schedule="dynamic", chunksize=2):
            _infer_chunk(a, ws, c, dense, out)
        ftz_leave(csr)
    return 0


def _predict_workspace(Py_ssize_t rows, Py_ssize_t nnz, Py_ssize_t pairs, Py_ssize_t M,
                       Py_ssize_t k, Py_ssize_t t, dtype):
    return AFMWorkspace(rows, max(nnz, 1), pairs, M, k, t, dtype, forward_only=True)


_predict_cache = _api.WorkspaceCache(_predict_workspace)


cdef Py_ssize_t _predict_typed(floating[:, ::1] V, X, params, attention, activation,
                               n_threads, floating[::1] out) except -1:
    """afm_predict for one dtype; returns the number of distinct pairs evaluated."""
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], n, r0, chunk_rows, n_eval = 0
    cdef int err = 0
    cdef unsigned int csr
    cdef AFMWorkspace ws
    cdef AFMArgs a
    indptr_a, indices_a, values_a = (np.asarray(X[0]), np.asarray(X[1]),
                                     np.asarray(X[2]))
    cdef const floating[::1] w = params.w
    cdef const floating[:, ::1] W = params.W
    cdef const floating[::1] dense = params.dense
    cdef Py_ssize_t t = W.shape[0]
    if n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    _check_activation(activation)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != 1 + k + 2 * t):
        raise ValueError("params shapes are inconsistent: see afmfast.kernel_api")
    n = indptr_a.shape[0] - 1
    if (indptr_a.shape[0] < 1 or indices_a.shape[0] != values_a.shape[0]
            or indptr_a[n] > indices_a.shape[0]):
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} entries, X has {n} rows")
    if n == 0:
        return 0
    # every id left is valid, so the step's checks cannot fail
    indptr_a, indices_a, values_a = _api.known_ids((indptr_a, indices_a, values_a), M)
    chunk_rows, max_nnz, max_pairs = _api.predict_chunks(indptr_a, k)
    kept = _predict_cache.take((chunk_rows, max_nnz, max_pairs, M, k, t, params.V.dtype))
    ws = kept[1]
    ws._ensure_threads(n_threads)
    rows_a = np.arange(n, dtype=np.int64)
    cdef const int64_t[::1] indptr = indptr_a
    cdef const int32_t[::1] indices = indices_a
    cdef const floating[::1] values = values_a
    cdef const int64_t[::1] rows = rows_a
    a.k = k
    a.t = t
    a.M = M
    # predict writes no table: only a table's size calls for prefetching
    a.prefetch_v = prefetch_table_rows(M * k * <Py_ssize_t>sizeof(floating), 1)
    a.n_rows = n
    a.nnz_cap = ws.max_batch_nnz
    a.pair_cap = ws.max_batch_pairs
    a.n_threads = n_threads
    a.attention = 1 if attention else 0
    a.activation = activation
    a.freeze_fm = 1
    a.drop_att = 0
    a.drop_pool = 0
    a.indptr = &indptr[0]
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    a.err.pos = 0
    a.err.value = 0
    with nogil:
        csr = ftz_enter_caller(a.n_threads)
        r0 = 0
        while r0 < n:
            a.rows = &rows[r0]
            a.B = n - r0 if n - r0 < chunk_rows else chunk_rows
            a.n_distinct = 0
            err = _predict_nogil(&a, ws, &values[0] if values.shape[0] > 0 else NULL,
                                 &V[0, 0], &w[0], &W[0, 0], &dense[0], &out[0])
            if err:
                break
            n_eval += a.n_distinct if a.attention else 0
            r0 += chunk_rows
        ftz_leave(csr)
    _predict_cache.give_back(kept)
    raise_batch_error(err, &a.err, n, M, ws.max_batch_nnz, ws.max_batch_pairs)
    return n_eval


def afm_predict(X, params, attention, activation, n_threads, out):
    """Raw AFM scores of every row of X into ``out`` (n_rows,) of params' dtype: no
    dropout, ids outside [0, M) skipped (they form no pairs). Rows are processed in
    chunks (kernel_api.predict_chunks) with the training step's forward pass, the
    attention MLP once per distinct pair of a chunk. Returns the number of distinct
    pairs evaluated.

    Example: out = np.empty(n_rows, np.float32); afm_predict(X, params, 1, RELU, 2, out)
    """
    dt = params.V.dtype
    if dt == np.float32:
        return _predict_typed[float](params.V, X, params, bool(attention),
                                     int(activation), team_size(n_threads), out)
    elif dt == np.float64:
        return _predict_typed[double](params.V, X, params, bool(attention),
                                      int(activation), team_size(n_threads), out)
    else:
        raise ValueError(f"params.V must be float32 or float64, got {dt}")


def afm_explain(X, params, attention, activation, n_threads, pair_indptr, i_out, j_out,
                weight_out, contribution_out):
    """Per-pair attention of every row of X, as ``reference.afm_explain``: for the pairs
    p < q (row order) of each row's nonzeros with ids in [0, M), written from
    pair_indptr[row]: i_out/j_out (int64) the two feature ids, weight_out the attention
    weight a_pq (1.0 with attention off), contribution_out a_pq * p . e_pq (params'
    dtype). pair_indptr (n_rows + 1,) int64 is computed by the caller.

    Example: afm_explain(X, params, 1, RELU, 2, indptr, i, j, weight, contribution)
    """
    dt = params.V.dtype
    if dt == np.float32:
        _infer_typed[float](params.V, X, params, bool(attention), int(activation),
                            team_size(n_threads), pair_indptr, i_out, j_out, weight_out,
                            contribution_out)
    elif dt == np.float64:
        _infer_typed[double](params.V, X, params, bool(attention), int(activation),
                             team_size(n_threads), pair_indptr, i_out, j_out, weight_out,
                             contribution_out)
    else:
        raise ValueError(f"params.V must be float32 or float64, got {dt}")


def _gemm_for_test(A, B, C, transpose_a=False):
    """C += A @ B (or A.T @ B) through the kernels' GEMM routine, for tests and timing."""
    cdef Py_ssize_t M, N, K
    if transpose_a:
        K, M = A.shape
    else:
        M, K = A.shape
    N = B.shape[1]
    if B.shape[0] != K or C.shape[0] != M or C.shape[1] != N:
        raise ValueError("shapes do not match")
    cdef float[:, ::1] Af, Bf, Cf
    cdef double[:, ::1] Ad, Bd, Cd
    cdef bint tr = bool(transpose_a)
    if C.dtype == np.float32:
        Af, Bf, Cf = A, B, C
        with nogil:
            if tr:
                _gemm(M, N, K, &Af[0, 0], 1, M, &Bf[0, 0], N, &Cf[0, 0], N)
            else:
                _gemm(M, N, K, &Af[0, 0], K, 1, &Bf[0, 0], N, &Cf[0, 0], N)
    else:
        Ad, Bd, Cd = A, B, C
        with nogil:
            if tr:
                _gemm(M, N, K, &Ad[0, 0], 1, M, &Bd[0, 0], N, &Cd[0, 0], N)
            else:
                _gemm(M, N, K, &Ad[0, 0], K, 1, &Bd[0, 0], N, &Cd[0, 0], N)


def _dropout_mask_for_test(seed, stream, step, rows, n_units, keep):
    """The kernels' dropout mask, bool (len(rows), n_units), to compare with
    kernel_api.dropout_mask bit for bit."""
    r = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.ones((r.shape[0], n_units), dtype=np.uint8)
    fill_dropout_mask(r, out, seed, stream, step, keep)
    return out.astype(bool)


def shuffled_rows(n_rows, seed, epoch, n_threads):
    """The epoch order of afmfast.kernel_api (a permutation of range(n_rows), int64, from
    (seed, epoch); the same for any n_threads), computed on n_threads threads.

    Example: order = shuffled_rows(len(y), 2016, epoch, 2)
    """
    return shuffled_rows_array(n_rows, seed, epoch, team_size(n_threads), _api)


def _phase_times():
    """{phase: seconds} of the last afm_step in this process, phases named by PHASES (for
    profiling; with concurrent steps, the last to finish each phase wins)."""
    return {name: _phase_t[i] - (_phase_t[i - 1] if i else 0.0)
            for i, name in enumerate(PHASES)}


def _constants():
    """The constants this module hard-codes (to test them against kernel_api)."""
    return dict(ADAGRAD=OPT_ADAGRAD, SGD=OPT_SGD, MOMENTUM=OPT_MOMENTUM, ADAM=OPT_ADAM,
                RELU=ACT_RELU, SIGMOID=ACT_SIGMOID, TANH=ACT_TANH, IDENTITY=ACT_IDENTITY,
                VECTOR_BYTES=AFM_VBYTES, DBLOCK=DBLOCK)
