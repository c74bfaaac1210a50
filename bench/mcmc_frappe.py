"""The Bayesian FM (``FM(solver="mcmc")``) on frappe-mini and on synthetic rating-like
data: validation RMSE and seconds per Gibbs iteration at 1 and 2 threads, side by side
with libFM's MCMC when a libFM binary is given, and with myFM's Bayesian FM when myFM is
installed, at the same rank, sample count, init_stdev and split.

    python bench/mcmc_frappe.py                 # frappe-mini, k=16, 100 iterations
    python bench/mcmc_frappe.py --synthetic     # rating-like data from a known FM
    python bench/mcmc_frappe.py --no-myfm       # skip the myFM comparison
    python bench/mcmc_frappe.py --backends numba  # one sampler backend only
    python bench/mcmc_frappe.py --probit        # the probit classifier (labels y > 0)
    python bench/mcmc_frappe.py --ceiling       # + two 1-thread fits at once (2-CPU bound)
    python bench/mcmc_frappe.py --libfm PATH --als 0.5 1 2 5  # libFM's ALS beside its MCMC
    python bench/mcmc_frappe.py --libfm /path/to/libFM --seeds 5   # or LIBFM=/path/to/libFM

Before and after each 2-thread fit the bench runs compare.py's CPU 0/1 probe
(bench/core_to_core.c, when a C compiler is there) and prints the cache-line latency
between the two CPUs (about 40 ns on one chiplet, 200 on two) and, before, their
floating-point throughput together against one alone (2.00 when each has a core to
itself): a 2-thread figure means little without them on a VM whose vCPUs move. The
summary gives the 2-thread speed-up of the pairs whose probes both saw one chiplet apart
from the others: while the two vCPUs sit on two chiplets a 2-thread sweep runs about as
fast as one thread (its threads read rows that the other thread wrote, a block before).

Each seed's fits alternate the sampler backends (Cython and Numba by default; the
samples are the same, so are the RMSEs) and libFM, so that a load on the machine falls
on all of them.

Seconds per iteration: the median wall time of the fit's ``history_`` records (scalar
draws and the sweep, no validation), and the process's CPU time over the whole fit
divided by the iterations (steadier on a machine shared with other jobs). The
frappe-mini split is the one of tests/models/test_frappe.py (every 5th row of the file
is validation).

libFM (``--libfm`` or the environment variable LIBFM): the split is written to a
temporary directory as libFM text (LF line ends: libFM refuses CRLF) and libFM runs
``-task r -dim 1,1,K -iter N -method mcmc -init_stdev 0.1 -seed S -rlog FILE``. Its RMSE
is the last iteration's "Test=" figure: the average of every sample's prediction, each
clipped to the training labels' range first. Its seconds per iteration are the median of
the ``time_learn`` column of its ``-rlog`` file: the user CPU time of one iteration (the
draws, then libFM's prediction of every training and test row, which it does each
iteration), without reading the data; one thread, as libFM has no other. Ours on one
thread are compared with that figure (our median wall seconds of an iteration; on one
thread wall and CPU time agree unless the machine is loaded).
"""
import argparse
import os
import statistics
import subprocess
import tempfile
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


def _timed_fit(args):
    return ours(*args)[1]


def ceiling(train, valid, k, n_iter, backend):
    """Median wall seconds per iteration of two 1-thread fits run at the same time in
    two processes (spawned, each with its own copy of the data)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_timed_fit, [(train[:200], valid[:10], k, 2, 1, 0, backend)] * 2)  # compile
        return pool.map(_timed_fit, [(train, valid, k, n_iter, 1, seed, backend)
                                     for seed in (0, 1)])


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
    # myFM reports progress through tqdm, one carriage-return line per iteration; tqdm
    # reads its TQDM_ defaults when it is first imported
    os.environ.setdefault("TQDM_DISABLE", "1")
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


def write_libfm(data, path):
    """Write a Dataset as libFM text ("label id:value ..." a row, LF line ends)."""
    values = (np.ones(data.indices.size, np.float32) if data.values is None
              or data.values.size == 0 else data.values)
    with open(path, "w", newline="\n") as out:
        for i in range(len(data)):
            lo, hi = data.indptr[i], data.indptr[i + 1]
            pairs = " ".join(f"{j}:{v:g}" for j, v in zip(data.indices[lo:hi],
                                                          values[lo:hi]))
            out.write(f"{float(data.y[i]):g} {pairs}\n")


def libfm_run(binary, train_path, valid_path, k, n_iter, seed, workdir, regular=None):
    """(validation RMSE, median user CPU seconds of an iteration, wall seconds of the
    whole run) of libFM's MCMC (module docstring), or with ``regular`` (one L2 for
    w0, w and V) of its ALS."""
    rlog = os.path.join(workdir, f"rlog_{seed}.tsv")
    method = ["-method", "mcmc"] if regular is None else [
        "-method", "als", "-regular", f"{regular:g},{regular:g},{regular:g}"]
    cmd = [binary, "-task", "r", "-train", train_path, "-test", valid_path,
           "-dim", f"1,1,{k}", "-iter", str(n_iter), *method,
           "-init_stdev", "0.1", "-seed", str(seed), "-rlog", rlog]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    wall = time.perf_counter() - t
    tests = [line for line in done.stdout.splitlines() if line.startswith("#Iter=")]
    if done.returncode != 0 or len(tests) != n_iter:
        raise RuntimeError(f"libFM ({' '.join(cmd)}) exited with {done.returncode} after "
                           f"{len(tests)} of {n_iter} iterations:\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-2000:]}")
    rmse = float(tests[-1].rsplit("Test=", 1)[1].split()[0])
    with open(rlog) as log:
        header = log.readline().rstrip("\n").split("\t")
        column = header.index("time_learn")
        per_iter = statistics.median(float(line.split("\t")[column]) for line in log)
    return rmse, per_iter, wall


def _mean(values):
    return statistics.fmean(values) if values else float("nan")


def probit(train, valid, k, n_iter):
    """The probit classifier (FMClassifier(solver="mcmc")) against the logistic SGD
    classifier with its defaults and 20 epochs, on the labels y > 0: validation
    logloss, AUC and accuracy, and the fit's seconds."""
    from bench_common import table  # this folder's (bench/), when run as a script

    rows = []
    for name, model in (
            (f"FMClassifier(solver='mcmc'), k={k}, {n_iter} iterations",
             afmfast.FMClassifier(solver="mcmc", n_factors=k, n_iter=n_iter,
                                  init_stdev=0.1, verbose=0)),
            ("FMClassifier() defaults, 20 epochs", afmfast.FMClassifier(verbose=0))):
        t = time.perf_counter()
        model.fit(train, train.y > 0)
        seconds = time.perf_counter() - t
        metrics = model.evaluate(valid, valid.y > 0)
        rows.append([name] + [f"{metrics[m]:.4f}" for m in ("logloss", "auc", "accuracy")]
                    + [f"{seconds:.1f}"])
    print(table(["classifier (labels y > 0)", "logloss", "AUC", "accuracy", "fit s"], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--no-myfm", action="store_true")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each fit")
    parser.add_argument("--backends", default="cython,numba",
                        help="comma-separated sampler backends, alternated")
    parser.add_argument("--libfm", default=os.environ.get("LIBFM"),
                        help="libFM binary for the side-by-side run (default: $LIBFM)")
    parser.add_argument("--als", type=float, nargs="+", default=None, metavar="REG",
                        help="with --libfm: also libFM's ALS (coordinate descent) at these "
                             "L2 values, the same seeds, for item 3 of issue #24")
    parser.add_argument("--ceiling", action="store_true",
                        help="also two 1-thread fits at once in two processes: what the "
                             "two vCPUs give together, the bound on the 2-thread speed-up")
    parser.add_argument("--probit", action="store_true",
                        help="only the probit classifier against the logistic one")
    args = parser.parse_args()
    train, valid = rating_like() if args.synthetic else frappe_mini()
    if args.probit:
        probit(train, valid, args.k, args.n_iter)
        return
    print(f"{'synthetic rating-like' if args.synthetic else 'frappe-mini'}: "
          f"{len(train)} train rows, {len(valid)} validation rows, "
          f"k={args.k}, {args.n_iter} iterations")
    names = [name for name in args.backends.split(",") if name]
    for backend in names:
        ours(train[:200], valid[:10], args.k, 2, 1, backend=backend)  # compile first
    with tempfile.TemporaryDirectory() as workdir:
        # this folder's (bench/) probe of where the two vCPUs sit, as compare.py prints it
        from comparison.probes import build_core_probe, core_probe
        from comparison.targets import SPLIT_LATENCY_NS

        probe = build_core_probe(workdir)
        if args.libfm:
            paths = [os.path.join(workdir, name) for name in ("train.libfm", "valid.libfm")]
            write_libfm(train, paths[0])
            write_libfm(valid, paths[1])
        rmses, per_iters, libfm_rmses, libfm_per_iters = [], {}, [], []
        one_chiplet = {}  # backend: per seed, both probes of its 2-thread fit on one chiplet
        # 1 and 2 threads alternate fit by fit, so that a change of load falls on both
        for seed in range(args.seeds):
            for threads in (1, 2):
                for backend in names:
                    latency, flops = core_probe(probe) if threads == 2 else (None, None)
                    rmse, per_iter, cpu = ours(train, valid, args.k, args.n_iter, threads,
                                               seed, backend)
                    after = core_probe(probe)[0] if threads == 2 else None
                    per_iters.setdefault((backend, threads), []).append(per_iter)
                    if threads == 2:
                        one_chiplet.setdefault(backend, []).append(
                            None if latency is None or after is None
                            else max(latency, after) < SPLIT_LATENCY_NS)
                    if threads == 1 and backend == names[0]:
                        rmses.append(rmse)
                    probes = ""
                    if latency is not None:
                        probes = (f"; CPU 0/1 probe just before: {latency:.0f} ns a cache "
                                  f"line, {flops:.2f}x one CPU's flops")
                    if after is not None:
                        probes += f"; just after: {after:.0f} ns"
                    print(f"afmfast mcmc ({backend}), {threads} thread(s), seed {seed}: "
                          f"validation RMSE {rmse:.4f}, {per_iter:.4f} s per iteration "
                          f"(median wall), {cpu:.4f} CPU s per iteration{probes}", flush=True)
                if args.libfm and threads == 1:
                    rmse, per_iter, wall = libfm_run(args.libfm, *paths, args.k,
                                                     args.n_iter, seed, workdir)
                    libfm_rmses.append(rmse)
                    libfm_per_iters.append(per_iter)
                    print(f"libFM mcmc, seed {seed}: validation RMSE {rmse:.4f}, "
                          f"{per_iter:.4f} s per iteration (median user CPU), {wall:.2f} s "
                          f"wall for the whole run", flush=True)
        if args.ceiling:
            pair = ceiling(train, valid, args.k, args.n_iter, names[0])
            one = statistics.median(per_iters[names[0], 1])
            print(f"two 1-thread fits ({names[0]}) at once, in two processes: "
                  f"{pair[0]:.4f} and {pair[1]:.4f} s per iteration (median wall), "
                  f"against {one:.4f} alone: the most that 2 threads can give here now "
                  f"is {2 * one / max(pair):.2f}x", flush=True)
        for regular in (args.als or []) if args.libfm else []:
            als = [libfm_run(args.libfm, *paths, args.k, args.n_iter, seed, workdir,
                             regular)[0] for seed in range(args.seeds)]
            print(f"libFM als, L2 {regular:g}: validation RMSE {_mean(als):.4f} (seeds "
                  f"0-{args.seeds - 1}: {', '.join(f'{r:.4f}' for r in als)})", flush=True)
    rmse_default, _, _ = ours(train, valid, args.k, args.n_iter, 1, None, names[0])
    myfm_rmses = []
    if not args.no_myfm:
        try:
            _import_myfm()
        except ImportError:
            print("myfm is not installed: pip install 'myfm>=0.4,<0.5' for the comparison")
        else:
            for seed in range(args.seeds):
                rmse, cpu = myfm_rmse(train, valid, args.k, args.n_iter, seed)
                myfm_rmses.append(rmse)
                print(f"myFM MyFMRegressor, seed {seed}: validation RMSE {rmse:.4f}, "
                      f"{cpu:.4f} CPU s per iteration", flush=True)
    print(f"\nvalidation RMSE, mean over seeds 0-{args.seeds - 1}: afmfast "
          f"{_mean(rmses):.4f} (default seed: {rmse_default:.4f})"
          + (f", libFM {_mean(libfm_rmses):.4f}" if libfm_rmses else "")
          + (f", myFM {_mean(myfm_rmses):.4f}" if myfm_rmses else ""))
    libfm_s = statistics.median(libfm_per_iters) if libfm_per_iters else None
    for backend in names:
        one = statistics.median(per_iters[backend, 1])
        two = statistics.median(per_iters[backend, 2])
        # each seed's 1- and 2-thread fits ran one after the other: the median of their
        # ratios is steadier than the ratio of medians when the machine's speed drifts
        pairs = [a / b for a, b in zip(per_iters[backend, 1], per_iters[backend, 2])]
        print(f"{backend}: {one:.4f} s per iteration on 1 thread, {two:.4f} on 2 "
              f"({one / two:.2f}x; median of the seeds' pairs {statistics.median(pairs):.2f}x"
              f": {', '.join(f'{r:.2f}' for r in pairs)})" + (
                  "" if libfm_s is None else f"; 1 thread / libFM = {one / libfm_s:.2f} "
                                             f"(libFM {libfm_s:.4f})"))
        placed = one_chiplet.get(backend, [])
        same = [r for r, ok in zip(pairs, placed) if ok is True]
        split = [r for r, ok in zip(pairs, placed) if ok is False]
        if placed and split:
            print(f"  {backend}: of those pairs, the {len(same)} whose 2-thread fit had both "
                  f"vCPUs on one chiplet before and after (probes under {SPLIT_LATENCY_NS} "
                  f"ns): median "
                  f"{statistics.median(same) if same else float('nan'):.2f}x; the other "
                  f"{len(split)}: median {statistics.median(split):.2f}x")


if __name__ == "__main__":
    main()
