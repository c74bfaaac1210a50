"""What fit's epoch loop costs around the kernels: one kernel call per batch against
runs of batches per call (``Trainer.train_epoch``, as fit trains).

    python bench/epoch_overhead.py                       # FM k=16 and AFM k=64, ml-tag
    python bench/epoch_overhead.py --configs fm:16 --rows 500000 --epochs 5

On the synthetic ml-tag set of bench/compare.py, per configuration and thread count,
alternating the two loops epoch by epoch over the same epoch orders (so that a change of
load on the shared machine hits both alike): the median seconds per epoch of each and
their ratio (runs / per batch), and for the per-batch loop the time outside the kernel
(the epoch minus the sum of its batches' phases) in microseconds per batch.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (data set and estimators of the comparison script)

from afmfast import _afm_cython, _fm_cython
from afmfast.models.training import Trainer  # noqa: E402

KERNELS = {"afm": _afm_cython, "fm": _fm_cython}


def kernel_seconds(model, ws):
    return sum(KERNELS[model]._phase_times(ws).values())


def per_batch_epoch(trainer, model, X, y, order, step):
    """The loop fit ran before runs: one kernel call per batch."""
    kernel = 0.0
    for start in range(0, len(order), compare.BATCH):
        trainer.train_batch(X, y, order[start:start + compare.BATCH], step)
        kernel += kernel_seconds(model, trainer.workspace)
        step += 1
    return step, kernel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["fm:16", "afm:64"],
                        help="model:k pairs (default fm:16 afm:64)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="ml-tag rows")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per loop and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    data = compare.synthetic_mltag(args.rows)
    X, y, n = data.X, data.y, data.n_rows
    n_batches = -(-n // compare.BATCH)
    print(f"ml-tag, {n:,} rows, batch {compare.BATCH}: median seconds per epoch")
    print(f"{'config':>8} {'threads':>7} {'per batch':>10} {'runs':>8} {'ratio':>6} "
          f"{'outside kernel us/batch':>24}")
    for config in args.configs:
        model, k = config.split(":")
        k = int(k)
        for threads in args.threads:
            est = compare.make_estimator(model, k, "cython", threads)
            est._validate()
            trainer = Trainer(est, data, threads=threads, backend="cython", adaptive=False)
            trainer.train_batch(X, y, np.arange(compare.BATCH, dtype=np.int64), 0)  # warm-up
            step = 1
            times = {"batch": [], "runs": []}
            outside = []
            for epoch in range(args.epochs):
                order = trainer.epoch_order(n, epoch)
                t0 = time.perf_counter()
                step, kernel = per_batch_epoch(trainer, model, X, y, order, step)
                times["batch"].append(time.perf_counter() - t0)
                outside.append((times["batch"][-1] - kernel) / n_batches)
                t0 = time.perf_counter()
                step, _ = trainer.train_epoch(X, y, order, step)
                times["runs"].append(time.perf_counter() - t0)
            tb, tr = np.median(times["batch"]), np.median(times["runs"])
            print(f"{config:>8} {threads:>7} {tb:10.3f} {tr:8.3f} {tr / tb:6.3f} "
                  f"{1e6 * np.median(outside):24.0f}")


if __name__ == "__main__":
    main()
