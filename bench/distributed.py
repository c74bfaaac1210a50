"""afmfast on Dask against single-process afmfast and Spark MLlib's FMRegressor.

    python bench/distributed.py                      # frappe-mini and 4M ml-tag-shaped rows
    python bench/distributed.py --data frappe --spark
    python bench/distributed.py --data mltag --rows 4000000 --epochs 5 --spark
    python bench/distributed.py --accuracy           # the frappe-mini accuracy targets
    python bench/distributed.py --data mltag --also-every 256 --scaling 3  # 2/1 medians
    python bench/distributed.py --data mltag --also-every 256 --allocator 3
    python bench/distributed.py --data mltag --sync-every 512 --profiler 5
    python bench/distributed.py --data frappe --spark --load 1   # beside a busy process
    python bench/distributed.py --data mltag --spark --tuned --sync-every 512 \
        --shuffle-unit 64 --no-profiler          # rows read in runs, workers unprofiled
    python bench/distributed.py --data mltag --spark --tuned --worker-threads  # 1 x 2

Rows of the table, per data set:
- afmfast single process, 1 thread (``afmfast.FM`` on the memory-mapped train store);
- the ceiling of data-parallel training here: two processes side by side, each training
  on half of the rows and never synchronising (no test RMSE: there is no one model);
- afmfast on Dask, 1 and 2 workers x 1 thread (``afmfast.dask.DaskFM``, a
  ``distributed.LocalCluster`` of worker processes, the same store);
- with ``--spark``: ``pyspark.ml.regression.FMRegressor`` in ``local[2]``, factorSize 16,
  its stepSize tuned on the validation rows, after a 2-iteration fit that warms up the
  JVM, then the chosen stepSize fitted again, alternating with 2-iteration fits that
  measure the fit's fixed cost (``--spark-repeats`` of each: medians;
  pyspark is a bench-only extra: ``pip install pyspark``; it needs Java 17);
- with ``--tuned``: afmfast tuned as Spark is, on Spark's model: a plain FM (keep 1, no
  batch norm), its learning rate chosen over ``--tuned-rates`` on the validation rows in
  one process, then that rate in two processes on halves (its ceiling) and on 2 Dask
  workers at each sync_every; with ``--spark`` a Spark ratio line for each 2-worker run
  and each ceiling (a bound: what two workers would reach if the exchange cost
  nothing), saying whether its test RMSE is at or below Spark's;
- with ``--tuned --worker-threads``: the same plain FM on one Dask worker whose kernels
  run on 2 threads (the other way to give a fit two cores), with its Spark ratio.

Columns: test RMSE (predictions clipped to the test labels' range, as afmfast.metrics.rmse
does, for every row), seconds per epoch (afmfast: training and synchronisation, without
scoring or the fit's set-up; Spark: an iteration, one pass over the rows with the
default miniBatchFraction 1, without the fit's fixed cost: ``run_spark``), the epochs or
iterations run, and the seconds of the whole training (afmfast: its epochs, early
stopping included; Spark: its iterations).

Data: frappe-mini (../shared/data/frappe beside the repository; the rows whose 1-based
line number is divisible by 5 are held out, of those the odd multiples of 5 validate and
the multiples of 10 test) and ``bench_common.synthetic_mltag`` rows (ml-tag's three
fields and 90,000 features, labels -1/1), split 8:1:1 into train, validation, test.
afmfast trains the reference FM settings (k 16, lr 0.01, batch 4096, keep 0.7, batch
norm) with early stopping on the validation rows.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from bench_common import (FRAPPE, PLAIN_FM, log, mltag_splits, packages_before_bench,
                          table, write_stores)
from load import Load, thread_cpu_seconds

import afmfast

# this file shares its name with the ``distributed`` package
packages_before_bench()
from afmfast.metrics import rmse  # noqa: E402

FM_SETTINGS = dict(n_factors=16, learning_rate=0.01, batch_size=4096, keep=0.7,
                   batch_norm=True, verbose=0)
# --tuned's label for the plain FM (bench_common.PLAIN_FM)
TUNED = "afmfast plain FM (keep 1, no batch norm)"
# the Dask configuration of the bench's clusters (--no-profiler adds to it)
WORKER_CONFIG = {}
_PROFILER = "distributed.worker.profile.enabled"
# settings compared in pairs of 2-worker fits (--allocator N, --profiler N): run_dask's
# arguments with the setting, without it, and what the ratio (without / with) is
PAIRED = {
    "allocator": ({}, {"nanny_allocator": True},
                  "without afmfast.dask.memory's settings / with them"),
    "profiler": ({"worker_config": {_PROFILER: True}},
                 {"worker_config": {_PROFILER: False}},
                 "without the workers' profiler / with it"),
}


# Spark's short fits, whose time is its fit's fixed cost plus this many iterations
SHORT_FIT = 2


def splits(name, rows, seed):
    """{"train", "valid", "test"} Datasets of a data set."""
    if name == "frappe":
        data = afmfast.load_libfm(FRAPPE)
        line = np.arange(1, len(data) + 1)
        return {"train": data[line % 5 != 0], "valid": data[line % 10 == 5],
                "test": data[line % 10 == 0]}
    return mltag_splits(rows, seed)


def epoch_seconds(history):
    """Median seconds of the epochs (the first included: nothing is compiled then)."""
    return float(np.median([h["seconds"] for h in history]))


def run_single(paths, epochs, threads, **extra):
    model = afmfast.FM(n_epochs=epochs, n_threads=threads, adaptive_threads=False,
                       **dict(FM_SETTINGS, **extra))
    train = afmfast.open_store(paths["train"])
    model.fit(train, validation=afmfast.open_store(paths["valid"]))
    test = afmfast.open_store(paths["test"])
    batches = -(-train.n_rows // FM_SETTINGS["batch_size"])
    seconds = epoch_seconds(model.history_)
    return {"rmse": model.evaluate(test)["rmse"],
            # the kept (best) epoch's validation RMSE, as the fit scored it
            "valid": model.history_[model.best_epoch_ - 1]["valid_rmse"],
            "sec": seconds, "batch_ms": 1e3 * seconds / batches,
            "total": sum(h["seconds"] for h in model.history_),
            "passes": len(model.history_), "model": model}


def _train_half(path, part, epochs, settings):
    from afmfast.dask.worker import open_shard

    model = afmfast.FM(n_epochs=epochs, n_threads=1, adaptive_threads=False, **settings)
    model.fit(open_shard((path, part, 2)))
    return epoch_seconds(model.history_)


def run_ceiling(paths, epochs, **extra):
    """Two processes side by side, each training FM (``FM_SETTINGS`` updated by
    ``extra``) on its half of the rows with no synchronisation at all: the most that two
    workers can gain over one on this machine, whatever the exchange costs (seconds per
    epoch: the slower of the two)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        # the whole settings: FM_SETTINGS as main set them, which a spawned process
        # would import afresh
        seconds = pool.starmap(_train_half, [(paths["train"], part, epochs,
                                              dict(FM_SETTINGS, **extra))
                                             for part in (0, 1)])
    half = -(-afmfast.open_store(paths["train"]).n_rows // 2)
    return {"rmse": float("nan"), "sec": max(seconds), "total": max(seconds) * epochs,
            "passes": epochs,
            "batch_ms": 1e3 * max(seconds) / -(-half // FM_SETTINGS["batch_size"])}


def _nanny_allocator():
    """Make this worker process leave its allocator as Dask's nanny set it (the
    ``--allocator`` comparison's "without" runs): ``afmfast.dask.memory.acquire`` a
    no-op."""
    from afmfast.dask import memory

    memory.acquire = lambda: False


def dask_label(workers, sync_every):
    """The results' label of afmfast on Dask with the reference settings."""
    return f"afmfast on Dask, {workers} worker(s) x 1 thread, sync_every {sync_every}"


def run_dask(paths, epochs, workers, sync_every, init_from=None, cls=None, merge="sum",
             nanny_allocator=False, watch=None, worker_config=None, threads=1, **extra):
    """A Dask fit on a LocalCluster of ``workers``, each training on ``threads`` kernel
    threads (``worker_config``: Dask settings over ``WORKER_CONFIG``); ``watch(client)``,
    if given, returns a started thread that watches the fit and is joined after it."""
    import dask
    from distributed import Client, LocalCluster

    from afmfast.dask import DaskFM

    cls = DaskFM if cls is None else cls
    settings = dict(FM_SETTINGS, **extra)
    with dask.config.set(dict(WORKER_CONFIG, **(worker_config or {}))), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        if nanny_allocator:
            client.run(_nanny_allocator)
        model = cls(n_epochs=epochs, n_threads=threads, adaptive_threads=False, client=client,
                    sync_every=sync_every, merge=merge, **settings)
        watcher = watch(client) if watch is not None else None
        model.fit(paths["train"], validation=paths["valid"], init_from=init_from)
        if watcher is not None:
            watcher.join()
        result = {"rmse": model.evaluate(paths["test"])["rmse"],
                  "sec": epoch_seconds(model.history_), "passes": len(model.history_),
                  "total": sum(h["seconds"] for h in model.history_),
                  "model": model.to_local(),
                  "sync_mb_per_epoch": float(np.mean([h["sync_bytes"] for h in
                                                      model.history_])) / 2**20,
                  "syncs_per_epoch": float(np.mean([h["syncs"] for h in model.history_])),
                  "wait_per_epoch": float(np.mean([h["sync_wait_seconds"] for h in
                                                   model.history_])),
                  # per synchronisation, for docs/distributed.md's projection
                  "per_sync": {key: float(np.mean([e[key] for e in model.sync_log_]))
                               for key in ("batches", "bytes", "train_seconds",
                                           "train_cpu_seconds", "merge_seconds",
                                           "wait_seconds", "seconds")},
                  "rows": afmfast.open_store(paths["train"]).n_rows, "workers": workers}
    return result


def _thread_cpu(pids):
    """{(pid, tid): CPU seconds so far} of every thread of the processes ``pids``."""
    return {(pid, tid): s for pid in pids for tid, s in thread_cpu_seconds(pid).items()}


def run_cpu_shares(paths, every, seconds, sec_per_epoch):
    """Where the CPUs go during a 2-worker fit (Linux): each thread's CPU time over
    ``seconds`` of the fit's middle, as shares of one CPU: per worker its training (the
    threads other than the main one, where the actor trains) and its event loop (the
    main thread: comms, actor calls, payloads), and this driver process (its client's
    event loop). The fit runs long enough (``sec_per_epoch`` a 2-worker epoch) with
    early stopping off."""
    import threading

    warm = 1.0
    epochs = int(math.ceil(1.5 * (warm + seconds) / max(sec_per_epoch, 1e-3))) + 2
    shares = {}

    def sample(pids):
        time.sleep(warm)
        before, t0 = _thread_cpu(pids + [os.getpid()]), time.perf_counter()
        time.sleep(seconds)
        after, t1 = _thread_cpu(pids + [os.getpid()]), time.perf_counter()
        used = {key: (after[key] - before.get(key, 0.0)) / (t1 - t0) for key in after}
        for i, pid in enumerate(pids):
            shares[f"worker {i} training"] = sum(
                v for (p, tid), v in used.items() if p == pid and tid != pid)
            shares[f"worker {i} event loop"] = used.get((pid, pid), 0.0)
        shares["driver"] = sum(v for (p, _), v in used.items() if p == os.getpid())
        shares["idle or elsewhere"] = (os.cpu_count() or 1) - sum(used.values())

    def watch(client):
        sampler = threading.Thread(target=sample,
                                   args=(sorted(client.run(os.getpid).values()),))
        sampler.start()
        return sampler

    run_dask(paths, epochs, 2, every, watch=watch, early_stopping=False)
    if not shares:
        raise RuntimeError("--cpu-shares: the fit ended before the sample; raise the "
                           "epochs' estimate")
    return shares


def write_libsvm(data, path):
    """Spark's libsvm text (1-based ids, values 1) of a one-hot Dataset."""
    ids = np.asarray(data.indices, np.int64) + 1
    starts = np.asarray(data.indptr)
    labels = [f"{v:g}" for v in np.asarray(data.y)]
    tokens = np.char.add(ids.astype(str), ":1")
    with open(path, "w") as fh:
        for lo in range(0, data.n_rows, 100_000):
            hi = min(data.n_rows, lo + 100_000)
            fh.write("".join(f"{labels[r]} {' '.join(tokens[starts[r]:starts[r + 1]])}\n"
                             for r in range(lo, hi)))


def run_spark(parts, folder, iterations, step_sizes, repeats):
    """FMRegressor in local[2]: stepSize tuned on the validation rows; returns the best
    configuration's test RMSE and seconds per iteration.

    A fit has a fixed cost besides its iterations (its jobs' set-up and the model's
    making; docs/distributed.md has it measured), as afmfast's fit has its own, which an
    afmfast epoch's seconds leave out. So the per-pass figure
    is the marginal iteration: (the median of the best configuration's fit and
    ``repeats - 1`` more, the same seed and so the same model) less (the median of
    ``repeats`` fits of SHORT_FIT iterations, alternating with them), over the
    difference in iterations. Also returned: the fit's seconds over its iterations
    (``sec_fit``, what earlier versions of this bench reported) and the fixed cost."""
    from pyspark.ml.regression import FMRegressor
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("afmfast-bench")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "8g").config("spark.ui.enabled", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    n_features = parts["train"].n_features
    frames = {}
    for key, data in parts.items():
        path = os.path.join(folder, f"{key}.libsvm")
        write_libsvm(data, path)
        frames[key] = (spark.read.format("libsvm").option("numFeatures", n_features)
                       .load(path).repartition(2).cache())
        frames[key].count()
    # a throwaway fit first: the JVM compiles Spark's code paths during the first one,
    # which would otherwise count against the first step size
    FMRegressor(factorSize=16, maxIter=2, stepSize=step_sizes[0], seed=0).fit(
        frames["train"])
    def timed_fit(step, n_iterations=iterations):
        t = time.perf_counter()
        model = FMRegressor(factorSize=16, maxIter=n_iterations, stepSize=step,
                            seed=0).fit(frames["train"])
        return model, time.perf_counter() - t

    best = None
    for step in step_sizes:
        model, seconds = timed_fit(step)
        scores = {}
        for key in ("valid", "test"):
            pred = model.transform(frames[key]).select("label", "prediction").toPandas()
            scores[key] = rmse(pred["label"].to_numpy(), pred["prediction"].to_numpy())
        log(f"  spark stepSize={step}: valid {scores['valid']:.4f}, test "
            f"{scores['test']:.4f}, {seconds / iterations:.2f} s/iteration")
        if best is None or scores["valid"] < best["valid"]:
            best = {"valid": scores["valid"], "rmse": scores["test"],
                    "sec": seconds / iterations, "total": seconds, "passes": iterations,
                    "step": step}
    seconds, short = [best["total"]], []
    for r in range(repeats):
        short.append(timed_fit(best["step"], SHORT_FIT)[1])
        log(f"  spark stepSize={best['step']}, {SHORT_FIT} iterations: {short[-1]:.2f} s")
        if r < repeats - 1:
            seconds.append(timed_fit(best["step"])[1])
            log(f"  spark stepSize={best['step']} again: {seconds[-1] / iterations:.2f} "
                f"s/iteration")
    spark.stop()
    total, fixed_fit = float(np.median(seconds)), float(np.median(short))
    marginal = (total - fixed_fit) / (iterations - SHORT_FIT)
    best.update(total=marginal * iterations, sec=marginal, sec_fit=total / iterations,
                fixed=fixed_fit - SHORT_FIT * marginal, fits_seconds=seconds,
                short_seconds=short)
    return best


def bench(name, args):
    sync_every = args.sync_every or (4 if name == "frappe" else 64)
    log(f"{name}: preparing data")
    parts = splits(name, args.rows, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        paths = write_stores(parts, folder)
        results = {}
        log(f"{name}: single process")
        results["afmfast, 1 process x 1 thread"] = run_single(paths, args.epochs, 1)
        log(f"{name}: two processes on halves, no synchronisation")
        results["(ceiling) 2 processes x 1 thread, each on half the rows, never "
                "synchronised"] = run_ceiling(paths, args.epochs)
        runs = [(1, sync_every)] + [(2, every) for every in [sync_every] + args.also_every]
        for workers, every in runs:
            log(f"{name}: Dask, {workers} worker(s), sync_every {every}")
            results[dask_label(workers, every)] = run_dask(paths, args.epochs, workers,
                                                           every, merge=args.merge)
        pairs = {}
        for key, (with_it, without_it, _) in PAIRED.items():
            pairs[key] = {every: [] for every in [sync_every] + args.also_every}
            for r in range(getattr(args, key)):
                # 2 workers with the setting and without it, one after the other
                log(f"{name}: {key} comparison {r + 1} of {getattr(args, key)}")
                for every, ratios in pairs[key].items():
                    with_setting = run_dask(paths, args.epochs, 2, every, merge=args.merge,
                                            **with_it)
                    without = run_dask(paths, args.epochs, 2, every, merge=args.merge,
                                       **without_it)
                    ratios.append(without["sec"] / with_setting["sec"])
        repeats = {every: [] for every in [sync_every] + args.also_every}
        for r in range(args.scaling):
            # 1 and 2 workers again, alternating: the ratio of each pair, measured a few
            # seconds apart, is what a VM whose vCPUs move can be asked for
            log(f"{name}: scaling repetition {r + 1} of {args.scaling}")
            one = run_dask(paths, args.epochs, 1, sync_every, merge=args.merge)["sec"]
            for every in repeats:
                two = run_dask(paths, args.epochs, 2, every, merge=args.merge)["sec"]
                repeats[every].append(one / two)
        if args.cpu_shares:
            log(f"{name}: CPU shares of a 2-worker fit, sync_every {sync_every}")
            results[f"CPU shares, sync_every {sync_every}"] = {"shares": run_cpu_shares(
                paths, sync_every, args.cpu_shares,
                results[dask_label(2, sync_every)]["sec"])}
        if args.tuned:
            # Spark's model, tuned as Spark is: a plain FM (no dropout, no batch norm),
            # its learning rate chosen on the validation rows (one process), then the
            # chosen one on 2 Dask workers
            tries = {}
            for rate in args.tuned_rates:
                log(f"{name}: plain FM, learning rate {rate}, single process")
                tries[rate] = run_single(paths, args.epochs, 1, learning_rate=rate,
                                         **PLAIN_FM)
                log(f"  valid {tries[rate]['valid']:.4f}, test {tries[rate]['rmse']:.4f}")
            tuned_rate = min(tries, key=lambda rate: tries[rate]["valid"])
            results[f"{TUNED}, learning rate {tuned_rate} (tuned), 1 process x 1 "
                    f"thread"] = tries[tuned_rate]
            log(f"{name}: plain FM, two processes on halves, no synchronisation")
            results[f"(ceiling) {TUNED}, 2 processes x 1 thread on halves, never "
                    f"synchronised"] = run_ceiling(paths, args.epochs,
                                                   learning_rate=tuned_rate, **PLAIN_FM)
            for every in [sync_every] + args.also_every:
                log(f"{name}: plain FM on Dask, 2 workers, sync_every {every}")
                results[f"{TUNED} on Dask, 2 workers x 1 thread, sync_every {every}"] = \
                    run_dask(paths, args.epochs, 2, every, merge=args.merge,
                             learning_rate=tuned_rate, **PLAIN_FM)
            if args.worker_threads:
                # the other layout of two cores: one worker whose kernels run on both
                # (nothing to exchange; the fit is the single process's, bit for bit)
                log(f"{name}: plain FM on Dask, 1 worker x 2 threads")
                results[f"{TUNED} on Dask, 1 worker x 2 threads"] = run_dask(
                    paths, args.epochs, 1, sync_every, merge=args.merge, threads=2,
                    learning_rate=tuned_rate, **PLAIN_FM)
        if args.spark:
            log(f"{name}: Spark FMRegressor local[2]")
            results["Spark FMRegressor, local[2]"] = run_spark(
                parts, folder, args.spark_iterations, args.spark_steps, args.spark_repeats)
    for label, r in results.items():
        if "shares" in r:
            rows.append([name, f"{label}: each thread's CPU, as a share of one CPU, over "
                         f"the middle of a long 2-worker fit", "-", "-", "-", "-",
                         ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["shares"].items())])
            continue
        extra = ""
        if "syncs_per_epoch" in r:
            # a round's batches are summed over the workers, its training time is the
            # slowest worker's: per worker, a batch took train / (batches / workers)
            per = r["per_sync"]
            batch_ms = 1e3 * per["train_seconds"] * r["workers"] / per["batches"]
            cpu_ms = 1e3 * per["train_cpu_seconds"] * r["workers"] / per["batches"]
            extra = (f"{r['syncs_per_epoch']:.0f} syncs/epoch, {r['sync_mb_per_epoch']:.1f} "
                     f"MiB/epoch, {r['wait_per_epoch']:.2f} s waiting/epoch, a merge "
                     f"{per['merge_seconds']:.3f} s; a batch "
                     f"{batch_ms:.2f} ms on each worker ({cpu_ms:.2f} ms of it on a CPU)")
        elif "step" in r:
            extra = (f"stepSize {r['step']} (tuned on validation); s/iteration: the "
                     f"median of {len(r['fits_seconds'])} fits' ("
                     + ", ".join(f"{t:.2f}" for t in r["fits_seconds"])
                     + f" s) less that of {len(r['short_seconds'])} {SHORT_FIT}-iteration "
                     f"fits' (" + ", ".join(f"{t:.2f}" for t in r["short_seconds"])
                     + f" s), over {r['passes'] - SHORT_FIT} iterations; a fit's fixed "
                     f"cost {r['fixed']:.2f} s; fit / iterations {r['sec_fit']:.3g} s")
        elif "batch_ms" in r:
            extra = f"a batch {r['batch_ms']:.2f} ms"
        rmse_text = f"{r['rmse']:.4f}" if np.isfinite(r["rmse"]) else "-"
        rows.append([name, label, rmse_text, f"{r['sec']:.3g}", r["passes"],
                     f"{r['total']:.3g}", extra])
    single = results["afmfast, 1 process x 1 thread"]["sec"]
    dask = [r["sec"] for label, r in results.items() if label.startswith("afmfast on Dask")]
    ceiling = [r["sec"] for label, r in results.items() if label.startswith("(ceiling)")]
    rows.append([name, "speed-ups per epoch: 2 Dask workers / 1 (target 1.6x; each "
                 "sync_every); the ceiling / 1 process; 1 process / 1 Dask worker", "-",
                 "; ".join(f"{dask[0] / two:.2f}x" for two in dask[1:])
                 + f"; {single / ceiling[0]:.2f}x; {single / dask[0]:.2f}x", "-", "-", ""])
    for key, by_every in pairs.items():
        for every, ratios in by_every.items():
            if ratios:
                rows.append([name, f"2 Dask workers, sync_every {every}: epoch "
                             f"{PAIRED[key][2]}, median of {len(ratios)} pairs (each "
                             f"pair)", "-", f"{np.median(ratios):.3f}x", "-", "-",
                             ", ".join(f"{r:.3f}" for r in ratios)])
                results[f"{key} pairs, sync_every {every}"] = {"ratios": ratios}
    for every, ratios in repeats.items():
        if ratios:
            rows.append([name, f"2 Dask workers / 1, sync_every {every}: median of "
                         f"{len(ratios)} alternating pairs (each pair)", "-",
                         f"{np.median(ratios):.2f}x", "-", "-",
                         ", ".join(f"{r:.2f}" for r in ratios)])
            results[f"scaling pairs, sync_every {every}"] = {"ratios": ratios}
    spark = results.get("Spark FMRegressor, local[2]")
    if spark is not None:
        # every 2-worker run, reference settings then --tuned's, and the ceilings: what
        # two workers would reach if the exchange cost nothing
        twos = [label for label in results if label.startswith(("afmfast on Dask, 2",
                                                                f"{TUNED} on Dask",
                                                                "(ceiling)"))]
        for label in twos:
            two = results[label]
            if not np.isfinite(two["rmse"]):
                accuracy = "no one model: a bound"
            else:
                accuracy = "test RMSE " + ("at or below" if two["rmse"] <= spark["rmse"]
                                           else "above") + " Spark's"
            rows.append([name, f"Spark / {label}: per pass (target 20x); whole training",
                         "-",
                         f"{spark['sec'] / two['sec']:.1f}x", "-",
                         f"{spark['total'] / two['total']:.1f}x", accuracy])
    return rows, {k: {kk: vv for kk, vv in v.items() if kk != "model"}
                  for k, v in results.items()}


def accuracy(args):
    """The accuracy targets on frappe-mini (the rows whose 1-based line number is
    divisible by 5 are the test rows, as in tests/models/test_frappe.py): FM with the
    reference settings for 20 epochs, single process against 2 Dask workers; then AFM
    (reference settings) warm-started from each FM, 20 epochs."""
    from afmfast.dask import DaskAFM

    data = afmfast.load_libfm(FRAPPE)
    line = np.arange(1, len(data) + 1)
    parts = {"train": data[line % 5 != 0], "valid": data[line % 5 == 0]}
    parts["test"] = parts["valid"]
    afm_settings = dict(n_factors=16, attention_size=16, keep=(1.0, 0.5),
                        l2_attention=100.0, learning_rate=0.1, batch_size=4096, verbose=0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        paths = write_stores(parts, folder)
        single = run_single(paths, 20, 1)
        dask2 = run_dask(paths, 20, 2, args.sync_every, merge=args.merge)
        rows.append(["FM", f"{single['rmse']:.4f}", f"{dask2['rmse']:.4f}",
                     f"{dask2['rmse'] - single['rmse']:+.4f}"])
        afm = afmfast.AFM(n_epochs=20, n_threads=1, **afm_settings)
        afm.fit(afmfast.open_store(paths["train"]), validation=afmfast.open_store(paths["valid"]),
                init_from=single["model"])
        afm_rmse = afm.evaluate(afmfast.open_store(paths["test"]))["rmse"]
        dafm = run_dask(paths, 20, 2, args.sync_every, init_from=dask2["model"],
                        cls=DaskAFM, merge=args.merge, attention_size=16, keep=(1.0, 0.5),
                        l2_attention=100.0, learning_rate=0.1, batch_norm=False)
        rows.append(["AFM (warm-started from its FM)", f"{afm_rmse:.4f}",
                     f"{dafm['rmse']:.4f}", f"{dafm['rmse'] - afm_rmse:+.4f}"])
    print(table(["model, 20 epochs", "test RMSE 1 process", f"2 Dask workers "
                 f"(sync_every {args.sync_every}, merge {args.merge})", "difference"], rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("frappe", "mltag", "both"), default="both")
    parser.add_argument("--rows", type=int, default=4_000_000, help="ml-tag-shaped rows")
    parser.add_argument("--epochs", type=int, default=None,
                        help="afmfast epochs (default: 20 on frappe, 5 on ml-tag)")
    parser.add_argument("--sync-every", type=int, default=None,
                        help="batches between synchronisations (default: 4 on frappe, 64 "
                             "on ml-tag, where a batch trains in a fraction of the time)")
    parser.add_argument("--also-every", type=int, nargs="+", default=[],
                        help="also run 2 workers at these sync_every values (the speed-up "
                             "line uses the first)")
    parser.add_argument("--merge", choices=("sum", "mean"), default="sum")
    parser.add_argument("--spark", action="store_true", help="also run Spark's FMRegressor")
    parser.add_argument("--allocator", type=int, default=0, metavar="N",
                        help="then N pairs of 2-worker fits with and without "
                             "afmfast.dask.memory's allocator settings")
    parser.add_argument("--profiler", type=int, default=0, metavar="N",
                        help="then N pairs of 2-worker fits with and without the Dask "
                             "workers' statistical profiler")
    parser.add_argument("--scaling", type=int, default=0, metavar="N",
                        help="then N more alternating runs of 1 and 2 Dask workers, for the "
                             "median of the 2-worker speed-up")
    parser.add_argument("--cpu-shares", type=float, default=0, metavar="SECONDS",
                        help="then a long 2-worker fit at the first sync_every, each "
                             "thread's CPU measured over SECONDS of it (Linux /proc)")
    parser.add_argument("--tuned", action="store_true",
                        help="also a plain FM (keep 1, no batch norm: the model Spark "
                             "trains), its learning rate tuned on the validation rows "
                             "over --tuned-rates, then on 2 Dask workers at each "
                             "sync_every")
    parser.add_argument("--worker-threads", action="store_true",
                        help="with --tuned: also the plain FM on 1 Dask worker whose "
                             "kernels run on 2 threads")
    parser.add_argument("--tuned-rates", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--spark-iterations", type=int, default=20)
    parser.add_argument("--spark-steps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--spark-repeats", type=int, default=3,
                        help="fits of the chosen stepSize whose median time is reported "
                             "(its tuning fit included): Spark's time varies from fit to "
                             "fit more than afmfast's epochs do")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="N busy processes (bench/load.py) beside every run, Spark's "
                             "included, from the first data set's preparation to the end")
    parser.add_argument("--shuffle-unit", type=int, default=1, metavar="ROWS",
                        help="every afmfast run's shuffle_unit: its epochs shuffle runs of "
                             "this many consecutive rows (README, 'Reading rows in runs'); "
                             "the rows of both data sets are stored in random order")
    parser.add_argument("--no-profiler", action="store_true",
                        help="start the Dask workers without their statistical profiler "
                             "(distributed.worker.profile.enabled: False), which samples "
                             "the training thread's stack 100 times a second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--accuracy", action="store_true",
                        help="only the frappe-mini accuracy targets")
    args = parser.parse_args(argv)
    if args.worker_threads and not args.tuned:
        parser.error("--worker-threads runs the plain FM that --tuned tunes: add --tuned")
    if args.spark and args.spark_iterations <= SHORT_FIT:
        parser.error(f"--spark-iterations must be more than the {SHORT_FIT} of the short "
                     f"fits that measure a Spark fit's fixed cost")
    FM_SETTINGS["shuffle_unit"] = args.shuffle_unit
    if args.no_profiler:
        WORKER_CONFIG[_PROFILER] = False
    if args.accuracy:
        args.sync_every = args.sync_every or 4
        accuracy(args)
        return
    names = ["frappe", "mltag"] if args.data == "both" else [args.data]
    print(f"bench/distributed.py {' '.join(sys.argv[1:])}: {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
          + (f"; {args.load} busy process(es) beside every run" if args.load else "")
          + (f"; afmfast's epochs shuffle runs of {args.shuffle_unit} rows"
             if args.shuffle_unit > 1 else "")
          + ("; Dask workers without their profiler" if args.no_profiler else ""))
    all_rows, out = [], {}
    with Load(args.load, "busy"):
        for name in names:
            epochs = args.epochs
            args.epochs = (20 if name == "frappe" else 5) if epochs is None else epochs
            rows, results = bench(name, args)
            args.epochs = epochs
            all_rows += rows
            out[name] = results
    print(table(["data", "run", "test RMSE", "s/epoch (Spark: s/iteration)", "passes",
                 "training s", "notes"], all_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
