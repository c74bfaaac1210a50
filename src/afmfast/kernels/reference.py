"""Float64 NumPy reference of the kernels: the truth both backends are tested against.

Readable, vectorised, slow; see ``afmfast.kernels.api`` for the contract. ``fm_forward``
and ``fm_loss`` give the loss as a plain function of the parameters (finite-difference
gradient checks), ``fm_gradients`` its analytic gradient, ``fm_step`` the full step with
the optimiser, mutating its arguments exactly as a backend does.
"""
import numpy as np

from afmfast.kernels.api import (
    ADAGRAD,
    ADAM,
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    BN_DECAY,
    BN_EPS,
    LOGISTIC,
    SQUARED,
    MOMENTUM,
    MOMENTUM_COEF,
    SGD,
    dropout_mask,
)


def data_loss_and_residual(y_hat, y, cfg):
    """(batch data loss, dloss/dy_hat per row). Squared: 1/2 sum (y_hat - y)^2, residual
    y_hat - y. Logistic (cfg.loss == LOGISTIC; targets t = 1 where y > 0, else 0):
    sum softplus(y_hat) - t y_hat, residual sigmoid(y_hat) - t."""
    if getattr(cfg, "loss", SQUARED) == LOGISTIC:
        t = (y > 0).astype(np.float64)
        loss = np.maximum(y_hat, 0.0) - t * y_hat + np.log1p(np.exp(-np.abs(y_hat)))
        return float(loss.sum()), 1.0 / (1.0 + np.exp(-y_hat)) - t
    r = y_hat - y
    return 0.5 * float(r @ r), r


def _explicit(X):
    """X with its values spelled out: an empty values array of nonzero rows (one-hot rows
    stored without values, kernels.api) stands for ones."""
    indptr, indices, values = X
    if values.size == 0 and indices.size:
        values = np.ones(indices.size)
    return indptr, indices, values


def _batch_rows(X, rows):
    """(row position in batch, feature id, value) of every nonzero of the batch rows."""
    indptr, indices, values = _explicit(X)
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    pos = np.repeat(np.arange(len(rows)), lengths)
    offs = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    nz = np.repeat(starts, lengths) + offs
    return pos, indices[nz].astype(np.int64), values[nz].astype(np.float64)


def fm_forward(X, rows, params, cfg, train=True, mask=None):
    """Forward pass of a batch; returns (y_hat (B,), cache dict)."""
    V, w, dense, bn_stats = (np.asarray(a, dtype=np.float64) for a in params)
    k = V.shape[1]
    B = len(rows)
    pos, feat, val = _batch_rows(X, rows)
    vx = V[feat] * val[:, None]
    s = np.zeros((B, k))
    sq = np.zeros((B, k))
    np.add.at(s, pos, vx)
    np.add.at(sq, pos, vx * vx)
    f = 0.5 * (s * s - sq)
    lin = np.zeros(B)
    np.add.at(lin, pos, w[feat] * val)
    gamma, beta = dense[1 : 1 + k], dense[1 + k :]
    cache = dict(pos=pos, feat=feat, val=val, vx=vx, s=s, f=f)
    if cfg.batch_norm:
        if train:
            mu, var = f.mean(axis=0), f.var(axis=0)
        else:
            mu, var = bn_stats[0], bn_stats[1]
        inv = 1.0 / np.sqrt(var + BN_EPS)
        fh = (f - mu) * inv
        z = gamma * fh + beta
        cache.update(mu=mu, var=var, inv=inv, fh=fh)
    else:
        z = f
    if train:
        if mask is None:
            mask = dropout_mask(cfg.seed, 0, cfg.step, rows, k, cfg.keep)
        scale = mask / cfg.keep if cfg.keep < 1.0 else np.ones_like(z)
    else:
        scale = np.ones_like(z)
    cache["scale"] = scale
    y_hat = dense[0] + lin + (z * scale).sum(axis=1)
    return y_hat, cache


def fm_loss(X, y, rows, params, cfg, mask=None):
    """Batch loss 1/2 sum (y - y_hat)^2 + l2/2 sum over touched rows ||V_row||^2."""
    y_hat, cache = fm_forward(X, rows, params, cfg, train=True, mask=mask)
    data_loss, _ = data_loss_and_residual(y_hat, np.asarray(y, dtype=np.float64)[rows], cfg)
    touched = np.unique(cache["feat"])
    V = np.asarray(params.V, dtype=np.float64)
    return data_loss + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())


def fm_gradients(X, y, rows, params, cfg, mask=None):
    """Analytic gradients: (loss, touched ids, gV (U, k), gw (U,), g_dense, batch mu, var)."""
    y_hat, c = fm_forward(X, rows, params, cfg, train=True, mask=mask)
    V = np.asarray(params.V, dtype=np.float64)
    dense = np.asarray(params.dense, dtype=np.float64)
    k = V.shape[1]
    B = len(rows)
    data_loss, r = data_loss_and_residual(y_hat, np.asarray(y, dtype=np.float64)[rows], cfg)
    touched, inverse = np.unique(c["feat"], return_inverse=True)
    loss = data_loss + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())
    dz = r[:, None] * c["scale"]
    g_dense = np.zeros_like(dense)
    g_dense[0] = r.sum()
    if cfg.batch_norm:
        gamma = dense[1 : 1 + k]
        fh, inv = c["fh"], c["inv"]
        g_dense[1 : 1 + k] = (dz * fh).sum(axis=0)
        g_dense[1 + k :] = dz.sum(axis=0)
        dfh = dz * gamma
        df = inv / B * (B * dfh - dfh.sum(axis=0) - fh * (dfh * fh).sum(axis=0))
    else:
        df = dz
    pos, val, vx, s = c["pos"], c["val"], c["vx"], c["s"]
    g_occ = df[pos] * val[:, None] * (s[pos] - vx)
    gV = np.zeros((len(touched), k))
    np.add.at(gV, inverse, g_occ)
    gV += cfg.l2 * V[touched]
    gw = np.zeros(len(touched))
    np.add.at(gw, inverse, r[pos] * val)
    return loss, touched, gV, gw, g_dense, c.get("mu"), c.get("var")


def _apply(p, g, state, cfg):
    """Optimiser update of parameter slice ``p`` (view) with gradient ``g``."""
    if cfg.optimizer == ADAGRAD:
        state[0] += g * g
        p -= cfg.lr * g / np.sqrt(state[0])
    elif cfg.optimizer == SGD:
        p -= cfg.lr * g
    elif cfg.optimizer == MOMENTUM:
        state[0] = MOMENTUM_COEF * state[0] + g
        p -= cfg.lr * state[0]
    elif cfg.optimizer == ADAM:
        t = cfg.step + 1
        lr_t = cfg.lr * np.sqrt(1.0 - ADAM_BETA2**t) / (1.0 - ADAM_BETA1**t)
        state[0] = ADAM_BETA1 * state[0] + (1.0 - ADAM_BETA1) * g
        state[1] = ADAM_BETA2 * state[1] + (1.0 - ADAM_BETA2) * g * g
        p -= lr_t * state[0] / (np.sqrt(state[1]) + ADAM_EPS)
    else:
        raise ValueError(f"unknown optimizer code {cfg.optimizer}")


def fm_step(X, y, rows, params, state, cfg, mask=None):
    """One training step in float64, mutating ``params`` and ``state`` in place (they may
    be float32 or float64 arrays); returns the batch loss before the update."""
    loss, touched, gV, gw, g_dense, mu, var = fm_gradients(X, y, rows, params, cfg, mask)
    V = params.V.astype(np.float64)
    w = params.w.astype(np.float64)
    dense = params.dense.astype(np.float64)
    sV = state.V.astype(np.float64)
    sw = state.w.astype(np.float64)
    sd = state.dense.astype(np.float64)
    Vt, wt = V[touched], w[touched]
    sVt, swt = sV[:, touched], sw[:, touched]
    _apply(Vt, gV, sVt, cfg)
    _apply(wt, gw, swt, cfg)
    _apply(dense, g_dense, sd, cfg)
    params.V[touched] = Vt
    params.w[touched] = wt
    params.dense[:] = dense
    state.V[:, touched] = sVt
    state.w[:, touched] = swt
    state.dense[:] = sd
    if cfg.batch_norm:
        stats = params.bn_stats.astype(np.float64)
        stats[0] = BN_DECAY * stats[0] + (1.0 - BN_DECAY) * mu
        stats[1] = BN_DECAY * stats[1] + (1.0 - BN_DECAY) * var
        params.bn_stats[:] = stats
    return loss


def fm_predict(X, params, batch_norm):
    """Raw scores of every row of X (no dropout, running BN statistics); ids outside
    [0, M) skipped."""
    indptr, indices, values = _explicit(X)
    M = params.V.shape[0]
    keep = (indices >= 0) & (indices < M)
    nnz_row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    Xk = (
        np.concatenate([[0], np.cumsum(np.bincount(nnz_row[keep], minlength=len(indptr) - 1))]),
        indices[keep],
        values[keep],
    )
    cfg = _PredictCfg(batch_norm)
    y_hat, _ = fm_forward(Xk, np.arange(len(indptr) - 1), params, cfg, train=False)
    return y_hat


class _PredictCfg:
    def __init__(self, batch_norm):
        self.batch_norm = batch_norm
        self.keep = 1.0


# ----- AFM ----------------------------------------------------------------------------
def _activation(code, u):
    """(act(u), act'(u)) for an activation code of kernels.api."""
    from afmfast.kernels.api import IDENTITY, RELU, SIGMOID, TANH

    if code == RELU:
        return np.maximum(u, 0.0), (u > 0).astype(np.float64)
    if code == SIGMOID:
        s = 1.0 / (1.0 + np.exp(-u))
        return s, s * (1.0 - s)
    if code == TANH:
        t = np.tanh(u)
        return t, 1.0 - t * t
    if code == IDENTITY:
        return u, np.ones_like(u)
    raise ValueError(f"unknown activation code {code}")


def _row_pairs(n):
    """Positions (p, q), p < q, of a row's nonzeros in the kernels' pair order."""
    p, q = np.triu_indices(n, k=1)
    return p, q


def afm_forward(X, rows, params, cfg, train=True, masks=None):
    """AFM forward pass of a batch; returns (y_hat (B,), per-row caches).

    ``masks`` = (list of per-row attention keep masks, pooled keep mask (B, k)) overrides
    the hash masks (tests with a fixed mask)."""
    indptr, indices, values = _explicit(X)
    V, w, W, dense = (np.asarray(a, dtype=np.float64) for a in params)
    M, k = V.shape
    t = W.shape[0]
    w0, p_vec, b, h = dense[0], dense[1:1 + k], dense[1 + k:1 + k + t], dense[1 + k + t:]
    B = len(rows)
    y_hat = np.empty(B)
    caches = []
    if masks is None and train:
        pooled = dropout_mask(cfg.seed, 2, cfg.step, rows, k, cfg.keep_pooled)
    elif masks is not None:
        pooled = masks[1]
    for bi, r in enumerate(rows):
        lo, hi = indptr[r], indptr[r + 1]
        feat = indices[lo:hi].astype(np.int64)
        val = values[lo:hi].astype(np.float64)
        if not train:  # ids never seen in training (or negative) contribute nothing
            keep_ids = (feat >= 0) & (feat < M)
            feat, val = feat[keep_ids], val[keep_ids]
        vx = V[feat] * val[:, None]
        pp, qq = _row_pairs(len(feat))
        e = vx[pp] * vx[qq]  # (P, k)
        c = dict(feat=feat, val=val, vx=vx, pp=pp, qq=qq, e=e)
        if cfg.attention and len(pp):
            u = e @ W.T + b
            hid, dact = _activation(cfg.activation, u)
            s = hid @ h
            a = np.exp(s - s.max())
            a /= a.sum()
            if train:
                if masks is not None:
                    m0 = masks[0][bi]
                else:
                    m0 = dropout_mask(cfg.seed, 1, cfg.step, [r], len(pp),
                                      cfg.keep_attention)[0]
                scale0 = m0 / cfg.keep_attention if cfg.keep_attention < 1.0 \
                    else np.ones(len(pp))
            else:
                scale0 = np.ones(len(pp))
            c.update(u=u, hid=hid, dact=dact, a=a, scale0=scale0)
            a_used = a * scale0
        else:
            a_used = np.ones(len(pp))
        c["a_used"] = a_used
        g = a_used @ e if len(pp) else np.zeros(k)
        scale1 = (pooled[bi] / cfg.keep_pooled if cfg.keep_pooled < 1.0 else np.ones(k)) \
            if train else np.ones(k)
        c.update(g=g, scale1=scale1)
        y_hat[bi] = w0 + w[feat] @ val + p_vec @ (g * scale1)
        caches.append(c)
    return y_hat, caches


def afm_loss(X, y, rows, params, cfg, masks=None):
    """AFM batch loss: 1/2 sum (y - y_hat)^2 + l2_attention/2 ||W||^2 (when attention is
    on) + l2/2 sum over touched rows ||V_row||^2."""
    y_hat, caches = afm_forward(X, rows, params, cfg, train=True, masks=masks)
    data_loss, _ = data_loss_and_residual(y_hat, np.asarray(y, dtype=np.float64)[rows], cfg)
    V = np.asarray(params.V, dtype=np.float64)
    W = np.asarray(params.W, dtype=np.float64)
    touched = np.unique(np.concatenate([c["feat"] for c in caches] + [np.zeros(0, np.int64)]))
    loss = data_loss + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())
    if cfg.attention:
        loss += 0.5 * cfg.l2_attention * float((W ** 2).sum())
    return loss


def afm_gradients(X, y, rows, params, cfg, masks=None):
    """Analytic AFM gradients: (loss, touched ids, gV (U, k), gw (U,), gW, g_dense)."""
    y_hat, caches = afm_forward(X, rows, params, cfg, train=True, masks=masks)
    V, w, W, dense = (np.asarray(a, dtype=np.float64) for a in params)
    M, k = V.shape
    t = W.shape[0]
    p_vec, h = dense[1:1 + k], dense[1 + k + t:]
    data_loss, r = data_loss_and_residual(y_hat, np.asarray(y, dtype=np.float64)[rows], cfg)
    gV_full = np.zeros_like(V)
    gw_full = np.zeros_like(w)
    gW = np.zeros_like(W)
    g_dense = np.zeros_like(dense)
    g_dense[0] = r.sum()
    for bi, c in enumerate(caches):
        rb = r[bi]
        g_dense[1:1 + k] += rb * c["g"] * c["scale1"]
        dg = rb * p_vec * c["scale1"]
        e, pp, qq, vx = c["e"], c["pp"], c["qq"], c["vx"]
        de = c["a_used"][:, None] * dg[None, :]
        if cfg.attention and len(pp):
            da = (e @ dg) * c["scale0"]
            a = c["a"]
            ds = a * (da - a @ da)
            g_dense[1 + k + t:] += ds @ c["hid"]
            du = ds[:, None] * h[None, :] * c["dact"]
            g_dense[1 + k:1 + k + t] += du.sum(axis=0)
            gW += du.T @ e
            de += du @ W
        dvx = np.zeros_like(vx)
        np.add.at(dvx, pp, de * vx[qq])
        np.add.at(dvx, qq, de * vx[pp])
        np.add.at(gV_full, c["feat"], dvx * c["val"][:, None])
        np.add.at(gw_full, c["feat"], rb * c["val"])
    touched = np.unique(np.concatenate([c["feat"] for c in caches] + [np.zeros(0, np.int64)]))
    loss = data_loss + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())
    gV = gV_full[touched] + cfg.l2 * V[touched]
    if cfg.attention:
        loss += 0.5 * cfg.l2_attention * float((W ** 2).sum())
        gW += cfg.l2_attention * W
    return loss, touched, gV, gw_full[touched], gW, g_dense


def afm_step(X, y, rows, params, state, cfg, masks=None):
    """One AFM training step in float64, mutating ``params`` and ``state`` in place;
    returns the batch loss before the update."""
    loss, touched, gV, gw, gW, g_dense = afm_gradients(X, y, rows, params, cfg, masks)
    k = params.V.shape[1]
    t = params.W.shape[0]
    dense = params.dense.astype(np.float64)
    sd = state.dense.astype(np.float64)
    lo = 1 if cfg.freeze_fm else 0
    hi = 1 + k + 2 * t if cfg.attention else 1 + k
    part, spart = dense[lo:hi], sd[:, lo:hi]
    _apply(part, g_dense[lo:hi], spart, cfg)
    dense[lo:hi], sd[:, lo:hi] = part, spart
    params.dense[:], state.dense[:] = dense, sd
    if cfg.attention:
        W = params.W.astype(np.float64)
        sW = state.W.astype(np.float64)
        _apply(W, gW, sW, cfg)
        params.W[:], state.W[:] = W, sW
    if not cfg.freeze_fm:
        Vt, wt = params.V[touched].astype(np.float64), params.w[touched].astype(np.float64)
        sVt = state.V[:, touched].astype(np.float64)
        swt = state.w[:, touched].astype(np.float64)
        _apply(Vt, gV, sVt, cfg)
        _apply(wt, gw, swt, cfg)
        params.V[touched], params.w[touched] = Vt, wt
        state.V[:, touched], state.w[:, touched] = sVt, swt
    return loss


def afm_predict(X, params, cfg):
    """Raw AFM scores (no dropout); ids outside [0, M) skipped. ``cfg`` needs attention and
    activation."""
    y_hat, _ = afm_forward(X, np.arange(len(X[0]) - 1), params, cfg, train=False)
    return y_hat


def afm_explain(X, params, cfg):
    """Per-pair attention of every row: (indptr (n_rows + 1,), i, j, weight, contribution)
    with weight a_pq (1 when attention is off) and contribution a_pq p . e_pq."""
    _, caches = afm_forward(X, np.arange(len(X[0]) - 1), params, cfg, train=False)
    k = params.V.shape[1]
    p_vec = np.asarray(params.dense, dtype=np.float64)[1:1 + k]
    counts = [len(c["pp"]) for c in caches]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    i = cat([c["feat"][c["pp"]] for c in caches]).astype(np.int64)
    j = cat([c["feat"][c["qq"]] for c in caches]).astype(np.int64)
    weight = cat([c["a_used"] for c in caches])
    contribution = cat([c["a_used"] * (c["e"] @ p_vec) for c in caches])
    return indptr, i, j, weight, contribution
