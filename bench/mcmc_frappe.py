"""The Bayesian FM (``FM(solver="mcmc")``) on frappe-mini and on synthetic rating-like
data: validation RMSE and seconds per Gibbs iteration at 1 and 2 threads, and, when myFM
is installed, myFM's Bayesian FM at the same rank, sample count and split.

    python bench/mcmc_frappe.py                 # frappe-mini, k=16, 100 iterations
    python bench/mcmc_frappe.py --synthetic     # rating-like data from a known FM
    python bench/mcmc_frappe.py --no-myfm       # skip the comparison
    python bench/mcmc_frappe.py --backends numba  # one sampler backend only

Each seed's fits alternate the sampler backends (Cython and Numba by default; the
samples are the same, so are the RMSEs) so that a load on the machine falls on both.

Seconds per iteration: the median wall time of the fit's ``history_`` records (scalar
draws and the sweep, no validation), and the process's CPU time over the whole fit
divided by the iterations (steadier on a machine shared with other jobs). The
frappe-mini split is the one of tests/models/test_frappe.py (every 5th row of the file
is validation).
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


def ours(train, valid, k, n_iter, threads, seed=2016, backend="numba"):
    """(validation RMSE, median wall seconds of an iteration, CPU seconds per
    iteration over the whole fit)."""
    t = time.process_time()
    model = afmfast.FM(solver="mcmc", n_factors=k, n_iter=n_iter, init_stdev=0.1,
                       n_threads=threads, adaptive_threads=False, random_state=seed,
                       backend=backend, verbose=0).fit(train)
    cpu = time.process_time() - t
    per_iter = statistics.median(r["seconds"] for r in model.history_)
    return model.evaluate(valid)["rmse"], per_iter, cpu / n_iter


def _import_myfm():
    """myfm 0.4 imports pkg_resources (setuptools) only to read its own version: give
    it a stand-in when setuptools is absent rather than install setuptools."""
    import sys
    import types
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)

        shim.DistributionNotFound, shim.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = shim
    import myfm
    return myfm


def myfm_rmse(train, valid, k, n_iter, seed=0):
    myfm = _import_myfm()
    import scipy.sparse as sp

    def csr(d):
        # fresh writable float64/int32 arrays: myFM's binding refuses a Dataset's
        # read-only ones
        values = d.values if d.values is not None and d.values.size else np.ones(d.indices.size)
        return sp.csr_matrix((np.array(values, np.float64), np.array(d.indices, np.int32),
                              np.array(d.indptr, np.int32)), shape=(len(d), train.n_features))

    t = time.process_time()
    fm = myfm.MyFMRegressor(rank=k, init_stdev=0.1, random_seed=seed)
    fm.fit(csr(train), np.array(train.y, np.float64), n_iter=n_iter, n_kept_samples=n_iter)
    cpu = time.process_time() - t
    pred = fm.predict(csr(valid))
    lo, hi = valid.y.min(), valid.y.max()
    return float(np.sqrt(np.mean((np.clip(pred, lo, hi) - valid.y) ** 2))), cpu / n_iter


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--no-myfm", action="store_true")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each fit")
    parser.add_argument("--backends", default="cython,numba",
                        help="comma-separated sampler backends, alternated")
    args = parser.parse_args()
    train, valid = rating_like() if args.synthetic else frappe_mini()
    print(f"{'synthetic rating-like' if args.synthetic else 'frappe-mini'}: "
          f"{len(train)} train rows, {len(valid)} validation rows, "
          f"k={args.k}, {args.n_iter} iterations")
    names = [name for name in args.backends.split(",") if name]
    for backend in names:
        ours(train[:200], valid[:10], args.k, 2, 1, backend=backend)  # compile first
    for threads in (1, 2):
        for seed in range(args.seeds):
            for backend in names:
                rmse, per_iter, cpu = ours(train, valid, args.k, args.n_iter, threads, seed,
                                           backend)
                print(f"afmfast mcmc ({backend}), {threads} thread(s), seed {seed}: "
                      f"validation RMSE {rmse:.4f}, {per_iter:.4f} s per iteration "
                      f"(median wall), {cpu:.4f} CPU s per iteration", flush=True)
    if not args.no_myfm:
        try:
            _import_myfm()
        except ImportError:
            print("myfm is not installed: pip install 'myfm>=0.4,<0.5' for the comparison")
            return
        for seed in range(args.seeds):
            rmse, cpu = myfm_rmse(train, valid, args.k, args.n_iter, seed)
            print(f"myFM MyFMRegressor, seed {seed}: validation RMSE {rmse:.4f}, "
                  f"{cpu:.4f} CPU s per iteration", flush=True)


if __name__ == "__main__":
    main()
