"""What the tables and verdicts show, derived from the measured times into the JSON
document: per row the medians, the 2-thread speed-up, PyTorch / this, the memory
figures; per set NumPy's GFLOP/s, the attention product's rates and the verdicts."""
import math

from bench_common import fmt_x, mb, med

from comparison.measure import find_run
from comparison.memory import memory_figures
from comparison.probes import probe_values
from comparison.settings import ATTENTION_K, THREADS, config_label
from comparison import targets as tg


def per_thread(fn):
    """{thread count as a JSON key: fn(thread count)}."""
    return {str(t): fn(t) for t in THREADS}


def ok(run):
    return run is not None and "error" not in run


def summarize_run(run, data_set):
    """Medians, speed-up, PyTorch / this and memory of one row (nothing for a failure)."""
    if not ok(run):
        return
    m = run["median_s"] = per_thread(lambda t: med(run["times"][str(t)]))
    run["speedup"] = m["1"] / m["2"]
    ref = find_run(data_set, run["model"], run["k"], "pytorch")
    run["pytorch_over_this"] = None
    if run["impl"] != "pytorch" and ok(ref):
        run["pytorch_over_this"] = per_thread(
            lambda t: med(ref["times"][str(t)]) / m[str(t)])
    run["memory"] = memory_figures(run, data_set)


def afmfast_runs(data_set, model, k, backends):
    return [r for b in backends[model]
            if ok(r := find_run(data_set, model, k, b))]


def best_time(data_set, model, k, backends, threads=2):
    """The best afmfast backend's median seconds at ``threads`` (NaN when none ran)."""
    vals = [r["median_s"][str(threads)] for r in afmfast_runs(data_set, model, k, backends)]
    return min(vals) if vals else float("nan")


def attention_figures(data_set, backends, has_torch):
    """NumPy's GFLOP/s per matmul environment and the AFM k=t=256 rows' rates: all
    pairs counted (6 P k t an epoch) and distinct pairs only, each also as a percentage
    of every NumPy environment."""
    k = t = ATTENTION_K
    flops_epoch = 6.0 * data_set["pairs_total"] * k * t
    mm = data_set["matmul"]
    for res in mm.values():
        if "error" not in res:
            res["gflops"] = per_thread(lambda tt: res["flops"] / med(res["times"][str(tt)])
                                       / 1e9)
    share = data_set["distinct_share"]
    rows = []
    for name in backends["afm"] + (["pytorch"] if has_torch else []):
        run = find_run(data_set, "afm", k, name)
        if not ok(run):
            continue
        for tt in THREADS:
            g = flops_epoch / run["median_s"][str(tt)] / 1e9
            gd = g * share if share is not None and name != "pytorch" else None
            rows.append(dict(impl=name, threads=tt, gflops=g, distinct_gflops=gd, of_numpy={
                label: 100 * g / r["gflops"][str(tt)] if "gflops" in r else None
                for label, r in mm.items()}, distinct_of_numpy={
                label: 100 * gd / r["gflops"][str(tt)] if gd is not None and "gflops" in r
                else None for label, r in mm.items()}))
    data_set["attention"] = dict(flops_epoch=flops_epoch, rows=rows)


def summarize_set(data_set, configs, backends, has_torch):
    for run in data_set["runs"]:
        summarize_run(run, data_set)
    if ("afm", ATTENTION_K) in configs:
        attention_figures(data_set, backends, has_torch)
    data_set["verdicts"] = verdicts(data_set, configs, backends)


# ----- verdicts ------------------------------------------------------------------------
def _probe_note(data_set, backends, model, k, with_torch):
    """What the probes saw during the rows a missed target comes from (the best afmfast
    backend's, and PyTorch's for a ratio), as " (probes during the row: ...)" or ""."""
    runs = afmfast_runs(data_set, model, k, backends)
    runs = [min(runs, key=lambda r: r["median_s"]["2"])] if runs else []
    ref = find_run(data_set, model, k, "pytorch")
    if with_torch and ref is not None:
        runs.append(ref)
    readings = [x for r in runs for x in r.get("c2c", [])]
    seen = tg.probe_notes(probe_values(readings, 0), probe_values(readings, 1))
    return f" (probes during the row: {', '.join(seen)})" if seen else ""


def _judged(data_set, backends, ok_, value, model, k, with_torch):
    """(state, probe note): the note only for a missed target."""
    state = tg.state(ok_, value)
    note = (_probe_note(data_set, backends, model, k, with_torch) if state == "NOT met"
            else "")
    return state, note


def _speed_verdicts(data_set, configs, backends):
    out = []
    for target in tg.SPEED_TARGETS:
        model, k, goal = target["model"], target["k"], target["goal"]
        if (model, k) not in configs:
            continue
        ref = find_run(data_set, model, k, "pytorch")
        torch_t = ref["median_s"]["2"] if ok(ref) else float("nan")
        r = torch_t / best_time(data_set, model, k, backends)
        label = config_label(model, k)
        if target["only_set"] and not data_set["name"].startswith(target["only_set"]):
            out.append(dict(id=target["id"], value=r, goal=None, state="no target",
                            text=f"{label}: {fmt_x(r)} PyTorch (no target here)"))
            continue
        state, note = _judged(data_set, backends, r >= goal, r, model, k, True)
        out.append(dict(id=target["id"], value=r, goal=goal, state=state, probes=note,
                        text=f"{label} >= {goal}x PyTorch: {fmt_x(r)} {state}{note}"))
    return out


def _attention_verdict(data_set, backends):
    """Machine efficiency: the flops actually needed, once per distinct pair."""
    mmb = data_set["matmul"].get("best", {})
    if "gflops" not in mmb:
        return []
    goal = tg.ATTENTION_TARGET["goal_percent"]
    g = data_set["attention"]["flops_epoch"] / best_time(data_set, "afm", ATTENTION_K,
                                                         backends) / 1e9
    share = data_set["distinct_share"]
    all_pct = 100 * g / mmb["gflops"]["2"]
    pct = 100 * g * share / mmb["gflops"]["2"] if share is not None else all_pct
    state = "met" if pct >= goal else "NOT met"
    shown = (f"{pct:.0f}% on distinct pairs ({all_pct:.0f}% counting all pairs)"
             if share is not None else f"{pct:.0f}%")
    return [dict(id=tg.ATTENTION_TARGET["id"], value=pct, goal=goal, state=state,
                 text=f"attention product >= {goal}% of NumPy: {shown} {state}")]


def _memory_verdict(data_set, configs, backends):
    checks = [(r["memory"]["within"], f"{r['config']} {r['impl']}", r["memory"]["work"],
               r["memory"]["bound"])
              for model, k in configs for r in afmfast_runs(data_set, model, k, backends)]
    if not checks:
        return []
    worst = max(checks, key=lambda c: c[2] / tg.memory_allowed(c[3]))
    state = "met" if all(c[0] for c in checks) else "NOT met"
    epoch_pairs = float(data_set["pairs_total"]) * ATTENTION_K * 4
    return [dict(id=tg.MEMORY_TARGET["id"], value=worst[2], goal=tg.memory_allowed(worst[3]),
                 state=state, text=(
                     f"training memory <= data + params/state + epoch order + "
                     f"{tg.MEMORY_FACTOR} x work bound + {tg.MEMORY_SLACK_MB} MB, every "
                     f"afmfast row: {state} (closest: {worst[1]}, work "
                     f"{mb(max(0, worst[2]))} MB, allowed {mb(tg.memory_allowed(worst[3]))} "
                     f"MB; an epoch's pairs at k=256 would be {mb(epoch_pairs)} MB)"))]


def _speedup_verdicts(data_set, configs, backends):
    target, out = tg.SPEEDUP_TARGET, []
    for model, k in configs:
        if model == target["model"] and k >= target["min_k"]:
            sp = (best_time(data_set, model, k, backends, 1)
                  / best_time(data_set, model, k, backends, 2))
            state, note = _judged(data_set, backends, sp >= target["goal"], sp, model, k,
                                  False)
            out.append(dict(id=f"{target['id']}_k{k}", value=sp, goal=target["goal"],
                            state=state, probes=note, text=f"AFM k=t={k} 2 threads >= "
                            f"{target['goal']}x 1 thread: {fmt_x(sp)} {state}{note}"))
    return out


def verdicts(data_set, configs, backends):
    """The set's verdicts in the order the summary prints them."""
    return (_speed_verdicts(data_set, configs, backends)
            + _attention_verdict(data_set, backends)
            + _memory_verdict(data_set, configs, backends)
            + _speedup_verdicts(data_set, configs, backends))


def reader_verdict(reader):
    """The reader's verdict entry ({"id", "value", "goal", "state", "text"})."""
    every, target = reader["mb_s_all"], reader["target_mb_s"]
    state = "met" if every >= target else "NOT met"
    return dict(id=tg.READER_TARGET_ID, value=every, goal=target, state=state,
                text=f">= {target:.0f} MB/s with all CPUs: {every:.0f} MB/s {state}")


def finite_or_none(value):
    """JSON has no NaN: a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
