"""The CPU 0/1 probe (``bench/core_to_core.c``): the one-way latency of a cache line
between the two CPUs and their floating-point throughput together relative to CPU 0
alone, and how a row's readings are summarised."""
import os
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]


def build_core_probe(directory):
    """bench/core_to_core.c compiled into directory: its path, or None without a C
    compiler."""
    exe = Path(directory) / "core_to_core"
    cmd = [os.environ.get("CC", "cc"), "-O2", "-pthread", str(BENCH / "core_to_core.c"),
           "-o", str(exe)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return exe


def core_probe(probe):
    """(one-way latency of a cache line between CPUs 0 and 1 in ns, floating-point
    throughput of both CPUs at once relative to CPU 0 alone), or (None, None)."""
    if probe is None or (os.cpu_count() or 1) < 2:
        return None, None
    try:
        out = subprocess.run([str(probe)], capture_output=True, text=True, timeout=120,
                             check=True).stdout.split()
        return float(out[0]), float(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, None


def probe_values(readings, i):
    """Field i (0: latency ns, 1: 2-CPU flops) of the CPU 0/1 probe readings measured."""
    return [r[i] for r in readings if r[i] is not None]


def probe_range(readings, i, fmt):
    """'lo-hi (n)' of field i of the CPU 0/1 probe readings that were measured."""
    vals = probe_values(readings, i)
    if not vals:
        return "?"
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return (lo if lo == hi else f"{lo}-{hi}") + f" ({len(vals)})"
