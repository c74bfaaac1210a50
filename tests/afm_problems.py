"""AFM problem generators for the kernel tests (``tests/test_kernels_afm.py``).

``make_afm_problem`` builds a small random CSR problem (ragged rows, real values, repeated
feature ids inside a row) with non-trivial AFM parameters, so that every term of the AFM
gradient is exercised: attention logits of varied size (a softmax far from uniform),
pre-activations of both signs (ReLU kinks are not hit by finite differences of 1e-6 in
practice, see ``test_kernels_afm``), p away from ones.
"""
import numpy as np
from conftest import random_csr

from afmfast.kernels import api
from afmfast.demo import frappe_like  # noqa: F401  (re-exported for test_kernels_afm)


def make_afm_problem(rng, n_rows, n_features, k, t, row_lengths, dtype=np.float64,
                     v_scale=0.5):
    """Random AFM problem: X from ``conftest.random_csr`` (ragged rows, duplicate ids
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
