# cython: language_level=3
"""Inline helpers shared by afmfast's Cython kernels (``_fm_cython``, ``_afm_cython``).

Apart from ``opt_cfg_from`` and ``fill_dropout_mask`` (called with the GIL, before a step
or from a test hook), nothing here allocates, touches Python objects or holds state, so
every helper may be called from inside ``prange`` bodies.

- Dropout RNG: ``mix64`` (splitmix64 finaliser), ``mix32``, ``dropout_row_key`` and
  ``dropout_kept`` reproduce ``afmfast.kernels.api.dropout_mask`` bit for bit (unsigned
  arithmetic, uint64 for the row key and uint32 per unit, so wrap-around is the C
  semantics the contract asks for).
- Optimisers: ``opt_elem`` updates one parameter, ``opt_vec`` a contiguous run of them,
  for the codes OPT_ADAGRAD/OPT_SGD/OPT_MOMENTUM/OPT_ADAM (mirrors of kernels.api's
  ADAGRAD/SGD/MOMENTUM/ADAM; ``afmfast._fm_cython._constants()`` exposes them so a test
  can check they still match). The float constants travel in an ``OptCfg`` filled from
  kernels.api at call time by ``opt_cfg_from``, so there is nothing else to keep in sync.
- ``dot_d``: a dot product of float32 or float64 vectors accumulated in double.
- Data loss: ``row_data_loss`` (LOSS_SQUARED / LOSS_LOGISTIC, kernels.api's SQUARED /
  LOGISTIC), ``loss_code_from`` reads and checks cfg.loss.
- Denormals: ``ftz_enter`` / ``ftz_leave`` (see their docstrings and kernels.api's
  "Denormals").
- ``team_size``: a kernel's n_threads argument, checked and bounded.
"""
from libc.math cimport exp, fabs, floor, fmax, log1p, sqrt, sqrtf
from libc.stdint cimport int64_t, uint32_t, uint64_t
from cython cimport floating
from openmp cimport omp_get_num_procs

cdef extern from *:
    """
    /* The optimisers' loops over n contiguous parameters, once each: afmfast_opt_vec_f/d
       are inlined into the per-feature updates; the _outline_ copies are called where a
       step updates its dense parameters and W. Inlined there too, GCC left those loops
       scalar in the step function (AFM's W update ran scalar divides and square roots;
       the dense_updates phase of bench/profile_phases.py --k 256 --data mltag shows
       it), so they are compiled as their own functions. The pointers are
       restrict (no run-time overlap check); the expressions are those of opt_elem, so
       both round alike. */
    #include <math.h>
    #include <stddef.h>
    enum { AFMFAST_OPT_ADAGRAD = 0, AFMFAST_OPT_SGD = 1, AFMFAST_OPT_MOMENTUM = 2,
           AFMFAST_OPT_ADAM = 3 };
    #define AFMFAST_OPT_LOOPS(T, SUF, SQRT)                                                 \\
    static inline __attribute__((always_inline)) void afmfast_opt_vec_##SUF(int code,     \\
        T* restrict p, T* restrict s0, T* restrict s1, const T* restrict g, ptrdiff_t n,  \\
        T lr, T mom, T b1, T c1, T b2, T c2, T eps) {                                     \\
        ptrdiff_t i;                                                                      \\
        if (code == AFMFAST_OPT_ADAGRAD)                                                  \\
            for (i = 0; i < n; i++) {                                                     \\
                s0[i] = s0[i] + g[i] * g[i];                                              \\
                p[i] = p[i] - lr * g[i] / SQRT(s0[i]);                                    \\
            }                                                                             \\
        else if (code == AFMFAST_OPT_SGD)                                                 \\
            for (i = 0; i < n; i++) p[i] = p[i] - lr * g[i];                              \\
        else if (code == AFMFAST_OPT_MOMENTUM)                                            \\
            for (i = 0; i < n; i++) {                                                     \\
                s0[i] = mom * s0[i] + g[i];                                               \\
                p[i] = p[i] - lr * s0[i];                                                 \\
            }                                                                             \\
        else if (code == AFMFAST_OPT_ADAM)                                                \\
            for (i = 0; i < n; i++) {                                                     \\
                s0[i] = b1 * s0[i] + c1 * g[i];                                           \\
                s1[i] = b2 * s1[i] + c2 * g[i] * g[i];                                    \\
                p[i] = p[i] - lr * s0[i] / (SQRT(s1[i]) + eps);                           \\
            }                                                                             \\
    }                                                                                     \\
    static __attribute__((noinline)) void afmfast_opt_vec_outline_##SUF(int code,         \\
        T* restrict p, T* restrict s0, T* restrict s1, const T* restrict g, ptrdiff_t n,  \\
        T lr, T mom, T b1, T c1, T b2, T c2, T eps) {                                     \\
        afmfast_opt_vec_##SUF(code, p, s0, s1, g, n, lr, mom, b1, c1, b2, c2, eps);       \\
    }
    AFMFAST_OPT_LOOPS(float, f, sqrtf)
    AFMFAST_OPT_LOOPS(double, d, sqrt)
    """
    enum:
        OPT_ADAGRAD "AFMFAST_OPT_ADAGRAD"
        OPT_SGD "AFMFAST_OPT_SGD"
        OPT_MOMENTUM "AFMFAST_OPT_MOMENTUM"
        OPT_ADAM "AFMFAST_OPT_ADAM"
    void afmfast_opt_vec_f(int code, float* p, float* s0, float* s1, const float* g,
                           Py_ssize_t n, float lr, float mom, float b1, float c1, float b2,
                           float c2, float eps) noexcept nogil
    void afmfast_opt_vec_d(int code, double* p, double* s0, double* s1, const double* g,
                           Py_ssize_t n, double lr, double mom, double b1, double c1,
                           double b2, double c2, double eps) noexcept nogil
    void afmfast_opt_vec_outline_f(int code, float* p, float* s0, float* s1,
                                   const float* g, Py_ssize_t n, float lr, float mom,
                                   float b1, float c1, float b2, float c2,
                                   float eps) noexcept nogil
    void afmfast_opt_vec_outline_d(int code, double* p, double* s0, double* s1,
                                   const double* g, Py_ssize_t n, double lr, double mom,
                                   double b1, double c1, double b2, double c2,
                                   double eps) noexcept nogil


cdef enum:
    LOSS_SQUARED = 0
    LOSS_LOGISTIC = 1


cdef inline double row_data_loss(int loss, double yhat, double y, double* res) noexcept nogil:
    """One row's data loss; ``res`` receives dloss/dyhat. Squared: 1/2 (yhat - y)^2.
    Logistic (target 1 where y > 0, else 0): softplus(yhat) - t yhat, written so that no
    yhat overflows."""
    cdef double t
    if loss == LOSS_LOGISTIC:
        t = 1.0 if y > 0 else 0.0
        res[0] = 1.0 / (1.0 + exp(-yhat)) - t
        return fmax(yhat, 0.0) - t * yhat + log1p(exp(-fabs(yhat)))
    res[0] = yhat - y
    return 0.5 * res[0] * res[0]


cdef inline int team_size(n_threads) except -1:
    """``n_threads`` as an OpenMP team size: an integer >= 1 (else ValueError), at most
    kernels.api.MAX_THREADS_PER_CPU threads per processor. An OpenMP runtime asked for more threads than it can
    start crashes the process, and results never depend on the thread count, so the
    kernels bound it themselves rather than trust every caller (afmfast.kernels.threads warns
    when it clamps a user's n_threads to the same bound)."""
    if isinstance(n_threads, bool) or not hasattr(n_threads, "__index__") or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    from afmfast.kernels.api import MAX_THREADS_PER_CPU
    return <int>min(int(n_threads), MAX_THREADS_PER_CPU * max(1, omp_get_num_procs()))


cdef inline int loss_code_from(cfg) except -1:
    """cfg.loss (SQUARED when the config has no such field), checked."""
    code = getattr(cfg, "loss", LOSS_SQUARED)
    if code not in (LOSS_SQUARED, LOSS_LOGISTIC):
        raise ValueError(f"cfg.loss must be {LOSS_SQUARED} (squared) or {LOSS_LOGISTIC} "
                         f"(logistic), got {code!r}")
    return code


ctypedef struct OptCfg:
    int code
    # Adam: the bias-corrected step lr * sqrt(1 - b2^t) / (1 - b1^t), computed in double
    # by the caller exactly as the reference does.
    double lr
    double momentum     # kernels.api.MOMENTUM_COEF
    double beta1        # kernels.api.ADAM_BETA1
    double beta2        # kernels.api.ADAM_BETA2
    double eps          # kernels.api.ADAM_EPS


cdef inline uint64_t golden64() noexcept nogil:
    return 0x9E3779B97F4A7C15ULL


cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t dropout_row_key(uint64_t seed, uint64_t stream, uint64_t step,
                                     uint64_t row) noexcept nogil:
    """Per (seed, stream, step, row) key; hoisted out of the loop over units."""
    return mix64(mix64(mix64(seed + stream * golden64()) + step) + row)


cdef inline uint32_t mix32(uint32_t x) noexcept nogil:
    x = (x ^ (x >> 16)) * 0x7FEB352DU
    x = (x ^ (x >> 15)) * 0x846CA68BU
    return x ^ (x >> 16)


cdef inline bint dropout_kept(uint64_t key, uint32_t unit, uint32_t threshold) noexcept nogil:
    """True when ``unit`` survives; ``threshold`` is kernels.api.dropout_threshold(keep).
    32-bit arithmetic, so that a loop over units vectorises."""
    cdef uint32_t bits = mix32(<uint32_t>key + (unit + 1U) * 0x9E3779B9U)
    return (bits ^ <uint32_t>(key >> 32)) < threshold


cdef inline uint32_t dropout_threshold(double keep) noexcept nogil:
    """kernels.api.dropout_threshold: floor(keep 2^32), exact (2^32 is a power of two),
    at most 2^32 - 1."""
    if keep >= 1.0:
        return 0xFFFFFFFFU
    return <uint32_t>floor(keep * 4294967296.0)


cdef inline uint64_t as_u64(value) except? 0:
    """A Python int taken mod 2^64 (seeds and step counters)."""
    return <uint64_t>(int(value) & 0xFFFFFFFFFFFFFFFF)


cdef inline int fill_dropout_mask(const int64_t[::1] rows, unsigned char[:, ::1] out,
                                  seed, stream, step, double keep) except -1:
    """out[i, u] = 1 where unit u of row rows[i] is kept (out starts as all ones); the
    body of the modules' ``_dropout_mask_for_test``."""
    cdef Py_ssize_t i, u
    cdef uint32_t thr = dropout_threshold(keep)
    cdef uint64_t sd = as_u64(seed), st = as_u64(stream), sp = as_u64(step), key
    if keep >= 1.0:
        return 0
    for i in range(rows.shape[0]):
        key = dropout_row_key(sd, st, sp, <uint64_t>rows[i])
        for u in range(out.shape[1]):
            out[i, u] = dropout_kept(key, <uint32_t>u, thr)
    return 0


cdef inline OptCfg opt_cfg_from(cfg, api) except *:
    """The OptCfg of a step config (cfg.optimizer, cfg.lr, cfg.step), constants read from
    the module ``api`` (afmfast.kernels.api); ValueError for an unknown optimiser code."""
    cdef OptCfg o
    o.code = cfg.optimizer
    o.lr = cfg.lr
    if o.code == OPT_ADAM:
        s = cfg.step + 1
        o.lr = cfg.lr * sqrt(1.0 - api.ADAM_BETA2**s) / (1.0 - api.ADAM_BETA1**s)
    elif o.code not in (OPT_ADAGRAD, OPT_SGD, OPT_MOMENTUM):
        raise ValueError(f"cfg.optimizer must be one of "
                         f"{sorted(api.OPTIMIZER_CODES.values())} (kernels.api codes), "
                         f"got {cfg.optimizer}")
    o.momentum = api.MOMENTUM_COEF
    o.beta1 = api.ADAM_BETA1
    o.beta2 = api.ADAM_BETA2
    o.eps = api.ADAM_EPS
    return o


cdef inline floating fsqrt(floating x) noexcept nogil:
    # sqrt() on a float would promote to double: keep float32 kernels in float32.
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline void opt_elem(const OptCfg* c, floating* p, floating* s0, floating* s1,
                          floating g) noexcept nogil:
    """One parameter ``p`` with gradient ``g``; ``s0``/``s1`` its two state slots."""
    cdef floating lr = <floating>c.lr
    if c.code == OPT_ADAGRAD:
        s0[0] = s0[0] + g * g
        p[0] = p[0] - lr * g / fsqrt(s0[0])
    elif c.code == OPT_SGD:
        p[0] = p[0] - lr * g
    elif c.code == OPT_MOMENTUM:
        s0[0] = <floating>c.momentum * s0[0] + g
        p[0] = p[0] - lr * s0[0]
    elif c.code == OPT_ADAM:
        s0[0] = <floating>c.beta1 * s0[0] + <floating>(1.0 - c.beta1) * g
        s1[0] = <floating>c.beta2 * s1[0] + <floating>(1.0 - c.beta2) * g * g
        p[0] = p[0] - lr * s0[0] / (fsqrt(s1[0]) + <floating>c.eps)


cdef inline void opt_vec(const OptCfg* c, floating* p, floating* s0, floating* s1,
                         const floating* g, Py_ssize_t n, bint outline) noexcept nogil:
    """``opt_elem`` over n contiguous parameters (p, s0, s1 and g must not overlap), the
    loops vectorised. ``outline``: run the loops as a function of their own (for the
    long runs of a step's dense parameters and W) instead of inlining them."""
    if floating is float:
        if outline:
            afmfast_opt_vec_outline_f(c.code, p, s0, s1, g, n, <float>c.lr,
                                      <float>c.momentum, <float>c.beta1,
                                      <float>(1.0 - c.beta1), <float>c.beta2,
                                      <float>(1.0 - c.beta2), <float>c.eps)
        else:
            afmfast_opt_vec_f(c.code, p, s0, s1, g, n, <float>c.lr, <float>c.momentum,
                              <float>c.beta1, <float>(1.0 - c.beta1), <float>c.beta2,
                              <float>(1.0 - c.beta2), <float>c.eps)
    else:
        if outline:
            afmfast_opt_vec_outline_d(c.code, p, s0, s1, g, n, c.lr, c.momentum, c.beta1,
                                      1.0 - c.beta1, c.beta2, 1.0 - c.beta2, c.eps)
        else:
            afmfast_opt_vec_d(c.code, p, s0, s1, g, n, c.lr, c.momentum, c.beta1,
                              1.0 - c.beta1, c.beta2, 1.0 - c.beta2, c.eps)


ctypedef fused floating2:
    float
    double


cdef inline double dot_d(const floating* a, const floating2* b, Py_ssize_t n) noexcept nogil:
    """Dot product accumulated in double, 8 lane sums in a fixed order: unlike one running
    sum (a chain of dependent adds that GCC may not reorder without -ffast-math), the
    lanes vectorise."""
    cdef double acc[8]
    cdef double s = 0
    cdef Py_ssize_t i, l, n8 = n - n % 8
    for l in range(8):
        acc[l] = 0
    i = 0
    while i < n8:
        for l in range(8):
            acc[l] = acc[l] + <double>a[i + l] * <double>b[i + l]
        i = i + 8
    for l in range(n - n8):
        acc[l] = acc[l] + <double>a[n8 + l] * <double>b[n8 + l]
    for l in range(8):
        s = s + acc[l]
    return s


cdef extern from *:
    """
    /* Flush-to-zero (MXCSR bit 15) and denormals-are-zero (bit 6) for the kernels' SSE/AVX
       arithmetic. MXCSR is per thread, so every thread that computes for a kernel sets
       them itself and puts its previous value back when its part ends. */
    #if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
    #include <xmmintrin.h>
    #define AFMFAST_HAVE_MXCSR 1
    #define AFMFAST_FTZ_DAZ 0x8040u
    static inline unsigned int afmfast_mxcsr(void) { return _mm_getcsr(); }
    static inline unsigned int afmfast_ftz_enter(void) {
        unsigned int old = _mm_getcsr();
        /* a load of MXCSR costs more than a read: skip it on a thread already set (the
           caller's thread, entering a parallel region inside a kernel call) */
        if ((old & AFMFAST_FTZ_DAZ) != AFMFAST_FTZ_DAZ)
            _mm_setcsr(old | AFMFAST_FTZ_DAZ);
        return old;
    }
    static inline void afmfast_ftz_leave(unsigned int old) {
        if ((old & AFMFAST_FTZ_DAZ) != AFMFAST_FTZ_DAZ)
            _mm_setcsr(old);
    }
    /* For a kernel's calling thread, before the parallel regions it starts. A thread that
       OpenMP creates copies the MXCSR of the thread creating it, and its ftz_leave would
       then keep FTZ and DAZ for good: an empty region of the same size first makes sure
       the caller's team exists before FTZ is set on the caller. */
    static inline unsigned int afmfast_ftz_enter_caller(int n_threads) {
    #ifdef _OPENMP
        #pragma omp parallel num_threads(n_threads)
        { __asm__ __volatile__("" ::: "memory"); }
    #endif
        return afmfast_ftz_enter();
    }
    #else
    /* No MXCSR (not x86): denormals are computed as the hardware does; a no-op. */
    #define AFMFAST_HAVE_MXCSR 0
    #define AFMFAST_FTZ_DAZ 0u
    static inline unsigned int afmfast_mxcsr(void) { return 0; }
    static inline unsigned int afmfast_ftz_enter(void) { return 0; }
    static inline void afmfast_ftz_leave(unsigned int old) { (void)old; }
    static inline unsigned int afmfast_ftz_enter_caller(int n) { (void)n; return 0; }
    #endif
    """
    enum:
        HAVE_MXCSR "AFMFAST_HAVE_MXCSR"
        FTZ_DAZ_BITS "AFMFAST_FTZ_DAZ"
    unsigned int mxcsr_read "afmfast_mxcsr"() noexcept nogil
    unsigned int ftz_enter "afmfast_ftz_enter"() noexcept nogil
    unsigned int ftz_enter_caller "afmfast_ftz_enter_caller"(int n_threads) noexcept nogil
    void ftz_leave "afmfast_ftz_leave"(unsigned int old) noexcept nogil
