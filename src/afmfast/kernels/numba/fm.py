"""Numba backend of the FM kernels (the contract is ``afmfast.kernels.api``).

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
        loss before the update (see kernels.api). ValueError (nothing but the workspace
        modified) for an empty batch, a row id outside X, a feature id outside [0, M), a
        batch larger than the workspace, or an invalid keep/optimizer in cfg.
    fm_predict(X, params, batch_norm, n_threads, out)
        out DTYPE (N,) receives raw scores (no dropout; running batch-norm statistics).
DTYPE is float32 or float64 (one compiled specialisation each); all arithmetic is float64
and rounded once when stored, as in ``afmfast.kernels.reference``.

Step layout: a prange over rows gathers the batch's nonzeros into contiguous arrays
(``numba.common.gather_batch``, ids checked); a prange over rows computes s and f; a
serial counting sort groups the nonzeros by feature; batch-norm statistics and all other
sums across rows run serially in row order, so the result does not depend on the thread
count; a prange over the unique touched features sums each feature's gradient over its
occurrences in increasing order and applies the optimiser to that row.
"""
from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from afmfast.kernels.numba.common import (
    BAD_NNZ,
    batch_offsets,
    block_bounds,
    check_indptr,
    check_keep,
    check_optimizer,
    effective_lr,
    ftz_enter,
    ftz_leave,
    gather_batch,
    start_threads,
    group_by_feature,
    keep_unit,
    NO_MARKS,
    numba_threads,
    opt_row,
    raise_batch_error,
    read_only_args,
    row_data_loss,
    row_key,
    run_step_kernel,
    shuffled_rows,  # noqa: F401  (the backend's epoch order, see kernels.api)
    step_key,
    steps_from,
    track_touched,  # noqa: F401  (kernels.api)
    update_feature,
)
from afmfast.kernels.api import BN_DECAY, BN_EPS, dropout_threshold

__all__ = ["FMWorkspace", "fm_workspace", "fm_step", "fm_predict", "track_touched"]

FMWorkspace = namedtuple(
    "FMWorkspace",
    "nzoff occ_feat occ_x occ_b slot uniq ustart ucur occ_list s f df lin r kvec gdense ul2 "
    "tacc touched",
)
FMWorkspace.__doc__ = """Scratch of ``fm_step``. nzoff int64 (B + 1,): batch-local offsets
of the rows' nonzeros; occ_feat int32 / occ_x float64 / occ_b int32 (max_batch_nnz,): the
batch's nonzeros ("occurrences") gathered contiguously with their batch row; slot int32
(M,) stays -1 between steps; uniq/ustart/ucur/occ_list: unique touched features and their
occurrences (positions in the occ_* arrays) in batch order; s, f, df float64 (B, k);
lin, r (B,); kvec (5, k) = [mu, var, inv_std, sum dz, sum dz*fh]; gdense (1 + 2k,); ul2
per touched row ||v||^2; tacc (threads, k_padded) per-thread gradient accumulator; touched
uint8 (M,) or (0,): marks of the touched features (``track_touched``)."""

# error_model="numpy": no zero-division checks, so divisions vectorise (numba.common).
_SER = dict(fastmath=False, cache=True, nogil=True, error_model="numpy")
_PAR = dict(_SER, parallel=True)


def fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype):
    """Allocate the scratch of ``fm_step`` for batches of at most ``batch_size`` rows and
    ``max_batch_nnz`` nonzeros, M = ``n_features``, k = ``n_factors``.

    Example: ``ws = fm_workspace(4096, 40960, 5382, 16, np.float32)``.
    """
    B, cap, M, k = int(batch_size), int(max_batch_nnz), int(n_features), int(n_factors)
    if B < 1 or cap < 0 or M < 1 or k < 1:
        raise ValueError(
            "fm_workspace needs batch_size >= 1, max_batch_nnz >= 0, n_features >= 1 and "
            f"n_factors >= 1; got {B}, {cap}, {M}, {k}"
        )
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    cap1 = max(cap, 1)
    cap_u = max(1, min(cap, M))
    # One padded row per pool thread (get_thread_id indexes it); the padding keeps two
    # threads' rows off the same cache line.
    kpad = (k + 7) // 8 * 8 + 8
    f8 = np.float64
    return FMWorkspace(
        nzoff=np.zeros(B + 1, dtype=np.int64),
        occ_feat=np.zeros(cap1, dtype=np.int32),
        occ_x=np.zeros(cap1, dtype=f8),
        occ_b=np.zeros(cap1, dtype=np.int32),
        slot=np.full(M, -1, dtype=np.int32),
        uniq=np.zeros(cap_u, dtype=np.int32),
        ustart=np.zeros(cap_u + 1, dtype=np.int64),
        ucur=np.zeros(cap_u, dtype=np.int64),
        occ_list=np.zeros(cap1, dtype=np.int64),
        s=np.zeros((B, k), dtype=f8),
        f=np.zeros((B, k), dtype=f8),
        df=np.zeros((B, k), dtype=f8),
        lin=np.zeros(B, dtype=f8),
        r=np.zeros(B, dtype=f8),
        kvec=np.zeros((5, k), dtype=f8),
        gdense=np.zeros(1 + 2 * k, dtype=f8),
        ul2=np.zeros(cap_u, dtype=f8),
        tacc=np.zeros((numba.config.NUMBA_NUM_THREADS, kpad), dtype=f8),
        touched=NO_MARKS,
    )


@njit(**_SER)
def _row_sums(feat, xs, lo, hi, V, w, s, sq):
    """s += sum v x, sq += sum (v x)^2 over the nonzeros lo..hi-1 of one row (ids outside
    [0, M) skipped); returns sum w x. float64 whatever the storage dtype. Empty ``xs``:
    every value is 1."""
    M = V.shape[0]
    k = V.shape[1]
    implied = xs.shape[0] == 0
    lin = 0.0
    for p in range(lo, hi):
        j = feat[p]
        if j < 0 or j >= M:
            continue
        x = 1.0 if implied else np.float64(xs[p])
        lin += np.float64(w[j]) * x
        vj = V[j]
        for c in range(k):
            vx = np.float64(vj[c]) * x
            s[c] += vx
            sq[c] += vx * vx
    return lin


@njit(**_PAR)
def _fm_step_kernel(indptr, indices, values, y, rows, V, w, dense, bn_stats,
                    sV, sw, sd, lr, l2, keep, threshold, optimizer, batch_norm,
                    seed, ustep, step, loss_code, ws, nb):
    """The whole step; returns (loss, status) with status < 0 (``numba.common.BAD_*``)
    when the batch is invalid or does not fit the workspace (nothing but the workspace
    is modified then). Each prange runs over one block of rows (features) per thread,
    which sets FTZ and DAZ first (``numba.common.ftz_enter``); nb is the thread count
    (``numba.get_num_threads()`` in a kernel would keep it from being cached)."""
    (nzoff, occ_feat, occ_x, occ_b, slot, uniq, ustart, ucur, occ_list, S, F, DF, LIN, R,
     kvec, gdense, ul2, tacc, touched) = ws
    B = rows.shape[0]
    M = V.shape[0]
    k = V.shape[1]

    nnz = batch_offsets(indptr, rows, nzoff)
    if nnz < 0:
        return np.nan, nnz
    if nnz > occ_feat.shape[0]:
        return np.nan, BAD_NNZ
    gather_batch(indptr, indices, values, rows, nzoff, M, occ_feat, occ_x, occ_b, nb)

    # Forward per row: s = sum v x, f = (s^2 - sum (v x)^2) / 2, linear term (ids -1 are
    # skipped: the grouping below rejects the batch before any parameter changes).
    for blk in prange(nb):
        csr = ftz_enter()
        b0, b1 = block_bounds(B, nb, blk)
        for b in range(b0, b1):
            sb = S[b]
            fb = F[b]
            for c in range(k):
                sb[c] = 0.0
                fb[c] = 0.0
            LIN[b] = _row_sums(occ_feat, occ_x, nzoff[b], nzoff[b + 1], V, w, sb, fb)
            for c in range(k):
                fb[c] = 0.5 * (sb[c] * sb[c] - fb[c])
        ftz_leave(csr)

    U = group_by_feature(occ_feat, nnz, slot, uniq, ustart, ucur, occ_list, touched)
    if U < 0:
        return np.nan, U

    # Every sum across rows below runs serially in row order (each column in row order:
    # the determinism guarantee), vectorised over the factors.
    mu = kvec[0]
    var = kvec[1]
    inv = kvec[2]
    s1 = kvec[3]
    s2 = kvec[4]
    if batch_norm:
        mu[:] = 0.0
        var[:] = 0.0
        for b in range(B):
            for c in range(k):
                mu[c] += F[b, c]
        for c in range(k):
            mu[c] /= B
        for b in range(B):
            for c in range(k):
                d = F[b, c] - mu[c]
                var[c] += d * d
        for c in range(k):
            var[c] /= B
            inv[c] = 1.0 / np.sqrt(var[c] + BN_EPS)
            bn_stats[0, c] = BN_DECAY * np.float64(bn_stats[0, c]) + (1.0 - BN_DECAY) * mu[c]
            bn_stats[1, c] = BN_DECAY * np.float64(bn_stats[1, c]) + (1.0 - BN_DECAY) * var[c]

    # Output, residual and dz = r * dropout scale (kept in DF).
    w0 = np.float64(dense[0])
    dropout = keep < 1.0
    inv_keep = 1.0 / keep
    skey = step_key(seed, np.uint64(0), ustep)
    for blk in prange(nb):
        csr = ftz_enter()
        b0, b1 = block_bounds(B, nb, blk)
        for b in range(b0, b1):
            fb = F[b]
            db = DF[b]
            rkey = row_key(skey, np.uint64(rows[b]))
            acc = 0.0
            for c in range(k):
                if batch_norm:
                    z = (np.float64(dense[1 + c]) * ((fb[c] - mu[c]) * inv[c])
                         + np.float64(dense[1 + k + c]))
                else:
                    z = fb[c]
                sc = 1.0
                if dropout:
                    sc = inv_keep if keep_unit(rkey, c, threshold) else 0.0
                acc += z * sc
                db[c] = sc
            # LIN[b] is read for the last time here: it takes the row's data loss
            LIN[b], res = row_data_loss(loss_code, w0 + LIN[b] + acc,
                                        np.float64(y[rows[b]]))
            R[b] = res
            for c in range(k):
                db[c] *= res
        ftz_leave(csr)

    sq = 0.0
    g0 = 0.0
    for b in range(B):
        sq += LIN[b]
        g0 += R[b]
    gdense[0] = g0
    if batch_norm:
        s1[:] = 0.0
        s2[:] = 0.0
        for b in range(B):
            for c in range(k):
                d = DF[b, c]
                s1[c] += d
                s2[c] += d * ((F[b, c] - mu[c]) * inv[c])
        for c in range(k):
            gdense[1 + c] = s2[c]
            gdense[1 + k + c] = s1[c]
    else:
        for c in range(2 * k):
            gdense[1 + c] = 0.0
    if batch_norm:
        # df = gamma * inv * (dz - mean(dz) - fh * mean(dz * fh)): BN backward per row.
        for blk in prange(nb):
            csr = ftz_enter()
            b0, b1 = block_bounds(B, nb, blk)
            for b in range(b0, b1):
                fb = F[b]
                db = DF[b]
                for c in range(k):
                    fh = (fb[c] - mu[c]) * inv[c]
                    db[c] = (np.float64(dense[1 + c]) * inv[c]
                             * (db[c] - s1[c] / B - fh * (s2[c] / B)))
            ftz_leave(csr)

    # Per touched feature: gradient summed over its occurrences in batch order, + l2 v,
    # then the lazy optimiser update of that V row and w entry. One feature = one
    # iteration, so reading V[j] before writing it sees the pre-update value.
    lr_eff = effective_lr(optimizer, lr, step)
    for blk in prange(nb):
        csr = ftz_enter()
        g = tacc[numba.get_thread_id()][:k]
        u0, u1 = block_bounds(U, nb, blk)
        for u in range(u0, u1):
            j = uniq[u]
            vj = V[j]
            for c in range(k):
                g[c] = 0.0
            gw = 0.0
            for q in range(ustart[u], ustart[u + 1]):
                o = occ_list[q]
                b = occ_b[o]
                x = occ_x[o]
                gw += R[b] * x
                sb = S[b]
                db = DF[b]
                for c in range(k):
                    g[c] += db[c] * x * (sb[c] - np.float64(vj[c]) * x)
            # the l2 terms only when l2 > 0 (at the estimators' default of 0 the running
            # sum of ||v||^2, a chain of dependent adds, costs a large k for nothing)
            nv = 0.0
            if l2 != 0.0:
                for c in range(k):
                    v = np.float64(vj[c])
                    nv += v * v
                    g[c] += l2 * v
            ul2[u] = nv
            update_feature(V, w, sV, sw, j, g, gw, optimizer, lr_eff)
        ftz_leave(csr)

    opt_row(dense, gdense, sd[0], sd[1], optimizer, lr_eff)

    reg = 0.0
    for u in range(U):
        reg += ul2[u]
    return sq + 0.5 * l2 * reg, 0


def fm_step(X, y, rows, params, state, cfg, ws):
    """One training step (forward, backward, optimiser update) on the batch ``rows``;
    returns the batch loss before the update. See the module docstring.

    Example: ``loss = fm_step(X, y, rows, params, state, cfg, ws)`` with ``params`` from
    ``kernels.api.new_fm_params``, ``state`` from ``new_opt_state`` and ``ws`` from
    ``fm_workspace``.
    """
    indptr, indices, values, y = read_only_args(*X, y)
    B = rows.shape[0]
    if B == 0 or B > ws.s.shape[0] or params.V.shape[0] != ws.slot.shape[0] or (
        params.V.shape[1] != ws.s.shape[1]
    ):
        raise ValueError(
            f"fm_step: workspace is for batches of 1 to {ws.s.shape[0]} rows, "
            f"{ws.slot.shape[0]} features and {ws.s.shape[1]} factors; got {B} rows and "
            f"V of shape {params.V.shape}. Build it with fm_workspace for this model."
        )
    keep = check_keep("fm_step", "keep", cfg.keep)
    optimizer = check_optimizer("fm_step", cfg.optimizer)
    threshold = np.uint64(dropout_threshold(keep) if keep < 1.0 else 0)
    loss, status = run_step_kernel(
        "fm_step", _fm_step_kernel,
        (indptr, indices, values, y, rows, params.V, params.w, params.dense,
         params.bn_stats, state.V, state.w, state.dense, float(cfg.lr), float(cfg.l2),
         keep, threshold, optimizer, bool(cfg.batch_norm)), cfg, ws)
    if status < 0:
        raise_batch_error("fm_step", status, indptr.shape[0] - 1, params.V.shape[0],
                          ws.occ_feat.shape[0])
    return float(loss)



fm_steps = steps_from(fm_step)


@njit(**_PAR)
def _fm_predict_kernel(indptr, indices, values, V, w, dense, bn_stats, batch_norm, out,
                       nb):
    start_threads(nb)
    csr0 = ftz_enter()
    n = indptr.shape[0] - 1
    k = V.shape[1]
    inv = np.empty(k)
    for c in range(k):
        inv[c] = 1.0 / np.sqrt(np.float64(bn_stats[1, c]) + BN_EPS)
    # Per-thread (s, sum of squares) rows: one allocation per call, none per row.
    kpad = (k + 7) // 8 * 8 + 8
    scratch = np.empty((numba.config.NUMBA_NUM_THREADS, 2, kpad))
    w0 = np.float64(dense[0])
    for blk in prange(nb):
        csr = ftz_enter()
        t = scratch[numba.get_thread_id()]
        s = t[0]
        sq = t[1]
        b0, b1 = block_bounds(n, nb, blk)
        for b in range(b0, b1):
            for c in range(k):
                s[c] = 0.0
                sq[c] = 0.0
            lin = _row_sums(indices, values, indptr[b], indptr[b + 1], V, w, s, sq)
            acc = 0.0
            for c in range(k):
                f = 0.5 * (s[c] * s[c] - sq[c])
                if batch_norm:
                    f = (np.float64(dense[1 + c]) * ((f - np.float64(bn_stats[0, c])) * inv[c])
                         + np.float64(dense[1 + k + c]))
                acc += f
            out[b] = w0 + lin + acc
        ftz_leave(csr)
    ftz_leave(csr0)


def fm_predict(X, params, batch_norm, n_threads, out):
    """Raw scores of every row of X into ``out`` (no dropout, running BN statistics)."""
    indptr, indices, values = read_only_args(*X)
    check_indptr("fm_predict", indptr, indices.shape[0])
    with numba_threads(n_threads):
        _fm_predict_kernel(indptr, indices, values, params.V, params.w, params.dense,
                           params.bn_stats, bool(batch_norm), out,
                           numba.get_num_threads())
