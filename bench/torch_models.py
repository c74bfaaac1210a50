"""PyTorch implementations of afmfast's FM and AFM: the same math as
``afmfast.kernels.api`` (and its float64 oracle ``afmfast.kernels.reference``), for benchmarks
only. PyTorch is never a dependency of afmfast (``pip install ".[bench]"`` brings it).

Same math, written the way a PyTorch user would write it well:
- rows with a fixed number of nonzeros n as (B, n) index and value tensors (every data
  set benchmarked here is one-hot with a constant row length); embeddings and linear
  weights are ``nn.Embedding(sparse=True)``, so their gradients are sparse and Adagrad
  updates only the touched rows, duplicates summed (the lazy update of kernels.api);
- FM: f = 1/2((sum v x)^2 - sum (v x)^2); batch norm with the batch's mean and biased
  variance, eps 1e-3, running statistics running = 0.9 running + 0.1 batch (biased
  variance, as kernels.api; PyTorch's own running update would use the unbiased one);
  inverted dropout (``F.dropout``) on f with keep probability ``keep``;
  y = w0 + sum w x + sum f;
- AFM: e_pq = (v_p x_p)(v_q x_q) for the row's pairs p < q; s = h . relu(W e + b);
  softmax over the row's pairs; inverted dropout on a (keep[0]) and on the pooled
  g = sum a e (keep[1]); y = w0 + sum w x + p . g;
- loss 1/2 sum (y - y_hat)^2 (a sum), + l2_attention/2 ||W||^2 (AFM), + l2/2 ||V_row||^2
  over the touched rows (when l2 > 0);
- ``torch.optim.Adagrad(initial_accumulator_value=1e-8, eps=0)``: acc += g^2,
  p -= lr g / sqrt(acc), as kernels.api's ADAGRAD with ADAGRAD_INIT.
Dropout masks come from PyTorch's RNG, not afmfast's counter hash: the same distribution,
other draws. ``bench/compare.py`` checks these models against ``afmfast.kernels.reference`` (loss
and parameters after two Adagrad steps, dropout off, float64) before timing them.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from afmfast.kernels.api import (ADAGRAD_INIT, BN_DECAY, BN_EPS, new_afm_params,
                                new_fm_params)


def fixed_width(indptr, indices, values):
    """(N, n) int64 ids and (N, n) values of a CSR matrix whose rows all have n nonzeros."""
    lengths = np.diff(indptr)
    if len(lengths) == 0 or lengths.min() != lengths.max():
        raise ValueError("the PyTorch models take rows with a constant number of nonzeros "
                         f"(got lengths {lengths.min()}..{lengths.max()})")
    n = int(lengths[0])
    return (torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64).reshape(-1, n)),
            torch.from_numpy(np.ascontiguousarray(values).reshape(-1, n)))


def _embedding(table, dtype):
    emb = nn.Embedding(table.shape[0], table.shape[1], sparse=True)
    emb.weight.data = torch.tensor(np.asarray(table), dtype=dtype)
    return emb


class TorchFM(nn.Module):
    """FM with bi-interaction, batch norm and dropout, initialised from afmfast's
    ``FMParams`` (so that a step can be compared with ``afmfast.kernels.reference.fm_step``)."""

    def __init__(self, params, keep, batch_norm=True, l2=0.0, dtype=torch.float32):
        super().__init__()
        k = params.V.shape[1]
        dense = np.asarray(params.dense, dtype=np.float64)
        self.V = _embedding(params.V, dtype)
        self.w = _embedding(np.asarray(params.w).reshape(-1, 1), dtype)
        self.w0 = nn.Parameter(torch.tensor(dense[:1], dtype=dtype))
        self.gamma = nn.Parameter(torch.tensor(dense[1:1 + k], dtype=dtype))
        self.beta = nn.Parameter(torch.tensor(dense[1 + k:], dtype=dtype))
        stats = np.asarray(params.bn_stats, dtype=np.float64)
        self.register_buffer("running_mean", torch.tensor(stats[0], dtype=dtype))
        self.register_buffer("running_var", torch.tensor(stats[1], dtype=dtype))
        self.keep, self.batch_norm, self.l2 = float(keep), bool(batch_norm), float(l2)

    def forward(self, idx, val):
        vx = self.V(idx) * val.unsqueeze(-1)                       # (B, n, k)
        s = vx.sum(dim=1)
        f = 0.5 * (s * s - (vx * vx).sum(dim=1))                   # (B, k)
        if self.batch_norm:
            # normalisation with the batch's biased variance (fused kernel); the running
            # statistics are updated by hand because PyTorch's use the unbiased variance
            z = F.batch_norm(f, None, None, self.gamma, self.beta, training=True,
                             eps=BN_EPS)
            with torch.no_grad():
                fd = f.detach()
                self.running_mean.mul_(BN_DECAY).add_(fd.mean(dim=0), alpha=1 - BN_DECAY)
                self.running_var.mul_(BN_DECAY).add_(fd.var(dim=0, unbiased=False),
                                                     alpha=1 - BN_DECAY)
        else:
            z = f
        if self.keep < 1.0:
            z = F.dropout(z, p=1.0 - self.keep, training=True)
        lin = (self.w(idx).squeeze(-1) * val).sum(dim=1)
        return self.w0 + lin + z.sum(dim=1)

    def loss(self, idx, val, y):
        r = self.forward(idx, val) - y
        loss = 0.5 * (r * r).sum()
        if self.l2 > 0:
            loss = loss + 0.5 * self.l2 * (self.V(torch.unique(idx)) ** 2).sum()
        return loss


class TorchAFM(nn.Module):
    """AFM (softmax over each row's pairs), initialised from afmfast's ``AFMParams``."""

    def __init__(self, params, n_nonzeros, keep=(1.0, 0.5), l2_attention=100.0, l2=0.0,
                 dtype=torch.float32):
        super().__init__()
        k = params.V.shape[1]
        t = params.W.shape[0]
        dense = np.asarray(params.dense, dtype=np.float64)
        self.V = _embedding(params.V, dtype)
        self.w = _embedding(np.asarray(params.w).reshape(-1, 1), dtype)
        self.W = nn.Parameter(torch.tensor(np.asarray(params.W), dtype=dtype))  # (t, k)
        self.w0 = nn.Parameter(torch.tensor(dense[:1], dtype=dtype))
        self.p = nn.Parameter(torch.tensor(dense[1:1 + k], dtype=dtype))
        self.b = nn.Parameter(torch.tensor(dense[1 + k:1 + k + t], dtype=dtype))
        self.h = nn.Parameter(torch.tensor(dense[1 + k + t:], dtype=dtype))
        pp, qq = np.triu_indices(n_nonzeros, k=1)  # the kernels' pair order
        self.register_buffer("pp", torch.from_numpy(pp.astype(np.int64)))
        self.register_buffer("qq", torch.from_numpy(qq.astype(np.int64)))
        self.keep = (float(keep[0]), float(keep[1]))
        self.l2_attention, self.l2 = float(l2_attention), float(l2)

    def forward(self, idx, val):
        vx = self.V(idx) * val.unsqueeze(-1)                       # (B, n, k)
        e = vx[:, self.pp] * vx[:, self.qq]                        # (B, P, k)
        u = torch.matmul(e, self.W.t()) + self.b                   # (B, P, t)
        s = torch.matmul(F.relu(u), self.h)                        # (B, P)
        a = torch.softmax(s, dim=1)
        if self.keep[0] < 1.0:
            a = F.dropout(a, p=1.0 - self.keep[0], training=True)
        g = torch.matmul(a.unsqueeze(1), e).squeeze(1)             # (B, k)
        if self.keep[1] < 1.0:
            g = F.dropout(g, p=1.0 - self.keep[1], training=True)
        lin = (self.w(idx).squeeze(-1) * val).sum(dim=1)
        return self.w0 + lin + g @ self.p

    def loss(self, idx, val, y):
        r = self.forward(idx, val) - y
        loss = 0.5 * (r * r).sum() + 0.5 * self.l2_attention * (self.W ** 2).sum()
        if self.l2 > 0:
            loss = loss + 0.5 * self.l2 * (self.V(torch.unique(idx)) ** 2).sum()
        return loss


def adagrad(model, lr):
    """kernels.api's Adagrad: accumulator from 1e-8, no epsilon in the denominator."""
    return torch.optim.Adagrad(model.parameters(), lr=lr,
                               initial_accumulator_value=ADAGRAD_INIT, eps=0.0)


def train_step(model, opt, idx, val, y):
    """One batch: forward, backward, Adagrad; returns the loss before the update."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(idx, val, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def model_like(est, n_features, n_nonzeros, seed=2016):
    """(model, optimiser): the TorchFM or TorchAFM of an afmfast estimator's
    hyperparameters (factors, attention size, dropout, batch norm, l2, learning rate)
    with the initial parameters afmfast draws for n_features features from seed, for
    rows of n_nonzeros nonzeros; Adagrad as ``adagrad``."""
    rng = np.random.default_rng(seed)
    k = est.n_factors
    if hasattr(est, "attention_size"):
        model = TorchAFM(new_afm_params(n_features, k, est.attention_size, rng), n_nonzeros,
                         est.keep, est.l2_attention, est.l2)
    else:
        model = TorchFM(new_fm_params(n_features, k, rng), est.keep, est.batch_norm, est.l2)
    return model, adagrad(model, est.learning_rate)


def train_epoch(model, opt, idx, val, y, batch):
    """One epoch as a PyTorch training loop runs it: ``torch.randperm`` of the rows,
    then ``train_step`` on each batch of that order."""
    n = len(y)
    order = torch.randperm(n)
    for start in range(0, n, batch):
        b = order[start:start + batch]
        train_step(model, opt, idx[b], val[b], y[b])


def fm_arrays(model):
    """The model's parameters as afmfast ``FMParams`` fields (float64 NumPy)."""
    dense = torch.cat([model.w0, model.gamma, model.beta]).detach().double().numpy()
    return dict(V=model.V.weight.detach().double().numpy(),
                w=model.w.weight.detach().double().numpy()[:, 0], dense=dense,
                bn_stats=torch.stack([model.running_mean, model.running_var])
                .double().numpy())


def afm_arrays(model):
    """The model's parameters as afmfast ``AFMParams`` fields (float64 NumPy)."""
    dense = torch.cat([model.w0, model.p, model.b, model.h]).detach().double().numpy()
    return dict(V=model.V.weight.detach().double().numpy(),
                w=model.w.weight.detach().double().numpy()[:, 0],
                W=model.W.detach().double().numpy(), dense=dense)
