"""AFM predict against a training epoch: the seconds of ``predict`` on the training rows
over the median seconds of an epoch on them, per data set, k (= t), backend and thread
count. Forward only is about a third of a training step's work; the target is a ratio of
at most TARGET.

    python bench/predict_ratio.py                          # frappe-mini and ml-tag, k 16 64 256
    python bench/predict_ratio.py --data frappe --sizes 64 --threads 2 --repeats 5

Data: frappe-mini's 46,178 training rows (bench/bench_common.py; skipped when the file is
absent) and ``--rows`` rows of the synthetic ml-tag of bench/compare.py (3 one-hot
fields: few pairs per row, few repeated within a chunk). Each configuration fits one
epoch (Numba compiles, workspaces fill) and predicts once, then alternates ``--repeats``
times a training epoch (the kernel steps of fit's epoch loop) and a ``predict`` of the
training rows, so that a change of load on a shared machine hits both alike; it prints
the medians of each and the median of the per-repetition ratios.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the synthetic ml-tag set)
import bench_common  # noqa: E402  (the frappe-mini split)

import afmfast  # noqa: E402
from afmfast.kernels.backends import available_backends  # noqa: E402
from afmfast.models.training import Trainer  # noqa: E402

TARGET = 0.5


def predict_ratio(train, k, backend, threads, repeats):
    """(epoch seconds, predict seconds, ratio): medians over ``repeats`` alternations
    of AFM k = t on ``train``."""
    model = afmfast.AFM(n_factors=k, attention_size=k, n_epochs=1, verbose=0,
                        backend=backend, n_threads=threads).fit(train)
    model.predict(train)
    # trains the model's own parameters from a fresh start: the epochs time the same
    # kernels fit runs, and predict scores the parameters they leave
    trainer = Trainer(model, train, adaptive=False)
    step = 0
    epochs, predicts = [], []
    for rep in range(repeats):
        order = trainer.epoch_order(len(train), 1 + rep)
        t0 = time.perf_counter()
        step, _ = trainer.train_epoch(train.X, train.y, order, step)
        t1 = time.perf_counter()
        model.predict(train)
        t2 = time.perf_counter()
        epochs.append(t1 - t0)
        predicts.append(t2 - t1)
    ratio = np.median(np.array(predicts) / np.array(epochs))
    return float(np.median(epochs)), float(np.median(predicts)), float(ratio)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["frappe", "mltag"],
                        choices=("frappe", "mltag"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=available_backends("afm"))
    parser.add_argument("--rows", type=int, default=200_000, help="ml-tag rows")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sets = []
    if "frappe" in args.data:
        if bench_common.FRAPPE.exists():
            sets.append(("frappe-mini", bench_common.frappe_mini_train()))
        else:
            print(f"skipping frappe-mini: {bench_common.FRAPPE} not found")
    if "mltag" in args.data:
        sets.append(("ml-tag", compare.synthetic_mltag(args.rows)))
    print(f"{'data':<12}{'k':>5} {'backend':<8}{'threads':>8}{'epoch s':>10}"
          f"{'predict s':>11}{'ratio':>8}")
    worst = 0.0
    for name, train in sets:
        for k in args.sizes:
            for backend in args.backends:
                for threads in args.threads:
                    epoch, pred, ratio = predict_ratio(train, k, backend, threads,
                                                       args.repeats)
                    worst = max(worst, ratio)
                    print(f"{name:<12}{k:>5} {backend:<8}{threads:>8}{epoch:>10.4f}"
                          f"{pred:>11.4f}{ratio:>8.3f}", flush=True)
    print(f"largest ratio {worst:.3f} (target at most {TARGET})")


if __name__ == "__main__":
    main()
