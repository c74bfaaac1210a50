/* Sums of 16 columns kept in vector registers for the Cython FM kernels
   (csrc/_fm_cython.pyx): the V-row gradient of a touched feature and a row's forward sums.
   GCC vector extensions, compiled at each ISA level of the build (two AVX-512 registers
   of floats, four of AVX2, ...). Each does, column by column, the arithmetic of the
   generic loop it replaces, so the results are the same bits. */
#ifndef AFMFAST_FM_VEC16_H
#define AFMFAST_FM_VEC16_H
#include <string.h>
#include <stdint.h>
#include <stddef.h>
/* The gradient of 16 columns of a V row summed over the feature's occurrences, in a
   vector register: as a stack array the running sum went through memory at every
   occurrence (a store-to-load forward each time). Same arithmetic, column by column,
   as the generic loop of _feature_update. With r not NULL, every column of a row's df
   is its residual r[b] (FM without batch norm or dropout): d * x is then r[b] * x in
   every lane, formed once as a scalar, and DF (a cache line a row at k = 16) is not
   read. */
typedef float afmfast_vf16 __attribute__((vector_size(64)));
typedef double afmfast_vd16 __attribute__((vector_size(128)));
#define AFMFAST_GRAD16(T, VT, SUF)                                                      \
static inline __attribute__((always_inline)) void afmfast_grad16_##SUF(                \
    const int32_t* restrict rows, const T* restrict xs, ptrdiff_t p0, ptrdiff_t p1,    \
    const T* restrict S, const T* restrict DF, const double* restrict r, ptrdiff_t k,  \
    const T* restrict v, T* restrict g) {                                              \
    VT acc = {0}, vv, s, d;                                                            \
    ptrdiff_t p, b;                                                                    \
    T x, dx;                                                                           \
    memcpy(&vv, v, sizeof(VT));                                                        \
    if (r != NULL) {                                                                   \
        for (p = p0; p < p1; p++) {                                                    \
            b = rows[p];                                                               \
            x = xs[p];                                                                 \
            dx = (T)r[b] * x;                                                          \
            memcpy(&s, S + b * k, sizeof(VT));                                         \
            acc = acc + dx * (s - vv * x);                                             \
        }                                                                              \
    } else {                                                                           \
        for (p = p0; p < p1; p++) {                                                    \
            b = rows[p];                                                               \
            x = xs[p];                                                                 \
            memcpy(&s, S + b * k, sizeof(VT));                                         \
            memcpy(&d, DF + b * k, sizeof(VT));                                        \
            acc = acc + d * x * (s - vv * x);                                          \
        }                                                                              \
    }                                                                                  \
    memcpy(g, &acc, sizeof(VT));                                                       \
}
AFMFAST_GRAD16(float, afmfast_vf16, f)
AFMFAST_GRAD16(double, afmfast_vd16, d)
/* s = sum v x and f = 1/2 (s^2 - sum (v x)^2) of 16 columns over a row's nonzeros
   (ids outside [0, M) skipped), the sums in registers rather than in the row's S
   and F entries; same arithmetic, column by column, as the generic loop of
   _pairwise. */
#define AFMFAST_PAIRWISE16(T, VT, SUF)                                                  \
static inline __attribute__((always_inline)) void afmfast_pairwise16_##SUF(            \
    const int32_t* restrict ids, const T* restrict xs, ptrdiff_t n, ptrdiff_t M,       \
    const T* restrict V, ptrdiff_t k, T* restrict s_out, T* restrict f_out) {          \
    VT s = {0}, sq = {0}, v, tv;                                                       \
    ptrdiff_t t, j;                                                                    \
    T x;                                                                               \
    for (t = 0; t < n; t++) {                                                          \
        j = ids[t];                                                                    \
        if (j < 0 || j >= M) continue;                                                 \
        x = xs != NULL ? xs[t] : (T)1;                                                 \
        memcpy(&v, V + j * k, sizeof(VT));                                             \
        tv = v * x;                                                                    \
        s = s + tv;                                                                    \
        sq = sq + tv * tv;                                                             \
    }                                                                                  \
    sq = (T)0.5 * (s * s - sq);                                                        \
    memcpy(s_out, &s, sizeof(VT));                                                     \
    memcpy(f_out, &sq, sizeof(VT));                                                    \
}
AFMFAST_PAIRWISE16(float, afmfast_vf16, f)
AFMFAST_PAIRWISE16(double, afmfast_vd16, d)

#endif
