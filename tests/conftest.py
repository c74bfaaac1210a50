"""Shared fixtures and problem generators for the kernel tests.

``make_problem`` builds a small random CSR problem (ragged rows, real values, repeated
feature ids inside a row) with non-trivial parameters, so every term of the FM gradient
is exercised; ``backend`` runs a test once per kernel backend that imports here.
"""
import numpy as np
import pytest

from afmfast import kernel_api as api
from afmfast.backends import available_backends, get_backend

BACKENDS = available_backends()


def make_problem(rng, n_rows, n_features, k, row_lengths, dtype=np.float64, v_scale=0.3):
    """Random problem: X = (indptr int64, indices int32, values dtype), y (n_rows,) and
    FMParams with V ~ N(0, v_scale), w ~ N(0, 0.1), w0/beta near 0, gamma near 1 and
    running BN statistics away from (0, 1).

    Row b has ``row_lengths[b % len(row_lengths)]`` nonzeros; in every row of 2 or more
    nonzeros the last id repeats the first, so duplicate ids within a row always occur.
    """
    lengths = np.array([row_lengths[b % len(row_lengths)] for b in range(n_rows)])
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_features, size=int(indptr[-1])).astype(np.int32)
    for b in range(n_rows):
        lo, hi = indptr[b], indptr[b + 1]
        if hi - lo >= 2:
            indices[hi - 1] = indices[lo]
    values = (rng.uniform(0.5, 1.5, size=indices.shape) * rng.choice([-1, 1], indices.shape))
    X = (indptr, indices, values.astype(dtype))
    y = rng.normal(0.0, 1.0, size=n_rows).astype(dtype)
    params = api.new_fm_params(n_features, k, rng, dtype=dtype)
    params.V[:] = rng.normal(0.0, v_scale, size=params.V.shape)
    params.w[:] = rng.normal(0.0, 0.1, size=params.w.shape)
    params.dense[:] = rng.normal(0.0, 0.1, size=params.dense.shape)
    params.dense[1 : 1 + k] += 1.0
    params.bn_stats[0] = rng.normal(0.0, 0.1, size=k)
    params.bn_stats[1] = rng.uniform(0.5, 2.0, size=k)
    return X, y, params


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


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available kernel backend module (Cython first)."""
    return get_backend(request.param)
