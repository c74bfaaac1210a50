"""Float64 NumPy reference of the kernels: the truth both backends are tested against.

Readable, vectorised, slow; see ``afmfast.kernel_api`` for the contract. ``fm_forward``
and ``fm_loss`` give the loss as a plain function of the parameters (finite-difference
gradient checks), ``fm_gradients`` its analytic gradient, ``fm_step`` the full step with
the optimiser, mutating its arguments exactly as a backend does.
"""
import numpy as np

from .kernel_api import (
    ADAGRAD,
    ADAM,
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    BN_DECAY,
    BN_EPS,
    MOMENTUM,
    MOMENTUM_COEF,
    SGD,
    dropout_mask,
)


def _batch_rows(X, rows):
    """(row position in batch, feature id, value) of every nonzero of the batch rows."""
    indptr, indices, values = X
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
    r = y_hat - np.asarray(y, dtype=np.float64)[rows]
    touched = np.unique(cache["feat"])
    V = np.asarray(params.V, dtype=np.float64)
    return 0.5 * float(r @ r) + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())


def fm_gradients(X, y, rows, params, cfg, mask=None):
    """Analytic gradients: (loss, touched ids, gV (U, k), gw (U,), g_dense, batch mu, var)."""
    y_hat, c = fm_forward(X, rows, params, cfg, train=True, mask=mask)
    V = np.asarray(params.V, dtype=np.float64)
    dense = np.asarray(params.dense, dtype=np.float64)
    k = V.shape[1]
    B = len(rows)
    r = y_hat - np.asarray(y, dtype=np.float64)[rows]
    touched, inverse = np.unique(c["feat"], return_inverse=True)
    loss = 0.5 * float(r @ r) + 0.5 * cfg.l2 * float((V[touched] ** 2).sum())
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
    """Raw scores of every row of X (no dropout, running BN statistics); ids >= M skipped."""
    indptr, indices, values = X
    M = params.V.shape[0]
    keep = indices < M
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
