"""Synthetic data shared by the kernel benchmarks (``test_bench_fm_step``,
``test_bench_afm_step``): one-hot rows shaped like Frappe, so the benchmarks run without
the licensed data set.

The generator is ``afmfast.demo.frappe_like`` (Frappe's 10 field sizes, one nonzero per
field, Zipf-like popularity inside a field, labels +-1).
"""
from afmfast.demo import FRAPPE_FIELD_SIZES as FIELD_SIZES
from afmfast.demo import frappe_like  # noqa: F401  (re-exported for the benchmarks)

N_FEATURES = sum(FIELD_SIZES)
NNZ = len(FIELD_SIZES)            # nonzeros per row
PAIRS = NNZ * (NNZ - 1) // 2      # pairs of nonzeros per row (AFM)
BATCH = 4096                      # the reference code's batch size
N_ROWS = 8 * BATCH


def batch_rows(perm, step, batch=BATCH):
    """The rows of batch number ``step`` of a pass over ``perm`` (cycling)."""
    n_batches = len(perm) // batch
    return perm[(step % n_batches) * batch:][:batch]
