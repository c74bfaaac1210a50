"""The command line of ``bench/compare.py`` and its main sequence of steps."""
import argparse
import json
import tempfile
import time

from bench_common import print_run_header

from comparison import document, figures, readme, report
from comparison.check import print_check, verified
from comparison.datasets import describe, load_sets, save_sets
from comparison.measure import Plan, measure_reader, measure_set
from comparison.probes import build_core_probe
from comparison.settings import (BATCH, CONFIGS, MAX_REPS, MIN_TIMED_SECONDS,
                                 STEPS_PER_SWITCH, THREADS)
from comparison.workers import run_job, run_worker


def _add_load_options(parser):
    parser.add_argument("--load", type=int, default=None, metavar="N",
                        help="instead of the rest: fits of 3 epochs on frappe-mini (FM k=16, "
                        "AFM k=t=16 and 64; --quick: k=16 only), quiet and beside N "
                        "competing processes (bench/fit_times.py, bench/load.py)")
    parser.add_argument("--load-kind", choices=("busy", "afmfast"), default="busy",
                        help="with --load: pure-Python busy loops (default), or afmfast "
                        "AFM k=t=16 trainings at default threads (the busy phase runs too)")
    parser.add_argument("--load-reps", type=int, default=5,
                        help="with --load: repetitions a phase (default 5)")
    parser.add_argument("--load-no-torch", action="store_true",
                        help="with --load: skip the PyTorch columns (a shorter run; under "
                        "load PyTorch's 2-thread fits can take ten times their quiet time)")


def _add_output_options(parser):
    parser.add_argument("--json", metavar="PATH",
                        help="also write every figure of the run (or of --load) as JSON")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="instead of measuring: the README's tables from these runs' "
                        "JSON (a row from the last file that has it)")
    parser.add_argument("--write-readme", nargs="?", const=str(readme.README),
                        metavar="README", help="with --report: write the tables between "
                        "their <!-- compare:NAME:begin/end --> markers (default README.md)")
    parser.add_argument("--tables", default=None,
                        help="with --report: only these of " + ",".join(readme.TABLES))
    parser.add_argument("--allow-quick", action="store_true",
                        help="with --write-readme: accept the figures of a --quick run")


def parser_for(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows, epochs and steps (about 3 minutes)")
    parser.add_argument("--rows", type=int, default=None,
                        help="synthetic ml-tag rows (default 2,000,000; --quick 200,000)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs at k <= 64, at least (default 5; --quick 2; "
                        "more until each thread count is timed for 3 s, --quick 1 s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed batches at k >= 128, at least (default 8; --quick 3)")
    parser.add_argument("--no-frappe", action="store_true", help="skip frappe-mini")
    parser.add_argument("--no-reader", action="store_true",
                        help="skip the reader's measurement")
    parser.add_argument("--configs", default=None,
                        help="only these model:k configurations, e.g. afm:16,fm:256 "
                             "(default: all of " + ",".join(f"{m}:{k}" for m, k in CONFIGS)
                             + ")")
    _add_load_options(parser)
    _add_output_options(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def parse_configs(parser, text):
    """--configs as [(model, k)] (CONFIGS without it)."""
    if not text:
        return CONFIGS
    try:
        configs = [(m, int(k)) for m, k in (c.split(":") for c in text.split(","))]
    except ValueError:
        parser.error(f"--configs: expected model:k[,model:k...], got {text!r}")
    bad = [c for c in configs if c[0] not in ("fm", "afm") or c[1] < 1]
    if bad:
        parser.error(f"--configs: unknown configuration(s) {bad}; models are fm, afm")
    return configs


def run_report(parser, args):
    names = args.tables.split(",") if args.tables else None
    unknown = [n for n in names or () if n not in readme.TABLES]
    if unknown:
        parser.error(f"--tables: unknown table(s) {unknown}; tables are "
                     + ",".join(readme.TABLES))
    try:
        done = readme.report(args.report, names, args.write_readme, args.allow_quick)
    except (KeyError, ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.write_readme:
        print(f"{args.write_readme}: rewrote {', '.join(done) or 'no table'}")


def same_math_check(path, set_name):
    """The check's worker run and printed: (its result, PyTorch verified)."""
    check = run_worker({"kind": "check", "data": path})
    print_check(check, set_name)
    return check, verified(check)


def print_timing_rules(epochs, steps, min_seconds):
    print(f"batch {BATCH}; timed at k <= 64: at least {epochs} epochs, at k >= 128: at "
          f"least {steps} single batches (epoch time = median batch time x n_rows / {BATCH}; "
          f"{STEPS_PER_SWITCH} batches in a row per thread count, the first untimed); "
          f"more until each thread count is timed for {min_seconds:g} s (at most {MAX_REPS} "
          f"repetitions)")


def run_comparison(args, configs):
    """The full comparison: measure, print the tables and verdicts; its document."""
    rows = args.rows or (200_000 if args.quick else 2_000_000)
    epochs = args.epochs or (2 if args.quick else 5)
    steps = args.steps or (3 if args.quick else 8)
    min_seconds = 1.0 if args.quick else MIN_TIMED_SECONDS
    started = time.perf_counter()
    has_torch, backends = print_run_header(
        f"afmfast bench/compare.py{' --quick' if args.quick else ''}",
        " (bench/torch_models.py, same math; see the check below)")
    print_timing_rules(epochs, steps, min_seconds)
    doc = document.new_document("compare", args, backends, has_torch)
    doc.update(configs=configs, settings=dict(
        batch=BATCH, threads=THREADS, rows=rows, epochs=epochs, steps=steps,
        min_seconds=min_seconds, max_reps=MAX_REPS, steps_per_switch=STEPS_PER_SWITCH),
        check=None, verified=None, sets=[], reader=None)
    with tempfile.TemporaryDirectory(prefix="afmfast-compare-") as tmp:
        plan = Plan(configs, backends, has_torch, epochs, steps, min_seconds,
                    build_core_probe(tmp), started)
        sets = load_sets(rows, args.no_frappe)
        paths = save_sets(sets, tmp)
        if has_torch:
            doc["check"], doc["verified"] = same_math_check(paths[0], sets[0][0])
        for (name, data), path in zip(sets, paths):
            doc["sets"].append(measure_set(plan, describe(name, data, steps), path))
        for data_set in doc["sets"]:
            figures.summarize_set(data_set, configs, backends, has_torch)
            report.print_set(doc, data_set)
        if not args.no_reader and not args.configs:
            doc["reader"] = measure_reader(tmp, runs=3 if args.quick else 7)
            doc["reader"]["verdict"] = figures.reader_verdict(doc["reader"])
    report.print_targets(doc)
    document.finish(doc, started)
    report.print_closing(doc)
    print(f"total run time: {doc['duration_s']:.0f} s")
    return doc


def main(description):
    parser = parser_for(description)
    args = parser.parse_args()
    if args.load is not None and (args.load < 0 or args.load_reps < 1):
        parser.error("--load takes N >= 0 and --load-reps a positive count")
    if args.worker:
        run_job(json.loads(args.worker))
        return
    if args.report:
        run_report(parser, args)
        return
    configs = parse_configs(parser, args.configs)
    if args.load is not None:
        from comparison.loadrun import run_load

        doc = run_load(args, configs if args.configs else None)
    else:
        doc = run_comparison(args, configs)
    document.write(doc, args.json)
