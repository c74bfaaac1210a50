"""``--load N``: bench/fit_times.py's comparison of fits, quiet and under load, with its
figures kept for the JSON document: the times and CPU use that fit_times hands to its
report, and the verdicts of its targets (a) and (b) as data."""
import signal
import sys
import tempfile
import time
from contextlib import contextmanager

from bench_common import FRAPPE, mean, med, print_run_header

from comparison.document import finish, new_document


@contextmanager
def _recording_report(fit_times, into):
    """fit_times.report, which receives every figure of the run, also recording them
    into ``into`` (fit_times.run returns nothing)."""
    original = fit_times.report

    def report(times, usage, configs, impls, phases, reps, n, default_threads):
        into.update(times=times, usage=usage, configs=configs, impls=impls,
                    phases=phases, reps=reps, n=n, default_threads=default_threads)
        return original(times, usage, configs, impls, phases, reps, n, default_threads)

    fit_times.report = report
    try:
        yield
    finally:
        fit_times.report = original


def _phase_label(kind, n):
    """"quiet", "1 busy loop", "2 afmfast trainings", as the README names a phase."""
    if kind is None:
        return "quiet"
    noun = "busy loop" if kind == "busy" else "afmfast training"
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _phase_doc(rec, name, kind, n):
    rows = [dict(model=model, k=k, impl=label, threads=threads,
                 times=rec["times"][name][(model, k, label)],
                 mean_s=mean(rec["times"][name][(model, k, label)]),
                 median_s=med(rec["times"][name][(model, k, label)]))
            for model, k in rec["configs"] for _, threads, label in rec["impls"]]
    return dict(name=name, label=_phase_label(kind, n), kind=kind, processes=n,
                usage=rec["usage"][name], rows=rows)


def _load_verdicts(fit_times, rec):
    """Targets (a) and (b): default threads / one thread, means, per configuration."""
    default, one = fit_times.IMPLS[0][2], fit_times.IMPLS[1][2]
    by_kind = {kind: name for name, kind, _ in rec["phases"]}
    out = []
    for target, num_kind in (("a", "busy"), ("b", "afmfast")):
        if num_kind not in by_kind or "busy" not in by_kind:
            continue
        num, den = rec["times"][by_kind[num_kind]], rec["times"][by_kind["busy"]]
        for model, k in rec["configs"]:
            if (model, k, default) not in num:
                continue
            r = mean(num[(model, k, default)]) / mean(den[(model, k, one)])
            out.append(dict(target=target, model=model, k=k, ratio_mean=r,
                            goal=fit_times.TARGET_RATIO,
                            state="met" if r <= fit_times.TARGET_RATIO else "NOT met"))
    return out


def run_load(args, configs):
    """Run the comparison under load; returns its JSON document."""
    import fit_times

    # a plain SIGTERM would end this process without its cleanup: make it an exit that
    # runs the finally blocks which kill the load (the load processes would die with
    # this one anyway, see bench/load.py)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    has_torch, backends = print_run_header(
        "afmfast bench/compare.py --load", " (bench/torch_models.py, the models that the "
        "same-math check of a full run verifies)")
    started = time.perf_counter()
    rec = {}
    doc = new_document("load", args, backends, has_torch)
    with tempfile.TemporaryDirectory(prefix="afmfast-load-") as tmp, \
            _recording_report(fit_times, rec):
        fit_times.run(args, configs, has_torch, tmp)
    doc.update(
        data_set=("frappe-mini train" if FRAPPE.exists() and not args.no_frappe
                  else "synthetic frappe-like"),
        settings=dict(epochs=fit_times.EPOCHS, reps=args.load_reps, processes=args.load,
                      load_kind=args.load_kind, target_ratio=fit_times.TARGET_RATIO),
        configs=rec.get("configs", []), default_threads=rec.get("default_threads"),
        phases=[_phase_doc(rec, *p) for p in rec.get("phases", [])],
        verdicts=_load_verdicts(fit_times, rec) if rec else [])
    finish(doc, started)
    return doc
