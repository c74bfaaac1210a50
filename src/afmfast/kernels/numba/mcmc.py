"""Numba backend of the Bayesian FM's Gibbs sweep (the sampler is described in
``afmfast.kernels.mcmc``; the float64 NumPy truth is ``afmfast.kernels.mcmc_reference``).

Functions
    mcmc_columns(X, n_features) -> Columns
        The column (CSC) view of X, built once per fit: colptr int64 (M + 1,), rows
        int64 (nnz,) ascending within a column, values float64 (nnz,) (ones when X
        stores none: one branch-free loop serves both). ValueError for an id outside
        [0, M) or a feature twice in one row (its FM term would be quadratic in v_jf,
        and the conditional of the sweep would not be its posterior).
    mcmc_plan(X, columns, groups) -> Plan
        The blocks of the sweep: order int64 (M,) (the features, block after block; a
        parallel block's by decreasing column length, ties ascending, a serial block's
        ascending), starts int64 (B + 1,), parallel bool (B,) (the block's
        features share no row). ``groups`` None: greedy blocks (kernels.mcmc); else int
        (M,): one block per distinct value, in increasing value order.
    mcmc_scores(X, w0, w, V, q, out, n_threads)
        out (n,) = yhat of every row of X with the float64 parameters, q (n, k) float64 =
        sum_j v_jf x_ij (the sweep's cache); ids outside [0, M) contribute nothing.
    mcmc_workspace(columns, n_factors, n_threads) -> Workspace
        Per-thread scratch of the sweep (E, Q: a column's e and q, gathered).
    mcmc_sweep(columns, plan, groups, w, V, e, q, hyper, seed, iteration, n_threads, ws)
        Step 3 of an iteration: samples every w_j and v_jf in plan order; mutates w (M,),
        V (M, k), e (n,) = y - yhat and q (n, k), all float64 C-contiguous, and ws.

A parallel block runs its features on the threads in contiguous runs of about equal
nonzeros (a feature's cost is its column's length): disjoint rows make every split give
the same result, so the split may follow the thread count. Each pass's sums are added by
chunks of SUM_CHUNK rows, each in row order, then the chunks in order (kernels.mcmc,
"Sums"), as the Cython sweep adds them. This backend does not split a column's chunks
between threads as the Cython one does: a parallel launch per pass (k + 2 per column)
cost more than the idle thread (docs/design.md).
"""
import math
from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from afmfast.kernels.api import GOLDEN, _stream_key, aligned_zeros
from afmfast.kernels.mcmc import MCMC_STREAM, SUM_CHUNK, sum_buffers
from afmfast.kernels.numba.common import (
    block_bounds,
    ftz_enter,
    ftz_leave,
    mix64,
    numba_threads,
    prefetch,
    read_only_args,
    start_threads,
)

__all__ = ["Columns", "Plan", "Workspace", "mcmc_columns", "mcmc_plan", "mcmc_scores", "normal_cdf",
           "mcmc_workspace", "mcmc_sweep"]

Columns = namedtuple("Columns", "colptr rows values")
Plan = namedtuple("Plan", "order starts parallel")
Workspace = namedtuple("Workspace", "E Q")

# rows ahead whose residual and q row the gather prefetches (as the Cython sweep does)
GATHER_PREFETCH = 16

_SER = dict(fastmath=False, cache=True, nogil=True, error_model="numpy")
_PAR = dict(_SER, parallel=True)

_GOLDEN = np.uint64(GOLDEN)
_ONE = np.uint64(1)
_TWO = np.uint64(2)
_S11 = np.uint64(11)
_ULP53 = 2.0**-53
_TWO_PI = 2.0 * np.pi


# ------------------------------------------------------------------ the column view

@njit(**_SER)
def _columns(indptr, indices, values, n_features, colptr, rows, vals, last_row):
    """Counting sort of the nonzeros by feature; returns 0, or -(row + 1) of the first
    row holding an id outside [0, M), or row + 1 of the first row repeating an id."""
    n = indptr.shape[0] - 1
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j < 0 or j >= n_features:
                return -(i + 1)
            if last_row[j] == i:
                return i + 1
            last_row[j] = i
            colptr[j + 1] += 1
    for j in range(n_features):
        colptr[j + 1] += colptr[j]
    fill = colptr[:-1].copy()
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            rows[fill[j]] = i
            vals[fill[j]] = values[p] if values.shape[0] else 1.0
            fill[j] += 1
    return 0


def mcmc_columns(X, n_features):
    """The column view of X (module docstring)."""
    indptr, indices, values = read_only_args(*X)
    nnz = int(indptr[-1] - indptr[0])
    colptr = np.zeros(n_features + 1, np.int64)
    rows = np.empty(nnz, np.int64)
    vals = np.empty(nnz, np.float64)
    status = _columns(indptr, indices, values, n_features, colptr, rows, vals,
                      np.full(n_features, -1, np.int64))
    if status < 0:
        raise ValueError(f"X: row {-status - 1} holds a feature id outside "
                         f"[0, {n_features}) (n_features)")
    if status > 0:
        raise ValueError(f"X: row {status - 1} holds a feature id twice; solver='mcmc' "
                         "needs each feature at most once a row (add the values of a "
                         "repeated id into one nonzero)")
    return Columns(colptr, rows, vals)


# ------------------------------------------------------------------------- the plan

@njit(**_SER)
def _greedy_blocks(indptr, indices, colptr, rows, block):
    """block[j] = the first block none of whose features shares a row with j, features
    taken in increasing id; returns the number of blocks. O(sum over rows of nnz^2)."""
    M = block.shape[0]
    banned = np.full(M + 1, -1, np.int64)  # banned[b] == j: block b shares a row with j
    n_blocks = 0
    for j in range(M):
        for p in range(colptr[j], colptr[j + 1]):
            i = rows[p]
            for r in range(indptr[i], indptr[i + 1]):
                other = indices[r]
                if other < j:
                    banned[block[other]] = j
        b = 0
        while banned[b] == j:
            b += 1
        block[j] = b
        n_blocks = max(n_blocks, b + 1)
    return n_blocks


@njit(**_SER)
def _disjoint_blocks(colptr, rows, order, starts, n_rows, parallel):
    """parallel[b] = no two features of block b share a row."""
    seen = np.full(n_rows, -1, np.int64)
    for b in range(starts.shape[0] - 1):
        ok = True
        for p in range(starts[b], starts[b + 1]):
            j = order[p]
            for r in range(colptr[j], colptr[j + 1]):
                i = rows[r]
                if seen[i] == b:
                    ok = False
                seen[i] = b
        parallel[b] = ok


def mcmc_plan(X, columns, groups=None):
    """The sweep's blocks (module docstring)."""
    indptr, indices, _ = read_only_args(*X)
    M = columns.colptr.shape[0] - 1
    if groups is None:
        block = np.empty(M, np.int64)
        n_blocks = _greedy_blocks(indptr, indices, columns.colptr, columns.rows, block)
    else:
        _, block = np.unique(np.asarray(groups), return_inverse=True)
        block = block.astype(np.int64).reshape(-1)
        n_blocks = int(block.max()) + 1 if M else 0
    order = np.argsort(block, kind="stable").astype(np.int64)
    starts = np.zeros(n_blocks + 1, np.int64)
    np.cumsum(np.bincount(block, minlength=n_blocks), out=starts[1:])
    parallel = np.empty(n_blocks, np.bool_)
    _disjoint_blocks(columns.colptr, columns.rows, order, starts, indptr.shape[0] - 1,
                     parallel)
    # a parallel block's features longest column first (any order samples the same
    # bits there): threads that take them in turn finish together, and the Cython sweep
    # finds its team-sampled columns at the block's start
    in_block = np.repeat(np.arange(n_blocks), np.diff(starts))
    length = np.diff(columns.colptr)[order]
    order = order[np.lexsort((np.where(parallel[in_block], -length, 0), in_block))]
    return Plan(order, starts, parallel)


# ----------------------------------------------------------------------- the caches

@njit(**_PAR)
def _scores(indptr, indices, values, w0, w, V, q, out, nb):
    start_threads(nb)
    csr0 = ftz_enter()
    n = indptr.shape[0] - 1
    M, k = V.shape
    for blk in prange(nb):
        csr = ftz_enter()
        b0, b1 = block_bounds(n, nb, blk)
        for i in range(b0, b1):
            lin = 0.0
            sq = 0.0
            for f in range(k):
                q[i, f] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                if j < 0 or j >= M:
                    continue
                x = 1.0 if values.shape[0] == 0 else np.float64(values[p])
                lin += w[j] * x
                for f in range(k):
                    vx = V[j, f] * x
                    q[i, f] += vx
                    sq += vx * vx
            inter = 0.0
            for f in range(k):
                inter += q[i, f] * q[i, f]
            out[i] = w0 + lin + 0.5 * (inter - sq)
        ftz_leave(csr)
    ftz_leave(csr0)


def mcmc_scores(X, w0, w, V, q, out, n_threads):
    """yhat into ``out`` and the q cache into ``q`` (module docstring)."""
    indptr, indices, values = read_only_args(*X)
    with numba_threads(n_threads):
        _scores(indptr, indices, values, float(w0), w, V, q, out,
                numba.get_num_threads())


# ------------------------------------------------------------------------ the sweep

@njit(**_SER)
def _normal(key, c):
    """kernels.mcmc.coordinate_normals of coordinate c (Box-Muller)."""
    c = np.uint64(c)
    h1 = mix64(key + (_TWO * c + _ONE) * _GOLDEN)
    h2 = mix64(key + (_TWO * c + _TWO) * _GOLDEN)
    u1 = np.float64((h1 >> _S11) + _ONE) * _ULP53
    u2 = np.float64(h2 >> _S11) * _ULP53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)


@njit(**_SER)
def _draw(sum_he, sum_hh, theta, alpha, mu, lam, z):
    """theta' from its conditional (kernels.mcmc.theta_conditional) and the normal z."""
    precision = lam + alpha * sum_hh
    mean = (alpha * (sum_he + theta * sum_hh) + lam * mu) / precision
    return mean + z / np.sqrt(precision)


@njit(**_SER)
def _pass(kind, nc, m, c0, rows, X, ones, e, q, E, Q, f, d, prev, cur, changes, half):
    """One pass over the nc chunks of a column's rows (its nonzeros from c0 on), each
    chunk's sums into half[c], returning the pass's sums: the chunks' added in chunk
    order (kind 0: gather e and q, sums for w; 1: apply w's change d, sums for v_0; 2:
    apply v_f's change (old value prev) to E, sums for v_(f+1) (value cur); 3: apply
    the last change, scatter e and q back, q_t with its factor's change changes[t]).
    Q_f changes only in the last pass, as no later pass reads it. ``ones``: every x is
    1, and the loops read none (the compiler unswitches them on kind and ones; 1 x = x
    exactly)."""
    k = Q.shape[0]
    for c in range(nc):
        lo = c * SUM_CHUNK
        hi = min(m, lo + SUM_CHUNK)
        she = 0.0
        shh = 0.0
        if kind == 0:
            q1 = q.reshape(q.size)
            for r in range(lo, hi):
                if r + GATHER_PREFETCH < hi:
                    # a column's rows are scattered (Cython sweep: GATHER_PREFETCH)
                    i = rows[c0 + r + GATHER_PREFETCH]
                    prefetch(e, i)
                    prefetch(q1, i * k)
                    prefetch(q1, i * k + k - 1)
                i = rows[c0 + r]
                E[r] = e[i]
                for t in range(k):
                    Q[t, r] = q[i, t]
                x = X[r]
                she += x * E[r]
                shh += x * x
        elif kind <= 2:
            qp = Q[f]
            qc = Q[f + 1 if kind == 2 else 0]
            for r in range(lo, hi):
                x = 1.0 if ones else X[r]
                if kind == 1:
                    ei = E[r] - d * x
                else:
                    ei = E[r] - d * (x * (qp[r] - prev * x))
                E[r] = ei
                h = x * (qc[r] - cur * x)
                she += h * ei
                shh += h * h
        elif k == 0:
            for r in range(lo, hi):
                e[rows[c0 + r]] = E[r] - d * X[r]
        else:
            qp = Q[k - 1]
            for r in range(lo, hi):
                x = 1.0 if ones else X[r]
                i = rows[c0 + r]
                e[i] = E[r] - d * (x * (qp[r] - prev * x))
                for t in range(k):
                    q[i, t] = Q[t, r] + changes[t] * x
        half[c, 0] = she
        half[c, 1] = shh
    she = half[0, 0]
    shh = half[0, 1]
    for c in range(1, nc):
        she += half[c, 0]
        shh += half[c, 1]
    return she, shh


@njit(**_SER)
def _sample_feature(j, colptr, rows, vals, g, w, V, e, q, alpha, mu_w, lam_w, mu_v,
                    lam_v, key, E, Q, part, changes):
    """w_j, then v_j0 .. v_j(k-1). Column j's residuals and q values are first copied
    into the contiguous scratch E (m,) and Q (k, m) (one read of each row's q, which
    lies on one or two cache lines), every pass then runs over contiguous memory, and
    the results go back at the end. Each pass applies the previous coordinate's change
    to E and sums h e and h^2 for the next one: the same arithmetic, row by row,
    as one pass per update and one per sum; the last pass scatters. Sums are over
    chunks of SUM_CHUNK rows (part (2, chunks, 2) holds them, by pass parity), as the
    Cython sweep adds them. changes (k,): scratch, the factors' changes."""
    k = V.shape[1]
    c0 = colptr[j]
    m = colptr[j + 1] - c0
    nc = max(1, (m + SUM_CHUNK - 1) // SUM_CHUNK)
    base = j * (k + 1)
    X = vals[c0:c0 + m]
    ones = True
    for r in range(m):
        if X[r] != 1.0:
            ones = False
            break
    she, shh = _pass(0, nc, m, c0, rows, X, ones, e, q, E, Q, 0, 0.0, 0.0, 0.0, changes,
                     part[0])
    old = w[j]
    new = _draw(she, shh, old, alpha, mu_w[g], lam_w[g], _normal(key, base))
    w[j] = new
    d = new - old
    prev = 0.0
    cur = 0.0
    if k > 0:
        cur = V[j, 0]
        she, shh = _pass(1, nc, m, c0, rows, X, ones, e, q, E, Q, 0, d, 0.0, cur, changes,
                         part[1])
    for f in range(k):
        new = _draw(she, shh, cur, alpha, mu_v[g, f], lam_v[g, f],
                    _normal(key, base + 1 + f))
        V[j, f] = new
        d = new - cur
        changes[f] = d
        prev = cur
        if f + 1 < k:
            cur = V[j, f + 1]
            she, shh = _pass(2, nc, m, c0, rows, X, ones, e, q, E, Q, f, d, prev, cur,
                             changes, part[f & 1])
    _pass(3, nc, m, c0, rows, X, ones, e, q, E, Q, 0, d, prev, 0.0, changes, part[0])


@njit(**_SER)
def _split(colptr, order, lo, hi, nb, bounds):
    """bounds (nb + 1,): runs of order[lo:hi] of about equal nonzeros (+1 a feature).
    Boundary t goes before or after the feature in which t/nb of the total falls,
    whichever is nearer: a block of a few features of very different lengths (a binary
    field) then still gives each thread one."""
    total = 0
    for p in range(lo, hi):
        total += colptr[order[p] + 1] - colptr[order[p]] + 1
    bounds[0] = lo
    t = 1
    acc = 0
    for p in range(lo, hi):
        c = colptr[order[p] + 1] - colptr[order[p]] + 1
        while t < nb and (acc + c) * nb >= total * t:
            bounds[t] = p if total * t - acc * nb <= (acc + c) * nb - total * t else p + 1
            t += 1
        acc += c
    while t <= nb:
        bounds[t] = hi
        t += 1


@njit(**_PAR)
def _parallel_block(colptr, rows, vals, order, bounds, groups, w, V, e, q, alpha, mu_w,
                    lam_w, mu_v, lam_v, key, E, Q, P, D, nb):
    """The features order[bounds[t]:bounds[t + 1]] with scratch E[t], Q[t], P[t], D[t]
    (one block's, on the threads)."""
    for t in prange(nb):
        csr = ftz_enter()
        for p in range(bounds[t], bounds[t + 1]):
            j = order[p]
            _sample_feature(j, colptr, rows, vals, groups[j], w, V, e, q, alpha, mu_w,
                            lam_w, mu_v, lam_v, key, E[t], Q[t], P[t], D[t])
        ftz_leave(csr)


@njit(**_SER)
def _sweep(colptr, rows, vals, order, starts, parallel, groups, w, V, e, q, alpha, mu_w,
           lam_w, mu_v, lam_v, key, E, Q, P, D, nb):
    # serial: only a parallel block starts the threads (_parallel_block), so a serial
    # block or a single thread costs no parallel launch
    bounds = np.empty(nb + 1, np.int64)
    for b in range(starts.shape[0] - 1):
        lo, hi = starts[b], starts[b + 1]
        if parallel[b] and nb > 1 and hi - lo > 1:
            _split(colptr, order, lo, hi, nb, bounds)
            _parallel_block(colptr, rows, vals, order, bounds, groups, w, V, e, q, alpha,
                            mu_w, lam_w, mu_v, lam_v, key, E, Q, P, D, nb)
        else:
            for p in range(lo, hi):
                j = order[p]
                _sample_feature(j, colptr, rows, vals, groups[j], w, V, e, q, alpha,
                                mu_w, lam_w, mu_v, lam_v, key, E[0], Q[0], P[0], D[0])


def mcmc_workspace(columns, n_factors, n_threads):
    """Scratch of ``mcmc_sweep`` for at most ``n_threads`` threads: E (threads, m) and
    Q (threads, k, m) float64, m the longest column (allocated once per fit)."""
    m = max(1, int(np.diff(columns.colptr).max(initial=0)))
    t = max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
    return Workspace(np.empty((t, m)), np.empty((t, n_factors, m)))


def mcmc_sweep(columns, plan, groups, w, V, e, q, hyper, seed, iteration, n_threads, ws):
    """Step 3 of Gibbs iteration ``iteration`` (module docstring); ``hyper`` a
    ``kernels.mcmc.Hyper``, ``groups`` int64 (M,) the hyperprior group of each feature,
    ``ws`` from ``mcmc_workspace`` (its thread count bounds the threads used)."""
    key = np.uint64(int(_stream_key(seed, MCMC_STREAM, iteration)[0]))
    with numba_threads(min(int(n_threads), ws.E.shape[0])):
        nb = numba.get_num_threads()
        start_threads(nb)
        csr = ftz_enter()
        try:
            _sweep(columns.colptr, columns.rows, columns.values, plan.order, plan.starts,
                   plan.parallel, groups, w, V, e, q, float(hyper.alpha), hyper.mu_w,
                   hyper.lam_w, hyper.mu_v, hyper.lam_v, key, ws.E, ws.Q,
                   sum_buffers(ws.E.shape[1], nb),
                   # each thread's row on whole cache lines of its own: each writes its own
                   aligned_zeros((nb, max(8, -(-V.shape[1] // 8) * 8)), np.float64),
                   nb)
        finally:
            ftz_leave(csr)


@njit(cache=True, nogil=True)
def normal_cdf(x):  # pragma: no cover - compiled
    """Phi(x) of float64 ``x`` (n,): the probit model's probabilities (through erfc,
    accurate in both tails; NumPy has no erf)."""
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = 0.5 * math.erfc(-x[i] / math.sqrt(2.0))
    return out
