"""Random kernel problems for the kernel tests (``tests/kernels/``).

``random_csr`` builds a small random CSR matrix (ragged rows, real values, repeated
feature ids inside a row); ``make_problem`` adds targets and non-trivial FM parameters,
so every term of the FM gradient is exercised; ``make_afm_problem`` does the same for
AFM: attention logits of varied size (a softmax far from uniform), pre-activations of
both signs (ReLU kinks are not hit by finite differences of 1e-6 in practice, see
``test_kernels_afm``), p away from ones.
"""
import numpy as np

from afmfast.kernels import api

OPTIMIZERS = {"adagrad": api.ADAGRAD, "sgd": api.SGD, "momentum": api.MOMENTUM,
              "adam": api.ADAM}
# Step sizes that keep several steps on the test problems far from divergence (the loss
# is a sum over the batch, so plain SGD needs a small one).
STABLE_LR = {api.ADAGRAD: 0.05, api.SGD: 2e-3, api.MOMENTUM: 1e-3, api.ADAM: 0.05}


def random_csr(rng, n_rows, n_features, row_lengths, dtype=np.float64):
    """X = (indptr int64, indices int32, values dtype) with values of both signs and
    magnitude in [0.5, 1.5]. Row b has ``row_lengths[b % len(row_lengths)]`` nonzeros; in
    every row of 2 or more nonzeros the last id repeats the first, so duplicate ids
    within a row always occur."""
    lengths = np.array([row_lengths[b % len(row_lengths)] for b in range(n_rows)])
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_features, size=int(indptr[-1])).astype(np.int32)
    for b in range(n_rows):
        lo, hi = indptr[b], indptr[b + 1]
        if hi - lo >= 2:
            indices[hi - 1] = indices[lo]
    values = (rng.uniform(0.5, 1.5, size=indices.shape) * rng.choice([-1, 1], indices.shape))
    return (indptr, indices, values.astype(dtype))


def make_problem(rng, n_rows, n_features, k, row_lengths, dtype=np.float64, v_scale=0.3):
    """Random problem: X from ``random_csr``, y (n_rows,) and FMParams with
    V ~ N(0, v_scale), w ~ N(0, 0.1), w0/beta near 0, gamma near 1 and running BN
    statistics away from (0, 1)."""
    X = random_csr(rng, n_rows, n_features, row_lengths, dtype)
    y = rng.normal(0.0, 1.0, size=n_rows).astype(dtype)
    params = api.new_fm_params(n_features, k, rng, dtype=dtype)
    params.V[:] = rng.normal(0.0, v_scale, size=params.V.shape)
    params.w[:] = rng.normal(0.0, 0.1, size=params.w.shape)
    params.dense[:] = rng.normal(0.0, 0.1, size=params.dense.shape)
    params.dense[1 : 1 + k] += 1.0
    params.bn_stats[0] = rng.normal(0.0, 0.1, size=k)
    params.bn_stats[1] = rng.uniform(0.5, 2.0, size=k)
    return X, y, params


def with_unseen_ids(rng, X, M):
    """X with ~20% of its ids replaced by ids >= M (unseen in training), the same X
    without them, and the number of kept ids per row."""
    indptr, indices, values = X
    unseen = rng.random(indices.shape) < 0.2
    X_unseen = (indptr, np.where(unseen, M + 3, indices).astype(np.int32), values)
    keep = ~unseen
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    counts = np.bincount(row_of[keep], minlength=len(indptr) - 1)
    X_kept = (np.r_[0, np.cumsum(counts)].astype(np.int64), indices[keep], values[keep])
    return X_unseen, X_kept, counts


def copy_tuple(t):
    """Deep copy of a namedtuple of arrays (FMParams, FMOptState)."""
    return type(t)(*(np.array(a, copy=True) for a in t))


def cast_tuple(t, dtype):
    """Copy of a namedtuple of arrays in another dtype."""
    return type(t)(*(np.asarray(a, dtype=dtype).copy() for a in t))


def make_cfg(**kw):
    """StepConfig with test defaults, overridden by keyword."""
    base = dict(lr=0.05, l2=0.05, keep=0.7, optimizer=api.ADAGRAD, batch_norm=1, seed=7,
                step=0, n_threads=2)
    base.update(kw)
    return api.StepConfig(**base)


def batch_nnz(X, rows):
    indptr = X[0]
    return int((indptr[rows + 1] - indptr[rows]).sum())


def make_afm_problem(rng, n_rows, n_features, k, t, row_lengths, dtype=np.float64,
                     v_scale=0.5):
    """Random AFM problem: X from ``random_csr`` (ragged rows, duplicate ids
    within a row), y (n_rows,) and AFMParams."""
    X = random_csr(rng, n_rows, n_features, row_lengths, dtype)
    y = rng.normal(0.0, 1.0, size=n_rows).astype(dtype)
    params = api.new_afm_params(n_features, k, t, rng, dtype=dtype)
    params.V[:] = rng.normal(0.0, v_scale, size=params.V.shape)
    params.w[:] = rng.normal(0.0, 0.1, size=params.w.shape)
    params.W[:] = rng.normal(0.0, 1.0, size=params.W.shape)
    dense = params.dense
    dense[0] = 0.1
    dense[1:1 + k] = 1.0 + rng.normal(0.0, 0.3, size=k)
    dense[1 + k:1 + k + t] = rng.normal(0.0, 0.2, size=t)
    dense[1 + k + t:] = rng.normal(0.0, 1.5, size=t)
    return X, y, params


def batch_pairs(X, rows):
    """Sum over ``rows`` of n (n - 1) / 2, n = the row's nonzeros."""
    n = X[0][rows + 1] - X[0][rows]
    return int((n * (n - 1) // 2).sum())
