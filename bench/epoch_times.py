"""Seconds per training epoch on frappe-mini, per model, backend and thread count.

    python bench/epoch_times.py                      # FM k=16, AFM k=t=16 and 256
    python bench/epoch_times.py --models afm --sizes 64 --epochs 4

Reads ../shared/data/frappe/frappe.validation.libfm (beside the repository; research use
only, never copied into it), splits it by the frappe-mini protocol and trains on the
46,178 training rows with the reference settings. Prints the median seconds per epoch
(the kernel steps only, not the per-epoch evaluation) of each configuration, measured
side by side in one run, and how long fit took per epoch against that (``fit/epoch``:
what the epoch loop adds, with fit's default reporting and no validation set; after a
one-epoch warm-up fit per backend, so that loading compiled code once per process does
not count); quote ratios, not absolute times, on a shared machine.
"""
import time
import argparse

import numpy as np

from bench_common import frappe_mini_train, make_estimator
from afmfast.kernels.backends import available_backends


def median_epoch_seconds(model, train):
    """(median seconds of an epoch's kernel work, fit's wall time per epoch)."""
    t0 = time.perf_counter()
    model.fit(train)
    wall = (time.perf_counter() - t0) / len(model.history_)
    return float(np.median([h["seconds"] for h in model.history_])), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fm", "afm"], choices=("fm", "afm"))
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="k (= t for AFM); default: FM 16, AFM 16 and 256")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per configuration (default 8, or 3 at k >= 128)")
    args = parser.parse_args()
    train = frappe_mini_train()
    print(f"frappe-mini train: {len(train)} rows, batch 4096; median seconds per epoch")
    print(f"{'model':<12}{'backend':<9}"
          + "".join(f"{t:>2} thread(s) fit/epoch " for t in args.threads))
    warmed = set()
    for model_name in args.models:
        sizes = args.sizes or ([16] if model_name == "fm" else [16, 256])
        for k in sizes:
            epochs = args.epochs or (3 if k >= 128 else 8)
            for backend in available_backends(model_name):
                if (model_name, backend) not in warmed:
                    # a process's first fit on a backend also loads its compiled code
                    # once (Numba's cache), which is not a cost of every epoch
                    make_estimator(model_name, k, backend, n_epochs=1).fit(train[:4096])
                    warmed.add((model_name, backend))
                cells = [median_epoch_seconds(
                             make_estimator(model_name, k, backend, threads, n_epochs=epochs,
                                            adaptive_threads=False), train)
                         for threads in args.threads]
                label = f"{model_name.upper()} k={k}"
                print(f"{label:<12}{backend:<9}"
                      + "".join(f"{epoch:>12.4f} {wall / epoch:>9.2f} " for epoch, wall in cells)
                      + (f"  speed-up {cells[0][0] / cells[-1][0]:.2f}x"
                         if len(cells) > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
