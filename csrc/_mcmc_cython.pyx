# cython: language_level=3
"""Cython (OpenMP) backend of the Bayesian FM's Gibbs sweep: the sampler is described in
``afmfast.kernels.mcmc``, the float64 NumPy truth is ``afmfast.kernels.mcmc_reference``,
and this module implements the same contract as ``afmfast.kernels.numba.mcmc``'s
``mcmc_workspace`` and ``mcmc_sweep`` (the column view, the plan and the scores, built
once per fit, come from that module: they are the same for both backends).

Functions
    mcmc_workspace(columns, n_factors, n_threads) -> Workspace
        Per-thread scratch of the sweep: E (threads, m) and Q (threads, k, m) float64, m
        the longest column.
    mcmc_sweep(columns, plan, groups, w, V, e, q, hyper, seed, iteration, n_threads, ws)
        Step 3 of an iteration: samples every w_j and v_jf in plan order; mutates w (M,),
        V (M, k), e (n,) and q (n, k), all float64 C-contiguous, and ws.

The arithmetic is the Numba sweep's, operation for operation (the same fused passes over
a column's gathered residuals and q values), and this module is built at the baseline
instruction set only, where the compiler has no fused multiply-add to contract into: the
samples are the Numba backend's bit for bit, for any thread count.

A parallel block's longest columns (the plan puts them first; ``team_counts`` says how
many) are sampled one after another, each by the whole team: a pass over the column's
rows is split between the threads by chunks of SUM_CHUNK rows, and the threads meet at
a barrier before each draw. The other features go to the threads dynamically, in plan
order, longest column first (the next free thread takes the next feature): a thread that the OS deschedules holds the others back
by one feature at most. A binary field, whose two columns hold all the rows between
them, then keeps both threads busy. None of this changes a bit: the features of a
parallel block share no row, each one's scratch is written before it is read, and a
pass's sums are its chunks' sums added in chunk order whoever computed them. Every
shape, dtype and index is checked in Python before the sweep releases the GIL, so no
input can make it read or write outside its arrays.
"""
import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport cos, log, sqrt, M_PI
from libc.stdint cimport int64_t, uint64_t
from openmp cimport omp_get_num_threads

from _batch cimport prefetch_row
from _common cimport ftz_enter, ftz_enter_caller, ftz_leave, golden64, mix64, team_size

from afmfast.kernels.api import _stream_key, aligned_zeros
from afmfast.kernels.mcmc import (MCMC_STREAM, SUM_CHUNK as _SUM_CHUNK, sum_buffers,
                                  team_counts)
from afmfast.kernels.numba.mcmc import Workspace

__all__ = ["mcmc_workspace", "mcmc_sweep"]

cdef double ULP53 = 2.0 ** -53
cdef Py_ssize_t SUM_CHUNK = _SUM_CHUNK
cdef double TWO_PI = 2.0 * M_PI

cdef enum:
    # rows ahead whose residual and q row the gather prefetches: a column's rows are
    # scattered, and the other thread may have written them last (a miss to another
    # core's cache, slow when that core sits on another chiplet)
    GATHER_PREFETCH = 16


ctypedef struct Sweep:
    const int64_t* colptr
    const int64_t* rows
    const double* vals
    const int64_t* order
    const int64_t* groups
    double* w
    double* V
    double* e
    double* q
    const double* mu_w
    const double* lam_w
    const double* mu_v
    const double* lam_v
    double alpha
    uint64_t key
    Py_ssize_t k
    double* E       # (threads, m)
    double* Q       # (threads, k, m)
    Py_ssize_t m    # the scratch's column length
    double* P       # (threads + 1, p_stride) partial sums: each thread's, then the team's
    Py_ssize_t p_stride
    double* D       # (threads, d_stride) each thread's record of a feature's factor changes
    Py_ssize_t d_stride


cdef inline double normal(uint64_t key, uint64_t c) noexcept nogil:
    """kernels.mcmc.coordinate_normals of coordinate c (Box-Muller)."""
    cdef uint64_t h1 = mix64(key + (2 * c + 1) * golden64())
    cdef uint64_t h2 = mix64(key + (2 * c + 2) * golden64())
    cdef double u1 = <double>((h1 >> 11) + 1) * ULP53
    cdef double u2 = <double>(h2 >> 11) * ULP53
    return sqrt(-2.0 * log(u1)) * cos(TWO_PI * u2)


cdef inline double draw(double sum_he, double sum_hh, double theta, double alpha,
                        double mu, double lam, double z) noexcept nogil:
    """theta' from its conditional (kernels.mcmc.theta_conditional) and the normal z."""
    cdef double precision = lam + alpha * sum_hh
    cdef double mean = (alpha * (sum_he + theta * sum_hh) + lam * mu) / precision
    return mean + z / sqrt(precision)


cdef extern from *:
    """
    /* A barrier of the innermost enclosing parallel region (an orphaned directive: the
       caller is inside one; without OpenMP, one thread needs none). */
    static inline void afmfast_team_barrier(void) {
    #ifdef _OPENMP
        #pragma omp barrier
    #endif
    }
    """
    void team_barrier "afmfast_team_barrier"() noexcept nogil


cdef inline void sums_out(double* out, double she, double shh) noexcept nogil:
    out[0] = she
    out[1] = shh


cdef inline bint gather_rows(const Sweep* s, int64_t c0, Py_ssize_t lo, Py_ssize_t hi,
                             double* E, double* Q, Py_ssize_t ms, double* out) noexcept nogil:
    """Pass 0 over rows lo:hi of the column whose nonzeros start at c0: gather e and q,
    sum x e and x^2 (for w). Returns whether every x there is 1: the later passes then
    run without reading x (``ones``), which gives the same bits, as 1 x = x exactly."""
    cdef Py_ssize_t k = s.k, r, f
    cdef const int64_t* rows = s.rows + c0
    cdef const double* X = s.vals + c0
    cdef const double* e = s.e
    cdef const double* q = s.q
    cdef int64_t i
    cdef double she = 0.0, shh = 0.0, x
    cdef bint ones = True
    for r in range(lo, hi):
        if r + GATHER_PREFETCH < hi:
            i = rows[r + GATHER_PREFETCH]
            prefetch_row(e + i, sizeof(double))
            prefetch_row(q + i * k, k * sizeof(double))
        i = rows[r]
        E[r] = e[i]
        for f in range(k):
            Q[f * ms + r] = q[i * k + f]
        x = X[r]
        ones = ones & (x == 1.0)
        she += x * E[r]
        shh += x * x
    sums_out(out, she, shh)
    return ones


cdef inline void next_rows(const double* X, bint ones, Py_ssize_t lo, Py_ssize_t hi,
                           double* E, const double* qp, const double* qc, double d,
                           double prev, double cur, double* out) noexcept nogil:
    """A pass over rows lo:hi after a draw: apply the coordinate's change d to the
    residuals (w's when qp is NULL: h = x; else v_f's, with its q values qp and old
    value prev: h = x (qp - prev x)), and sum h e and h^2 for the next coordinate v_g
    (its q values qc, value cur). q_f itself changes only in the last pass: no later
    pass reads it, and a pass that stores less streams less. ones: every x is 1. The
    compiler makes the loop once per case of qp and ones (1 x = x exactly)."""
    cdef Py_ssize_t r
    cdef double she = 0.0, shh = 0.0, x, ei, h
    for r in range(lo, hi):
        x = 1.0 if ones else X[r]
        if qp == NULL:
            ei = E[r] - d * x
        else:
            ei = E[r] - d * (x * (qp[r] - prev * x))
        E[r] = ei
        h = x * (qc[r] - cur * x)
        she += h * ei
        shh += h * h
    sums_out(out, she, shh)


cdef inline void pass_chunks(const double* X, bint ones, Py_ssize_t c_lo, Py_ssize_t c_hi,
                             Py_ssize_t m, double* E, const double* qp, const double* qc,
                             double d, double prev, double cur,
                             double* half) noexcept nogil:
    """next_rows over chunks c_lo:c_hi of a column of m rows, chunk c's sums into
    half[2 c]."""
    cdef Py_ssize_t c, lo
    for c in range(c_lo, c_hi):
        lo = c * SUM_CHUNK
        next_rows(X, ones, lo, min(m, lo + SUM_CHUNK), E, qp, qc, d, prev, cur,
                  half + 2 * c)


cdef inline void last_rows(const Sweep* s, int64_t c0, Py_ssize_t lo, Py_ssize_t hi,
                           const double* E, const double* Q, Py_ssize_t ms, const double* qp,
                           double d, double prev, const double* changes,
                           bint ones) noexcept nogil:
    """The last pass: apply the last factor's change (w's when k = 0) to the residuals
    and scatter e and q back to the rows, each q_u with its factor's change
    (changes[u]) applied."""
    cdef Py_ssize_t k = s.k, r, u
    cdef const int64_t* rows = s.rows + c0
    cdef const double* X = s.vals + c0
    cdef double* e = s.e
    cdef double* q = s.q
    cdef int64_t i
    cdef double x
    if k == 0:
        for r in range(lo, hi):
            e[rows[r]] = E[r] - d * X[r]
        return
    for r in range(lo, hi):
        x = 1.0 if ones else X[r]
        i = rows[r]
        e[i] = E[r] - d * (x * (qp[r] - prev * x))
        for u in range(k):
            q[i * k + u] = Q[u * ms + r] + changes[u] * x


cdef inline void chunk_totals(const double* part, Py_ssize_t nc, double* she,
                              double* shh) noexcept nogil:
    """A pass's sums: its chunks' partial sums added in chunk order."""
    cdef Py_ssize_t c
    she[0] = part[0]
    shh[0] = part[1]
    for c in range(1, nc):
        she[0] += part[2 * c]
        shh[0] += part[2 * c + 1]


cdef void sample_feature(const Sweep* s, int64_t j, int t, int team, double* E, double* Q,
                         double* part, double* changes) noexcept nogil:
    """w_j, then v_j0 .. v_j(k-1), by thread t of a team of ``team`` threads sampling
    feature j together (team 1: one thread alone). Column j's residuals and q values are
    gathered into E (m,) and Q (k, m), one fused pass per coordinate (apply the previous
    change, sum h e and h^2 for the next), the last one scattering back. Each pass sums
    over chunks of SUM_CHUNK rows (part: (2, chunks, 2), one half per pass parity);
    thread t runs the chunks t * chunks / team up to the next thread's, every thread
    adds the partial sums in chunk order after a barrier and draws the same value (only
    thread 0 stores it). The parities keep a pass's sums until every thread has read
    them; a value is read before the barrier after which thread 0 overwrites it.
    changes (k,): the calling thread's record of the factors' changes."""
    cdef Py_ssize_t k = s.k, ms = s.m, f, c
    cdef int64_t c0 = s.colptr[j], c1 = s.colptr[j + 1]
    cdef Py_ssize_t m = c1 - c0
    cdef Py_ssize_t nc = max(1, (m + SUM_CHUNK - 1) // SUM_CHUNK)   # 1: an empty column
    cdef Py_ssize_t c_lo = t * nc // team, c_hi = (t + 1) * nc // team
    cdef Py_ssize_t lo, hi
    cdef int64_t g = s.groups[j]
    cdef uint64_t base = <uint64_t>j * <uint64_t>(k + 1)
    cdef const double* X = s.vals + c0
    cdef double* Vj = s.V + j * k
    cdef double she, shh, old, new, d, cur = 0.0, prev = 0.0
    cdef bint ones = True
    for c in range(c_lo, c_hi):
        lo = c * SUM_CHUNK
        hi = min(m, lo + SUM_CHUNK)
        ones = ones & gather_rows(s, c0, lo, hi, E, Q, ms, part + 2 * c)
    old = s.w[j]
    if k > 0:
        cur = Vj[0]
    if team > 1:
        team_barrier()
    chunk_totals(part, nc, &she, &shh)
    new = draw(she, shh, old, s.alpha, s.mu_w[g], s.lam_w[g], normal(s.key, base))
    if t == 0:
        s.w[j] = new
    d = new - old
    if k > 0:
        pass_chunks(X, ones, c_lo, c_hi, m, E, NULL, Q, d, 0.0, cur, part + 2 * nc)
        if team > 1:
            team_barrier()
    for f in range(k):
        chunk_totals(part + 2 * nc * ((f + 1) & 1), nc, &she, &shh)
        new = draw(she, shh, cur, s.alpha, s.mu_v[g * k + f], s.lam_v[g * k + f],
                   normal(s.key, base + 1 + <uint64_t>f))
        if t == 0:
            Vj[f] = new
        d = new - cur
        changes[f] = d
        prev = cur
        if f + 1 < k:
            cur = Vj[f + 1]
            pass_chunks(X, ones, c_lo, c_hi, m, E, Q + f * ms, Q + (f + 1) * ms, d, prev,
                        cur, part + 2 * nc * (f & 1))
            if team > 1:
                team_barrier()
    for c in range(c_lo, c_hi):
        lo = c * SUM_CHUNK
        hi = min(m, lo + SUM_CHUNK)
        last_rows(s, c0, lo, hi, E, Q, ms, Q + (k - 1) * ms if k > 0 else Q, d, prev,
                  changes, ones)
    if team > 1:
        team_barrier()   # the shared scratch is free for the next feature


cdef void run(const Sweep* s, int64_t lo, int64_t hi) noexcept nogil:
    """The features order[lo:hi] on the calling thread alone, with the first thread's
    scratch (its own MXCSR set for the run)."""
    cdef unsigned int csr = ftz_enter()
    cdef int64_t p
    for p in range(lo, hi):
        sample_feature(s, s.order[p], 0, 1, s.E, s.Q, s.P, s.D)
    ftz_leave(csr)


def mcmc_workspace(columns, n_factors, n_threads):
    """Scratch of ``mcmc_sweep`` for at most ``n_threads`` threads (module docstring;
    allocated once per fit)."""
    m = max(1, int(np.diff(np.asarray(columns.colptr)).max(initial=0)))
    t = team_size(n_threads)
    return Workspace(np.empty((t, m)), np.empty((t, int(n_factors), m)))


def _array(name, a, dtype, shape):
    """``a`` checked to be a C-contiguous ``dtype`` array of ``shape`` (None: any)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array, got "
                         f"{type(a).__name__} {getattr(a, 'dtype', '')}")
    if a.ndim != len(shape) or any(want is not None and got != want
                                   for got, want in zip(a.shape, shape)):
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def _in_range(name, a, stop):
    if a.size and (a.min() < 0 or a.max() >= stop):
        raise ValueError(f"{name} holds an index outside [0, {stop})")


def mcmc_sweep(columns, plan, groups, w, V, e, q, hyper, seed, iteration, n_threads, ws):
    """Step 3 of Gibbs iteration ``iteration`` (module docstring); the arguments are
    those of ``afmfast.kernels.numba.mcmc.mcmc_sweep``. ValueError for any argument of
    the wrong dtype, shape or layout, and for ids and offsets outside their arrays."""
    V = _array("V", V, np.float64, (None, None))
    M, k = V.shape
    w = _array("w", w, np.float64, (M,))
    e = _array("e", e, np.float64, (None,))
    n = e.shape[0]
    q = _array("q", q, np.float64, (n, k))
    colptr = _array("columns.colptr", columns.colptr, np.int64, (M + 1,))
    rows = _array("columns.rows", columns.rows, np.int64, (None,))
    vals = _array("columns.values", columns.values, np.float64, rows.shape)
    if colptr[0] != 0 or colptr[M] != rows.shape[0] or (np.diff(colptr) < 0).any():
        raise ValueError("columns.colptr must rise from 0 to len(columns.rows)")
    _in_range("columns.rows", rows, n)
    order = _array("plan.order", plan.order, np.int64, (None,))
    _in_range("plan.order", order, M)
    starts = _array("plan.starts", plan.starts, np.int64, (None,))
    B = starts.shape[0] - 1
    if B < 0 or (B > 0 and (starts[0] < 0 or starts[B] > order.shape[0]
                            or (np.diff(starts) < 0).any())):
        raise ValueError("plan.starts must rise within [0, len(plan.order)]")
    is_parallel = _array("plan.parallel", plan.parallel, np.bool_, (B,))
    groups = _array("groups", groups, np.int64, (M,))
    mu_w = _array("hyper.mu_w", hyper.mu_w, np.float64, (None,))
    G = mu_w.shape[0]
    _in_range("groups", groups, G)
    lam_w = _array("hyper.lam_w", hyper.lam_w, np.float64, (G,))
    mu_v = _array("hyper.mu_v", hyper.mu_v, np.float64, (G, k))
    lam_v = _array("hyper.lam_v", hyper.lam_v, np.float64, (G, k))
    E = _array("ws.E", ws.E, np.float64, (None, None))
    T, m = E.shape
    Q = _array("ws.Q", ws.Q, np.float64, (T, k, m))
    if T < 1 or (M and int(np.diff(colptr).max()) > m):
        raise ValueError(f"ws was made for other columns (scratch of {T} threads x {m} "
                         "rows); make it with mcmc_workspace(columns, ...)")
    cdef int nt = min(team_size(n_threads), T)
    cdef Sweep s
    cdef double[::1] d_dummy = np.zeros(1)
    cdef int64_t[::1] i_dummy = np.zeros(1, np.int64)
    cdef const int64_t[::1] colptr_v = colptr
    cdef const int64_t[::1] rows_v = rows if rows.shape[0] else i_dummy
    cdef const double[::1] vals_v = vals if vals.shape[0] else d_dummy
    cdef const int64_t[::1] starts_v = starts
    cdef const unsigned char[::1] par_v = (is_parallel.view(np.uint8) if B
                                           else np.zeros(1, np.uint8))
    cdef const int64_t[::1] groups_v = groups if M else i_dummy
    cdef double[::1] w_v = w if M else d_dummy
    cdef double[::1] V_v = V.reshape(-1) if V.size else d_dummy
    cdef double[::1] e_v = e if n else d_dummy
    cdef double[::1] q_v = q.reshape(-1) if q.size else d_dummy
    cdef const double[::1] mu_w_v = mu_w if G else d_dummy
    cdef const double[::1] lam_w_v = lam_w if G else d_dummy
    cdef const double[::1] mu_v_v = mu_v.reshape(-1) if mu_v.size else d_dummy
    cdef const double[::1] lam_v_v = lam_v.reshape(-1) if lam_v.size else d_dummy
    cdef double[::1] E_v = E.reshape(-1)
    cdef double[::1] Q_v = Q.reshape(-1) if Q.size else d_dummy
    cooperative = team_counts(columns, plan, nt)
    P = sum_buffers(m, T)
    cdef const int64_t[::1] order_v = order if order.shape[0] else i_dummy
    cdef const int64_t[::1] coop_v = cooperative if B else i_dummy
    cdef double[::1] P_v = P.reshape(-1)
    # each thread's row on whole cache lines of its own: each thread writes its own
    cdef Py_ssize_t d_stride = max(8, (k + 7) // 8 * 8)
    cdef double[::1] D_v = aligned_zeros((T * d_stride,), np.float64)
    s.colptr, s.rows, s.vals = &colptr_v[0], &rows_v[0], &vals_v[0]
    s.order, s.groups = &order_v[0], &groups_v[0]
    s.w, s.V, s.e, s.q = &w_v[0], &V_v[0], &e_v[0], &q_v[0]
    s.mu_w, s.lam_w, s.mu_v, s.lam_v = &mu_w_v[0], &lam_w_v[0], &mu_v_v[0], &lam_v_v[0]
    s.alpha = float(hyper.alpha)
    s.key = <uint64_t>int(_stream_key(seed, MCMC_STREAM, iteration)[0])
    s.k, s.E, s.Q, s.m = k, &E_v[0], &Q_v[0], m
    s.P, s.p_stride = &P_v[0], P.shape[1] * P.shape[2] * P.shape[3]
    s.D, s.d_stride = &D_v[0], d_stride
    cdef Py_ssize_t b, n_blocks = B
    cdef int64_t lo, hi, mid, p, pc = 0
    cdef int t = 0, team = 1
    cdef double* team_sums = s.P + <Py_ssize_t>T * s.p_stride
    cdef unsigned int csr, csr_t = 0
    with nogil:
        csr = ftz_enter_caller(nt)
        for b in range(n_blocks):
            lo = starts_v[b]
            hi = starts_v[b + 1]
            if par_v[b] and nt > 1 and (hi - lo > 1 or coop_v[b] > 0):
                # disjoint rows: each feature reads and writes only its own rows
                mid = lo + coop_v[b]
                with parallel(num_threads=nt):
                    csr_t = ftz_enter()
                    t = threadid()
                    team = omp_get_num_threads()
                    # the longest columns first, each by the whole team (its chunks
                    # split between the threads, the team's scratch and sums) ...
                    for pc in range(lo, mid):
                        sample_feature(&s, s.order[pc], t, team, s.E, s.Q, team_sums,
                                       s.D + t * s.d_stride)
                    # ... then the rest, each by the next free thread
                    for p in prange(mid, hi, schedule="dynamic"):
                        sample_feature(&s, s.order[p], 0, 1, s.E + threadid() * s.m,
                                       s.Q + threadid() * s.k * s.m,
                                       s.P + threadid() * s.p_stride,
                                       s.D + threadid() * s.d_stride)
                    ftz_leave(csr_t)
            else:
                run(&s, lo, hi)
        ftz_leave(csr)
