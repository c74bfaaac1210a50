"""Fits as a user runs them, timed on the quiet machine and beside competing processes
(``bench/load.py``): the measurement behind ``python bench/compare.py --load N``.

    python bench/compare.py --load 1                      # quiet, then 1 busy loop
    python bench/compare.py --load 1 --load-kind afmfast  # quiet, 1 busy loop, 1 afmfast
    python bench/compare.py --load 1 --quick              # FM k=16 and AFM k=t=16 only
    python bench/compare.py --load 1 --load-no-torch      # without the PyTorch columns

What is timed: one repetition is a fit of EPOCHS epochs of each configuration (FM k=16,
AFM k=t=16, AFM k=t=64, or those of ``--configs``) by each implementation, one after the
other, the implementations' order rotating from repetition to repetition, so that a
change of load on the shared machine hits every one alike:
- afmfast at its default thread count (``n_threads=None``) and at ``n_threads=1``:
  ``afmfast.FM(n_factors=k, n_epochs=3, verbose=0, ...).fit(data)`` (AFM: attention
  size k), the estimators' defaults otherwise: everything fit does is timed;
- PyTorch at 1 and 2 threads (``torch.set_num_threads``): ``bench/torch_models.py``'s
  model of the same hyperparameters built with afmfast's initial parameters
  (``model_like``), then EPOCHS epochs of ``train_epoch`` (the models bench/compare.py
  checks against afmfast.kernels.reference; the check is not repeated here).
afmfast and PyTorch run in two worker processes that stay up for the whole run (their
two OpenMP runtimes never share a process) and train only when asked, one fit at a time;
each does one untimed fit of one epoch of every configuration and thread count first
(thread pools, JIT).

Phases: quiet (no load of ours; the machine's other users are not stopped, the table
says how busy it was), then N busy loops, then N afmfast trainings at the default thread
count (``--load-kind afmfast``; the busy phase runs too, for target (b)). Each phase
reports the mean and the median of its repetitions: stalls under load come in bursts
and the mean is what a user waits.

Targets (issue "Fast on a busy machine"):
(a) with N-1 busy loops on an N-CPU machine, the default thread count's mean time at
    most TARGET_RATIO times the one-thread mean time, for every configuration;
(b) beside a second afmfast process at its default thread count, the default thread
    count's mean time at most TARGET_RATIO times the one-thread mean time measured
    beside a busy loop.

``python bench/fit_times.py --serve afmfast|pytorch --data NPZ --parent PID`` is a
worker's entry point: it reads one JSON job a line from stdin and answers each with a
JSON line holding the fit's seconds.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import load as load_mod
from bench_common import (fmt_s, fmt_x, frappe_like_train, frappe_mini_or_like,
                          load_dataset, log, make_estimator, mean, med, save_dataset,
                          table)

EPOCHS = 3
LOAD_CONFIGS = [("fm", 16), ("afm", 16), ("afm", 64)]
QUICK_CONFIGS = [("fm", 16), ("afm", 16)]
# (worker, threads, label); None: afmfast's default thread count
IMPLS = [("afmfast", None, "afmfast default threads"), ("afmfast", 1, "afmfast 1 thread"),
         ("pytorch", 1, "PyTorch 1 thread"), ("pytorch", 2, "PyTorch 2 threads")]
TARGET_RATIO = 1.25
MIN_REPS = 5
# CPUs that processes other than ours may use during a phase before the verdicts say
# that the machine was not the idle one the targets suppose
OTHERS_NOTE_CPUS = 0.3
WORKER_TIMEOUT = 600.0  # seconds one fit may take before the run gives up


# ----- worker side ---------------------------------------------------------------------
def _afmfast_fitter(data):
    def fit(model, k, threads, epochs):
        make_estimator(model, k, threads=threads, n_epochs=epochs).fit(data)
    return fit


def _torch_fitter(data):
    import torch
    from torch_models import fixed_width, model_like, train_epoch

    torch.sparse.check_sparse_tensor_invariants.disable()
    idx, val = fixed_width(data.indptr, data.indices, data.values)
    yt = torch.from_numpy(data.y)

    def fit(model, k, threads, epochs):
        torch.set_num_threads(threads)
        est = make_estimator(model, k, n_epochs=epochs)
        net, opt = model_like(est, data.n_features, idx.shape[1])
        for _ in range(epochs):
            train_epoch(net, opt, idx, val, yt, est.batch_size)
    return fit


def serve(kind, data_path):
    """A worker's loop: for each JSON job line on stdin ({"model", "k", "threads",
    "epochs"}), fit and print {"seconds": wall time of the fit} (or {"error": ...})."""
    data = load_dataset(data_path)
    fit = _afmfast_fitter(data) if kind == "afmfast" else _torch_fitter(data)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            t0 = time.perf_counter()
            fit(job["model"], job["k"], job["threads"], job["epochs"])
            out = {"seconds": time.perf_counter() - t0}
        except Exception as exc:  # reported to the parent, which names it in the table
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)


# ----- parent side ---------------------------------------------------------------------
class FitWorker:
    """A worker process (``serve``) that dies with this one; ``fit`` times one fit in
    it, ``close`` kills it by its id."""

    def __init__(self, kind, data_path):
        self.kind = kind
        self.proc = load_mod.spawn_child(
            [Path(__file__).resolve(), "--serve", kind, "--data", data_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self._read()  # its "ready" line
        except BaseException:
            self.close()
            raise

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker ended (status {self.proc.poll()})")
        return json.loads(line)

    def fit(self, model, k, threads, epochs=EPOCHS):
        """Seconds of one fit (raises RuntimeError when the fit failed)."""
        self.proc.stdin.write(json.dumps(dict(model=model, k=k, threads=threads,
                                              epochs=epochs)) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"{self.kind} {model} k={k} threads={threads}: {out['error']}")
        return out["seconds"]

    @property
    def pid(self):
        """The worker's process id."""
        return self.proc.pid

    def close(self):
        """Kill the worker by its id and reap it."""
        load_mod.kill_processes([self.proc])
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:  # a broken pipe from the killed worker
                pass


class Usage:
    """CPU use over a phase: the whole machine's busy and stolen CPUs, the load
    processes' and the fit workers', each in CPUs (CPU seconds per wall second)."""

    def __init__(self, load, worker_pids):
        self.load, self.worker_pids = load, worker_pids
        self.t0 = time.monotonic()
        self.start = self._sample()

    def _sample(self):
        machine = load_mod.machine_cpu_seconds() or (float("nan"), float("nan"))
        workers = sum(s for s in map(load_mod.process_cpu_seconds, self.worker_pids)
                      if s is not None)
        return (*machine, self.load.cpu_seconds() if self.load else 0.0, workers)

    def stop(self):
        """{"machine", "stolen", "load", "workers", "others"} in CPUs since the start."""
        wall = time.monotonic() - self.t0
        busy, stolen, load, workers = (b - a for a, b in zip(self.start, self._sample()))
        return dict(machine=busy / wall, stolen=stolen / wall, load=load / wall,
                    workers=workers / wall, others=(busy - load - workers) / wall,
                    seconds=wall)


def phases_for(n, kind):
    """[(phase name, load kind or None, processes)]: quiet first, then the load; an
    afmfast load brings the busy-loop phase too (target (b) compares with it)."""
    out = [("quiet", None, 0)]
    if n > 0:
        out.append((f"{n} busy", "busy", n))
        if kind == "afmfast":
            out.append((f"{n} afmfast", "afmfast", n))
    return out


def measure(data_path, configs, impls, phases, reps, probe=None):
    """{phase: {(model, k, label): [seconds of each repetition]}} and {phase: Usage
    figures}; the load of each phase is started before its repetitions and killed after
    them (also on an error or Ctrl-C), the workers likewise at the end. ``probe``: the
    CPU 0/1 probe (comparison.probes), run just before each phase's load starts and
    just after it ends (usage's "probe_ns": the two cache-line latencies; two trainings
    share one L3 only where the two CPUs do)."""
    from comparison.probes import core_probe
    workers = {}
    times, usage = {}, {}
    try:
        for worker in sorted({w for w, _, _ in impls}):
            log(f"starting the {worker} worker ...")
            workers[worker] = FitWorker(worker, data_path)
        log("warm-up: one epoch of every configuration and thread count ...")
        for model, k in configs:
            for worker, threads, _ in impls:
                workers[worker].fit(model, k, threads, epochs=1)
        pids = [w.pid for w in workers.values()]
        for name, kind, n in phases:
            log(f"phase {name}: {reps} repetitions ...")
            times[name] = {(m, k, label): [] for m, k in configs for _, _, label in impls}
            before = core_probe(probe)[0]
            with (load_mod.Load(n, kind, data=data_path) if kind else nullcontext()) as load:
                meter = Usage(load, pids)
                for rep in range(reps):
                    turn = impls[rep % len(impls):] + impls[:rep % len(impls)]
                    for model, k in configs:
                        for worker, threads, label in turn:
                            times[name][(model, k, label)].append(
                                workers[worker].fit(model, k, threads))
                usage[name] = meter.stop()
            usage[name]["probe_ns"] = [before, core_probe(probe)[0]]
    finally:
        for w in workers.values():
            w.close()
    return times, usage


def config_name(model, k):
    """"FM k=16" / "AFM k=t=16"."""
    return f"FM k={k}" if model == "fm" else f"AFM k=t={k}"


def _probe_text(probe_ns):
    """The phase's CPU 0/1 probe readings (before, after) for its usage line, or ""."""
    if not probe_ns or None in probe_ns:
        return ""
    return f"; CPU 0/1 probe before/after: {probe_ns[0]:.0f}/{probe_ns[1]:.0f} ns a cache line"


def report(times, usage, configs, impls, phases, reps, n, default_threads):
    """Print the side-by-side table, the default / one-thread ratios and the verdicts
    of targets (a) and (b)."""
    names = [p[0] for p in phases]
    print("\nCPU use during each phase (CPUs; machine: every process, from /proc/stat; "
          "load: our load processes; workers: the fits timed; others: the rest of the "
          "machine, which a shared machine does not keep quiet):")
    for name in names:
        u = usage[name]
        print(f"  {name:<10} {u['seconds']:6.1f} s: machine {u['machine']:.2f}, load "
              f"{u['load']:.2f}, workers {u['workers']:.2f}, others {u['others']:.2f}"
              + (f", stolen by the host {u['stolen']:.2f}" if u["stolen"] >= 0.05 else "")
              + _probe_text(u.get("probe_ns")))
    header = ["config", "impl"]
    for name in names:
        header += [f"{name} mean s", f"{name} median s"]
    rows = []
    for model, k in configs:
        for _, threads, label in impls:
            row = [config_name(model, k),
                   label + (f" (= {default_threads} now)" if threads is None else "")]
            for name in names:
                row += [fmt_s(mean(times[name][(model, k, label)])),
                        fmt_s(med(times[name][(model, k, label)]))]
            rows.append(row)
    print(f"\nSeconds per fit of {EPOCHS} epochs, mean and median of {reps} repetitions "
          "(default threads: n_threads=None, whatever afmfast makes of it; \"= N now\" is "
          "what afmfast.kernels.threads.default_threads() returns; fit may use fewer while that is faster)")
    print(table(header, rows))

    default, one = IMPLS[0][2], IMPLS[1][2]
    if not any(label == default for _, _, label in impls):
        return
    print("\nafmfast default threads / n_threads=1, means (medians)")
    rows = []
    for model, k in configs:
        row = [config_name(model, k), ""]
        for name in names:
            row.append(f"{ratio(times[name], model, k, default, one)} "
                       f"({ratio(times[name], model, k, default, one, med)})")
        rows.append(row)
    print(table(["config", ""] + names, rows))

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nTargets (issue \"Fast on a busy machine\"; means, medians in brackets; "
          f"{cpus} CPUs):")
    busy = next((p[0] for p in phases if p[1] == "busy"), None)
    if busy is not None:
        note = ("" if n == cpus - 1 else
                f" (the target is set for {cpus - 1} busy loop(s) on {cpus} CPUs: this run's "
                f"{n} is not that case; figures for information)")
        print(f"  (a) beside {n} busy loop(s), default threads <= {TARGET_RATIO}x 1 thread"
              f"{note}:")
        for model, k in configs:
            print(f"      {config_name(model, k)}: "
                  + verdict(times[busy], times[busy], model, k, default, one))
    afm = next((p[0] for p in phases if p[1] == "afmfast"), None)
    if afm is not None:
        note = "" if n == 1 else f" (the target is set for 1 afmfast process: this run has {n})"
        print(f"  (b) beside {n} afmfast training(s) at default threads, default threads <= "
              f"{TARGET_RATIO}x 1 thread beside {n} busy loop(s){note}:")
        for model, k in configs:
            print(f"      {config_name(model, k)}: "
                  + verdict(times[afm], times[busy], model, k, default, one))
    elif n > 0:
        print("  (b) needs --load-kind afmfast")
    if n == 0:
        print("  none judged: --load 0 runs the quiet phase only")
    busiest = max(usage[name]["others"] for name in names)
    if busiest > OTHERS_NOTE_CPUS:
        print(f"  note: the rest of the machine used up to {busiest:.2f} CPUs during these "
              "phases (the CPU use above): the targets suppose a machine otherwise idle, "
              "so these figures describe a busier one (and the quiet phase was not quiet)")


def ratio(phase_times, model, k, num, den, stat=mean):
    """stat of num's times over stat of den's in one phase, as "1.23x"."""
    return fmt_x(stat(phase_times[(model, k, num)]) / stat(phase_times[(model, k, den)]))


def verdict(num_times, den_times, model, k, num, den):
    """"mean-ratio (median-ratio) met / NOT met" of num's times against den's."""
    a = mean(num_times[(model, k, num)]) / mean(den_times[(model, k, den)])
    m = med(num_times[(model, k, num)]) / med(den_times[(model, k, den)])
    state = "n/a" if not np.isfinite(a) else "met" if a <= TARGET_RATIO else "NOT met"
    return (f"{fmt_s(mean(num_times[(model, k, num)]))} s / "
            f"{fmt_s(mean(den_times[(model, k, den)]))} s = {fmt_x(a)} ({fmt_x(m)}) {state}")


def run(args, configs, has_torch, tmpdir):
    """The comparison under load of ``bench/compare.py --load N``: data, measurement,
    tables (args: the parsed command line; configs: --configs or None)."""
    from afmfast.kernels.threads import default_threads

    started = time.perf_counter()
    if configs is None:
        configs = QUICK_CONFIGS if args.quick else LOAD_CONFIGS
    if args.load_reps < MIN_REPS:
        print(f"note: {args.load_reps} repetitions, fewer than {MIN_REPS}: the mean of so few "
              "says little about bursts of stalls")
    set_name, data = (("synthetic frappe-like", frappe_like_train()) if args.no_frappe
                      else frappe_mini_or_like())
    path = os.path.join(tmpdir, "fits.npz")
    save_dataset(data, path)
    if not has_torch and not args.load_no_torch:
        print("PyTorch columns skipped: PyTorch does not import")
    impls = [i for i in IMPLS if i[0] != "pytorch" or (has_torch and not args.load_no_torch)]
    phases = phases_for(args.load, args.load_kind)
    print(f"\n=== fits of {EPOCHS} epochs on {set_name} ({data.n_rows:,} rows), quiet and "
          f"under load: {', '.join(p[0] for p in phases)} (bench/load.py: 'busy' pure-Python "
          "busy loops, 'afmfast' AFM k=t=16 fits at default threads in a loop); "
          f"{args.load_reps} repetitions a phase, each a fit of every configuration and "
          "implementation in turn ===")
    from comparison.probes import build_core_probe
    times, usage = measure(path, configs, impls, phases, args.load_reps,
                           probe=build_core_probe(tmpdir))
    report(times, usage, configs, impls, phases, args.load_reps, args.load,
           default_threads())
    print(f"total run time: {time.perf_counter() - started:.0f} s")


def main():
    """A worker's entry point (``--serve``)."""
    parser = argparse.ArgumentParser(description="a fit worker of bench/fit_times.py")
    parser.add_argument("--serve", choices=("afmfast", "pytorch"), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    # a Ctrl-C in the terminal reaches this process too: the parent ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_mod.die_with_parent(args.parent)
    serve(args.serve, args.data)


if __name__ == "__main__":
    main()
