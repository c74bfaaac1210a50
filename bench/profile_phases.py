"""Where a training step spends its time: the Cython kernel's phases, per batch.

    python bench/profile_phases.py       # AFM, frappe-mini, k = t = 16, 1 and 2 threads
    python bench/profile_phases.py --k 256 --data mltag --epochs 1
    python bench/profile_phases.py --model fm --data mltag
    python bench/profile_phases.py --model fm --k 256 --data mltag --no-dropout
    python bench/profile_phases.py --model fm --data mltag --rows 4000000 --store --plain
    python bench/profile_phases.py --model fm --data mltag --rows 4000000 --store --plain \
        --shuffle-unit 64 --optimizer sgd     # what the Adagrad accumulator costs

Trains on frappe-mini (../shared/data beside the repository) or on the synthetic ml-tag
set of ``bench/compare.py`` and prints, per thread count, the 10th percentile and the
median of the batch time and the 10th percentile of each phase that the kernel module's
``_phase_times(workspace)`` reports.
- AFM (``afmfast._afm_cython``): gather (offsets, batch-order copy, chunks); group_vx
  (v x per occurrence while one thread groups the nonzeros by feature); numbering (the
  distinct pairs); distinct_forward (e, W e + b, act, logit per distinct pair);
  row_forward (softmax, pooling, residual, da, ds per row); ds_sums; backward_de (du and
  C' = W^T du per distinct pair, then the pairs' gradients into v x, group by group);
  row_sums; feature_updates (the sparse optimiser); dW; dense_updates.
- FM (``afmfast._fm_cython``): prepare (offsets, batch-order copy); group_forward (the
  grouping by feature on one thread while the others compute s, f and the linear term
  per row); output (batch norm, prediction, residual); df; feature_updates;
  dense_updates.
``--store`` trains from a binary store of the rows (written to a temporary folder) in
the windowed epoch order that ``fit`` uses for stores (``afmfast.models.epoch_order``),
as a Dask worker does, instead of an in-memory set in one permutation of all rows;
``--plain`` trains FM without batch norm and dropout (Spark's FMRegressor's model, the
``--tuned`` runs of ``bench/distributed.py``). The first third of the batches is
warm-up. On a shared machine quote the percentiles side by side, not one absolute time.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the data sets of the comparison script)

import afmfast
from afmfast import _afm_cython, _fm_cython
from afmfast.models.training import Trainer  # noqa: E402

KERNELS = {"afm": _afm_cython, "fm": _fm_cython}


def profile(model, data, k, threads, epochs, batch=compare.BATCH, dropout=True,
            plain=False, shuffle_unit=1, optimizer="adagrad"):
    est = compare.make_estimator(model, k, "cython", threads)
    est.shuffle_unit = shuffle_unit
    est.optimizer = optimizer
    if optimizer == "sgd":
        # the gradient is the batch's sum (the reference's loss), so plain SGD needs a
        # far smaller step than Adagrad to stay finite
        est.learning_rate = 1e-4
    if not dropout or plain:
        est.keep = 1.0 if model == "fm" else (1.0, 1.0)
    if plain:
        est.batch_norm = False
    est._validate()
    trainer = Trainer(est, data, threads=threads, backend="cython", adaptive=False)
    X, y, n = data.X, data.y, data.n_rows
    rng = np.random.default_rng(1)
    phases, totals, step = [], [], 0
    for epoch in range(1, epochs + 1):
        if data.memory_mapped:  # as fit orders a store: window by window
            segments = trainer.epoch_segments(data, epoch)
        else:
            segments = [rng.permutation(n).astype(np.int64, copy=False)]
        for order in segments:
            order = np.ascontiguousarray(order)
            for start in range(0, len(order) - batch + 1, batch):
                t0 = time.perf_counter()
                trainer.train_batch(X, y, order[start:start + batch], step)
                totals.append(time.perf_counter() - t0)
                phases.append(list(KERNELS[model]._phase_times(trainer.workspace).values()))
                step += 1
    skip = len(totals) // 3
    return np.array(totals[skip:]), np.array(phases[skip:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("afm", "fm"), default="afm")
    parser.add_argument("--data", choices=("frappe", "mltag"), default="frappe")
    parser.add_argument("--k", type=int, default=16, help="k (= t for AFM; default 16)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000, help="ml-tag rows")
    parser.add_argument("--no-dropout", action="store_true",
                        help="keep = 1 (the defaults otherwise): what dropout costs")
    parser.add_argument("--plain", action="store_true",
                        help="FM without batch norm or dropout (Spark's model)")
    parser.add_argument("--store", action="store_true",
                        help="train from a binary store in fit's windowed order")
    parser.add_argument("--shuffle-unit", type=int, default=1, metavar="ROWS",
                        help="with --store: the windowed order shuffles runs of this many "
                             "rows (the estimators' shuffle_unit)")
    parser.add_argument("--optimizer", choices=("adagrad", "sgd", "momentum", "adam"),
                        default="adagrad", help="the sparse optimiser (sgd: learning rate "
                                                "1e-4; default adagrad)")
    args = parser.parse_args()
    if args.shuffle_unit != 1 and not args.store:
        parser.error("--shuffle-unit applies to --store's windowed order")
    if args.plain and args.model != "fm":
        parser.error("--plain is FM's (batch norm off, keep 1)")
    data = (compare.frappe_mini_train() if args.data == "frappe"
            else compare.synthetic_mltag(args.rows))
    notes = (["no dropout"] * (args.no_dropout and not args.plain)
             + ["no batch norm or dropout"] * args.plain + ["from a store"] * args.store
             + [f"runs of {args.shuffle_unit} rows"] * (args.shuffle_unit > 1)
             + [f"optimizer {args.optimizer}"] * (args.optimizer != "adagrad"))
    print(f"{args.model.upper()} k={args.k} on {args.data} ({data.n_rows:,} rows, batch "
          f"{compare.BATCH}{''.join('; ' + n for n in notes)}); milliseconds per batch")
    names = KERNELS[args.model].PHASES
    print(f"{'threads':>7} {'p10':>7} {'median':>7}  " + " ".join(f"{n[:10]:>10}" for n in names))
    with tempfile.TemporaryDirectory() as folder:
        if args.store:
            path = os.path.join(folder, "train.store")
            afmfast.write_store(data, path)
            data = afmfast.open_store(path)
        for threads in args.threads:
            totals, phases = profile(args.model, data, args.k, threads, args.epochs,
                                     dropout=not args.no_dropout, plain=args.plain,
                                     shuffle_unit=args.shuffle_unit,
                                     optimizer=args.optimizer)
            p10 = np.percentile(phases, 10, axis=0) * 1e3
            print(f"{threads:>7} {np.percentile(totals, 10) * 1e3:7.2f} "
                  f"{np.median(totals) * 1e3:7.2f}  " + " ".join(f"{v:10.2f}" for v in p10))
        del data  # the store's maps, before its folder goes


if __name__ == "__main__":
    main()
