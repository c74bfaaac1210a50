"""An epoch's time and a fit's accuracy against the shuffle's unit (``shuffle_unit``).

    python bench/shuffle_unit.py                           # both data sets, units 1 16 64 256
    python bench/shuffle_unit.py --data mltag --units 1 64 --reps 5
    python bench/shuffle_unit.py --data frappe --seeds 2016 1 2 3 4
    python bench/shuffle_unit.py --data mltag --in-memory   # the rows in memory
    python bench/shuffle_unit.py --data mltag --units 1 64 --dask 512   # 2 Dask workers

- ml-tag: ``bench_common.synthetic_mltag`` rows (``--rows``, split 8:1:1 into train,
  validation and test; its rows are drawn independently, so stored in random order),
  trained from a store as ``fit`` trains large data (the windowed order; with
  ``--in-memory`` from arrays in memory, in one shuffle of all rows), FM k=16 on one
  thread, 5 epochs with early stopping, in two settings: the reference settings and the
  plain FM of ``bench/distributed.py --tuned`` (keep 1, no batch norm, learning rate
  0.05). The units' fits alternate, ``--reps`` rounds; per unit: the median of the
  epochs' median seconds, the median of each round's ratio to unit 1's epoch (measured a
  few seconds apart), and the validation and test RMSE of the kept epoch (the same in
  every round: a fit is a function of its seed). ``--dask S``: the fits run on a
  ``distributed.LocalCluster`` of 2 worker processes x 1 thread (``DaskFM``,
  ``sync_every`` S, each worker on half of the store) instead of one process.
- frappe-mini (../shared/data/frappe beside the repository; the rows whose 1-based line
  number is divisible by 5 are held out and evaluated; the file's rows are in random
  order): FM with the reference settings for 20 epochs, no early stopping, from a store,
  one fit per seed (``--seeds``); per unit the mean test RMSE and its difference to unit
  1's.

On a shared machine quote the ratios, which come from fits run side by side.
"""
import argparse
import os
import tempfile
import time

import numpy as np

from bench_common import (FRAPPE, PLAIN_FM, log, mltag_splits, packages_before_bench,
                          table, write_stores)

import afmfast

packages_before_bench()  # --dask imports the distributed package, not bench/distributed.py

REFERENCE = dict(n_factors=16, learning_rate=0.01, batch_size=4096, keep=0.7,
                 batch_norm=True)
PLAIN = dict(REFERENCE, **PLAIN_FM, learning_rate=0.05)


def dask_fit(paths, unit, epochs, settings, sync_every):
    """``fit``'s model trained on 2 Dask worker processes from the stores at ``paths``;
    returns it as a local ``FM`` (``DaskFM.to_local``: its history and best epoch
    too)."""
    from distributed import Client, LocalCluster

    from afmfast.dask import DaskFM

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        model = DaskFM(n_epochs=epochs, n_threads=1, adaptive_threads=False, verbose=0,
                       shuffle_unit=unit, client=client, sync_every=sync_every, **settings)
        return model.fit(paths["train"], validation=paths["valid"]).to_local()


def fit(data, unit, epochs, settings, seed=2016, early_stopping=True):
    """FM with ``settings`` fitted in one process, one thread, on ``data["train"]``
    (validated on ``data["valid"]`` when given)."""
    model = afmfast.FM(n_epochs=epochs, n_threads=1, adaptive_threads=False, verbose=0,
                       shuffle_unit=unit, random_state=seed, early_stopping=early_stopping,
                       **settings)
    return model.fit(data["train"], validation=data.get("valid"))


def mltag(args, folder):
    parts = mltag_splits(args.rows, args.seed)
    paths = write_stores(parts, folder)
    opened = {name: afmfast.open_store(path) for name, path in paths.items()}
    if args.in_memory:
        opened["train"] = parts["train"]
    where = (f", 2 Dask workers, sync_every {args.dask}" if args.dask
             else ", in memory" if args.in_memory else "")
    rows = []
    for label, settings in (("reference settings", REFERENCE), ("plain FM", PLAIN)):
        seconds = {unit: [] for unit in args.units}
        scores = {}
        for rep in range(args.reps):
            log(f"ml-tag, {label}: round {rep + 1} of {args.reps}")
            for unit in args.units:
                model = (dask_fit(paths, unit, args.epochs, settings, args.dask)
                         if args.dask else fit(opened, unit, args.epochs, settings))
                seconds[unit].append(float(np.median([h["seconds"]
                                                      for h in model.history_])))
                if rep == 0:  # a fit is a function of its seed: every round's scores alike
                    scores[unit] = (model.history_[model.best_epoch_ - 1]["valid_rmse"],
                                    model.evaluate(opened["test"])["rmse"])
        base = seconds[args.units[0]]
        for unit in args.units:
            ratios = [s / b for s, b in zip(seconds[unit], base)]
            rows.append([f"ml-tag {args.rows:,} rows, {label}{where}", unit,
                         f"{np.median(seconds[unit]):.3f}", f"{np.median(ratios):.3f}x",
                         ", ".join(f"{r:.3f}" for r in ratios),
                         f"{scores[unit][0]:.4f}", f"{scores[unit][1]:.4f}"])
    return rows


def frappe(args, folder):
    if not FRAPPE.exists():
        log(f"{FRAPPE} is not present: frappe-mini skipped")
        return []
    data = afmfast.load_libfm(FRAPPE)
    held_out = np.arange(1, len(data) + 1) % 5 == 0
    paths = write_stores({"train": data[~held_out], "test": data[held_out]}, folder)
    opened = {name: afmfast.open_store(path) for name, path in paths.items()}
    train = {"train": opened["train"]}
    rmses = {unit: [] for unit in args.units}
    for seed in args.seeds:
        log(f"frappe-mini: seed {seed}")
        for unit in args.units:
            model = fit(train, unit, 20, REFERENCE, seed=seed, early_stopping=False)
            rmses[unit].append(model.evaluate(opened["test"])["rmse"])
    base = np.mean(rmses[args.units[0]])
    return [[f"frappe-mini, reference settings, 20 epochs, seeds "
             f"{' '.join(map(str, args.seeds))}", unit, "-", "-",
             ", ".join(f"{r:.4f}" for r in rmses[unit]), "-",
             f"{np.mean(rmses[unit]):.4f} ({np.mean(rmses[unit]) - base:+.4f})"]
            for unit in args.units]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("mltag", "frappe", "both"), default="both")
    parser.add_argument("--units", type=int, nargs="+", default=[1, 16, 64, 256],
                        help="shuffle_unit values (the first is the base of the ratios)")
    parser.add_argument("--rows", type=int, default=4_000_000, help="ml-tag-shaped rows")
    parser.add_argument("--epochs", type=int, default=5, help="ml-tag epochs")
    parser.add_argument("--reps", type=int, default=3, help="ml-tag rounds of fits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2016, 1, 2],
                        help="frappe-mini seeds")
    parser.add_argument("--seed", type=int, default=0, help="ml-tag data seed")
    parser.add_argument("--in-memory", action="store_true",
                        help="ml-tag: train from the rows in memory, not from a store")
    parser.add_argument("--dask", type=int, default=0, metavar="SYNC_EVERY",
                        help="ml-tag: train on 2 Dask workers with this sync_every")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores")
    args = parser.parse_args(argv)
    if args.dask and args.in_memory:
        parser.error("--dask trains from the store: drop --in-memory")
    print(f"bench/shuffle_unit.py: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} "
          f"CPUs, load {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        if args.data in ("mltag", "both"):
            rows += mltag(args, folder)
        if args.data in ("frappe", "both"):
            rows += frappe(args, folder)
    print(table(["data", "shuffle_unit", "s/epoch (median)",
                 f"epoch / unit {args.units[0]}'s (median)",
                 "each round (frappe: each seed's test RMSE)", "valid RMSE", "test RMSE"],
                rows))


if __name__ == "__main__":
    main()
