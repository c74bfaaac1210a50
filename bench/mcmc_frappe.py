"""The Bayesian FM (``FM(solver="mcmc")``) on frappe-mini and on synthetic rating-like
data: validation RMSE and seconds per Gibbs iteration at 1 and 2 threads, and, when myFM
is installed, myFM's Bayesian FM at the same rank, sample count and split.

    python bench/mcmc_frappe.py                 # frappe-mini, k=16, 100 iterations
    python bench/mcmc_frappe.py --synthetic     # rating-like data from a known FM
    python bench/mcmc_frappe.py --no-myfm       # skip the comparison

Seconds per iteration are the median of the fit's ``history_`` records (the sampling
time of an iteration: scalar draws and the sweep, no validation). The frappe-mini split
is the one of tests/models/test_frappe.py (every 5th row of the file is validation).
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import afmfast
from afmfast.data.dataset import Dataset

FRAPPE = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "frappe"
          / "frappe.validation.libfm")


def frappe_mini():
    data = afmfast.load_libfm(FRAPPE)
    is_valid = (np.arange(1, len(data) + 1) % 5) == 0
    return data[~is_valid], data[is_valid]


def rating_like(seed=0, n_rows=60000, fields=(2000, 1500, 7, 24), k=8):
    """Users, items and two context fields; ratings 1..5 from a planted FM plus noise,
    rounded and clipped (what rating data looks like)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(fields)])
    M = int(offsets[-1])
    w, V = rng.normal(0, 0.3, M), rng.normal(0, 0.3, (M, k))
    ids = np.stack([offsets[f] + rng.zipf(1.3, n_rows) % fields[f]
                    for f in range(len(fields))], axis=1)
    s = V[ids].sum(axis=1)
    inter = 0.5 * ((s ** 2).sum(axis=1) - (V[ids] ** 2).sum(axis=(1, 2)))
    y = np.clip(np.round(3.5 + w[ids].sum(axis=1) + inter + rng.normal(0, 0.7, n_rows)),
                1, 5)
    F = len(fields)
    data = Dataset(np.arange(0, n_rows * F + 1, F, dtype=np.int64),
                   ids.reshape(-1).astype(np.int32), None,
                   y.astype(np.float32), M)
    n_train = int(0.8 * n_rows)
    return data[np.arange(n_train)], data[np.arange(n_train, n_rows)]


def ours(train, valid, k, n_iter, threads):
    t = time.perf_counter()
    model = afmfast.FM(solver="mcmc", n_factors=k, n_iter=n_iter, init_stdev=0.1,
                       n_threads=threads, backend="numba", verbose=0).fit(train)
    wall = time.perf_counter() - t
    per_iter = statistics.median(r["seconds"] for r in model.history_)
    return model.evaluate(valid)["rmse"], per_iter, wall


def myfm_rmse(train, valid, k, n_iter):
    import myfm
    import scipy.sparse as sp

    def csr(d):
        values = d.values if d.values.size else np.ones(d.indices.size, np.float32)
        return sp.csr_matrix((values, d.indices, d.indptr), shape=(len(d), train.n_features))

    t = time.perf_counter()
    fm = myfm.MyFMRegressor(rank=k, init_stdev=0.1, random_seed=0)
    fm.fit(csr(train), train.y, n_iter=n_iter, n_kept_samples=n_iter)
    wall = time.perf_counter() - t
    pred = fm.predict(csr(valid))
    lo, hi = valid.y.min(), valid.y.max()
    return float(np.sqrt(np.mean((np.clip(pred, lo, hi) - valid.y) ** 2))), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--no-myfm", action="store_true")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--n-iter", type=int, default=100)
    args = parser.parse_args()
    train, valid = rating_like() if args.synthetic else frappe_mini()
    print(f"{'synthetic rating-like' if args.synthetic else 'frappe-mini'}: "
          f"{len(train)} train rows, {len(valid)} validation rows, "
          f"k={args.k}, {args.n_iter} iterations")
    ours(train[:200], valid[:10], args.k, 2, 1)  # compile before timing
    for threads in (1, 2):
        rmse, per_iter, wall = ours(train, valid, args.k, args.n_iter, threads)
        print(f"afmfast mcmc, {threads} thread(s): validation RMSE {rmse:.4f}, "
              f"{per_iter:.4f} s per iteration (median), fit {wall:.1f} s")
    if not args.no_myfm:
        try:
            rmse, wall = myfm_rmse(train, valid, args.k, args.n_iter)
        except ImportError:
            print("myfm is not installed: pip install 'myfm>=0.4,<0.5' for the comparison")
        else:
            print(f"myFM MyFMRegressor: validation RMSE {rmse:.4f}, fit {wall:.1f} s")


if __name__ == "__main__":
    main()
