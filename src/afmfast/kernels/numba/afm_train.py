"""Training half of the Numba AFM backend (``afmfast.kernels.numba.afm`` is the backend
module: it adds ``afm_infer``'s predict and explain). The contract is the AFM section of
``afmfast.kernels.api``; the float64 truth is ``afmfast.kernels.reference.afm_*``.

Functions
    afm_workspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                  attention_size, dtype) -> AFMWorkspace
        Scratch for one fit, allocated once (not thread safe: one workspace per
        concurrently running fit). ``max_batch_pairs`` bounds the sum over a batch's rows
        of n (n - 1) / 2 (the distinct-pair scratch is sized by it too). The product
        scratch (VX, E, U, Z, hbuf, cW, WT) is in ``dtype``; the other floats float64.
    afm_step(X, y, rows, params, state, cfg, ws) -> float
        X = (indptr int64 (N+1,), indices int32 (nnz,), values DTYPE (nnz,)), y DTYPE (N,),
        rows int64 (B,). Mutates params.V/w (touched rows only, unless cfg.freeze_fm),
        params.W (only with cfg.attention), params.dense ([w0, p, b, h]: w0 not with
        freeze_fm, b and h only with attention), the matching entries of ``state``, and
        the workspace. Returns the batch loss before the update. ValueError (nothing
        modified) for an empty batch, a row or feature id out of range, a batch larger
        than the workspace, or an invalid keep/optimizer/activation in cfg.
    afm_predict(X, params, attention, activation, n_threads, out) -> int
        out DTYPE (N,) receives raw scores (no dropout); ids outside [0, M) form no
        pairs. Chunks of rows through the step's forward pass (steps 1 and 2 below);
        returns the number of distinct pairs evaluated.
    afm_explain(X, params, attention, activation, n_threads, pair_indptr, i_out, j_out,
                weight_out, contribution_out)
        pair_indptr int64 (N+1,) from the count n of each row's ids < M (n (n-1)/2 pairs);
        fills i_out/j_out (int64 feature ids, p < q in row order), weight_out (a_pq, 1 with
        attention off) and contribution_out (a_pq p . e_pq).
DTYPE is float32 or float64 (one compiled specialisation each).

Precision: the attention products (E W^T, (h act'(u)) W, G^T E) run in DTYPE, so float32
models use float32 SIMD for the hot spot; logits, softmax, residuals, pooled vector,
every sum across pairs or rows that is not part of a product, the optimiser and the V
gradients run in float64 and are rounded once on store. dW is summed per chunk in DTYPE
and across chunks in float64.

Step layout (deterministic for any thread count):
  1. per-row counts of nonzeros and pairs (prefix sums), the batch's nonzeros gathered
     in batch order ("occurrences", prange over rows) and grouped by feature (stable
     counting sort): ``numba.common.batch_offsets/gather_batch/group_by_feature``;
     then v x of every occurrence (prange over rows);
  2. with attention, the distinct pairs: a pair's logit depends only on (v_p x_p,
     v_q x_q) (docs/design.md), and a batch of one-hot rows repeats most of its
     pairs. ``_distinct_pairs`` (serial) numbers them; prange over chunks of distinct
     pairs computes e, act(e W^T + b), the logit h . act and Z = (h act'(u)) W once each;
  3. the batch's rows are cut into at most ``n_chunks`` chunks of consecutive rows with
     about equal work (the cut depends only on the batch); prange over chunks, rows in
     order: softmax of the row's logits, dropout masks, y_hat, residual, dg, da, the
     logit gradients ds (kept per pair), de = a' dg + ds Z and dvx per occurrence; each
     chunk accumulates sum r^2, dw0 and dp;
  4. ds summed per distinct pair in pair order; prange over chunks of distinct pairs:
     G = ds h act'(u), dh, db and the chunk's dW = G^T E;
  5. chunk partials summed in chunk order (prange over the t rows of W); prange over the
     unique touched features: V/w gradients summed over occurrences in batch order,
     + l2 v, optimiser; then the dense parameters and W.
"""
import math
from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from afmfast.kernels.numba.common import (
    BAD_NNZ,
    BAD_PAIRS,
    batch_offsets,
    block_bounds,
    check_keep,
    check_optimizer,
    effective_lr,
    ftz_enter,
    ftz_leave,
    gather_batch,
    group_by_feature,
    keep_unit,
    NO_MARKS,
    opt_row,
    raise_batch_error,
    read_only_args,
    row_data_loss,
    row_key,
    run_step_kernel,
    step_key,
    steps_from,
    update_feature,
)
from afmfast.kernels.api import (
    ACTIVATION_CODES,
    IDENTITY,
    RELU,
    SIGMOID,
    TANH,
    dropout_threshold,
)

__all__ = ["AFMWorkspace", "afm_workspace", "afm_step", "afm_steps"]

AFMWorkspace = namedtuple(
    "AFMWorkspace",
    "slot uniq ustart ucur occ_list nzoff pairoff occ_feat occ_x occ_b VX DVX LIN atom arep "
    "amark acnt plo phi po qo plist pid drep E U Z S DS A SC0 D R WT ch_lo dch_lo cW cvec gW "
    "gdense ul2 tbuf hbuf tacc touched",
)
AFMWorkspace.__doc__ = """Scratch of ``afm_step`` (see the module docstring).
slot int32 (M,) stays -1 between steps; uniq/ustart/ucur/occ_list: unique touched
features and their occurrences (indices into the occ_* arrays) in batch order;
nzoff/pairoff int64 (B+1,): prefix sums of the rows' nonzeros and pairs; occ_feat, occ_x,
occ_b: feature, value and batch row of each occurrence; VX (nnz, k) DTYPE: v x;
DVX (nnz, k) float64: gradient of V from each occurrence; LIN (B,): sum w x;
atom/arep/amark/acnt (nnz,): atoms (feature, value) of the occurrences and the pair
buckets; plo/phi/po/qo/plist/pid (pairs,): pair keys, occurrences, bucket order and
distinct-pair id; drep (pairs, 2): occurrences of each distinct pair; per distinct pair
E (k) DTYPE: e, U (t) DTYPE: act(e W^T + b), Z (k) DTYPE: (h act'(u)) W, S: logit,
DS: summed logit gradient; per pair A, SC0, D float64: attention weights, attention
dropout scales, da then ds; R (B,): residuals; WT (k, t) DTYPE: W transposed;
ch_lo/dch_lo (n_chunks+1,): bounds of the row chunks and distinct-pair chunks;
cW (n_chunks, t, k) DTYPE and cvec (n_chunks, 2+k+2t) float64 = [sum r^2, dw0, dp, db,
dh]: chunk partials; gW (t, k), gdense (1+k+2t,): gradients; ul2: ||v||^2 per touched
row; tbuf (n_chunks, 3, kmax) float64 and hbuf (n_chunks, _PBLK, t) DTYPE: per-chunk
scratch; tacc (threads, kmax): float64 vectors; touched uint8 (M,) or (0,): marks of the
touched features (``track_touched``)."""

# Fixed number of chunks a batch is cut into (independent of the thread count, so the
# summation order is too). 64 keeps every thread busy up to ~16 threads.
_N_CHUNKS = 64
# Pairs per block in predict/explain (per-thread scratch of _PBLK x max(k, t)) and of
# the distinct-pair passes of the step (per-chunk scratch hbuf).
_PBLK = 64

# 'contract' lets LLVM fuse a*b+c into FMA: rounding then depends on the compiled code
# only, never on the thread count.
_FM = {"contract"}
# error_model="numpy": no zero-division checks, so divisions vectorise (numba.common).
_SER = dict(fastmath=_FM, cache=True, nogil=True, error_model="numpy")
_PAR = dict(_SER, parallel=True)
# Short float64 dot products (logits, da) may be reassociated so that they vectorise: the
# order is then fixed by the compiled code, still independent of the thread count.
_DOT = dict(_SER, fastmath={"contract", "reassoc"})


def afm_workspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                  attention_size, dtype):
    """Allocate the scratch of ``afm_step`` for batches of at most ``batch_size`` rows,
    ``max_batch_nnz`` nonzeros and ``max_batch_pairs`` pairs, M = ``n_features``,
    k = ``n_factors``, t = ``attention_size``, parameters of ``dtype``.

    Example: ``ws = afm_workspace(4096, 40960, 184320, 5382, 16, 16, np.float32)``.
    """
    B, cap, pcap = int(batch_size), int(max_batch_nnz), int(max_batch_pairs)
    M, k, t = int(n_features), int(n_factors), int(attention_size)
    if B < 1 or cap < 0 or pcap < 0 or M < 1 or k < 1 or t < 1:
        raise ValueError(
            "afm_workspace needs batch_size >= 1, max_batch_nnz >= 0, max_batch_pairs >= 0, "
            "n_features >= 1, n_factors >= 1 and attention_size >= 1; got "
            f"{B}, {cap}, {pcap}, {M}, {k}, {t}"
        )
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    cap1, pcap1 = max(cap, 1), max(pcap, 1)
    cap_u = max(1, min(cap, M))
    nch = max(1, min(B, _N_CHUNKS))
    kmax = (max(k, t) + 7) // 8 * 8 + 8  # padded: no two threads share a cache line
    f8 = np.float64
    return AFMWorkspace(
        slot=np.full(M, -1, dtype=np.int32),
        uniq=np.zeros(cap_u, dtype=np.int32),
        ustart=np.zeros(cap_u + 1, dtype=np.int64),
        ucur=np.zeros(cap_u, dtype=np.int64),
        occ_list=np.zeros(cap1, dtype=np.int64),
        nzoff=np.zeros(B + 1, dtype=np.int64),
        pairoff=np.zeros(B + 1, dtype=np.int64),
        occ_feat=np.zeros(cap1, dtype=np.int32),
        occ_x=np.zeros(cap1, dtype=f8),
        occ_b=np.zeros(cap1, dtype=np.int32),
        VX=np.zeros((cap1, k), dtype=dtype),
        DVX=np.zeros((cap1, k), dtype=f8),
        LIN=np.zeros(B, dtype=f8),
        atom=np.zeros(cap1, dtype=np.int32),
        arep=np.zeros(cap1, dtype=np.int32),
        amark=np.zeros(cap1, dtype=np.int64),
        acnt=np.zeros(cap1 + 1, dtype=np.int64),
        plo=np.zeros(pcap1, dtype=np.int32),
        phi=np.zeros(pcap1, dtype=np.int32),
        po=np.zeros(pcap1, dtype=np.int32),
        qo=np.zeros(pcap1, dtype=np.int32),
        plist=np.zeros(pcap1, dtype=np.int32),
        pid=np.zeros(pcap1, dtype=np.int32),
        drep=np.zeros((pcap1, 2), dtype=np.int32),
        E=np.zeros((pcap1, k), dtype=dtype),
        U=np.zeros((pcap1, t), dtype=dtype),
        Z=np.zeros((pcap1, k), dtype=dtype),
        S=np.zeros(pcap1, dtype=f8),
        DS=np.zeros(pcap1, dtype=f8),
        A=np.zeros(pcap1, dtype=f8),
        SC0=np.zeros(pcap1, dtype=f8),
        D=np.zeros(pcap1, dtype=f8),
        R=np.zeros(B, dtype=f8),
        WT=np.zeros((k, t), dtype=dtype),
        ch_lo=np.zeros(nch + 1, dtype=np.int64),
        dch_lo=np.zeros(nch + 1, dtype=np.int64),
        cW=np.zeros((nch, t, k), dtype=dtype),
        cvec=np.zeros((nch, 2 + k + 2 * t), dtype=f8),
        gW=np.zeros((t, k), dtype=f8),
        gdense=np.zeros(1 + k + 2 * t, dtype=f8),
        ul2=np.zeros(cap_u, dtype=f8),
        tbuf=np.zeros((nch, 3, kmax), dtype=f8),
        hbuf=np.zeros((nch, _PBLK, t), dtype=dtype),
        tacc=np.zeros((numba.config.NUMBA_NUM_THREADS, kmax), dtype=f8),
        touched=NO_MARKS,
    )


# ----------------------------------------------------------------------- small helpers

@njit(**_SER)
def _activate_rows(code, H, R, t):
    """H[:R, :t] = act(H[:R, :t]) in place (computed in float64, stored in H's dtype).
    The activation branch sits outside the loops so that ReLU and identity vectorise."""
    if code == RELU:
        for i in range(R):
            hi = H[i]
            for j in range(t):
                hi[j] = max(hi[j], 0.0)
    elif code == SIGMOID:
        for i in range(R):
            hi = H[i]
            for j in range(t):
                hi[j] = 1.0 / (1.0 + math.exp(-np.float64(hi[j])))
    elif code == TANH:
        for i in range(R):
            hi = H[i]
            for j in range(t):
                hi[j] = math.tanh(np.float64(hi[j]))
    # IDENTITY: nothing to do (codes are validated upstream)


@njit(**_SER)
def _row_vx(feat, xs, lo, hi, V, w, VX, fout, base):
    """For the nonzeros lo..hi-1 of one row with ids in [0, M), in order (n of them):
    VX[base + i] = v x (storage dtype, product in float64), fout[base + i] = id.
    Returns (sum w x in float64, n). Empty ``xs``: every value is 1."""
    M = V.shape[0]
    k = V.shape[1]
    implied = xs.shape[0] == 0
    n = 0
    lin = 0.0
    for p in range(lo, hi):
        j = feat[p]
        if j < 0 or j >= M:
            continue
        x = 1.0 if implied else np.float64(xs[p])
        lin += np.float64(w[j]) * x
        vj = V[j]
        vxn = VX[base + n]
        for c in range(k):
            vxn[c] = np.float64(vj[c]) * x
        fout[base + n] = j
        n += 1
    return lin, n


@njit(**_DOT)
def _pair_dot(vp, vq, d, n):
    """sum_c (vp[c] vq[c]) d[c] in float64 (the product vp vq in the storage dtype, as
    the pair's e), c < n; reassociated so that it vectorises."""
    acc = 0.0
    for c in range(n):
        acc += np.float64(vp[c] * vq[c]) * d[c]
    return acc


@njit(**_DOT)
def _logits(H, R, t, dense, hoff, out, ooff):
    """out[ooff + i] = h . H[i] (float64, j in order) for i < R; h = dense[hoff:hoff+t]."""
    for i in range(R):
        hi = H[i]
        acc = 0.0
        for j in range(t):
            acc += np.float64(dense[hoff + j]) * np.float64(hi[j])
        out[ooff + i] = acc


@njit(**_SER)
def _mm_acc(A, B, C, R, K, N):
    """C[:R, :N] += A[:R, :K] @ B[:K, :N]. B and C rows must be contiguous (A may be any
    strided view, e.g. a transpose). Register blocked 4 rows x 4 inner; the innermost
    loop runs over contiguous N and is vectorised by LLVM. The summation order of every
    entry is fixed by (R, K, N): K in groups of 4, each group added to C."""
    r = 0
    while r + 4 <= R:
        c0 = C[r]
        c1 = C[r + 1]
        c2 = C[r + 2]
        c3 = C[r + 3]
        m = 0
        while m + 4 <= K:
            b0 = B[m]
            b1 = B[m + 1]
            b2 = B[m + 2]
            b3 = B[m + 3]
            a00, a01, a02, a03 = A[r, m], A[r, m + 1], A[r, m + 2], A[r, m + 3]
            a10, a11, a12, a13 = A[r + 1, m], A[r + 1, m + 1], A[r + 1, m + 2], A[r + 1, m + 3]
            a20, a21, a22, a23 = A[r + 2, m], A[r + 2, m + 1], A[r + 2, m + 2], A[r + 2, m + 3]
            a30, a31, a32, a33 = A[r + 3, m], A[r + 3, m + 1], A[r + 3, m + 2], A[r + 3, m + 3]
            for n in range(N):
                x0 = b0[n]
                x1 = b1[n]
                x2 = b2[n]
                x3 = b3[n]
                c0[n] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                c1[n] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                c2[n] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                c3[n] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
            m += 4
        while m < K:
            b0 = B[m]
            a0, a1, a2, a3 = A[r, m], A[r + 1, m], A[r + 2, m], A[r + 3, m]
            for n in range(N):
                x0 = b0[n]
                c0[n] += a0 * x0
                c1[n] += a1 * x0
                c2[n] += a2 * x0
                c3[n] += a3 * x0
            m += 1
        r += 4
    while r < R:
        c0 = C[r]
        m = 0
        while m + 4 <= K:
            b0 = B[m]
            b1 = B[m + 1]
            b2 = B[m + 2]
            b3 = B[m + 3]
            a00, a01, a02, a03 = A[r, m], A[r, m + 1], A[r, m + 2], A[r, m + 3]
            for n in range(N):
                c0[n] += a00 * b0[n] + a01 * b1[n] + a02 * b2[n] + a03 * b3[n]
            m += 4
        while m < K:
            b0 = B[m]
            a0 = A[r, m]
            for n in range(N):
                c0[n] += a0 * b0[n]
            m += 1
        r += 1


# ----------------------------------------------------------------------------- step

@njit(**_SER)
def _distinct_pairs(nzoff, occ_x, nU, ustart, occ_list, atom, arep, amark, acnt,
                    plo, phi, po, qo, plist, pid, drep, B):
    """Number the distinct pairs of the batch (serial; depends only on the batch).

    A pair's attention logit depends only on (v_p x_p, v_q x_q) (docs/design.md), so
    it is computed once per distinct pair. Occurrences of one feature with one value
    share an "atom" (the first 8 values of a feature are looked up, a later new value
    gets a new atom: duplicates only cost speed). Pair P (p < q in row order) has the
    key (a_lo, a_hi) of its atoms; the pairs are bucketed by a_lo (counting sort) and
    numbered within a bucket by first appearance of a_hi. Writes pid (pairs,) and
    drep (distinct, 2) = the two occurrences of the distinct pair's first pair; returns
    the number of distinct pairs."""
    nA = 0
    for u in range(nU):
        first = nA
        for q in range(ustart[u], ustart[u + 1]):
            o = occ_list[q]
            x = occ_x[o]
            a = -1
            for c in range(first, min(nA, first + 8)):
                if occ_x[arep[c]] == x:
                    a = c
                    break
            if a < 0:
                a = nA
                arep[a] = o
                nA += 1
            atom[o] = a
    for a in range(nA + 1):
        acnt[a] = 0
    P = 0
    for b in range(B):
        o0 = nzoff[b]
        n = nzoff[b + 1] - o0
        for p in range(n):
            ap = atom[o0 + p]
            for q in range(p + 1, n):
                aq = atom[o0 + q]
                lo = min(ap, aq)
                plo[P] = lo
                phi[P] = max(ap, aq)
                po[P] = o0 + p
                qo[P] = o0 + q
                acnt[lo + 1] += 1
                P += 1
    for a in range(nA):
        acnt[a + 1] += acnt[a]
        amark[a] = acnt[a]  # fill cursor of bucket a
    for i in range(P):
        lo = plo[i]
        plist[amark[lo]] = i
        amark[lo] += 1
    for a in range(nA):
        amark[a] = -1
    nD = 0
    for a in range(nA):
        for j in range(acnt[a], acnt[a + 1]):
            i = plist[j]
            h = phi[i]
            d = amark[h]
            if d < 0:
                d = nD
                amark[h] = d
                drep[d, 0] = po[i]
                drep[d, 1] = qo[i]
                nD += 1
            pid[i] = d
        for j in range(acnt[a], acnt[a + 1]):
            amark[phi[plist[j]]] = -1
    return nD


@njit(**_SER)
def _pair_offsets(nzoff, B, pairoff):
    """pairoff[b] = the first pair of batch row b (n (n - 1) / 2 pairs a row of n
    nonzeros, from nzoff), B + 1 entries; returns the batch's pairs."""
    npairs = 0
    for b in range(B):
        pairoff[b] = npairs
        n = nzoff[b + 1] - nzoff[b]
        npairs += n * (n - 1) // 2
    pairoff[B] = npairs
    return npairs


@njit(**_SER)
def _even_cuts(n, nch, cuts):
    """cuts[0..nch] = bounds of nch chunks of about n / nch items each."""
    for c in range(nch + 1):
        cuts[c] = (n * c) // nch


@njit(**_SER)
def _act_grad_rows(code, Hsrc, R, t, dense, hoff, out):
    """out[i, j] = h_j act'(u_ij) with act' from act(u) = Hsrc[i, j] (ReLU: act > 0,
    sigmoid: a (1 - a), tanh: 1 - a^2, identity: 1); h = dense[hoff:hoff+t]."""
    for i in range(R):
        hs = Hsrc[i]
        oi = out[i]
        if code == RELU:
            for j in range(t):
                oi[j] = dense[hoff + j] if hs[j] > 0.0 else 0.0
        elif code == SIGMOID:
            for j in range(t):
                a = np.float64(hs[j])
                oi[j] = np.float64(dense[hoff + j]) * (a * (1.0 - a))
        elif code == TANH:
            for j in range(t):
                a = np.float64(hs[j])
                oi[j] = np.float64(dense[hoff + j]) * (1.0 - a * a)
        else:
            for j in range(t):
                oi[j] = dense[hoff + j]


@njit(**_SER)
def _pair_logits(d0, d1, drep, VX, WT, dense, activation, E, U, S):
    """Distinct pairs d0..d1-1, in rows 0..d1-d0-1 of E and U: E = e, U = act(e W^T + b),
    and S[d] = h . U (float64)."""
    k = WT.shape[0]
    t = WT.shape[1]
    for d in range(d0, d1):
        vp = VX[drep[d, 0]]
        vq = VX[drep[d, 1]]
        ed = E[d - d0]
        for c in range(k):
            ed[c] = vp[c] * vq[c]
        ud = U[d - d0]
        for j in range(t):
            ud[j] = dense[1 + k + j]
    n = d1 - d0
    _mm_acc(E, WT, U, n, k, t)
    _activate_rows(activation, U, n, t)
    _logits(U, n, t, dense, 1 + k + t, S, d0)


@njit(**_SER)
def _pair_forward(d0, d1, drep, VX, W, WT, dense, activation, E, U, Z, S, hbuf):
    """Distinct pairs d0..d1-1: E = e, U = act(e W^T + b), S = h . U (float64) and
    Z = (h * act'(u)) W (k,) in blocks of _PBLK pairs (hbuf: _PBLK x t scratch)."""
    k = W.shape[1]
    t = W.shape[0]
    _pair_logits(d0, d1, drep, VX, WT, dense, activation, E[d0:d1], U[d0:d1], S)
    for d in range(d0, d1):
        zd = Z[d]
        for c in range(k):
            zd[c] = 0.0
    for b0 in range(d0, d1, _PBLK):
        m = min(_PBLK, d1 - b0)
        _act_grad_rows(activation, U[b0:b0 + m], m, t, dense, 1 + k + t, hbuf)
        _mm_acc(hbuf, W, Z[b0:b0 + m], m, t, k)


@njit(**_SER)
def _pair_backward(d0, d1, DS, U, E, activation, dense, cw, cv, hbuf):
    """Distinct pairs d0..d1-1 with summed logit gradients DS: dh += DS act(u),
    G = DS h act'(u), db += G, cw += G^T E (in blocks of _PBLK pairs)."""
    k = E.shape[1]
    t = U.shape[1]
    db = cv[2 + k:2 + k + t]
    dh = cv[2 + k + t:2 + k + 2 * t]
    for b0 in range(d0, d1, _PBLK):
        m = min(_PBLK, d1 - b0)
        _act_grad_rows(activation, U[b0:b0 + m], m, t, dense, 1 + k + t, hbuf)
        for i in range(m):
            ds = DS[b0 + i]
            ui = U[b0 + i]
            hi = hbuf[i]
            for j in range(t):
                dh[j] += ds * np.float64(ui[j])
                g = ds * np.float64(hi[j])
                db[j] += g
                hi[j] = g
        _mm_acc(hbuf[:m].T, E[b0:b0 + m], cw, t, m, k)


@njit(**_SER)
def _row_softmax(S, pid, P0, npairs, A):
    """A[P0:P0 + npairs] = softmax of the row's pair logits S[pid[P]] (max subtracted)."""
    smax = -np.inf
    for i in range(npairs):
        a = S[pid[P0 + i]]
        A[P0 + i] = a
        if a > smax:
            smax = a
    tot = 0.0
    for i in range(npairs):
        e = math.exp(A[P0 + i] - smax)
        A[P0 + i] = e
        tot += e
    for i in range(npairs):
        A[P0 + i] /= tot


@njit(**_SER)
def _pool_pairs(VX, o0, n, A, SC, scaled, P0, g):
    """g += sum over the row's pairs P (from P0) of a e_P (float64, e in the storage
    dtype), a = A[P] * SC[P] when scaled (dropout), else A[P]."""
    k = VX.shape[1]
    P = P0
    for p in range(n):
        vp = VX[o0 + p]
        for q in range(p + 1, n):
            vq = VX[o0 + q]
            ap = A[P] * SC[P] if scaled else A[P]
            for c in range(k):
                g[c] += ap * np.float64(vp[c] * vq[c])
            P += 1


@njit(**_SER)
def _pool_plain(VX, o0, n, g, s):
    """Attention off: g = sum over pairs e_pq = ((sum vx)^2 - sum vx^2) / 2, O(n k)
    (g zero on entry); s = sum vx."""
    k = VX.shape[1]
    for c in range(k):
        s[c] = 0.0
    for i in range(n):
        vxo = VX[o0 + i]
        for c in range(k):
            v = np.float64(vxo[c])
            s[c] += v
            g[c] += v * v
    for c in range(k):
        g[c] = 0.5 * (s[c] * s[c] - g[c])


@njit(**_SER)
def _train_row(b, ch, rows, y, nzoff, pairoff, occ_x, VX, DVX, LIN, pid, S, Z, dense,
               A, SC0, D, R, cvec, tb, attention, freeze_fm, keep0, thr0, skey1, keep1,
               thr1, skey2, loss_code):
    """Forward and backward of batch row b (chunk ch) given v x (VX), the linear term
    (LIN) and, with attention, the distinct pairs' logits S and Z = (h act'(u)) W:
    writes R[b], the logit gradients D of its pairs (attention), DVX of its
    occurrences (unless freeze_fm), and accumulates the chunk's data loss, dw0 and dp."""
    k = VX.shape[1]
    row = rows[b]
    o0 = nzoff[b]
    n = nzoff[b + 1] - o0
    P0 = pairoff[b]
    npairs = pairoff[b + 1] - P0
    g = tb[0]
    dg = tb[1]
    s = tb[2]
    cv = cvec[ch]
    for c in range(k):
        g[c] = 0.0

    use_pairs = attention and npairs > 0
    if use_pairs:
        _row_softmax(S, pid, P0, npairs, A)
        rkey1 = row_key(skey1, np.uint64(row))
        for i in range(npairs):
            sc = 1.0
            if keep0 < 1.0:
                sc = 1.0 / keep0 if keep_unit(rkey1, i, thr0) else 0.0
            SC0[P0 + i] = sc
        _pool_pairs(VX, o0, n, A, SC0, True, P0, g)
    elif not attention and n > 0:
        _pool_plain(VX, o0, n, g, s)

    # Pooled dropout, output, residual; dg holds the pooled scale until overwritten.
    rkey2 = row_key(skey2, np.uint64(row))
    dot = 0.0
    for c in range(k):
        sc = 1.0
        if keep1 < 1.0:
            sc = 1.0 / keep1 if keep_unit(rkey2, c, thr1) else 0.0
        dg[c] = sc
        dot += np.float64(dense[1 + c]) * (g[c] * sc)
    row_loss, res = row_data_loss(loss_code, np.float64(dense[0]) + LIN[b] + dot,
                                  np.float64(y[row]))
    R[b] = res
    cv[0] += row_loss
    cv[1] += res
    for c in range(k):
        cv[2 + c] += res * (g[c] * dg[c])
        dg[c] = res * np.float64(dense[1 + c]) * dg[c]

    if use_pairs:
        sad = 0.0
        P = P0
        for p in range(n):
            vp = VX[o0 + p]
            for q in range(p + 1, n):
                vq = VX[o0 + q]
                da = _pair_dot(vp, vq, dg, k) * SC0[P]
                D[P] = da
                sad += A[P] * da
                P += 1
        for i in range(npairs):
            D[P0 + i] = A[P0 + i] * (D[P0 + i] - sad)  # ds
        if not freeze_fm:
            # de = a' dg + ds Z; dvx_p += de vx_q, dvx_q += de vx_p.
            for i in range(n):
                di = DVX[o0 + i]
                for c in range(k):
                    di[c] = 0.0
            P = P0
            for p in range(n):
                vp = VX[o0 + p]
                dp_ = DVX[o0 + p]
                for q in range(p + 1, n):
                    vq = VX[o0 + q]
                    dq = DVX[o0 + q]
                    ap = A[P] * SC0[P]
                    ds = D[P]
                    zd = Z[pid[P]]
                    for c in range(k):
                        de = ap * dg[c] + ds * np.float64(zd[c])
                        dp_[c] += de * np.float64(vq[c])
                        dq[c] += de * np.float64(vp[c])
                    P += 1
            for i in range(n):
                x = occ_x[o0 + i]
                di = DVX[o0 + i]
                for c in range(k):
                    di[c] *= x
    elif not freeze_fm:
        if not attention:
            # dvx_p = dg * (sum_q vx_q - vx_p)
            for i in range(n):
                x = occ_x[o0 + i]
                vxo = VX[o0 + i]
                di = DVX[o0 + i]
                for c in range(k):
                    di[c] = dg[c] * (s[c] - np.float64(vxo[c])) * x
        else:  # fewer than 2 nonzeros: no pairs, no gradient through V
            for i in range(n):
                di = DVX[o0 + i]
                for c in range(k):
                    di[c] = 0.0


@njit(**_PAR)
def _afm_step_kernel(indptr, indices, values, y, rows, V, w, W, dense, sV, sw, sW, sd,
                     lr, l2, l2a, keep0, thr0, keep1, thr1, optimizer, attention,
                     activation, freeze_fm, useed, ustep, step, loss_code, ws, nb):
    """The whole step; returns (loss, status), status < 0 (``numba.common.BAD_*``) when
    the batch is invalid or does not fit the workspace (nothing but the workspace is
    modified then). Every prange body sets FTZ and DAZ first (``numba.common.ftz_enter``):
    once per iteration over chunks or rows of W, once per thread block over rows and
    features (nb blocks: the thread count)."""
    (slot, uniq, ustart, ucur, occ_list, nzoff, pairoff, occ_feat, occ_x, occ_b, VX, DVX,
     LIN, atom, arep, amark, acnt, plo, phi, po, qo, plist, pid, drep, E, U, Z, S, DS,
     A, SC0, D, R, WT, ch_lo, dch_lo, cW, cvec, gW, gdense, ul2, tbuf, hbuf, tacc,
     touched) = ws
    B = rows.shape[0]
    M = V.shape[0]
    k = V.shape[1]
    t = W.shape[0]

    nnz = batch_offsets(indptr, rows, nzoff)
    if nnz < 0:
        return np.nan, nnz
    npairs = _pair_offsets(nzoff, B, pairoff)
    if nnz > occ_feat.shape[0]:
        return np.nan, BAD_NNZ
    if attention and npairs > E.shape[0]:
        return np.nan, BAD_PAIRS
    gather_batch(indptr, indices, values, rows, nzoff, M, occ_feat, occ_x, occ_b, nb)
    nU = group_by_feature(occ_feat, nnz, slot, uniq, ustart, ucur, occ_list, touched)
    if nU < 0:
        return np.nan, nU

    # v x of every occurrence and the linear term of every row.
    for blk in prange(nb):
        csr = ftz_enter()
        b0, b1 = block_bounds(B, nb, blk)
        for b in range(b0, b1):
            LIN[b], _ = _row_vx(occ_feat, occ_x, nzoff[b], nzoff[b + 1], V, w, VX,
                                occ_feat, nzoff[b])
        ftz_leave(csr)

    nch = min(cW.shape[0], B)
    for ch in range(cvec.shape[0]):
        for i in range(cvec.shape[1]):
            cvec[ch, i] = 0.0
    # Attention MLP once per distinct pair (forward: logits S and Z = (h act'(u)) W).
    nD = 0
    ndch = 0
    if attention and npairs > 0:
        for c in prange(k):
            csr = ftz_enter()
            for j in range(t):
                WT[c, j] = W[j, c]
            ftz_leave(csr)
        nD = _distinct_pairs(nzoff, occ_x, nU, ustart, occ_list, atom, arep, amark, acnt,
                             plo, phi, po, qo, plist, pid, drep, B)
        ndch = min(nch, nD)
        _even_cuts(nD, ndch, dch_lo)
        for ch in prange(ndch):
            csr = ftz_enter()
            _pair_forward(dch_lo[ch], dch_lo[ch + 1], drep, VX, W, WT, dense, activation,
                          E, U, Z, S, hbuf[ch])
            ftz_leave(csr)

    # Rows: chunks of consecutive rows with about equal work (pairs + nonzeros + 1).
    total = pairoff[B] + nzoff[B] + B
    ch_lo[0] = 0
    bb = 0
    for c in range(1, nch):
        while bb < B and (pairoff[bb] + nzoff[bb] + bb) * nch < c * total:
            bb += 1
        ch_lo[c] = bb
    ch_lo[nch] = B
    skey1 = step_key(useed, np.uint64(1), ustep)
    skey2 = step_key(useed, np.uint64(2), ustep)
    for ch in prange(nch):
        csr = ftz_enter()
        tb = tbuf[ch]
        for b in range(ch_lo[ch], ch_lo[ch + 1]):
            _train_row(b, ch, rows, y, nzoff, pairoff, occ_x, VX, DVX, LIN, pid, S, Z,
                       dense, A, SC0, D, R, cvec, tb, attention, freeze_fm, keep0, thr0,
                       skey1, keep1, thr1, skey2, loss_code)
        ftz_leave(csr)

    # Attention backward once per distinct pair: its logit gradients summed in pair
    # order, then dh, db and the chunk's dW.
    if nD > 0:
        for d in range(nD):
            DS[d] = 0.0
        for i in range(npairs):
            DS[pid[i]] += D[i]
        for ch in prange(ndch):
            csr = ftz_enter()
            cw = cW[ch]
            for j in range(t):
                for c in range(k):
                    cw[j, c] = 0.0
            _pair_backward(dch_lo[ch], dch_lo[ch + 1], DS, U, E, activation, dense, cw,
                           cvec[ch], hbuf[ch])
            ftz_leave(csr)

    # Chunk partials, summed in chunk order.
    sq = 0.0
    for ch in range(nch):
        sq += cvec[ch, 0]
    for i in range(gdense.shape[0]):
        acc = 0.0
        for ch in range(cvec.shape[0]):
            acc += cvec[ch, 1 + i]
        gdense[i] = acc
    wnorm = 0.0
    if attention:
        for j in prange(t):
            csr = ftz_enter()
            for c in range(k):
                acc = 0.0
                for ch in range(ndch):
                    acc += np.float64(cW[ch, j, c])
                gW[j, c] = acc + l2a * np.float64(W[j, c])
            ftz_leave(csr)
        for j in range(t):
            for c in range(k):
                wv = np.float64(W[j, c])
                wnorm += wv * wv
    # Touched features: gradient over occurrences in batch order, + l2 v, optimiser.
    lr_eff = effective_lr(optimizer, lr, step)
    for blk in prange(nb):
        csr = ftz_enter()
        gacc = tacc[numba.get_thread_id()][:k]
        u0, u1 = block_bounds(nU, nb, blk)
        for u in range(u0, u1):
            f = uniq[u]
            vf = V[f]
            # the l2 terms only when l2 > 0 (see numba.fm)
            nv = 0.0
            if l2 != 0.0:
                for c in range(k):
                    v = np.float64(vf[c])
                    nv += v * v
            ul2[u] = nv
            if not freeze_fm:
                for c in range(k):
                    gacc[c] = 0.0
                gw = 0.0
                for q in range(ustart[u], ustart[u + 1]):
                    o = occ_list[q]
                    gw += R[occ_b[o]] * occ_x[o]
                    do = DVX[o]
                    for c in range(k):
                        gacc[c] += do[c]
                if l2 != 0.0:
                    for c in range(k):
                        gacc[c] += l2 * np.float64(vf[c])
                update_feature(V, w, sV, sw, f, gacc, gw, optimizer, lr_eff)
        ftz_leave(csr)

    lo = 1 if freeze_fm else 0
    hi = 1 + k + 2 * t if attention else 1 + k
    opt_row(dense[lo:hi], gdense[lo:hi], sd[0, lo:hi], sd[1, lo:hi], optimizer, lr_eff)
    if attention:
        for j in prange(t):
            csr = ftz_enter()
            opt_row(W[j], gW[j], sW[0, j], sW[1, j], optimizer, lr_eff)
            ftz_leave(csr)

    reg = 0.0
    for u in range(nU):
        reg += ul2[u]
    loss = sq + 0.5 * l2 * reg
    if attention:
        loss += 0.5 * l2a * wnorm
    return loss, 0


def afm_step(X, y, rows, params, state, cfg, ws):
    """One AFM training step (forward, backward, optimiser update) on the batch ``rows``;
    returns the batch loss before the update. See the module docstring.

    Example: ``loss = afm_step(X, y, rows, params, state, cfg, ws)`` with ``params`` from
    ``kernels.api.new_afm_params``, ``state`` from ``new_opt_state`` and ``ws`` from
    ``afm_workspace``.
    """
    indptr, indices, values, y = read_only_args(*X, y)
    B = rows.shape[0]
    M, k = params.V.shape
    t = params.W.shape[0]
    if (B == 0 or B > ws.R.shape[0] or M != ws.slot.shape[0] or k != ws.VX.shape[1]
            or t != ws.U.shape[1] or params.V.dtype != ws.VX.dtype):
        raise ValueError(
            f"afm_step: the workspace is for batches of 1 to {ws.R.shape[0]} rows, "
            f"{ws.slot.shape[0]} features, k = {ws.VX.shape[1]}, t = {ws.U.shape[1]} and "
            f"{ws.VX.dtype}; got {B} rows, V {params.V.shape} {params.V.dtype} and t = {t}. "
            "Build it with afm_workspace for this model."
        )
    keep0 = check_keep("afm_step", "keep_attention", cfg.keep_attention)
    keep1 = check_keep("afm_step", "keep_pooled", cfg.keep_pooled)
    optimizer = check_optimizer("afm_step", cfg.optimizer)
    if int(cfg.activation) not in (RELU, SIGMOID, TANH, IDENTITY):
        raise ValueError(f"afm_step: cfg.activation must be one of {ACTIVATION_CODES}, "
                         f"got {cfg.activation!r}")
    thr0 = np.uint64(dropout_threshold(keep0) if keep0 < 1.0 else 0)
    thr1 = np.uint64(dropout_threshold(keep1) if keep1 < 1.0 else 0)
    loss, status = run_step_kernel(
        "afm_step", _afm_step_kernel,
        (indptr, indices, values, y, rows, params.V, params.w, params.W, params.dense,
         state.V, state.w, state.W, state.dense, float(cfg.lr), float(cfg.l2),
         float(cfg.l2_attention), keep0, thr0, keep1, thr1, optimizer,
         bool(cfg.attention), int(cfg.activation), bool(cfg.freeze_fm)), cfg, ws)
    if status < 0:
        raise_batch_error("afm_step", status, indptr.shape[0] - 1, M, ws.occ_feat.shape[0],
                          ws.E.shape[0])
    return float(loss)


afm_steps = steps_from(afm_step)
