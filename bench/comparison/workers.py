"""The training workers, each run in a fresh interpreter (``run_worker``): afmfast's
and PyTorch's timed training of one configuration, NumPy's float32 matmul, and the
same-math check (``check``). A worker prints its result as one JSON line."""
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench_common import BENCH, load_dataset, make_estimator, worker_env

from comparison.memory import (peak_rss_bytes, reset_peak_rss, resident_param_bytes,
                               rss_bytes)
from comparison.probes import core_probe
from comparison.settings import (BATCH, MAX_REPS, OPENBLAS_VARS, PROBE_EVERY,
                                 STEPS_PER_SWITCH, THREADS, WARMUP_ROWS)

ENTRY = BENCH / "compare.py"  # the script whose --worker option runs a job


def timing_plan(job, n_rows, rng):
    """(batches of repetition i, epoch scale): None (a full epoch) in epochs mode, else
    the next STEPS_PER_SWITCH full batches of one fixed permutation (cycling), of which
    the first is run untimed."""
    if job["mode"] == "epochs":
        return (lambda i: None), 1.0
    order = rng.permutation(n_rows)
    n_full = max(1, n_rows // BATCH)
    size = min(BATCH, n_rows)
    return (lambda i: [order[((i * STEPS_PER_SWITCH + j) % n_full) * BATCH:][:size]
                       for j in range(STEPS_PER_SWITCH)]), n_rows / size


def repetitions(job, rows_for, times, probes, scale):
    """job["reps"] repetitions, then more until every thread count has been timed for
    job["min_seconds"] of wall time in all (at most MAX_REPS); times holds the timings
    multiplied by scale (per batch to per epoch in steps mode). Between repetitions, at
    most every PROBE_EVERY seconds, the CPU 0/1 probe (job["probe"]) runs and its reading
    is appended to probes: what the machine was like while the row ran, not only before
    and after."""
    i = 0
    last_probe = time.perf_counter()
    while i < job["reps"] or (i < MAX_REPS
                              and min(sum(v) for v in times.values()) / scale
                              < job["min_seconds"]):
        if i > 0 and job.get("probe") and time.perf_counter() - last_probe >= PROBE_EVERY:
            probes.append(core_probe(job["probe"]))
            last_probe = time.perf_counter()
        yield rows_for(i)
        i += 1


def warmup_rows(data):
    """The first 64 rows, with only their own features: the warm-up model built on them
    is small, so that the timed model cannot reuse memory it frees unseen."""
    return data[:64].with_n_features(None)


def _afmfast_trainer(job, rows, threads):
    from afmfast.models.training import Trainer

    est = make_estimator(job["model"], job["k"], job["backend"], threads)
    est._validate()
    return Trainer(est, rows, threads=threads, adaptive=False)


def _afmfast_warmup(job, data):
    """JIT and thread pools, before the memory baseline, on a model of the first rows'
    features only, so that the timed model cannot reuse the memory it frees (that would
    hide as much of the timed model's own)."""
    small = warmup_rows(data)
    warm = _afmfast_trainer(job, small, 2)
    for threads in THREADS:
        warm.train_batch(small.X, small.y, np.arange(64, dtype=np.int64), 0, threads)


def _afmfast_timed(job, trainer, data, rows_for, scale):
    """The timed repetitions at each thread count in turn: (times, probe readings)."""
    from afmfast.kernels.threads import RunPlanner

    X, y, n = data.X, data.y, data.n_rows
    times = {t: [] for t in THREADS}
    probes = []
    step = 0
    for threads in THREADS:  # one warm-up batch per thread count
        trainer.train_batch(X, y, np.arange(min(WARMUP_ROWS, n), dtype=np.int64), step,
                            threads)
        step += 1
    # fixed thread counts: this table measures the kernels' scaling (--load measures fit's
    # default, adaptive count)
    planners = {t: RunPlanner(t, adaptive=False) for t in THREADS}
    for rows in repetitions(job, rows_for, times, probes, scale):
        for threads in THREADS:
            trainer.planner = planners[threads]
            if rows is None:  # one epoch, as fit runs it (without its evaluation)
                t0 = time.perf_counter()
                order = trainer.epoch_order(n, step, threads)
                step, _ = trainer.train_epoch(X, y, order, step)
                del order  # as fit does
                times[threads].append((time.perf_counter() - t0) * scale)
                continue
            for i, batch in enumerate(rows):
                t0 = time.perf_counter()
                trainer.train_batch(X, y, batch, step, threads)
                step += 1
                if i > 0:
                    times[threads].append((time.perf_counter() - t0) * scale)
    return times, probes


def worker_afmfast(job):
    data = load_dataset(job["data"])
    _afmfast_warmup(job, data)
    # the steps mode's batches are the harness's, not training's: drawn before the baseline
    rows_for, scale = timing_plan(job, data.n_rows, np.random.default_rng(1))
    rss_before = rss_bytes()
    reset_ok = reset_peak_rss()
    trainer = _afmfast_trainer(job, data, THREADS[0])
    param_bytes = resident_param_bytes(trainer)
    times, probes = _afmfast_timed(job, trainer, data, rows_for, scale)
    # fit's epoch order (int64 per row) is training's own memory in epochs mode
    order_bytes = 8 * data.n_rows if job["mode"] == "epochs" else 0
    return dict(times=times, rss_before=rss_before, peak=peak_rss_bytes(),
                peak_reset=reset_ok, param_bytes=param_bytes, order_bytes=order_bytes,
                probes=probes)


def _torch_timed(job, model, opt, tensors, rows_for, scale):
    """PyTorch's timed repetitions at each thread count in turn: (times, probes)."""
    import torch

    from torch_models import train_epoch, train_step

    idx, val, yt = tensors
    times = {t: [] for t in THREADS}
    probes = []
    for rows in repetitions(job, rows_for, times, probes, scale):
        for threads in THREADS:
            torch.set_num_threads(threads)
            if rows is None:
                t0 = time.perf_counter()
                train_epoch(model, opt, idx, val, yt, BATCH)
                times[threads].append((time.perf_counter() - t0) * scale)
                continue
            for i, batch in enumerate(rows):
                b = torch.from_numpy(batch)
                t0 = time.perf_counter()
                train_step(model, opt, idx[b], val[b], yt[b])
                if i > 0:
                    times[threads].append((time.perf_counter() - t0) * scale)
    return times, probes


def worker_torch(job):
    import torch

    from torch_models import fixed_width, model_like, train_step

    torch.sparse.check_sparse_tensor_invariants.disable()
    data = load_dataset(job["data"])
    idx, val = fixed_width(data.indptr, data.indices, data.values)
    yt = torch.from_numpy(data.y)
    n = data.n_rows
    est = make_estimator(job["model"], job["k"])

    def build(n_features):
        return model_like(est, n_features, idx.shape[1])

    first = torch.arange(min(WARMUP_ROWS, n))
    # warm-up: thread pools, allocator; only the first rows' features (see worker_afmfast)
    warm, warm_opt = build(warmup_rows(data).n_features)
    for threads in THREADS:
        torch.set_num_threads(threads)
        train_step(warm, warm_opt, idx[first[:64]], val[first[:64]], yt[first[:64]])
    del warm, warm_opt
    rows_for, scale = timing_plan(job, n, np.random.default_rng(1))
    rss_before = rss_bytes()
    reset_ok = reset_peak_rss()
    model, opt = build(data.n_features)
    param_bytes = sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    for threads in THREADS:
        torch.set_num_threads(threads)
        train_step(model, opt, idx[first], val[first], yt[first])
    times, probes = _torch_timed(job, model, opt, (idx, val, yt), rows_for, scale)
    return dict(times=times, rss_before=rss_before, peak=peak_rss_bytes(),
                peak_reset=reset_ok, param_bytes=param_bytes, probes=probes,
                torch=torch.__version__)


def _blas_info(threadpool_info):
    """NumPy's own OpenBLAS as threadpoolctl sees it (scipy, imported through
    scikit-learn, may bring another)."""
    blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    blas = [d for d in blas if "numpy" in str(d.get("filepath"))] or blas
    if not blas:
        return {}
    return {key: blas[0].get(key) for key in ("internal_api", "version", "architecture",
                                              "filepath")}


def worker_matmul(job):
    rng = np.random.default_rng(0)
    P, k, t = job["P"], job["k"], job["t"]
    A = rng.standard_normal((P, k), dtype=np.float32)
    B = rng.standard_normal((k, t), dtype=np.float32)
    C = np.empty((P, t), np.float32)
    times = {}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info = threadpool_limits = None
    for threads in THREADS:
        if threadpool_limits is not None:
            with threadpool_limits(limits=threads, user_api="blas"):
                np.matmul(A, B, out=C)
                ts = []
                for _ in range(job["reps"]):
                    t0 = time.perf_counter()
                    np.matmul(A, B, out=C)
                    ts.append(time.perf_counter() - t0)
        else:
            ts = [float("nan")]
        times[threads] = ts
    info = _blas_info(threadpool_info) if threadpool_info is not None else {}
    env = {v: os.environ.get(v) for v in OPENBLAS_VARS}
    return dict(times=times, flops=2.0 * P * k * t, blas=info, env=env,
                threadpoolctl=threadpool_info is not None)


def run_job(job):
    """A worker's side: run ``job`` and print its result as the last line of stdout."""
    from comparison.check import worker_check

    workers = {"afmfast": worker_afmfast, "torch": worker_torch, "matmul": worker_matmul,
               "check": worker_check}
    print(json.dumps(workers[job["kind"]](job)))


def run_worker(job, env=None, timeout=3600):
    """Run ``job`` in a fresh interpreter; returns its result dict or {"error": text}.
    Per-thread figures keep the thread count as a string key, as JSON has it."""
    cmd = [sys.executable, str(ENTRY), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(env),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
