"""The project's targets as data, and the verdict of a figure against one.

Each target names the figure it judges (``kind``), where it applies and its goal; the
report (``report.verdict_lines``) computes the figure and words the verdict. A missed
2-thread target is annotated with what the CPU 0/1 probes saw during its rows when the
machine was not a quiet one (SPLIT_LATENCY_NS, SHARED_FLOPS)."""
import math

SPLIT_LATENCY_NS = 100  # a probe latency above this: the two vCPUs were on two chiplets
SHARED_FLOPS = 1.8  # 2-CPU flops below this: the host ran other work on our cores
# the memory target: training's own work space at most MEMORY_FACTOR times the issue's
# O(B * P * max(k, t)) bound plus MEMORY_SLACK_MB (allocator, thread stacks). The kernels
# keep several arrays of a batch's size: per pair e and act(W e + b) and their
# gradients, per occurrence v x and its float64 gradient, per row float64 sums of
# k and t; where rows have few pairs (ml-tag: 3) the per-occurrence and per-row ones
# weigh as much as the per-pair ones, and the Numba backend adds per-chunk dW partials
# (64 x t x k). The largest work space seen is below 8 x the bound (ml-tag AFM
# k=t=256, Numba; the memory table of a full run shows it); what the target rules out,
# pairs kept for an epoch, would be n_pairs * max(k, t) * 4 bytes.
MEMORY_FACTOR = 8
MEMORY_SLACK_MB = 8

# PyTorch seconds / afmfast seconds at 2 threads, the best afmfast backend. only_set:
# the target holds on data sets whose name starts so (elsewhere the ratio is shown
# with "no target here").
SPEED_TARGETS = [
    dict(id="afm16_vs_pytorch", model="afm", k=16, goal=10, only_set="frappe"),
    dict(id="afm256_vs_pytorch", model="afm", k=256, goal=3, only_set=None),
    dict(id="fm16_vs_pytorch", model="fm", k=16, goal=10, only_set=None),
    dict(id="fm256_vs_pytorch", model="fm", k=256, goal=10, only_set=None),
]
# the attention product's rate (on distinct pairs when countable) against NumPy's best
# float32 matmul, in percent, at 2 threads
ATTENTION_TARGET = dict(id="attention_vs_numpy", goal_percent=50)
# t(1 thread) / t(2 threads) of AFM at k >= min_k, the best afmfast backend
SPEEDUP_TARGET = dict(id="afm_speedup", model="afm", min_k=64, goal=1.8)
MEMORY_TARGET = dict(id="memory", factor=MEMORY_FACTOR, slack_mb=MEMORY_SLACK_MB)
# the reader's goal comes from bench/reader_speed.py (TARGET_MB_S)
READER_TARGET_ID = "reader"


def as_data():
    """Every target, for the JSON document."""
    return dict(speed=SPEED_TARGETS, attention=ATTENTION_TARGET, speedup=SPEEDUP_TARGET,
                memory=MEMORY_TARGET, split_latency_ns=SPLIT_LATENCY_NS,
                shared_flops=SHARED_FLOPS)


def memory_allowed(bound):
    """Bytes of work space the memory target allows for a work-space bound."""
    return MEMORY_FACTOR * bound + MEMORY_SLACK_MB * 2**20


def state(ok, value):
    """"met", "NOT met", or "n/a" when the figure could not be measured."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return "met" if ok else "NOT met"


def probe_notes(latencies, flops):
    """What the probes saw that makes a machine not a quiet one, as phrases."""
    seen = []
    if latencies and max(latencies) > SPLIT_LATENCY_NS:
        seen.append(f"vCPUs on two chiplets at times, up to {max(latencies):.0f} ns")
    if flops and min(flops) < SHARED_FLOPS:
        seen.append(f"2-CPU flops down to {min(flops):.2f}")
    return seen
