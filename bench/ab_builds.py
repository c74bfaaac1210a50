"""A/B of two builds of a Cython kernel module, measured in one process.

    git worktree add /tmp/base <commit>            # the build to compare against
    (cd /tmp/base && python setup.py build_ext --inplace)
    python bench/ab_builds.py --model afm --k 64 --base /tmp/base
    python bench/ab_builds.py --model fm --k 16 --data mltag --base /tmp/base
    python bench/ab_builds.py --model fm --data mltag --plain --base /tmp/base  # Spark's FM
    python bench/ab_builds.py --model mcmc --k 16 --base /tmp/base   # Gibbs sweeps
    python bench/ab_builds.py --model fm --data mltag --base /tmp/probe --new /tmp/probe \
        --interleave                     # one build, two table layouts (bench/probes)

Both builds of ``afmfast._<model>_cython`` are loaded into this process (from
``<dir>/afmfast``), each with its own copy of the same initial parameters, optimiser
state and workspace, and every batch runs through both, the order alternating from batch
to batch. The shared machines here change speed by 20-30% from minute to minute; runs of
two builds one after the other mostly measure that drift, while alternating batch by batch
exposes both builds to the same moment. Prints whether both sides end with bit-identical
parameters and, per thread count, the median and the 10th
percentile of each build's batch time, the ratio of the medians (new / base) and the
median of the per-batch ratios. The first batches are warm-up. ``--model mcmc`` does the
same with whole Gibbs sweeps of ``afmfast._mcmc_cython`` on frappe-mini (``--epochs``
rounds, each a sweep of both builds at every thread count, alternating which goes
first), and also prints each build's speed-up from 1 to 2 threads as the median of the
rounds' ratios.

A difference of 1-2% is inside this timing noise. ``--callgrind`` settles it: each build
runs alone under ``valgrind --tool=callgrind`` (1 thread, the same batches), collecting
only inside the step function, and the script prints the instructions per batch of each
build and their ratio. Instruction counts repeat to the instruction from run to run.
"""
import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (data sets and estimators of the comparison script)
from bench_common import PLAIN_FM  # noqa: E402

from afmfast.models.training import Trainer  # noqa: E402
from afmfast.kernels import dispatch  # noqa: E402
from afmfast.kernels import api  # noqa: E402

WARMUP = 5


def load_build(directory, model):
    """The module ``afmfast._<model>_cython`` compiled in the checkout ``directory`` (its
    ``src/afmfast``, or ``afmfast`` for a checkout from before the src layout): the best
    level built there that this CPU supports (``afmfast/_isa/<level>/``, as
    afmfast.kernels.dispatch would choose), else a build from before levels existed."""
    package = Path(directory) / "src" / "afmfast"
    if not package.is_dir():
        package = Path(directory) / "afmfast"
    found = [str(path) for level in dispatch.supported_levels()
             for path in [dispatch.module_file(f"_{model}_cython", level, package)] if path]
    found += glob.glob(str(package / f"_{model}_cython.*.so"))
    if not found:
        sys.exit(f"ab_builds: no _{model}_cython extension in {package}; build "
                 "it there first (python setup.py build_ext --inplace)")
    # a build from before the packages by layer imports the contract as afmfast.kernel_api
    sys.modules.setdefault("afmfast.kernel_api", importlib.import_module("afmfast.kernels.api"))
    spec = importlib.util.spec_from_file_location(f"afmfast._{model}_cython", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"{directory}: {found[0]}")
    return module


def interleaved(params, state):
    """FM ``params`` and ``state`` with V and state.V copied into one table of shape
    (2, M, 2k) (its slot 1's first k columns unused): a feature's V row and its slot-0
    row (Adagrad's accumulator) side by side, 128 bytes at k = 16 float32, which the
    adjacent-line prefetcher fetches together; the other tables are the same objects.
    V and state.V are strided views; only a kernel that takes rows with a stride
    accepts them (bench/probes/interleaved_v.patch)."""
    M, k = params.V.shape
    table = api.aligned_zeros((2, M, 2 * k), params.V.dtype)
    table[0, :, :k] = params.V
    table[:, :, k:] = state.V
    return params._replace(V=table[0, :, :k]), state._replace(V=table[:, :, k:])


def build_run(module, trainer, model, offset=0, interleave=False):
    """(step function, params, state, workspace) of one build, from the trainer's:
    copies placed ``offset`` bytes past a cache line (0, as the estimators place them),
    V beside its optimiser rows if ``interleave`` (``interleaved``)."""
    params = type(trainer.params)(*[api.aligned_copy(a, offset) for a in trainer.params])
    state = type(trainer.state)(*[api.aligned_copy(a, offset) for a in trainer.state])
    if interleave:
        params, state = interleaved(params, state)
    ws = trainer.workspace
    if model == "afm":
        ws = module.afm_workspace(ws.batch_size, ws.max_batch_nnz, ws.max_batch_pairs,
                                  ws.n_features, ws.n_factors, ws.attention_size, ws.dtype)
        return module.afm_step, params, state, ws
    ws = module.fm_workspace(ws.batch_size, ws.max_batch_nnz, ws.n_features,
                             ws.n_factors, ws.dtype)
    return module.fm_step, params, state, ws


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("fm", "afm", "mcmc"), default="afm")
    parser.add_argument("--k", type=int, default=16, help="k (= t for AFM); default 16")
    parser.add_argument("--data", choices=("frappe", "mltag"), default="frappe")
    parser.add_argument("--rows", type=int, default=2_000_000, help="ml-tag rows")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--base", required=True, help="directory of the base build")
    parser.add_argument("--new", default=str(REPO), help="directory of the new build "
                        "(default: this repository)")
    parser.add_argument("--base-offset", type=int, default=0,
                        help="place the base side's parameter and state arrays this many "
                        "bytes past a cache line (with --base and --new the same build: "
                        "what alignment is worth); default 0, as the estimators do")
    parser.add_argument("--plain", action="store_true",
                        help="FM without batch norm or dropout (Spark's model; the "
                        "defaults otherwise)")
    parser.add_argument("--interleave", action="store_true",
                        help="the new side's V beside its optimiser rows in one table "
                        "(--model fm; a probe's layout: bench/probes/README.md)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per batch under valgrind instead of timing")
    parser.add_argument("--only", choices=("base", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave and (args.model != "fm" or args.callgrind):
        sys.exit("ab_builds: --interleave lays out FM tables, timed (--model fm, "
                 "no --callgrind)")
    if args.callgrind:
        if args.model == "mcmc":
            sys.exit("ab_builds: --callgrind counts the SGD steps only (--model fm or afm)")
        count_instructions(args)
        return

    builds = {name: load_build(getattr(args, name), args.model)
              for name in ("base", "new") if args.only in (None, name)}
    if args.model == "mcmc":
        compare_sweeps(builds, args)
        return
    data = (compare.frappe_mini_train() if args.data == "frappe"
            else compare.synthetic_mltag(args.rows))
    est = compare.make_estimator(args.model, args.k, "cython", 1,
                                 **(PLAIN_FM if args.plain else {}))
    est._validate()
    trainer = Trainer(est, data, threads=1, backend="cython", adaptive=False)
    runs = {name: build_run(m, trainer, args.model,
                            args.base_offset if name == "base" else 0,
                            interleave=args.interleave and name == "new")
            for name, m in builds.items()}

    X, y, n = data.X, data.y, data.n_rows
    rng = np.random.default_rng(1)
    times = {(name, t): [] for name in builds for t in args.threads}
    step = 0
    for _ in range(args.epochs):
        for threads in args.threads:
            order = rng.permutation(n).astype(np.int64, copy=False)
            for start in range(0, n - compare.BATCH + 1, compare.BATCH):
                rows = order[start:start + compare.BATCH]
                cfg = trainer.config(step, threads)
                for name in (("base", "new") if step % 2 == 0 else ("new", "base")):
                    if name not in runs:
                        continue
                    fn, params, state, ws = runs[name]
                    t0 = time.perf_counter()
                    fn(X, y, rows, params, state, cfg, ws)
                    times[(name, threads)].append(time.perf_counter() - t0)
                step += 1

    if args.only:
        print(f"batches run: {step}")
        return
    if len(runs) == 2:
        # the same batches from the same start: equal parameters unless the builds (or
        # the layouts) compute differently
        same = all(np.array_equal(a, b) for a, b in zip(runs["base"][1], runs["new"][1]))
        print(f"parameters after the run: {'bit-identical' if same else 'DIFFERENT'}")
    print(f"{args.model.upper()} k={args.k} on {args.data} ({n:,} rows, batch "
          f"{compare.BATCH}); base {args.base}, new {args.new}; ms per batch")
    for threads in args.threads:
        base = np.array(times[("base", threads)][WARMUP:]) * 1e3
        new = np.array(times[("new", threads)][WARMUP:]) * 1e3
        print(f"  {threads} thread(s): base median {np.median(base):.3f} p10 "
              f"{np.percentile(base, 10):.3f} | new median {np.median(new):.3f} p10 "
              f"{np.percentile(new, 10):.3f} | new/base: medians "
              f"{np.median(new) / np.median(base):.3f}, per batch {np.median(new / base):.3f}")


def compare_sweeps(builds, args):
    """--model mcmc: whole sweeps of both builds, alternating, on frappe-mini."""
    from afmfast.kernels import mcmc
    from afmfast.kernels.numba import mcmc as nb_mcmc

    data = compare.frappe_mini_train()
    n, M, k = data.n_rows, data.n_features, args.k
    columns = nb_mcmc.mcmc_columns(data.X, M)
    plan = nb_mcmc.mcmc_plan(data.X, columns)
    groups = np.zeros(M, np.int64)
    rng = np.random.default_rng(0)
    w, V = np.zeros(M), rng.normal(0, 0.1, (M, k))
    # q placed as the estimator places it (rows on their own cache lines)
    q, yhat = api.aligned_empty((n, k), np.float64), np.empty(n)
    nb_mcmc.mcmc_scores(data.X, 0.0, w, V, q, yhat, 1)
    e = np.asarray(data.y, np.float64) - yhat
    hyper, _ = mcmc.draw_scalars(0.0, w, V, e, groups, 1, 0, 0)
    states = {name: (w.copy(), V.copy(), e.copy(), q.copy(),
                     module.mcmc_workspace(columns, k, max(args.threads)))
              for name, module in builds.items()}
    times = {(name, t): [] for name in builds for t in args.threads}
    for r in range(args.epochs + WARMUP):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
            w_, V_, e_, q_, ws = states[name]
            for threads in args.threads:
                t0 = time.perf_counter()
                builds[name].mcmc_sweep(columns, plan, groups, w_, V_, e_, q_, hyper, 0, r,
                                        threads, ws)
                if r >= WARMUP:
                    times[(name, threads)].append(time.perf_counter() - t0)
    print(f"Gibbs sweeps, k={k}, frappe-mini ({n:,} rows), {args.epochs} rounds; base "
          f"{args.base}, new {args.new}; ms per sweep")
    for threads in args.threads:
        base = np.array(times[("base", threads)]) * 1e3
        new = np.array(times[("new", threads)]) * 1e3
        print(f"  {threads} thread(s): base median {np.median(base):.2f} | new median "
              f"{np.median(new):.2f} | new/base: medians {np.median(new) / np.median(base):.3f}, "
              f"per round {np.median(new / base):.3f}")
    if 1 in args.threads and 2 in args.threads:
        for name in builds:
            ratio = np.array(times[(name, 1)]) / np.array(times[(name, 2)])
            print(f"  {name}: 1 thread / 2 threads, median of the rounds' ratios "
                  f"{np.median(ratio):.2f}x")


def count_instructions(args):
    """Run each build alone under callgrind, collecting inside its step function only, and
    print the instructions per batch of both and their ratio."""
    # the batch loop of float32 parameters, called once per batch by the step entry point
    step_symbol = "*fuse_0*steps_typed*"
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("base", "new"):
            out = os.path.join(tmp, f"callgrind.{name}")
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                       f"--toggle-collect={step_symbol}", sys.executable, __file__,
                       "--model", args.model, "--k", str(args.k), "--data", args.data,
                       "--rows", str(args.rows), "--threads", "1", "--epochs",
                       str(args.epochs), "--base", args.base, "--new", args.new,
                       "--only", name] + (["--plain"] if args.plain else [])
            run = subprocess.run(command, capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
            if run.returncode != 0:
                sys.exit(f"ab_builds --callgrind: the {name} run failed:\n{run.stderr[-2000:]}")
            batches = int(re.search(r"batches run: (\d+)", run.stdout).group(1))
            with open(out) as handle:
                totals = [line for line in handle if line.startswith(("summary:", "totals:"))]
            counts[name] = int(totals[-1].split()[1]) / batches
    print(f"{args.model.upper()} k={args.k} on {args.data}, 1 thread, {batches} batches: "
          f"instructions per batch base {counts['base']:,.0f}, new {counts['new']:,.0f}, "
          f"new/base {counts['new'] / counts['base']:.4f}")


if __name__ == "__main__":
    main()
