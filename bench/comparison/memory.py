"""Memory of a worker process: its RSS, its peak RSS since a reset, the parameters and
optimiser state it holds; and what the memory table derives from them (work space and
the issue's work-space bound)."""
import resource

from comparison.settings import BATCH
from comparison.targets import memory_allowed


def proc_status_bytes(field):
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", "RssAnon", ...) in bytes;
    None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    return proc_status_bytes("VmRSS") or 0


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Peak RSS since the last reset: VmHWM of this process. (``getrusage``'s ru_maxrss
    is not usable here: across fork + exec it keeps the parent's peak as a floor.)"""
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_param_bytes(trainer):
    """Bytes of the parameters and of the optimiser state that is in memory: every
    state array has two slots, the first written at creation, the second only by Adam
    (an untouched slot is zero pages that cost nothing, and counting it would hide as
    much work space)."""
    slots = 2 if trainer.model.optimizer == "adam" else 1
    return (sum(a.nbytes for a in trainer.params)
            + sum(a[:slots].nbytes for a in trainer.state))


def work_bound(model, k, data_set):
    """The issue's work-space bound: B * (pairs per row) * max(k, t) * 4 bytes (AFM;
    FM: B * nonzeros per row * k * 4)."""
    per_row = (max(1, data_set["pairs_max"]) if model == "afm"
               else max(1, data_set["max_row_nnz"]))
    return BATCH * per_row * k * 4


def memory_figures(run, data_set):
    """The memory table's figures of one row: data + params, growth over the baseline,
    fit's epoch order, the work space left over, its bound and whether it is within
    what the memory target allows (None for PyTorch, which the target does not judge)."""
    bound = work_bound(run["model"], run["k"], data_set)
    grown = run["peak"] - run["rss_before"]
    order = run.get("order_bytes", 0)
    work = grown - run["param_bytes"] - order
    within = (None if run["impl"] == "pytorch"
              else bool(work <= memory_allowed(bound) and run["peak_reset"]))
    return dict(base=data_set["data_bytes"] + run["param_bytes"], grown=grown,
                order=order, work=work, bound=bound, within=within)
