"""Numba backend of the FM kernels (the contract is ``afmfast.kernel_api``).

Functions
    fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype) -> FMWorkspace
        Scratch arrays for one fit (allocated once, reused by every step; not thread
        safe: one workspace per concurrently running fit). ``dtype`` is the parameter
        dtype; the scratch itself is float64 whatever it is.
    fm_step(X, y, rows, params, state, cfg, ws) -> float
        X = (indptr int64 (N+1,), indices int32 (nnz,), values DTYPE (nnz,)), y DTYPE (N,),
        rows int64 (B,), B <= batch_size and the batch's nonzeros <= max_batch_nnz.
        Mutates params.V/w/dense/bn_stats (bn_stats only with cfg.batch_norm), state.V/w/
        dense (only rows of V and w the batch touches) and the workspace. Returns the batch
        loss before the update (see kernel_api). Ids outside [0, M) are skipped (memory
        safety only: the Python layer rejects them before any kernel runs).
    fm_predict(X, params, batch_norm, n_threads, out)
        out DTYPE (N,) receives raw scores (no dropout; running batch-norm statistics).
DTYPE is float32 or float64 (one compiled specialisation each); all arithmetic is float64
and rounded once when stored, as in ``afmfast.reference``.

Step layout: a prange over rows gathers the batch's nonzeros into contiguous arrays; a
prange over rows computes s and f; a serial counting sort groups the nonzeros by feature;
batch-norm statistics and all other sums across rows run in row order (over blocks of
factors in parallel), so the result does not depend on the thread count; a prange over
the unique touched features sums each feature's gradient over its occurrences in
increasing order and applies the optimiser to that row.
"""
from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from ._numba_common import (
    effective_lr,
    keep_unit,
    opt_row,
    opt_update,
    row_key,
    step_key,
)
from .kernel_api import BN_DECAY, BN_EPS, dropout_threshold

__all__ = ["FMWorkspace", "fm_workspace", "fm_step", "fm_predict"]

FMWorkspace = namedtuple(
    "FMWorkspace",
    "offs bidx bval slot uniq ustart ucur occ_row occ_x s f df lin r kvec gdense ul2 tacc",
)
FMWorkspace.__doc__ = """Scratch of ``fm_step``. offs int64 (B + 1,): batch-local offsets of
the rows' nonzeros; bidx int32 / bval float64 (max_batch_nnz,): the batch's nonzeros
gathered contiguously (id -1 for an id outside [0, M)); slot int32 (M,) stays -1 between steps;
uniq/ustart/ucur: unique touched features and their occurrence ranges; occ_row/occ_x: row
and value of every occurrence grouped by feature; s, f, df float64 (B, k); lin, r (B,);
kvec (5, k) = [mu, var, inv_std, sum dz, sum dz*fh]; gdense (1 + 2k,); ul2 per touched row
||v||^2; tacc (threads, k_padded) per-thread gradient accumulator."""

_MASK64 = (1 << 64) - 1
# Factor blocks of the across-row sums: 8 float64 = one cache line, so that two threads
# never write the same line.
_FBLOCK = 8

_PAR = dict(parallel=True, fastmath=False, cache=True, nogil=True)
_SER = dict(fastmath=False, cache=True, nogil=True)


def fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype):
    """Allocate the scratch of ``fm_step`` for batches of at most ``batch_size`` rows and
    ``max_batch_nnz`` nonzeros, M = ``n_features``, k = ``n_factors``."""
    B, cap, M, k = int(batch_size), int(max_batch_nnz), int(n_features), int(n_factors)
    if B < 1 or cap < 0 or M < 1 or k < 1:
        raise ValueError(
            "fm_workspace needs batch_size >= 1, max_batch_nnz >= 0, n_features >= 1 and "
            f"n_factors >= 1; got {B}, {cap}, {M}, {k}"
        )
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    cap_u = max(1, min(cap, M))
    # One padded row per pool thread (get_thread_id indexes it); the padding keeps two
    # threads' rows off the same cache line.
    kpad = (k + 7) // 8 * 8 + 8
    f8 = np.float64
    return FMWorkspace(
        offs=np.zeros(B + 1, dtype=np.int64),
        bidx=np.zeros(max(cap, 1), dtype=np.int32),
        bval=np.zeros(max(cap, 1), dtype=f8),
        slot=np.full(M, -1, dtype=np.int32),
        uniq=np.zeros(cap_u, dtype=np.int32),
        ustart=np.zeros(cap_u + 1, dtype=np.int64),
        ucur=np.zeros(cap_u, dtype=np.int64),
        occ_row=np.zeros(max(cap, 1), dtype=np.int32),
        occ_x=np.zeros(max(cap, 1), dtype=f8),
        s=np.zeros((B, k), dtype=f8),
        f=np.zeros((B, k), dtype=f8),
        df=np.zeros((B, k), dtype=f8),
        lin=np.zeros(B, dtype=f8),
        r=np.zeros(B, dtype=f8),
        kvec=np.zeros((5, k), dtype=f8),
        gdense=np.zeros(1 + 2 * k, dtype=f8),
        ul2=np.zeros(cap_u, dtype=f8),
        tacc=np.zeros((numba.config.NUMBA_NUM_THREADS, kpad), dtype=f8),
    )


@njit(**_SER)
def _batch_offsets(indptr, rows, offs):
    """offs[b] = start of row b's nonzeros in the batch-local arrays; returns nnz."""
    nnz = 0
    for b in range(rows.shape[0]):
        offs[b] = nnz
        r = rows[b]
        nnz += indptr[r + 1] - indptr[r]
    offs[rows.shape[0]] = nnz
    return nnz


@njit(**_SER)
def _group_by_feature(offs, bidx, bval, B, slot, uniq, ustart, ucur, occ_row, occ_x):
    """Stable counting sort of the gathered batch nonzeros by feature id. Returns the
    number U of unique touched features: uniq[:U] in order of first appearance, the
    occurrences of uniq[u] at occ_*[ustart[u]:ustart[u+1]] in batch order. Reads only
    the contiguous gathered arrays (the random reads of X happen in the parallel
    forward pass). Leaves ``slot`` all -1 again."""
    nnz = offs[B]
    U = 0
    for q in range(nnz):
        j = bidx[q]
        if j < 0:
            continue
        u = slot[j]
        if u < 0:
            u = U
            slot[j] = U
            uniq[U] = j
            ucur[U] = 0
            U += 1
        ucur[u] += 1
    pos = 0
    for u in range(U):
        ustart[u] = pos
        pos += ucur[u]
        ucur[u] = ustart[u]
    ustart[U] = pos
    for b in range(B):
        for q in range(offs[b], offs[b + 1]):
            j = bidx[q]
            if j < 0:
                continue
            u = slot[j]
            t = ucur[u]
            occ_row[t] = b
            occ_x[t] = bval[q]
            ucur[u] = t + 1
    # Only the touched entries are reset, so the step never pays O(M).
    for u in range(U):
        slot[uniq[u]] = -1
    return U


@njit(**_PAR)
def _column_moments(a, B, mu, var):
    """mu, var = mean and biased variance of a[:B] per column, each column summed
    serially in row order (parallel over blocks of columns)."""
    k = a.shape[1]
    nblk = (k + _FBLOCK - 1) // _FBLOCK
    for blk in prange(nblk):
        lo = blk * _FBLOCK
        hi = min(k, lo + _FBLOCK)
        for c in range(lo, hi):
            mu[c] = 0.0
            var[c] = 0.0
        for b in range(B):
            for c in range(lo, hi):
                mu[c] += a[b, c]
        for c in range(lo, hi):
            mu[c] /= B
        for b in range(B):
            for c in range(lo, hi):
                d = a[b, c] - mu[c]
                var[c] += d * d
        for c in range(lo, hi):
            var[c] /= B


@njit(**_PAR)
def _bn_backward_sums(f, dz, B, mu, inv, s1, s2):
    """s1 = sum_b dz_b, s2 = sum_b dz_b * fh_b per factor, in row order."""
    k = f.shape[1]
    nblk = (k + _FBLOCK - 1) // _FBLOCK
    for blk in prange(nblk):
        lo = blk * _FBLOCK
        hi = min(k, lo + _FBLOCK)
        for c in range(lo, hi):
            s1[c] = 0.0
            s2[c] = 0.0
        for b in range(B):
            for c in range(lo, hi):
                d = dz[b, c]
                s1[c] += d
                s2[c] += d * ((f[b, c] - mu[c]) * inv[c])


@njit(**_PAR)
def _fm_step_kernel(indptr, indices, values, y, rows, V, w, dense, bn_stats,
                    sV, sw, sd, lr, l2, keep, threshold, optimizer, batch_norm,
                    seed, ustep, step, ws):
    """The whole step; returns (loss, status) with status -1 when the batch does not fit
    the workspace (nothing is modified then)."""
    (offs, bidx, bval, slot, uniq, ustart, ucur, occ_row, occ_x, S, F, DF, LIN, R, kvec,
     gdense, ul2, tacc) = ws
    B = rows.shape[0]
    M = V.shape[0]
    k = V.shape[1]

    if _batch_offsets(indptr, rows, offs) > bidx.shape[0]:
        return np.nan, -1

    # Gather the batch's nonzeros into contiguous batch-local arrays first: a loop that
    # only copies keeps many independent cache misses on the random rows of X in flight,
    # and every later pass reads the contiguous copy.
    for b in prange(B):
        r = rows[b]
        q = offs[b]
        p0 = indptr[r]
        for i in range(indptr[r + 1] - p0):
            j = indices[p0 + i]
            bidx[q + i] = j if (j >= 0 and j < M) else -1
            bval[q + i] = values[p0 + i]

    # Forward per row: s = sum v x, f = (s^2 - sum (v x)^2) / 2, linear term.
    for b in prange(B):
        sb = S[b]
        fb = F[b]
        for c in range(k):
            sb[c] = 0.0
            fb[c] = 0.0
        lin = 0.0
        for q in range(offs[b], offs[b + 1]):
            j = bidx[q]
            if j < 0:
                continue
            x = bval[q]
            lin += np.float64(w[j]) * x
            vj = V[j]
            for c in range(k):
                vx = np.float64(vj[c]) * x
                sb[c] += vx
                fb[c] += vx * vx
        for c in range(k):
            fb[c] = 0.5 * (sb[c] * sb[c] - fb[c])
        LIN[b] = lin

    U = _group_by_feature(offs, bidx, bval, B, slot, uniq, ustart, ucur, occ_row, occ_x)

    mu = kvec[0]
    var = kvec[1]
    inv = kvec[2]
    s1 = kvec[3]
    s2 = kvec[4]
    if batch_norm:
        _column_moments(F, B, mu, var)
        for c in range(k):
            inv[c] = 1.0 / np.sqrt(var[c] + BN_EPS)
            bn_stats[0, c] = BN_DECAY * np.float64(bn_stats[0, c]) + (1.0 - BN_DECAY) * mu[c]
            bn_stats[1, c] = BN_DECAY * np.float64(bn_stats[1, c]) + (1.0 - BN_DECAY) * var[c]

    # Output, residual and dz = r * dropout scale (kept in DF).
    w0 = np.float64(dense[0])
    dropout = keep < 1.0
    inv_keep = 1.0 / keep
    skey = step_key(seed, np.uint64(0), ustep)
    for b in prange(B):
        fb = F[b]
        db = DF[b]
        rkey = row_key(skey, np.uint64(rows[b]))
        acc = 0.0
        for c in range(k):
            if batch_norm:
                z = np.float64(dense[1 + c]) * ((fb[c] - mu[c]) * inv[c]) + np.float64(dense[1 + k + c])
            else:
                z = fb[c]
            sc = 1.0
            if dropout:
                sc = inv_keep if keep_unit(rkey, c, threshold) else 0.0
            acc += z * sc
            db[c] = sc
        res = (w0 + LIN[b] + acc) - np.float64(y[rows[b]])
        R[b] = res
        for c in range(k):
            db[c] *= res

    # Sums across rows, serial in row order (the determinism guarantee).
    sq = 0.0
    g0 = 0.0
    for b in range(B):
        sq += R[b] * R[b]
        g0 += R[b]
    gdense[0] = g0
    if batch_norm:
        _bn_backward_sums(F, DF, B, mu, inv, s1, s2)
        for c in range(k):
            gdense[1 + c] = s2[c]
            gdense[1 + k + c] = s1[c]
        # df = gamma * inv * (dz - mean(dz) - fh * mean(dz * fh)): BN backward per row.
        for b in prange(B):
            fb = F[b]
            db = DF[b]
            for c in range(k):
                fh = (fb[c] - mu[c]) * inv[c]
                db[c] = np.float64(dense[1 + c]) * inv[c] * (db[c] - s1[c] / B - fh * (s2[c] / B))
    else:
        for c in range(2 * k):
            gdense[1 + c] = 0.0

    # Per touched feature: gradient summed over its occurrences in batch order, + l2 v,
    # then the lazy optimiser update of that V row and w entry. One feature = one
    # iteration, so reading V[j] before writing it sees the pre-update value.
    lr_eff = effective_lr(optimizer, lr, step)
    for u in prange(U):
        g = tacc[numba.get_thread_id()][:k]
        j = uniq[u]
        vj = V[j]
        for c in range(k):
            g[c] = 0.0
        gw = 0.0
        for q in range(ustart[u], ustart[u + 1]):
            b = occ_row[q]
            x = occ_x[q]
            gw += R[b] * x
            sb = S[b]
            db = DF[b]
            for c in range(k):
                g[c] += db[c] * x * (sb[c] - np.float64(vj[c]) * x)
        nv = 0.0
        for c in range(k):
            v = np.float64(vj[c])
            nv += v * v
            g[c] += l2 * v
        ul2[u] = nv
        opt_row(vj, g, sV[0, j], sV[1, j], optimizer, lr_eff)
        p, a, m = opt_update(w[j], gw, sw[0, j], sw[1, j], optimizer, lr_eff)
        w[j] = p
        sw[0, j] = a
        sw[1, j] = m

    opt_row(dense, gdense, sd[0], sd[1], optimizer, lr_eff)

    reg = 0.0
    for u in range(U):
        reg += ul2[u]
    return 0.5 * sq + 0.5 * l2 * reg, 0


def fm_step(X, y, rows, params, state, cfg, ws):
    """One training step (forward, backward, optimiser update) on the batch ``rows``;
    returns the batch loss before the update. See the module docstring."""
    indptr, indices, values = X
    B = rows.shape[0]
    if B == 0 or B > ws.s.shape[0] or params.V.shape[0] != ws.slot.shape[0] or (
        params.V.shape[1] != ws.s.shape[1]
    ):
        raise ValueError(
            f"fm_step: workspace is for batches of 1 to {ws.s.shape[0]} rows, "
            f"{ws.slot.shape[0]} features and {ws.s.shape[1]} factors; got {B} rows and "
            f"V of shape {params.V.shape}. Build it with fm_workspace for this model."
        )
    keep = float(cfg.keep)
    threshold = np.uint64(dropout_threshold(keep) if keep < 1.0 else 0)
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(cfg.n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        loss, status = _fm_step_kernel(
            indptr, indices, values, y, rows,
            params.V, params.w, params.dense, params.bn_stats,
            state.V, state.w, state.dense,
            float(cfg.lr), float(cfg.l2), keep, threshold, int(cfg.optimizer),
            bool(cfg.batch_norm),
            np.uint64(int(cfg.seed) & _MASK64), np.uint64(int(cfg.step) & _MASK64),
            int(cfg.step), ws,
        )
    finally:
        numba.set_num_threads(prev)
    if status < 0:
        raise ValueError(
            f"fm_step: the batch has more nonzeros than the workspace holds "
            f"(max_batch_nnz={ws.occ_row.shape[0]}); size the workspace with the largest "
            "sum of row lengths of any batch."
        )
    return float(loss)


@njit(**_PAR)
def _fm_predict_kernel(indptr, indices, values, V, w, dense, bn_stats, batch_norm, out):
    n = indptr.shape[0] - 1
    M = V.shape[0]
    k = V.shape[1]
    inv = np.empty(k)
    for c in range(k):
        inv[c] = 1.0 / np.sqrt(np.float64(bn_stats[1, c]) + BN_EPS)
    # Per-thread (s, sum of squares) rows: one allocation per call, none per row.
    kpad = (k + 7) // 8 * 8 + 8
    scratch = np.empty((numba.config.NUMBA_NUM_THREADS, 2, kpad))
    w0 = np.float64(dense[0])
    for b in prange(n):
        t = scratch[numba.get_thread_id()]
        s = t[0]
        sq = t[1]
        for c in range(k):
            s[c] = 0.0
            sq[c] = 0.0
        lin = 0.0
        for p in range(indptr[b], indptr[b + 1]):
            j = indices[p]
            if j < 0 or j >= M:
                continue
            x = np.float64(values[p])
            lin += np.float64(w[j]) * x
            vj = V[j]
            for c in range(k):
                vx = np.float64(vj[c]) * x
                s[c] += vx
                sq[c] += vx * vx
        acc = 0.0
        for c in range(k):
            f = 0.5 * (s[c] * s[c] - sq[c])
            if batch_norm:
                f = (np.float64(dense[1 + c]) * ((f - np.float64(bn_stats[0, c])) * inv[c])
                     + np.float64(dense[1 + k + c]))
            acc += f
        out[b] = w0 + lin + acc


def fm_predict(X, params, batch_norm, n_threads, out):
    """Raw scores of every row of X into ``out`` (no dropout, running BN statistics)."""
    indptr, indices, values = X
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        _fm_predict_kernel(indptr, indices, values, params.V, params.w, params.dense,
                           params.bn_stats, bool(batch_norm), out)
    finally:
        numba.set_num_threads(prev)
