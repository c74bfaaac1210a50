"""AFM problem generators for the kernel tests (``tests/test_kernels_afm.py``).

``make_afm_problem`` builds a small random CSR problem (ragged rows, real values, repeated
feature ids inside a row) with non-trivial AFM parameters, so that every term of the AFM
gradient is exercised: attention logits of varied size (a softmax far from uniform),
pre-activations of both signs (ReLU kinks are not hit by finite differences of 1e-6 in
practice, see ``test_kernels_afm``), p away from ones.
"""
import numpy as np
from conftest import random_csr

from afmfast import kernel_api as api


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


def frappe_like(n_rows, seed=0):
    """CSR float32 one-hot rows shaped like Frappe: 10 fields, one nonzero each, 5,382
    features with Frappe's field sizes, Zipf-like ids within a field (benchmarks)."""
    field_sizes = [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]
    rng = np.random.default_rng(seed)
    cols = []
    offset = 0
    for size in field_sizes:
        p = 1.0 / np.arange(1, size + 1) ** 0.8
        cols.append(offset + rng.choice(size, size=n_rows, p=p / p.sum()))
        offset += size
    indices = np.stack(cols, axis=1).reshape(-1).astype(np.int32)
    indptr = np.arange(0, indices.size + 1, len(field_sizes), dtype=np.int64)
    values = np.ones(indices.size, dtype=np.float32)
    y = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n_rows)
    return (indptr, indices, values), y


def batch_pairs(X, rows):
    """Sum over ``rows`` of n (n - 1) / 2, n = the row's nonzeros."""
    n = X[0][rows + 1] - X[0][rows]
    return int((n * (n - 1) // 2).sum())
