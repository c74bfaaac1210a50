"""The measurement: every configuration of every data set by every implementation in
its own worker process, with CPU 0/1 probes around and between the rows, and NumPy's
matmul ceiling after the AFM k=t=256 rows. The figures go into the JSON document's
set entries (``runs``, ``matmul``, ``load_avg``, ``probes``)."""
import os
import time
from pathlib import Path

from bench_common import log

from comparison.probes import core_probe
from comparison.settings import (AFMFAST_MALLOC_ENV, ATTENTION_K, OPENBLAS_VARS,
                                 STEPS_PER_SWITCH, config_label, timing_mode)
from comparison.workers import run_worker


class Plan:
    """What a run measures: configurations, backends, repetitions and the probe."""

    def __init__(self, configs, backends, has_torch, epochs, steps, min_seconds, probe,
                 started):
        self.configs, self.backends, self.has_torch = configs, backends, has_torch
        self.epochs, self.steps, self.min_seconds = epochs, steps, min_seconds
        self.probe, self.started = probe, started  # started: perf_counter of the run

    def impls(self, model):
        """[(worker kind, implementation name)] of a model's rows."""
        return ([("afmfast", b) for b in self.backends[model]]
                + ([("torch", "pytorch")] if self.has_torch else []))

    def reps(self, k):
        """Repetitions at least: epochs, or enough batches of STEPS_PER_SWITCH (the first
        of each untimed) for ``steps`` timed ones."""
        if timing_mode(k) == "epochs":
            return self.epochs
        return -(-self.steps // (STEPS_PER_SWITCH - 1))

    def progress(self, text):
        log(f"[{time.perf_counter() - self.started:6.0f} s] {text}")


def _run_row(plan, data_set, path, model, k, kind, name):
    """One configuration by one implementation, with the probes before and after it
    appended to the set's, and its own (before, during, after) in its entry."""
    plan.progress(f"{data_set['name']}: {model.upper()} k={k} {name} ...")
    job = dict(kind=kind, data=path, model=model, k=k, backend=name, mode=timing_mode(k),
               reps=plan.reps(k), min_seconds=plan.min_seconds,
               probe=str(plan.probe) if plan.probe else None)
    before = data_set["probes"][-1]
    res = run_worker(job, env=dict(os.environ, **AFMFAST_MALLOC_ENV) if kind == "afmfast"
                     else None)
    data_set["load_avg"].append(os.getloadavg()[0])
    during = [list(v) for v in res.pop("probes", [])]
    data_set["probes"] += during + [list(core_probe(plan.probe))]
    return dict(res, model=model, k=k, config=config_label(model, k), impl=name,
                kind=kind, mode=timing_mode(k), c2c=[before] + during
                + [data_set["probes"][-1]])


def _run_matmul(plan, data_set):
    """NumPy float32 (P x k) @ (k x t), P one batch's pairs: the CPU's own kernel
    (OPENBLAS_VARS removed), then the environment as set when it sets one of them."""
    env_best = {key: v for key, v in os.environ.items() if key not in OPENBLAS_VARS}
    env_set = any(os.environ.get(v) is not None for v in OPENBLAS_VARS)
    P = data_set["pairs_first_batch"]
    out = {}
    for label, env in (("best", env_best), ("as set", None)):
        if label == "as set" and not env_set:
            continue
        plan.progress(f"NumPy matmul P={P} ({label})")
        out[label] = run_worker(dict(kind="matmul", P=P, k=ATTENTION_K, t=ATTENTION_K,
                                     reps=max(5, plan.steps)), env=env)
    return out, env_set


def measure_set(plan, data_set, path):
    """Every row of one data set into data_set (a ``datasets.describe`` entry)."""
    data_set["load_avg"] = [os.getloadavg()[0]]
    data_set["probes"] = [list(core_probe(plan.probe))]
    data_set["runs"] = [_run_row(plan, data_set, path, model, k, kind, name)
                        for model, k in plan.configs for kind, name in plan.impls(model)]
    # the NumPy float32 matmul ceiling right after the AFM k=256 runs
    data_set["matmul"], data_set["openblas_env_set"] = {}, None
    if ("afm", ATTENTION_K) in plan.configs:
        data_set["matmul"], data_set["openblas_env_set"] = _run_matmul(plan, data_set)
    return data_set


def find_run(data_set, model, k, impl):
    """The set's entry of one configuration by one implementation, or None."""
    return next((r for r in data_set.get("runs", ()) if (r["model"], r["k"], r["impl"])
                 == (model, k, impl)), None)



def measure_reader(directory, runs):
    """bench/reader_speed.py's side-by-side measurement on a 100 MB synthetic one-hot
    file written into directory; prints its block and returns its figures (MB/s of 1
    thread, all CPUs and the Python loader, and the target in MB/s)."""
    import reader_speed

    log("reader: writing a 100 MB libFM file ...")
    path = reader_speed.make_synthetic(Path(directory) / "reader_100MB.libfm", size_mb=100)
    print("\n=== libFM reader (bench/reader_speed.py) ===")
    one, every, slow = reader_speed.compare(path, runs, python_runs=1)
    return dict(mb_s_one=one, mb_s_all=every, mb_s_python=slow,
                target_mb_s=reader_speed.TARGET_MB_S)
