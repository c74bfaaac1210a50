"""The thread count: its default (affinity, cgroup quota, environment, threadpoolctl), its
checks and clamp, and the fit-time planner that steps down under load."""
import os
import subprocess
import sys
import warnings

import pytest

import afmfast
from afmfast.kernels import threads
from afmfast.kernels.backends import available_backends, get_backend
from afmfast.demo import make_demo_data
from afmfast.kernels.threads import RunPlanner, cgroup_cpu_limit, default_threads, resolve_threads

NO_ENV = {}


def fake_cgroup(tmp_path, proc_line, files):
    """A cgroup tree under tmp_path/fs with ``files`` ({relative path: text}) and a
    /proc/self/cgroup holding ``proc_line``."""
    root = tmp_path / "fs"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line)
    return str(root), str(proc)


@pytest.mark.parametrize("files,proc_line,expected", [
    ({"cpu.max": "200000 100000\n"}, "0::/\n", 2.0),                      # container root
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),                         # no limit
    ({"a/b/cpu.max": "max 100000\n", "a/cpu.max": "50000 100000\n"},
     "0::/a/b\n", 0.5),                                                    # an ancestor's
    ({"a/cpu.max": "300000 100000\n", "cpu.max": "150000 100000\n"},
     "0::/a\n", 1.5),                                                      # the smallest
    ({"cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     "4:cpu,cpuacct:/\n2:memory:/\n", 2.5),                                # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
    ({"cpu.max": "garbage\n"}, "0::/\n", None),                            # unreadable
    ({}, "0::/gone\n", None),                                              # no files
])
def test_cgroup_cpu_limit_reads_v1_and_v2_quotas(tmp_path, files, proc_line, expected):
    root, proc = fake_cgroup(tmp_path, proc_line, files)
    assert cgroup_cpu_limit(root=root, proc_cgroup=proc) == expected


def test_cgroup_quota_rounds_up_and_bounds_the_default(tmp_path):
    cpus = threads.affinity_cpus()
    root, proc = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert default_threads(environ=NO_ENV, cgroup_root=root, proc_cgroup=proc) == 1
    root, proc = fake_cgroup(tmp_path / "b", "0::/\n", {"cpu.max": "6400000 100000\n"})
    # a quota of 64 CPUs on a machine with fewer: the affinity mask decides
    assert default_threads(environ=NO_ENV, cgroup_root=root, proc_cgroup=proc) == cpus


def test_environment_variables_lower_the_default():
    cpus = threads.affinity_cpus()
    assert default_threads(environ={"AFMFAST_NUM_THREADS": "1"}) == 1
    assert default_threads(environ={"OMP_NUM_THREADS": "1,1"}) == 1
    assert default_threads(environ={"OMP_NUM_THREADS": str(cpus + 5)},
                           openmp_limit=False) == cpus
    with pytest.warns(RuntimeWarning, match="AFMFAST_NUM_THREADS='many'"):
        assert default_threads(environ={"AFMFAST_NUM_THREADS": "many"},
                               openmp_limit=False) == cpus


def run_python(code, cwd, **env):
    """Run ``code`` in a new interpreter in the empty folder ``cwd`` (from the checkout,
    ``python -c`` would import its uncompiled afmfast rather than the installed one)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


FIT_THREADS = ("import afmfast; from afmfast.demo import make_demo_data; "
               "d = make_demo_data(n_rows=300, seed=0); "
               "print(afmfast.FM(n_factors=4, n_epochs=1, verbose=0).fit(d.train).n_threads_)")


def test_omp_num_threads_gives_one_thread_in_a_new_process(tmp_path):
    assert run_python(FIT_THREADS, tmp_path, OMP_NUM_THREADS="1") == "1"
    assert run_python(FIT_THREADS, tmp_path, AFMFAST_NUM_THREADS="1") == "1"


def test_threadpoolctl_openmp_limit_applies():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("afmfast._fm_cython")
    data = make_demo_data(n_rows=300, seed=0)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        model = afmfast.FM(n_factors=4, n_epochs=1, verbose=0).fit(data.train)
    assert model.n_threads_ == 1
    assert default_threads() == min(threads.affinity_cpus(), default_threads())


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_n_threads_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="n_threads must be None or a positive integer"):
        resolve_threads(bad)
    data = make_demo_data(n_rows=100, seed=0)
    with pytest.raises(ValueError, match="n_threads"):
        afmfast.FM(n_factors=4, n_epochs=1, n_threads=bad, verbose=0).fit(data.train)


@pytest.mark.parametrize("backend", available_backends("afm"))
def test_absurd_thread_counts_are_clamped_with_a_warning_and_train(backend):
    data = make_demo_data(n_rows=300, seed=0)
    with pytest.warns(RuntimeWarning, match="threads per CPU"):
        model = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, n_threads=100_000,
                            backend=backend, verbose=0).fit(data.train)
    assert model.n_threads_ == threads.max_threads()
    model.predict(data.valid)
    # the kernels bound what they are given themselves: no crash without the estimator
    kernels = get_backend(backend, "afm")
    order = kernels.shuffled_rows(1000, 1, 1, 100_000)
    assert sorted(order.tolist()) == list(range(1000))


# ----- the planner, on a simulated machine ---------------------------------------------

def simulate(planner, seconds_per_row, n_rows=4_000_000, batch=4096, now=None):
    """Feed ``planner`` the run times of a machine where a run on t threads at time s (in
    seconds of training) costs seconds_per_row(t, s) per row; returns the rows trained
    per thread count and the simulated seconds. ``now`` (a one-item list), if given,
    holds the simulated time as it goes."""
    clock, done, rows = 0.0, 0, {}
    now = [0.0] if now is None else now
    while done < n_rows:
        t, batches = planner.next_run(batch, n_rows - done)
        r = min(batches * batch, n_rows - done)
        seconds = r * seconds_per_row(t, clock)
        planner.record(t, r, -(-r // batch), seconds)
        rows[t] = rows.get(t, 0) + r
        clock += seconds
        now[0] = clock
        done += r
    return rows, clock


IDLE = {1: 1.0e-6, 2: 0.55e-6}      # two threads ~1.8x one
BUSY = {1: 1.0e-6, 2: 2.3e-6}       # a busy loop beside: one thread keeps a CPU


def first_reading(value, then):
    """A busy_cpus that reads ``value`` once, then ``then``."""
    readings = iter([value])
    return lambda: next(readings, then)


@pytest.mark.parametrize("first", [0, 1])  # a right or a wrong first guess
def test_planner_keeps_all_threads_on_an_idle_machine(first):
    planner = RunPlanner(2, busy_cpus=first_reading(first, 0))
    assert planner.current == 2 - first
    rows, seconds = simulate(planner, lambda t, s: IDLE[t])
    assert rows[2] / sum(rows.values()) > 0.98
    assert seconds < 1.02 * 4_000_000 * IDLE[2]


def test_planner_recovers_when_the_busy_count_is_wrong_for_good():
    # a container on a busy host: the machine-wide count says busy, our CPUs are free
    planner = RunPlanner(2, busy_cpus=lambda: 1)
    rows, seconds = simulate(planner, lambda t, s: IDLE[t], n_rows=40_000_000)
    assert planner.current == 2 and rows[2] / sum(rows.values()) > 0.85


@pytest.mark.parametrize("busy", [lambda: 1, lambda: 0])  # counted, or not seen at all
def test_planner_steps_down_beside_a_busy_process(busy):
    planner = RunPlanner(2, busy_cpus=busy)
    rows, seconds = simulate(planner, lambda t, s: BUSY[t], n_rows=400_000)
    assert planner.current == 1
    assert seconds < 1.1 * 400_000 * BUSY[1]
    long_planner = RunPlanner(2, busy_cpus=busy)
    rows, seconds = simulate(long_planner, lambda t, s: BUSY[t], n_rows=40_000_000)
    assert seconds < 1.03 * 40_000_000 * BUSY[1]


def test_other_running_threads_reads_procs_running(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    assert threads.other_running_threads(str(stat)) == 2
    assert threads.other_running_threads(str(tmp_path / "missing")) == 0
    assert threads.other_running_threads() >= 0


def test_planner_follows_the_load_as_it_comes_and_goes():
    clock = [0.0]
    planner = RunPlanner(2, busy_cpus=lambda: 1 if 0.5 <= clock[0] < 1.5 else 0)
    # busy between 0.5 s and 1.5 s of training
    rows, seconds = simulate(planner, lambda t, s: (BUSY if 0.5 <= s < 1.5 else IDLE)[t],
                             n_rows=8_000_000, now=clock)
    # the time of always choosing the right count
    ideal_rows = [0.5 / IDLE[2], 1.0 / BUSY[1]]
    ideal = 0.5 + 1.0 + (8_000_000 - sum(ideal_rows)) * IDLE[2]
    assert seconds < 1.1 * ideal
    assert planner.current == 2


def test_planner_never_adapts_when_told_not_to_or_with_one_thread():
    for planner in (RunPlanner(2, adaptive=False), RunPlanner(1)):
        rows, _ = simulate(planner, lambda t, s: BUSY[t], n_rows=200_000)
        assert list(rows) == [planner.most]


def test_planner_ladder_halves_to_one():
    assert RunPlanner(12, busy_cpus=lambda: 0).ladder == [12, 6, 3, 1]
    assert RunPlanner(1).ladder == [1]


def test_planner_runs_last_about_a_tenth_of_a_second():
    planner = RunPlanner(2, adaptive=False)
    planner.record(2, 4096, 1, 0.001)
    planner.record(2, 4096, 1, 0.001)
    assert planner.next_run(4096, 10**9) == (2, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planner.record(2, 0, 0, 0.0)  # nothing run: nothing learnt, no error
