"""Synthetic data shared by the kernel benchmarks (``test_bench_fm_step``,
``test_bench_afm_step``): one-hot rows shaped like Frappe, so the benchmarks run without
the licensed data set.

Frappe has 10 fields (one nonzero each) and 5,382 features with the field sizes below;
ids inside a field follow a Zipf-like popularity (p ~ rank^-0.8), labels are +-1.
"""
import numpy as np

FIELD_SIZES = [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]  # Frappe's fields: 5,382 features
N_FEATURES = sum(FIELD_SIZES)
NNZ = len(FIELD_SIZES)            # nonzeros per row
PAIRS = NNZ * (NNZ - 1) // 2      # pairs of nonzeros per row (AFM)
BATCH = 4096                      # the reference code's batch size
N_ROWS = 8 * BATCH


def frappe_like(n_rows, seed=0):
    """(X, y): X = (indptr int64, indices int32, values float32 ones) CSR, y float32 +-1.

    Example: X, y = frappe_like(N_ROWS)
    """
    rng = np.random.default_rng(seed)
    cols = []
    offset = 0
    for size in FIELD_SIZES:
        p = 1.0 / np.arange(1, size + 1) ** 0.8
        cols.append(offset + rng.choice(size, size=n_rows, p=p / p.sum()))
        offset += size
    indices = np.stack(cols, axis=1).reshape(-1).astype(np.int32)
    indptr = np.arange(0, indices.size + 1, NNZ, dtype=np.int64)
    values = np.ones(indices.size, dtype=np.float32)
    y = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n_rows)
    return (indptr, indices, values), y


def batch_rows(perm, step, batch=BATCH):
    """The rows of batch number ``step`` of a pass over ``perm`` (cycling)."""
    n_batches = len(perm) // batch
    return perm[(step % n_batches) * batch:][:batch]
