"""The ``afmfast`` command line (also ``python -m afmfast``).

``afmfast fm`` mirrors the flags and defaults of the AFM authors' ``FM.py``; ``afmfast
demo`` trains on built-in synthetic data. Usage errors exit with status 2 and one line,
data errors (and a diverging run) with status 1, naming the file and line.
"""
import argparse
import os
import sys
import time

from . import backends

OPTIMIZER_ALIASES = {
    "adagradoptimizer": "adagrad", "adagrad": "adagrad",
    "adamoptimizer": "adam", "adam": "adam",
    "gradientdescentoptimizer": "sgd", "gd": "sgd", "sgd": "sgd",
    "momentumoptimizer": "momentum", "momentum": "momentum",
}


class UsageError(Exception):
    """A command-line argument is wrong (exit status 2)."""


def _add_common(p):
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: all CPUs of this process)")
    p.add_argument("--backend", default="auto", choices=backends.BACKEND_NAMES,
                   help="kernel backend (default: auto = cython, else numba)")
    p.add_argument("--seed", type=int, default=2016, help="random seed (default 2016)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="afmfast", description="Fast Factorization Machines on multicore CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    fm = sub.add_parser("fm", help="train or evaluate a Factorization Machine "
                        "(flags and defaults of the reference FM.py)")
    fm.add_argument("--process", default="train", choices=("train", "evaluate"),
                    help="train, or evaluate a saved model on the test file")
    fm.add_argument("--path", default="../data/", help="input data path (default ../data/)")
    fm.add_argument("--dataset", default="ml-tag",
                    help="reads <path>/<dataset>/<dataset>.{train,validation,test}.libfm")
    fm.add_argument("--epoch", type=int, default=20, help="number of epochs (default 20)")
    fm.add_argument("--pretrain", type=int, default=-1, choices=(-1, 0, 1),
                    help="-1: save the model to pretrain/fm_<dataset>_<k>.npz; "
                    "0: random init, no save; 1: start from that file (default -1)")
    fm.add_argument("--batch_size", type=int, default=4096, help="batch size (default 4096)")
    fm.add_argument("--hidden_factor", type=int, default=256,
                    help="number of factors k (default 256)")
    fm.add_argument("--lamda", type=float, default=0.0,
                    help="L2 regulariser of the embeddings (default 0)")
    fm.add_argument("--keep", type=float, default=0.7,
                    help="keep probability of the interaction dropout; 1: none (default 0.7)")
    fm.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    fm.add_argument("--optimizer", default="AdagradOptimizer",
                    help="AdagradOptimizer, AdamOptimizer, GradientDescentOptimizer, "
                    "MomentumOptimizer (or adagrad, adam, sgd, momentum)")
    fm.add_argument("--verbose", type=int, default=1, help="print every epoch (1) or not (0)")
    fm.add_argument("--batch_norm", type=int, default=1, choices=(0, 1),
                    help="batch normalisation of the interactions (default 1)")
    fm.add_argument("--train", help="training file (instead of --path/--dataset)")
    fm.add_argument("--validation", help="validation file")
    fm.add_argument("--test", help="test file")
    fm.add_argument("--save", help="also save the trained model to this path; with "
                    "--process evaluate, the model to load")
    _add_common(fm)

    demo = sub.add_parser("demo", help="train an FM on built-in synthetic data")
    _add_common(demo)
    return parser


def _data_files(args):
    base = os.path.join(args.path, args.dataset, args.dataset)
    named = {"train": args.train, "validation": args.validation, "test": args.test}
    files = {}
    for part, given in named.items():
        if given:
            files[part] = given
        elif not args.train and os.path.exists(f"{base}.{part}.libfm"):
            files[part] = f"{base}.{part}.libfm"
    if args.process == "train" and "train" not in files:
        raise FileNotFoundError(f"{base}.train.libfm: no such file (use --path/--dataset "
                                "or --train)")
    if args.process == "evaluate" and "test" not in files:
        raise FileNotFoundError(f"{base}.test.libfm: no such file (use --test)")
    return files


def _load_all(files):
    """Read every file; give them one feature count (max id + 1 over all)."""
    from .dataset import load_libfm

    data = {part: load_libfm(path) for part, path in files.items()}
    n_features = max(d.n_features for d in data.values())
    return {part: d.with_n_features(n_features) for part, d in data.items()}


def _pretrain_file(args):
    return os.path.join("pretrain", f"fm_{args.dataset}_{args.hidden_factor}.npz")


def _fm_train(args):
    from .estimator import FM
    from .persistence import load

    optimizer = OPTIMIZER_ALIASES.get(args.optimizer.lower())
    if optimizer is None:
        raise UsageError(f"--optimizer: unknown optimizer {args.optimizer!r}; choose "
                         "AdagradOptimizer, AdamOptimizer, GradientDescentOptimizer or "
                         "MomentumOptimizer")
    model = FM(n_factors=args.hidden_factor, learning_rate=args.lr,
               batch_size=args.batch_size, n_epochs=args.epoch, keep=args.keep,
               batch_norm=bool(args.batch_norm), l2=args.lamda, optimizer=optimizer,
               random_state=args.seed, n_threads=args.threads, backend=args.backend,
               verbose=args.verbose)
    try:
        model._validate()
    except ValueError as exc:
        raise UsageError(_flag_message(str(exc))) from exc
    init_from = None
    if args.pretrain == 1:
        init_from = load(_pretrain_file(args))
    data = _load_all(_data_files(args))
    if args.verbose:
        print(f"FM: dataset={args.dataset}, factors={args.hidden_factor}, "
              f"#epoch={args.epoch}, batch={args.batch_size}, lr={args.lr:.4f}, "
              f"lambda={args.lamda:.1e}, keep={args.keep:.2f}, optimizer={args.optimizer}, "
              f"batch_norm={args.batch_norm}")
    t0 = time.perf_counter()
    model.fit(data["train"], validation=data.get("validation"), init_from=init_from)
    h = model.history_
    if h:
        best = h[model.best_epoch_ - 1]
        valid = f"{best['valid_rmse']:.4f}" if best["valid_rmse"] is not None else "n/a"
        print(f"Best Iter(validation)= {best['epoch']}\t train = {best['train_rmse']:.4f}, "
              f"valid = {valid} [{time.perf_counter() - t0:.1f} s]")
    if "test" in data:
        print(f"Test RMSE: {model.evaluate(data['test'])['rmse']:.4f}")
    if args.pretrain == -1:
        os.makedirs("pretrain", exist_ok=True)
        model.save(_pretrain_file(args))
        print(f"Save model to file as pretrain: {_pretrain_file(args)}")
    if args.save:
        model.save(args.save)
        print(f"Saved model to {args.save}")
    return 0


def _fm_evaluate(args):
    from .persistence import load

    path = args.save or _pretrain_file(args)
    model = load(path)
    files = _data_files(args)
    from .dataset import load_libfm

    test = load_libfm(files["test"])
    print(f"Test RMSE: {model.evaluate(test)['rmse']:.4f}")
    return 0


_FLAGS = {"n_factors": "--hidden_factor", "learning_rate": "--lr", "batch_size":
          "--batch_size", "n_epochs": "--epoch", "keep": "--keep", "l2": "--lamda",
          "n_threads": "--threads", "random_state": "--seed"}


def _flag_message(message):
    name = message.split(" ", 1)[0]
    return message.replace(name, _FLAGS.get(name, name), 1)


def main(argv=None):
    """Entry point of the ``afmfast`` command; returns the exit status."""
    from .estimator import TrainingDivergedError

    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {args.threads}")
        if args.command == "demo":
            from .demo import run_demo

            run_demo(backend=args.backend, n_threads=args.threads, seed=args.seed)
            return 0
        if args.process == "train":
            return _fm_train(args)
        return _fm_evaluate(args)
    except UsageError as exc:
        print(f"afmfast: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, TrainingDivergedError) as exc:
        print(f"afmfast: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
