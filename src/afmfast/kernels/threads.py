"""How many threads the kernels run on: the default count, and its adaptation during fit.

The default (``n_threads=None``) is the smallest of
- the CPUs in the process's affinity mask (``os.sched_getaffinity``),
- the CPU quota of its cgroup, rounded up (cgroup v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us``, on the process's cgroup and its ancestors),
- ``OMP_NUM_THREADS`` and ``AFMFAST_NUM_THREADS`` when set,
- OpenMP's ``omp_get_max_threads()`` as the Cython kernels' OpenMP runtime reports it,
  which is how ``threadpoolctl.threadpool_limits(n, user_api="openmp")`` limits afmfast.

An explicit ``n_threads`` above ``MAX_THREADS_PER_CPU`` times the CPU count is clamped
with a warning: an OpenMP runtime asked for a hundred thousand threads fails to create
them and aborts the process.

During ``fit`` a ``RunPlanner`` chooses the thread count of each kernel call. A kernel
call splits a batch between its threads and meets them at barriers; when another process
keeps a CPU busy, the OS takes one of the threads off its CPU for a time slice, and the
others wait for it at every barrier. Fewer threads that each keep a CPU are then faster.
The planner measures the seconds per row of each call, tries a neighbouring thread count
now and then (one short run) and moves when that is faster. Results do not depend on the
thread count (the kernels' determinism guarantee), so switching costs nothing in
reproducibility.
"""
import math
import numbers
import os
import time
import warnings

from afmfast.kernels.api import MAX_THREADS_PER_CPU

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"


def affinity_cpus():
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ancestors(path):
    """'/a/b' -> ['/a/b', '/a', '/']: a quota set on any ancestor limits the process."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(root, path):
    text = _read(os.path.join(root, path.lstrip("/"), "cpu.max"))
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(root, controllers, path):
    base = os.path.join(root, controllers, path.lstrip("/"))
    quota, period = _read(os.path.join(base, "cpu.cfs_quota_us")), \
        _read(os.path.join(base, "cpu.cfs_period_us"))
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root=CGROUP_ROOT, proc_cgroup=PROC_SELF_CGROUP):
    """The CPU quota of this process's cgroup in CPUs (a float), or None when unlimited.

    ``proc_cgroup`` is the process's ``/proc/self/cgroup``; its lines name the cgroup
    paths (``0::/path`` for v2, ``N:cpu,cpuacct:/path`` for v1), looked up under
    ``root``. In a container the cgroup usually reads ``/`` and the container's own
    limits sit in ``root`` itself, which the walk up to ``/`` covers. Both paths are
    parameters so that tests can lay out fake cgroup trees.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "cpu.max").write_text("150000 100000\\n")
    >>> _ = (d / "cgroup").write_text("0::/\\n")
    >>> cgroup_cpu_limit(root=str(d), proc_cgroup=str(d / "cgroup"))
    1.5
    """
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            for p in _ancestors(path):
                limits.append(_v2_quota(root, p))
        elif "cpu" in controllers.split(","):
            for p in _ancestors(path):
                limits.append(_v1_quota(root, controllers, p))
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _env_threads(name, environ):
    """A positive thread count from environment variable ``name``, or None.

    ``OMP_NUM_THREADS`` may be a list for nested levels ("4,2"): the first entry is the
    outer level's. Values that are not positive integers are ignored with a warning, as
    OpenMP runtimes ignore them."""
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    first = text.split(",")[0].strip()
    try:
        value = int(first)
    except ValueError:
        value = 0
    if value < 1:
        warnings.warn(f"afmfast: ignoring {name}={text!r}: not a positive integer",
                      RuntimeWarning, stacklevel=3)
        return None
    return value


def _openmp_max_threads():
    """omp_get_max_threads() of the Cython kernels' OpenMP runtime, or None without it."""
    try:
        from afmfast import _fm_cython
    except ImportError:
        return None
    query = getattr(_fm_cython, "openmp_max_threads", None)  # None: an older build
    return None if query is None else int(query())


def default_threads(*, environ=None, cgroup_root=CGROUP_ROOT,
                    proc_cgroup=PROC_SELF_CGROUP, openmp_limit=True):
    """Threads used when ``n_threads`` is None (see the module docstring for the rules).

    Examples
    --------
    >>> default_threads(environ={"AFMFAST_NUM_THREADS": "1"})
    1
    """
    environ = os.environ if environ is None else environ
    counts = [affinity_cpus()]
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        counts.append(max(1, math.ceil(quota)))
    for name in ("OMP_NUM_THREADS", "AFMFAST_NUM_THREADS"):
        value = _env_threads(name, environ)
        if value is not None:
            counts.append(value)
    if openmp_limit:
        omp = _openmp_max_threads()
        if omp is not None and omp >= 1:
            counts.append(omp)
    return max(1, min(counts))


def max_threads():
    """The most threads any kernel call may use: MAX_THREADS_PER_CPU per CPU."""
    return MAX_THREADS_PER_CPU * (os.cpu_count() or 1)


def resolve_threads(n_threads, name="n_threads"):
    """Validate ``n_threads`` (None or a positive int) and return a positive int.

    None gives ``default_threads()``; a count above ``max_threads()`` is clamped to it
    with a warning; 0, negatives, bools, floats and strings raise ``ValueError`` naming
    the argument.

    Examples
    --------
    >>> resolve_threads(3)
    3
    >>> resolve_threads(0)
    Traceback (most recent call last):
    ...
    ValueError: n_threads must be None or a positive integer, got 0
    """
    if n_threads is None:
        return default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral) or n_threads < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {n_threads!r}")
    n_threads = int(n_threads)
    limit = max_threads()
    if n_threads > limit:
        warnings.warn(f"afmfast: {name}={n_threads} is more than {MAX_THREADS_PER_CPU} "
                      f"threads per CPU of this machine; using {limit}",
                      RuntimeWarning, stacklevel=3)
        return limit
    return n_threads


def other_running_threads(stat="/proc/stat"):
    """Threads of other processes running or runnable right now, machine-wide: the
    kernel's ``procs_running`` count less the calling thread (0 where there is no
    ``/proc/stat``). A snapshot, and in a container it counts the host's threads too,
    so it serves only as a first guess that measurement then corrects."""
    text = _read(stat)
    if text:
        for line in text.splitlines():
            if line.startswith("procs_running "):
                try:
                    return max(0, int(line.split()[1]) - 1)
                except ValueError:
                    break
    return 0


class RunPlanner:
    """Plans fit's kernel calls: how many batches each call runs, on how many threads.

    A call runs about ``span_seconds`` of batches (at most ``max_span_batches``), short
    enough for Ctrl-C to land soon. With ``adaptive`` the thread count moves along the
    ladder ``most, most // 2, ..., 1``: every so often one short run (a probe) tries a
    neighbouring count, and the planner moves there when its seconds per row beat the
    current count's recent median by ``switch_margin``. After a probe that loses, the
    wait before the next doubles (from ``first_gap`` up to ``longest_gap`` seconds of
    training, and at least ``probe_share`` times the probe's cost), so on a machine whose
    load does not change the probes cost little; when the current count suddenly runs
    ``slowdown`` times slower than its recent median (a competing process started) the
    next run is a probe.

    A probe with more threads costs most when it is wrong: beside a busy process one
    batch on a descheduled thread can take as long as many batches on fewer threads,
    and a batch cannot be cut short. So an upward probe runs only when ``busy_cpus()``
    (other processes' running threads) leaves a CPU free for each added thread, or
    otherwise after ``blind_gap`` seconds of training (doubling up to
    ``longest_blind_gap``), since that count is machine-wide and can be wrong, for
    example in a container on a busy host. The same count picks the first thread count.

    Parameters
    ----------
    most : int
        The largest thread count (the fit's resolved ``n_threads``).
    adaptive : bool
        False: every run uses ``most`` threads.
    busy_cpus : callable, optional
        Returns the CPUs other processes keep busy now (default:
        ``other_running_threads``, the least of three readings).

    Examples
    --------
    >>> planner = RunPlanner(2, busy_cpus=lambda: 0)
    >>> threads, batches = planner.next_run(batch_rows=4096, rows_left=40000)
    >>> threads, batches
    (2, 1)
    >>> planner.record(threads, rows=4096, batches=1, seconds=0.002)
    """

    span_seconds = 0.1
    max_span_batches = 256
    probe_seconds = 0.002
    first_gap = 0.03
    longest_gap = 2.0
    blind_gap = 2.0
    longest_blind_gap = 16.0
    probe_share = 20.0
    switch_margin = 0.9
    slowdown = 1.5
    history = 3

    def __init__(self, most, adaptive=True, busy_cpus=None):
        self.most = int(most)
        self.adaptive = bool(adaptive) and self.most > 1
        ladder = [self.most]
        while ladder[-1] > 1:
            ladder.append(ladder[-1] // 2)
        self.ladder = ladder
        self._busy = busy_cpus or _least_busy
        self.current = self.most
        if self.adaptive:
            self.current = next((t for t in ladder if t <= self._free_cpus()), 1)
        self._recent = {}          # threads -> seconds per row of its last runs
        self._batch_seconds = {}   # threads -> seconds per batch of its last run
        self._first = True         # the fit's first run: cold caches, JIT, thread start
        self._clock = 0.0          # seconds spent in kernel runs so far
        self._next_probe = self.first_gap
        self._gap = self.first_gap
        self._blind_gap = self.blind_gap
        self._next_blind = self.blind_gap
        self._probe_up = False
        self._probing = None       # the thread count of the run in flight, if a probe
        self.rows_by_threads = {}  # threads -> rows trained (for the epoch's report)

    def _free_cpus(self):
        return (os.cpu_count() or 1) - self._busy()

    def _span(self, threads, seconds):
        per_batch = self._batch_seconds.get(threads) or self._batch_seconds.get(self.current)
        if not per_batch:
            return 1
        return max(1, min(self.max_span_batches, int(seconds / per_batch)))

    def _median(self, threads):
        values = sorted(self._recent.get(threads, ()))
        return values[len(values) // 2] if values else None

    def _neighbour(self):
        i = self.ladder.index(self.current)
        up = self.ladder[i - 1] if i > 0 else None
        down = self.ladder[i + 1] if i + 1 < len(self.ladder) else None
        if up is None or down is None:
            return up or down
        self._probe_up = not self._probe_up
        return up if self._probe_up else down

    def _may_probe(self, probe):
        if probe < self.current or self._free_cpus() >= probe:
            return True
        if self._clock >= self._next_blind:
            self._blind_gap = min(self.longest_blind_gap, 2 * self._blind_gap)
            self._next_blind = self._clock + self._blind_gap
            return True
        return False

    def _lost_probe(self, cost):
        self._gap = min(self.longest_gap, 2 * self._gap)
        self._next_probe = self._clock + max(self._gap, self.probe_share * cost)

    def next_run(self, batch_rows, rows_left):
        """(threads, batches) of the next kernel call; ``batch_rows`` is the batch size,
        ``rows_left`` the rows left in the epoch."""
        self._probing = None
        if not self.adaptive:
            return self.current, self._span(self.current, self.span_seconds)
        if self._median(self.current) is None:  # a short first measurement
            return self.current, self._span(self.current, self.probe_seconds)
        if self._clock >= self._next_probe and rows_left > 2 * batch_rows:
            probe = self._neighbour()
            if self._may_probe(probe):
                self._probing = probe
                return probe, self._span(probe, self.probe_seconds)
            self._lost_probe(0.0)
        # end the run at the next probe, so that it is not late by a whole span
        seconds = min(self.span_seconds, max(self._next_probe - self._clock, 0.0))
        return self.current, self._span(self.current, seconds or self.span_seconds)

    def record(self, threads, rows, batches, seconds):
        """Account a finished kernel call of ``batches`` batches and ``rows`` rows."""
        self._clock += seconds
        self.rows_by_threads[threads] = self.rows_by_threads.get(threads, 0) + rows
        if batches < 1 or rows < 1:
            return
        self._batch_seconds[threads] = seconds / batches
        if self._first:  # not typical of what follows
            self._first = False
            return
        if not self.adaptive:
            return
        rate = seconds / rows
        reference = self._median(self.current)
        self._remember(threads, rate)
        if self._probing is not None and threads == self._probing:
            if reference is not None and rate < self.switch_margin * reference:
                self.current = threads
                self._gap = self.first_gap
                self._next_probe = self._clock + self._gap
            else:
                self._lost_probe(seconds)
        elif reference is not None and rate > self.slowdown * reference:
            self._gap = self.first_gap
            self._next_probe = self._clock

    def _remember(self, threads, rate):
        values = self._recent.setdefault(threads, [])
        values.append(rate)
        del values[:-self.history]

    def take_rows_by_threads(self):
        """Rows trained per thread count since the last call (then reset)."""
        counts, self.rows_by_threads = self.rows_by_threads, {}
        return counts


def _least_busy():
    """other_running_threads(), the least of three readings: a process that ran for a
    moment should not count as a competing load."""
    return min(other_running_threads() for _ in range(3))
