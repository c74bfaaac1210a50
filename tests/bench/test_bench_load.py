"""bench/load.py's competing processes: started, running, and gone afterwards however
their starter ends (leaving the block, an exception, the starter killed outright), so
that a benchmark under load never leaves a busy loop behind on a shared machine."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.paths import REPO

BENCH = REPO / "bench"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="the checks read /proc")


@pytest.fixture(scope="module")
def load():
    sys.path.insert(0, str(BENCH))
    try:
        import load as module
        yield module
    finally:
        sys.path.remove(str(BENCH))


def alive(pid):
    """True while pid exists and is not a zombie (a zombie runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_busy_loops_run_and_are_killed(load):
    with load.Load(2, "busy") as running:
        pids = running.pids
        assert len(set(pids)) == 2 and all(map(alive, pids))
        t0 = running.cpu_seconds()
        time.sleep(0.5)
        assert running.cpu_seconds() > t0  # they burn CPU, not sleep
    assert not any(map(alive, pids))  # killed and reaped on leaving the block
    assert all(p.returncode == -signal.SIGKILL for p in running.procs)


def test_an_exception_in_the_block_kills_the_load(load):
    with pytest.raises(KeyError):
        with load.Load(1, "busy") as running:
            pids = running.pids
            raise KeyError("boom")
    assert not any(map(alive, pids))


def test_load_dies_with_a_starter_killed_outright(load, tmp_path):
    # a starter that SIGKILL ends runs no cleanup: the children must end by themselves
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]); import load; "
         "running = load.Load(2, 'busy').start(); print(*running.pids, flush=True); "
         "time.sleep(60)", str(BENCH)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(BENCH.parent), os.environ.get("PYTHONPATH", "")])))
    try:
        pids = [int(p) for p in starter.stdout.readline().split()]
        assert len(pids) == 2 and all(map(alive, pids))
    finally:
        starter.kill()
        starter.wait()
    assert wait_gone(pids) == []


def test_afmfast_load_trains_and_is_killed(load):
    with load.Load(1, "afmfast", rows=2000) as running:
        pid = running.pids[0]
        t0 = running.cpu_seconds()
        time.sleep(0.5)
        assert alive(pid) and running.cpu_seconds() > t0
    assert not alive(pid)


def test_a_child_that_fails_is_reported_and_nothing_is_left(load, tmp_path):
    running = load.Load(1, "afmfast", data=str(tmp_path / "missing.npz"))
    with pytest.raises(RuntimeError, match="ended with status"):
        running.start()
    assert not any(map(alive, running.pids))
