"""Competing load for the benchmarks: processes that keep CPUs busy while afmfast is
timed (``bench/compare.py --load N``, the "under load" pytest-benchmark group).

    with Load(1, "busy"):         # one pure-Python busy loop, like python -c "while True: pass"
        ...                       # time something beside it
    with Load(1, "afmfast"):      # a second afmfast training: AFM k=t=16 fits in a loop,
        ...                       # at the default thread count (n_threads=None)

Kinds
- busy: a pure-Python loop that never sleeps (one CPU's worth of work each).
- afmfast: fits of ``afmfast.AFM(n_factors=16, attention_size=16, n_epochs=3)`` with
  ``n_threads=None``, one after the other, on the data set ``data`` (an .npz written by
  ``bench_common.save_dataset``), else frappe-mini train when the Frappe file is there,
  else synthetic rows of its shape (``rows`` of them when given).

The processes are ended by their process ids (SIGKILL, then reaped) when the ``with``
block is left, however it is left (exception, Ctrl-C). They also die with the process
that started them if it is killed outright (SIGKILL, or a SIGTERM that runs no cleanup):
each asks the kernel for SIGKILL when its parent ends (prctl PR_SET_PDEATHSIG; Linux)
and, where that is not available or its parent is already gone, a watchdog thread polls
the parent's id. They ignore SIGINT: a Ctrl-C in the terminal reaches the whole process
group, and the parent, not the child, decides when the load ends.

``python bench/load.py --child KIND --parent PID [--data NPZ] [--rows N]`` is a child's
entry point (the parent passes its own id).
"""
import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KINDS = ("busy", "afmfast")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 0.2
READY_TIMEOUT = 120.0  # an afmfast child imports afmfast and loads its data first
AFMFAST_LOAD = dict(model="afm", k=16, n_epochs=3)  # the training an afmfast child repeats


# ----- the child side ------------------------------------------------------------------
def die_with_parent(parent_pid):
    """End this process when the process parent_pid ends: SIGKILL from the kernel
    (prctl PR_SET_PDEATHSIG, Linux) and a watchdog thread that polls the parent's id (the
    kernel's signal does not exist elsewhere, and comes too late for a parent that died
    before the call). Exits at once if parent_pid is no longer this process's parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _ready():
    print("ready", flush=True)


def busy_loop():
    """Keep one CPU busy in pure Python, as ``python -c "while True: pass"`` does."""
    _ready()
    while True:
        pass


def afmfast_loop(data_path=None, rows=None):
    """Fit AFM k=t=16 (AFMFAST_LOAD) at the default thread count again and again, on the
    data set of data_path, else frappe-mini train or synthetic rows of its shape."""
    if data_path and not os.path.exists(data_path):  # say so before seconds of imports
        raise FileNotFoundError(data_path)
    from bench_common import (frappe_like_train, frappe_mini_or_like, load_dataset,
                              make_estimator)

    if data_path:
        data = load_dataset(data_path)
    elif rows:
        data = frappe_like_train(rows)
    else:
        data = frappe_mini_or_like()[1]
    _ready()
    while True:
        make_estimator(AFMFAST_LOAD["model"], AFMFAST_LOAD["k"], threads=None,
                       n_epochs=AFMFAST_LOAD["n_epochs"]).fit(data)


def child_main(argv=None):
    """Entry point of a load process (see the module docstring)."""
    parser = argparse.ArgumentParser(description="a load process of bench/load.py")
    parser.add_argument("--child", choices=KINDS, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(args.parent)
    if args.child == "busy":
        busy_loop()
    else:
        afmfast_loop(args.data, args.rows)


# ----- the parent side -----------------------------------------------------------------
def spawn_child(args, env=None, **popen):
    """Start ``python <args> --parent <this process's id>``, a child whose entry point
    calls ``die_with_parent`` with that id; env (default: this environment, leading to
    this process's afmfast and to bench/) is its environment."""
    if env is None:
        from bench_common import worker_env  # imports afmfast: only where it is needed

        env = worker_env()
    cmd = [sys.executable] + [str(a) for a in args] + ["--parent", str(os.getpid())]
    return subprocess.Popen(cmd, env=env, **popen)


def kill_processes(procs, timeout=10.0):
    """SIGKILL each still running Popen of procs by its process id, then reap it (no
    zombie left). Returns the ids that were still running."""
    killed = []
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
            except ProcessLookupError:  # ended meanwhile
                pass
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a process in uninterruptible sleep: report it
            print(f"bench/load.py: process {proc.pid} did not end within {timeout} s of "
                  "SIGKILL", file=sys.stderr)
    return killed


def _stat_cpu_seconds(path):
    """User + system CPU seconds of a /proc ``stat`` file; None when it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid):
    """CPU seconds (user + system, all threads) that process pid has used so far; None
    when it is gone or /proc is not there."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid):
    """{thread id: CPU seconds so far} of every thread of process pid (Linux /proc);
    empty when it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    seconds = {int(tid): _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    return {tid: s for tid, s in seconds.items() if s is not None}  # ended meanwhile


def machine_cpu_seconds():
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat (busy:
    every state but idle, iowait and steal); None without /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle, iowait = values[3], values[4]
    steal = values[7] if len(values) > 7 else 0
    busy = sum(values[:8]) - idle - iowait - steal
    return busy / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


class Load:
    """n competing processes of one kind (``KINDS``), started by ``start()`` (or on
    entering a ``with`` block) and killed by their ids by ``stop()`` (or on leaving it).

    ``start`` returns once every process reports that it is running (an afmfast child
    after importing afmfast and loading its data) and raises RuntimeError, having killed
    the others, when one does not within ``ready_timeout`` seconds. ``pids`` lists the
    processes' ids, ``cpu_seconds()`` the CPU time they have used together. Start it
    from a thread that outlives the load (the main thread): the kernel's parent-death
    signal fires when the starting thread ends, not the process."""

    def __init__(self, n, kind="busy", data=None, rows=None, ready_timeout=READY_TIMEOUT):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.kind, self.data, self.rows = n, kind, data, rows
        self.ready_timeout = ready_timeout
        self.procs = []
        self._logs = []

    @property
    def pids(self):
        """Process ids of the load processes started."""
        return [p.pid for p in self.procs]

    def start(self):
        """Start the processes and wait until each runs its load; returns self."""
        args = [Path(__file__).resolve(), "--child", self.kind]
        if self.data:
            args += ["--data", self.data]
        if self.rows:
            args += ["--rows", self.rows]
        try:
            for _ in range(self.n):
                # stderr to a file: a pipe nobody reads could fill up and stall the child
                err = tempfile.TemporaryFile(mode="w+")
                self._logs.append(err)
                # a busy loop imports nothing: it starts without afmfast's imports
                self.procs.append(spawn_child(
                    args, env=dict(os.environ) if self.kind == "busy" else None,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err))
            deadline = time.monotonic() + self.ready_timeout
            for proc, err in zip(self.procs, self._logs):
                self._wait_ready(proc, err, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc, err, deadline):
        line = None
        left = deadline - time.monotonic()
        if left > 0 and select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline().decode(errors="replace").strip()
        if line != "ready":
            if line == "":  # end of its output: it is ending, let its status arrive
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            err.seek(0)
            tail = " | ".join(err.read().strip().splitlines()[-3:])
            state = (f"ended with status {proc.poll()}" if proc.poll() is not None
                     else f"not ready within {self.ready_timeout:g} s")
            raise RuntimeError(f"{self.kind} load process {proc.pid} {state}"
                               + (f": {tail}" if tail else ""))

    def stop(self):
        """Kill every load process by its id and reap it (safe to call twice)."""
        kill_processes(self.procs)
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()
        for err in self._logs:
            err.close()
        self._logs = []

    def cpu_seconds(self):
        """CPU seconds the load processes have used so far (those still there)."""
        return sum(s for s in map(process_cpu_seconds, self.pids) if s is not None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


if __name__ == "__main__":
    child_main()
