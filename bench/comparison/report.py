"""The console report of a run, printed from its JSON document: per data set the
seconds-per-epoch table, the attention product against NumPy and the memory table;
then the verdicts on the project's targets and the run's closing notes."""
import os

from bench_common import fmt_s, fmt_x, mb, table

from comparison.measure import find_run
from comparison.probes import probe_range, probe_values
from comparison.settings import ATTENTION_K, BATCH, OPENBLAS_VARS, THREADS, config_label


def configs(doc):
    """The run's (model, k) configurations (JSON keeps them as lists)."""
    return [tuple(c) for c in doc["configs"]]


def _impl_names(doc, model):
    return doc["backends"][model] + (["pytorch"] if doc["has_torch"] else [])


def _print_set_header(data_set):
    print(f"\n=== {data_set['name']}: {data_set['rows']:,} rows, "
          f"{data_set['features']:,} features, {data_set['nnz_min']}-{data_set['nnz_max']} "
          f"nonzeros a row ({data_set['pairs_max']} pairs), batch {BATCH} ===")
    loads = data_set["load_avg"]
    print(f"load average (1 min) while measured: {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} CPUs")
    lat, fma = probe_values(data_set["probes"], 0), probe_values(data_set["probes"], 1)
    if not lat:
        print("CPU 0 / CPU 1 probe (cache line latency, 2-CPU throughput): not measured "
              "(no C compiler or one CPU)")
        return
    print(f"cache line from CPU 0 to CPU 1 (bench/core_to_core.c) while measured: "
          f"{min(lat):.0f}-{max(lat):.0f} ns one way (about 40: the two share a "
          "chiplet; over 100: they do not, and 2-thread runs of kernels that update "
          "tables the other thread reads next suffer)")
    print(f"floating-point throughput of CPUs 0 and 1 together, relative to CPU 0 "
          f"alone (same probe): {min(fma):.2f}-{max(fma):.2f} (2.00: each vCPU has "
          "a core to itself; below that the host runs other work on the same cores "
          "and no 2-thread speed-up can reach 2)")


def _speed_row(run):
    cfg, lat = config_label(run["model"], run["k"]), probe_range(run["c2c"], 0, "{:.0f}")
    fma = probe_range(run["c2c"], 1, "{:.2f}")
    if "error" in run:
        return [cfg, run["impl"], "failed: " + run["error"][:60]] + [""] * 8
    m, ratio = run["median_s"], run["pytorch_over_this"]
    mode = "epochs" if run["mode"] == "epochs" else "steps x N/B"
    return [cfg, run["impl"], fmt_s(m["1"]), fmt_s(m["2"]), fmt_x(run["speedup"]),
            *("" if ratio is None else fmt_x(ratio[str(t)]) for t in THREADS), mode, lat,
            fma]


def print_speed_table(doc, data_set):
    print("Seconds per epoch (median); ratio = PyTorch / afmfast at the same thread "
          "count; speed-up = 1 thread / 2 threads")
    rows = [_speed_row(find_run(data_set, model, k, name)) for model, k in configs(doc)
            for name in _impl_names(doc, model)]
    print(table(["config", "impl", "1 thread s", "2 threads s", "speed-up",
                 "PyTorch/this 1T", "PyTorch/this 2T", "timed as", "CPU0-1 ns",
                 "2-CPU flops"], rows))
    print("(CPU0-1 ns: the cache line latency between CPUs 0 and 1; 2-CPU flops: their "
          "floating-point throughput together relative to CPU 0 alone; each the lowest-"
          "highest of the probes before, during (every ~2 s, between repetitions) and "
          "after the row's runs, with their count)")


def _print_matmul(label, res, P):
    if "error" in res:
        print(f"  NumPy matmul ({label}): failed: {res['error']}")
        return
    env = ", ".join(f"{v}={res['env'][v]}" if res["env"][v] is not None
                    else f"{v} unset" for v in OPENBLAS_VARS)
    kern = (f"{res['blas'].get('internal_api')} {res['blas'].get('version')}, "
            f"kernel {res['blas'].get('architecture')}" if res["blas"]
            else "kernel unknown (threadpoolctl missing)")
    gf = res["gflops"]
    print(f"  NumPy float32 ({P:,} x 256) @ (256 x 256), {label} ({env}): "
          f"{kern}: {gf['1']:.0f} GFLOP/s 1 thread, {gf['2']:.0f} GFLOP/s 2 threads")


def _pct(value):
    return "-" if value is None else f"{value:.0f}%"


def print_attention(data_set):
    att, P = data_set["attention"], data_set["pairs_first_batch"]
    print(f"\nAFM k=t=256 attention product: 6*P*k*t = {att['flops_epoch'] / 1e9:,.1f} GFLOP "
          f"an epoch (P = {data_set['pairs_total']:,} pairs; "
          f"{6.0 * P * ATTENTION_K * ATTENTION_K / 1e9:.2f} GFLOP "
          f"a full batch of {P:,} pairs), divided by the whole step time")
    for label, res in data_set["matmul"].items():
        _print_matmul(label, res, P)
    if not data_set["openblas_env_set"]:
        print("  (neither OpenBLAS variable is set in this environment: the environment "
              "as set is the best kernel's, measured once)")
    share = data_set["distinct_share"]
    if share is not None:
        print(f"  distinct pairs a batch: {data_set['distinct_median']:,} of "
              f"{data_set['pairs_timed_batch']:,} ({100 * share:.1f}%); afmfast's kernels run "
              "the attention MLP once per distinct pair, so 'GFLOP/s' (all pairs "
              "counted) is an effective rate that can exceed the machine's peak; "
              "'distinct GFLOP/s' counts 6*D*k*t")
    labels = list(data_set["matmul"])
    rows = [["AFM k=t=256", r["impl"], r["threads"], f"{r['gflops']:.1f}",
             *(_pct(r["of_numpy"][lb]) for lb in labels),
             "-" if r["distinct_gflops"] is None else f"{r['distinct_gflops']:.1f}",
             *(_pct(r["distinct_of_numpy"][lb]) for lb in labels)] for r in att["rows"]]
    print(table(["config", "impl", "threads", "GFLOP/s"]
                + [f"of NumPy {label}" for label in labels] + ["distinct GFLOP/s"]
                + [f"of NumPy {label}" for label in labels], rows))


def _memory_row(run):
    mem, torch = run["memory"], run["impl"] == "pytorch"
    return [run["config"], run["impl"], mb(run["param_bytes"]), mb(mem["base"]),
            mb(run["rss_before"]), mb(run["peak"]), mb(mem["grown"]),
            mb(mem["order"]) if not torch else "-", mb(max(0, mem["work"])) if not torch
            else "-", mb(mem["bound"]), "" if run["peak_reset"] else "peak not reset"]


def print_memory(doc, data_set):
    print(f"\nPeak RSS of training (own subprocess; peak reset after data load and "
          f"warm-up) vs data ({mb(data_set['data_bytes'])} MB: CSR + labels) plus parameters "
          "and the optimiser state in memory (Adam's second slot only with Adam); "
          "work = peak - before - params/state - fit's epoch "
          "order (int64 a row, epochs mode); work-space bound = B * P_row * max(k,t) "
          "* 4 bytes (AFM; FM: B * nnz_row * k * 4)")
    runs = [find_run(data_set, model, k, name) for model, k in configs(doc)
            for name in _impl_names(doc, model)]
    print(table(["config", "impl", "params+state MB", "data+params+state MB",
                 "RSS before MB", "peak RSS MB", "peak - before MB", "epoch order MB",
                 "work MB", "work bound MB", ""],
                [_memory_row(r) for r in runs if "error" not in r]))


def print_set(doc, data_set):
    """One data set's blocks: header, speed table, attention product, memory."""
    _print_set_header(data_set)
    print_speed_table(doc, data_set)
    if ("afm", ATTENTION_K) in configs(doc):
        print_attention(data_set)
    print_memory(doc, data_set)


def print_targets(doc):
    print("\nTargets of issue 5 (2 threads; the best afmfast backend):")
    for data_set in doc["sets"]:
        print(f"  {data_set['name']}: " + "; ".join(v["text"] for v in data_set["verdicts"]))
    if doc.get("reader") is not None:
        print(f"  reader: {doc['reader']['verdict']['text']}")
    if doc.get("verified") is False:
        print("  (PyTorch ratios unverified: the same-math check failed)")


def print_closing(doc):
    """The load at the end, a warning when other processes were busy, the failures."""
    print(f"\nload at end: {doc['machine']['uptime_end']}")
    loads = [x for s in doc["sets"] for x in s["load_avg"]]
    busiest = max(loads) if loads else 0.0
    cpus = doc["machine"]["cpus"] or 1
    if busiest > cpus + 0.5:  # this run's own worker accounts for <= 2
        print(f"WARNING: other processes were using the CPUs (1-minute load average up to "
              f"{busiest:.1f} on {cpus} CPUs, of which this run's worker accounts "
              "for at most 2): absolute times are inflated and 2-thread figures suffer "
              "most; repeat on an idle machine before quoting them.")
    for data_set in doc["sets"]:
        for run in data_set["runs"]:
            if "error" in run:
                print(f"note: {data_set['name']} {run['config']} {run['impl']}: "
                      f"{run['error']}")
