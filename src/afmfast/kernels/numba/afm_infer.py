"""Numba AFM inference: ``afm_predict`` and ``afm_explain`` of the Numba backend (see
``afmfast.kernels.numba.afm``, which exports them, for the contract).

predict runs the rows in chunks (``kernels.api.predict_chunks``) through the training
step's forward pass, built from the step's own pieces: v x per occurrence, the distinct
pairs of the chunk, their logits (the attention MLP once per distinct pair), then per row
the softmax, the pooled vector and the score. explain writes every pair of every row out,
so it runs row by row.
"""
import math

import numba
import numpy as np
from numba import njit, prange

from afmfast.kernels.numba.afm_train import (
    _PAR,
    _PBLK,
    _SER,
    _activate_rows,
    _distinct_pairs,
    _even_cuts,
    _logits,
    _mm_acc,
    _pair_offsets,
    _pair_logits,
    _pool_pairs,
    _pool_plain,
    _row_softmax,
    _row_vx,
    afm_workspace,
)
from afmfast.kernels.numba.common import (batch_offsets, check_indptr, ftz_enter, ftz_leave,
                            gather_batch, group_by_feature, numba_threads,
                            read_only_args, start_threads)
from afmfast.kernels.api import WorkspaceCache, known_ids, predict_chunks


@njit(**_SER)
def _predict_row(b, nzoff, pairoff, VX, LIN, pid, S, A, dense, attention, g, s):
    """Score of chunk row b (no dropout) from v x, the linear term and, with attention,
    the distinct pairs' logits S."""
    k = VX.shape[1]
    o0 = nzoff[b]
    n = nzoff[b + 1] - o0
    P0 = pairoff[b]
    npairs = pairoff[b + 1] - P0
    for c in range(k):
        g[c] = 0.0
    if attention and npairs > 0:
        _row_softmax(S, pid, P0, npairs, A)
        _pool_pairs(VX, o0, n, A, A, False, P0, g)
    elif not attention and n > 0:
        _pool_plain(VX, o0, n, g, s)
    dot = 0.0
    for c in range(k):
        dot += np.float64(dense[1 + c]) * g[c]
    return np.float64(dense[0]) + LIN[b] + dot


@njit(**_PAR)
def _predict_kernel(indptr, indices, values, V, w, W, dense, attention, activation,
                    chunk_rows, ws, out, nb):
    """Scores of every row of X (every id in [0, M)), in chunks of chunk_rows rows, each
    through the step's forward pass: v x, the distinct pairs' logits (blocks of _PBLK,
    E and U of a block in per-thread scratch: only the logits are kept), then the rows.
    Returns the number of distinct pairs evaluated. FTZ and DAZ are set on the calling
    thread and in every parallel body that computes (``numba.common.ftz_enter``); nb is
    the thread count."""
    start_threads(nb)
    csr0 = ftz_enter()
    (slot, uniq, ustart, ucur, occ_list, nzoff, pairoff, occ_feat, occ_x, occ_b, VX, DVX,
     LIN, atom, arep, amark, acnt, plo, phi, po, qo, plist, pid, drep, E, U, Z, S, DS,
     A, SC0, D, R, WT, ch_lo, dch_lo, cW, cvec, gW, gdense, ul2, tbuf, hbuf, tacc,
     touched) = ws
    n_rows = indptr.shape[0] - 1
    M = V.shape[0]
    k = V.shape[1]
    t = W.shape[0]
    if attention:
        for c in prange(k):
            for j in range(t):
                WT[c, j] = W[j, c]
    nth = numba.config.NUMBA_NUM_THREADS
    Eb = np.empty((nth, _PBLK, k), dtype=V.dtype)
    Ub = np.empty((nth, _PBLK, t), dtype=V.dtype)
    all_rows = np.arange(n_rows)
    n_eval = 0
    for r0 in range(0, n_rows, chunk_rows):
        rows = all_rows[r0:min(n_rows, r0 + chunk_rows)]
        B = rows.shape[0]
        nnz = batch_offsets(indptr, rows, nzoff)
        npairs = _pair_offsets(nzoff, B, pairoff)
        gather_batch(indptr, indices, values, rows, nzoff, M, occ_feat, occ_x, occ_b, nb)
        for b in prange(B):
            csr = ftz_enter()
            LIN[b], _ = _row_vx(occ_feat, occ_x, nzoff[b], nzoff[b + 1], V, w, VX,
                                occ_feat, nzoff[b])
            ftz_leave(csr)
        if attention and npairs > 0:
            nU = group_by_feature(occ_feat, nnz, slot, uniq, ustart, ucur, occ_list, touched)
            nD = _distinct_pairs(nzoff, occ_x, nU, ustart, occ_list, atom, arep, amark,
                                 acnt, plo, phi, po, qo, plist, pid, drep, B)
            n_eval += nD
            for blk in prange((nD + _PBLK - 1) // _PBLK):
                csr = ftz_enter()
                tid = numba.get_thread_id()
                d0 = blk * _PBLK
                _pair_logits(d0, min(nD, d0 + _PBLK), drep, VX, WT, dense, activation,
                             Eb[tid], Ub[tid], S)
                ftz_leave(csr)
        nch = min(ch_lo.shape[0] - 1, B)
        _even_cuts(B, nch, ch_lo)
        for ch in prange(nch):
            csr = ftz_enter()
            tb = tbuf[ch]
            for b in range(ch_lo[ch], ch_lo[ch + 1]):
                out[rows[b]] = _predict_row(b, nzoff, pairoff, VX, LIN, pid, S, A, dense,
                                            attention, tb[0], tb[1])
            ftz_leave(csr)
    ftz_leave(csr0)
    return n_eval


_predict_cache = WorkspaceCache(afm_workspace)


def afm_predict(X, params, attention, activation, n_threads, out):
    """Raw AFM scores of every row of X into ``out`` (no dropout; ids outside [0, M) form
    no pairs), in chunks (``kernels.api.predict_chunks``) with the training step's
    forward pass, the attention MLP once per distinct pair of a chunk. Returns the
    number of distinct pairs evaluated.

    Example: ``out = np.empty(n_rows, np.float32); afm_predict(X, params, 1, RELU, 2, out)``.
    """
    n_rows = X[0].shape[0] - 1
    if out.shape[0] != n_rows:
        raise ValueError(f"afm_predict: out has {out.shape[0]} entries, X has {n_rows} rows")
    if n_rows == 0:
        return 0
    M, k = params.V.shape
    t = params.W.shape[0]
    check_indptr("afm_predict", X[0], X[1].shape[0])
    indptr, indices, values = read_only_args(*known_ids(X, M))
    rows, nnz, pairs = predict_chunks(indptr, k)
    kept = _predict_cache.take((rows, nnz, pairs, M, k, t, params.V.dtype))
    try:
        with numba_threads(n_threads):
            return int(_predict_kernel(indptr, indices, values, params.V, params.w,
                                       params.W, params.dense, bool(attention),
                                       int(activation), rows, kept[1], out,
                                       numba.get_num_threads()))
    finally:
        _predict_cache.give_back(kept)


@njit(**_PAR)
def _explain_kernel(indptr, indices, values, V, w, W, dense, attention, activation,
                    pair_indptr, out_cap, i_out, j_out, weight_out, contrib_out, nb):
    """Per-pair explanations of every row of X, row by row (the pairs of every row are
    written out, so nothing is shared between rows). Returns the number of rows whose
    pair count disagrees with pair_indptr (those rows are left unwritten). FTZ and DAZ
    are set on the calling thread and per row; nb is the thread count."""
    start_threads(nb)
    csr0 = ftz_enter()
    n_rows = indptr.shape[0] - 1
    k = V.shape[1]
    t = W.shape[0]
    nmax = 0
    for r in range(n_rows):
        n = indptr[r + 1] - indptr[r]
        if n > nmax:
            nmax = n
    pmax = nmax * (nmax - 1) // 2
    WT = np.empty((k, t), dtype=W.dtype)
    for c in range(k):
        for j in range(t):
            WT[c, j] = W[j, c]
    nth = numba.config.NUMBA_NUM_THREADS
    # Per-thread scratch, allocated once per call.
    VXb = np.empty((nth, max(nmax, 1), k), dtype=V.dtype)
    feat_b = np.empty((nth, max(nmax, 1)), dtype=np.int64)
    Eb = np.empty((nth, _PBLK, k), dtype=V.dtype)
    Ub = np.empty((nth, _PBLK, t), dtype=V.dtype)
    Sb = np.empty((nth, max(pmax, 1)), dtype=np.float64)
    bad = np.zeros(n_rows, dtype=np.int64)
    for r in prange(n_rows):
        csr = ftz_enter()
        tid = numba.get_thread_id()
        vx = VXb[tid]
        feat = feat_b[tid]
        Eblk = Eb[tid]
        Ublk = Ub[tid]
        sbuf = Sb[tid]
        lin, n = _row_vx(indices, values, indptr[r], indptr[r + 1], V, w, vx, feat, 0)
        npairs = n * (n - 1) // 2
        if (pair_indptr[r + 1] - pair_indptr[r] != npairs
                or pair_indptr[r] < 0 or pair_indptr[r + 1] > out_cap):
            bad[r] = 1
            ftz_leave(csr)
            continue
        if attention and npairs > 0:
            # Logits, in blocks of _PBLK pairs.
            cnt = 0
            base = 0
            for p in range(n):
                for q in range(p + 1, n):
                    eb = Eblk[cnt]
                    for c in range(k):
                        eb[c] = vx[p, c] * vx[q, c]
                    cnt += 1
                    if cnt == _PBLK or (p == n - 2 and q == n - 1):
                        for i in range(cnt):
                            for j in range(t):
                                Ublk[i, j] = dense[1 + k + j]
                        _mm_acc(Eblk, WT, Ublk, cnt, k, t)
                        _activate_rows(activation, Ublk, cnt, t)
                        _logits(Ublk, cnt, t, dense, 1 + k + t, sbuf, base)
                        base += cnt
                        cnt = 0
            smax = -np.inf
            for i in range(npairs):
                if sbuf[i] > smax:
                    smax = sbuf[i]
            tot = 0.0
            for i in range(npairs):
                e = math.exp(sbuf[i] - smax)
                sbuf[i] = e
                tot += e
            for i in range(npairs):
                sbuf[i] /= tot
        P = 0
        for p in range(n):
            for q in range(p + 1, n):
                a = sbuf[P] if attention else 1.0
                pe = 0.0
                for c in range(k):
                    pe += np.float64(dense[1 + c]) * np.float64(vx[p, c] * vx[q, c])
                o = pair_indptr[r] + P
                i_out[o] = feat[p]
                j_out[o] = feat[q]
                weight_out[o] = a
                contrib_out[o] = a * pe
                P += 1
        ftz_leave(csr)
    nbad = 0
    for r in range(n_rows):
        nbad += bad[r]
    ftz_leave(csr0)
    return nbad


def afm_explain(X, params, attention, activation, n_threads, pair_indptr, i_out, j_out,
                weight_out, contribution_out):
    """Per-pair attention weights and contributions of every row of X (see the module
    docstring); ``pair_indptr`` must count n (n - 1) / 2 pairs per row, n = the row's
    ids < M.

    Example: ``afm_explain(X, params, 1, RELU, 2, indptr, i, j, weight, contribution)``.
    """
    indptr, indices, values = read_only_args(*X)
    check_indptr("afm_explain", indptr, indices.shape[0])
    n_rows = indptr.shape[0] - 1
    total = int(pair_indptr[-1]) if pair_indptr.shape[0] else 0
    cap = min(a.shape[0] for a in (i_out, j_out, weight_out, contribution_out))
    if pair_indptr.shape[0] != n_rows + 1 or pair_indptr[0] != 0 or cap < total:
        raise ValueError(
            f"afm_explain: pair_indptr must have n_rows + 1 = {n_rows + 1} entries starting "
            f"at 0 and the outputs at least pair_indptr[-1] = {total} entries (got "
            f"{pair_indptr.shape[0]} and {cap})"
        )
    with numba_threads(n_threads):
        nbad = _explain_kernel(indptr, indices, values, params.V, params.w, params.W,
                               params.dense, bool(attention), int(activation),
                               pair_indptr, cap, i_out, j_out, weight_out, contribution_out,
                               numba.get_num_threads())
    if nbad:
        raise ValueError(
            f"afm_explain: pair_indptr disagrees with the data in {nbad} rows; each row "
            "needs n (n - 1) / 2 pairs, n = its number of ids < n_features"
        )
