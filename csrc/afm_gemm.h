/* AFM kernel building blocks in plain C, included by _afm_cython.pyx (one
   translation unit with it, so everything here stays static inline): a
   register-tiled GEMM and the per-row loops of pooling and gradients. */
#ifndef AFMFAST_AFM_GEMM_H
#define AFMFAST_AFM_GEMM_H
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
typedef float afm_vf __attribute__((vector_size(AFM_VBYTES)));
typedef float afm_vfu __attribute__((vector_size(AFM_VBYTES), aligned(4), may_alias));
typedef double afm_vd __attribute__((vector_size(AFM_VBYTES)));
typedef double afm_vdu __attribute__((vector_size(AFM_VBYTES), aligned(8), may_alias));

/* a micro-kernel call of r rows (4, 2 or 1), each height its own unrolled code */
#define AFM_MK_ROWS(SUF, NV, r, ...)                                                  \
    ((r) == 4 ? afm_mk_##SUF(4, NV, __VA_ARGS__)                                      \
     : (r) == 2 ? afm_mk_##SUF(2, NV, __VA_ARGS__) : afm_mk_##SUF(1, NV, __VA_ARGS__))
#define AFM_DEFINE_GEMM(T, SUF, VT, VTU)                                              \
static inline __attribute__((always_inline)) void afm_mk_##SUF(                      \
    const int R, const int NV, ptrdiff_t K, const T* restrict A, ptrdiff_t lda,       \
    ptrdiff_t sa, const T* restrict B, ptrdiff_t ldb, T* restrict C, ptrdiff_t ldc)   \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    VT acc[AFM_RMAX][AFM_NVMAX];                                                      \
    _Pragma("GCC unroll 12") for (int r = 0; r < R; r++)                              \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \
        acc[r][v] = *(const VTU*)(C + r * ldc + v * VL);                              \
    for (ptrdiff_t kk = 0; kk < K; kk++) {                                            \
        const T* b = B + kk * ldb;                                                    \
        const T* a = A + kk * sa;                                                     \
        VT bv[AFM_NVMAX];                                                             \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                          \
            bv[v] = *(const VTU*)(b + v * VL);                                        \
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                        \
            T av = a[r * lda];                                                        \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                      \
                acc[r][v] += av * bv[v];                                              \
        }                                                                             \
    }                                                                                 \
    _Pragma("GCC unroll 12") for (int r = 0; r < R; r++)                              \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \
        *(VTU*)(C + r * ldc + v * VL) = acc[r][v];                                    \
}                                                                                     \
/* the rows past the last full tile, in pieces of 4, 2 and 1 rows: a tile height     \
   known at compile time keeps the accumulators in registers */                       \
static void afm_mk_tail_##SUF(int R, int NV, ptrdiff_t K, const T* restrict A,        \
    ptrdiff_t lda, ptrdiff_t sa, const T* restrict B, ptrdiff_t ldb, T* restrict C,   \
    ptrdiff_t ldc)                                                                    \
{                                                                                     \
    while (R > 0) {                                                                   \
        const int r = R >= 4 ? 4 : R >= 2 ? 2 : 1;                                    \
        if (NV == 4 && AFM_NVMAX >= 4)                                                \
            AFM_MK_ROWS(SUF, AFM_NVMAX >= 4 ? 4 : 1, r, K, A, lda, sa, B, ldb, C, ldc); \
        else if (NV == 3 && AFM_NVMAX >= 3)                                           \
            AFM_MK_ROWS(SUF, AFM_NVMAX >= 3 ? 3 : 1, r, K, A, lda, sa, B, ldb, C, ldc); \
        else if (NV == 2)                                                             \
            AFM_MK_ROWS(SUF, 2, r, K, A, lda, sa, B, ldb, C, ldc);                    \
        else                                                                          \
            AFM_MK_ROWS(SUF, 1, r, K, A, lda, sa, B, ldb, C, ldc);                    \
        A += r * lda; C += r * ldc; R -= r;                                           \
    }                                                                                 \
}                                                                                     \
/* B's columns [0, N - N % VL) in the driver's panel order (afm_gemm): the panel of   \
   width w = nv VL at column n0 holds B[kk, n0 + c] at Bp[n0 K + kk w + c], so a       \
   micro-kernel reads its panel as one contiguous stream (with B's rows a power of two \
   apart, the rows of a panel would crowd a few sets of L1 and come from L2 instead). */ \
static void afm_pack_b_##SUF(ptrdiff_t N, ptrdiff_t K, const T* restrict B,           \
    ptrdiff_t ldb, T* restrict Bp)                                                    \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t n0 = 0;                                                                 \
    while (n0 + VL <= N) {                                                            \
        int nv = (int)((N - n0) / VL);                                                \
        if (nv > AFM_NVMAX) nv = AFM_NVMAX;                                           \
        const ptrdiff_t w = (ptrdiff_t)nv * VL;                                       \
        T* p = Bp + n0 * K;                                                           \
        for (ptrdiff_t kk = 0; kk < K; kk++)                                          \
            for (ptrdiff_t c = 0; c < w; c++)                                         \
                p[kk * w + c] = B[kk * ldb + n0 + c];                                 \
        n0 += w;                                                                      \
    }                                                                                 \
}                                                                                     \
/* C += A @ B; Bp NULL or B packed by afm_pack_b (then B is read for the columns past \
   the last full vector only). Same arithmetic either way. */                         \
static void afm_gemm_##SUF(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const T* A,         \
    ptrdiff_t lda, ptrdiff_t sa, const T* B, ptrdiff_t ldb, const T* Bp, T* C,        \
    ptrdiff_t ldc)                                                                    \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t n0 = 0, i0;                                                             \
    while (n0 + VL <= N) {                                                            \
        int nv = (int)((N - n0) / VL);                                                \
        if (nv > AFM_NVMAX) nv = AFM_NVMAX;                                           \
        int R = (nv >= 3 || (nv == 2 && AFM_NVMAX == 2)) ? AFM_R_WIDE : AFM_R_NARROW; \
        const T* b = Bp ? Bp + n0 * K : B + n0;                                       \
        const ptrdiff_t lb = Bp ? (ptrdiff_t)nv * VL : ldb;                           \
        for (i0 = 0; i0 + R <= M; i0 += R) {                                          \
            const T* a = A + i0 * lda; T* c = C + i0 * ldc + n0;                      \
            if (nv == 4)                                                              \
                afm_mk_##SUF(AFM_R_WIDE, 4, K, a, lda, sa, b, lb, c, ldc);             \
            else if (nv == 3)                                                         \
                afm_mk_##SUF(AFM_R_WIDE, 3, K, a, lda, sa, b, lb, c, ldc);             \
            else if (nv == 2 && AFM_NVMAX == 2)                                       \
                afm_mk_##SUF(AFM_R_WIDE, 2, K, a, lda, sa, b, lb, c, ldc);             \
            else if (nv == 2)                                                         \
                afm_mk_##SUF(AFM_R_NARROW, 2, K, a, lda, sa, b, lb, c, ldc);           \
            else                                                                      \
                afm_mk_##SUF(AFM_R_NARROW, 1, K, a, lda, sa, b, lb, c, ldc);           \
        }                                                                             \
        if (i0 < M)                                                                   \
            afm_mk_tail_##SUF((int)(M - i0), nv, K, A + i0 * lda, lda, sa, b, lb,     \
                             C + i0 * ldc + n0, ldc);                                 \
        n0 += nv * VL;                                                                \
    }                                                                                 \
    for (i0 = 0; i0 < M; i0++)                                                        \
        for (ptrdiff_t n = n0; n < N; n++) {                                          \
            T acc = C[i0 * ldc + n];                                                  \
            for (ptrdiff_t kk = 0; kk < K; kk++)                                      \
                acc += A[i0 * lda + kk * sa] * B[kk * ldb + n];                       \
            C[i0 * ldc + n] = acc;                                                    \
        }                                                                             \
}

AFM_DEFINE_GEMM(float, f, afm_vf, afm_vfu)
AFM_DEFINE_GEMM(double, d, afm_vd, afm_vdu)

/* ---- row kernels of the pair loops (k-vectors of one row's occurrences) ------------
   Each walks the row's pairs (i < i2, row-major, P = 0, 1, ...) once per block of VL
   columns, accumulating in vector registers; columns past the last full block run
   the same arithmetic one at a time. The order of every sum depends on n and k only. */
#define AFM_DEFINE_ROWS(T, SUF, VT, VTU)                                              \
/* g (k, double) = sum_P au_P v_i v_i2 = sum_i v_i (sum_i2 au_P v_i2), inner sum in T */ \
static void afm_pool_row_##SUF(const T* restrict vx, const double* restrict au,      \
    ptrdiff_t n, ptrdiff_t k, double* restrict g)                                     \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t fb = 0, f, i, i2, P;                                                    \
    for (f = 0; f < k; f++) g[f] = 0;                                                 \
    for (; fb + VL <= k; fb += VL) {                                                  \
        for (i = 0, P = 0; i + 1 < n; i++) {                                          \
            VT acc = {0};                                                             \
            for (i2 = i + 1; i2 < n; i2++, P++)                                       \
                acc += (T)au[P] * *(const VTU*)(vx + i2 * k + fb);                    \
            VT prod = *(const VTU*)(vx + i * k + fb) * acc;                           \
            for (int l = 0; l < VL; l++) g[fb + l] += (double)prod[l];                \
        }                                                                             \
    }                                                                                 \
    for (f = fb; f < k; f++)                                                          \
        for (i = 0, P = 0; i + 1 < n; i++) {                                          \
            T acc = 0;                                                                \
            for (i2 = i + 1; i2 < n; i2++, P++) acc += (T)au[P] * vx[i2 * k + f];     \
            g[f] += (double)(vx[i * k + f] * acc);                                    \
        }                                                                             \
}                                                                                     \
/* scale[P] *= (v_i dg) . v_i2 for the row's pairs; tv (k) is scratch */              \
static void afm_da_row_##SUF(const T* restrict vx, const double* restrict dg,         \
    ptrdiff_t n, ptrdiff_t k, T* restrict tv, double* restrict scale)                 \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t i, i2, f, fb, P = 0;                                                    \
    for (i = 0; i + 1 < n; i++) {                                                     \
        for (f = 0; f < k; f++) tv[f] = (T)((double)vx[i * k + f] * dg[f]);           \
        for (i2 = i + 1; i2 < n; i2++, P++) {                                         \
            const T* v2 = vx + i2 * k;                                                \
            VT acc = {0};                                                             \
            for (fb = 0; fb + VL <= k; fb += VL)                                      \
                acc += *(const VTU*)(tv + fb) * *(const VTU*)(v2 + fb);               \
            T tail = 0;                                                               \
            for (f = fb; f < k; f++) tail += tv[f] * v2[f];                           \
            scale[P] *= (double)(afm_hsum_##SUF(acc) + tail);                         \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
/* dvx (n, k) = sum over the row's pairs of de v_other, de = au_P dg. The sum is     \
   factorised, dvx_i = dg (sum_i2 au v_i2), so it needs no per-pair product with dg. */ \
static void afm_pair_grad_row_##SUF(const T* restrict vx, const T* restrict dg,       \
    const double* restrict au, ptrdiff_t n, ptrdiff_t k, T* restrict dvx)             \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t i, i2, f, fb = 0, P;                                                    \
    for (f = 0; f < n * k; f++) dvx[f] = 0;                                           \
    for (; fb + VL <= k; fb += VL) {                                                  \
        for (i = 0, P = 0; i < n; i++) {                                              \
            VT v1 = *(const VTU*)(vx + i * k + fb), acc = {0};                        \
            for (i2 = i + 1; i2 < n; i2++, P++) {                                     \
                T a = (T)au[P];                                                       \
                acc += a * *(const VTU*)(vx + i2 * k + fb);                           \
                *(VTU*)(dvx + i2 * k + fb) += a * v1;                                 \
            }                                                                         \
            *(VTU*)(dvx + i * k + fb) += acc;                                         \
        }                                                                             \
        VT dgv = *(const VTU*)(dg + fb);                                              \
        for (i = 0; i < n; i++)                                                       \
            *(VTU*)(dvx + i * k + fb) *= dgv;                                         \
    }                                                                                 \
    for (f = fb; f < k; f++) {                                                        \
        for (i = 0, P = 0; i < n; i++) {                                              \
            T acc = 0;                                                                \
            for (i2 = i + 1; i2 < n; i2++, P++) {                                     \
                T a = (T)au[P];                                                       \
                acc += a * vx[i2 * k + f];                                            \
                dvx[i2 * k + f] += a * vx[i * k + f];                                 \
            }                                                                         \
            dvx[i * k + f] += acc;                                                    \
        }                                                                             \
        for (i = 0; i < n; i++) dvx[i * k + f] *= dg[f];                              \
    }                                                                                 \
}                                                                                     \
/* dvx += C[r] v_other for nrep distinct pairs with C rows C[0], C[1], ... whose      \
   representative pairs are of the row's occurrences (batch-wide) rq[2r], rq[2r + 1], \
   q0 the row's first, in r order */                                                  \
static void afm_rep_grad_##SUF(const T* restrict vx, ptrdiff_t nrep,                  \
    const int* restrict rq, ptrdiff_t q0, const T* restrict C, ptrdiff_t k,           \
    T* restrict dvx)                                                                  \
{                                                                                     \
    enum { VL = AFM_VBYTES / sizeof(T) };                                             \
    ptrdiff_t f, fb, r;                                                               \
    for (r = 0; r < nrep; r++) {                                                      \
        const T* c = C + r * k;                                                       \
        T* d1 = dvx + (rq[2 * r] - q0) * k;                                           \
        T* d2 = dvx + (rq[2 * r + 1] - q0) * k;                                       \
        const T* v1 = vx + (rq[2 * r] - q0) * k;                                      \
        const T* v2 = vx + (rq[2 * r + 1] - q0) * k;                                  \
        for (fb = 0; fb + VL <= k; fb += VL) {                                        \
            VT cv = *(const VTU*)(c + fb);                                            \
            *(VTU*)(d1 + fb) += cv * *(const VTU*)(v2 + fb);                          \
            *(VTU*)(d2 + fb) += cv * *(const VTU*)(v1 + fb);                          \
        }                                                                             \
        for (f = fb; f < k; f++) {                                                    \
            d1[f] += c[f] * v2[f];                                                    \
            d2[f] += c[f] * v1[f];                                                    \
        }                                                                             \
    }                                                                                 \
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
#endif
