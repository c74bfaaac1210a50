"""The ``afmfast`` command line (also ``python -m afmfast``).

``afmfast fm`` and ``afmfast afm`` mirror the flags and defaults of the AFM authors'
``FM.py`` and ``AFM.py``; ``afmfast demo`` trains on built-in synthetic data. Usage
errors exit with status 2 and one line naming the flag, data errors (and a diverging run)
with status 1, naming the file and line. Ctrl-C saves
the best epoch so far (when the flags ask for a save) and exits with status 130; a closed
output pipe (``afmfast ... | head``) ends the command quietly with status 141, the status
of a command that the shell's SIGPIPE ended.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np

from afmfast.kernels import backends
from afmfast.kernels import dispatch

OPTIMIZER_ALIASES = {
    "adagradoptimizer": "adagrad", "adagrad": "adagrad",
    "adamoptimizer": "adam", "adam": "adam",
    "gradientdescentoptimizer": "sgd", "gd": "sgd", "sgd": "sgd",
    "momentumoptimizer": "momentum", "momentum": "momentum",
}


class UsageError(Exception):
    """A command-line argument is wrong (exit status 2)."""


#: exit statuses beyond 0/1/2: the shell's 128 + SIGINT and 128 + SIGPIPE
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141

#: --hidden_factor when training without it (the reference's defaults)
DEFAULT_HIDDEN_FACTOR = {"fm": 256, "afm": [16, 16]}
DEFAULT_PATH = "../data/"


def _number_list(text, length, kind, flag, example):
    """Parse the reference's list syntax, e.g. '[16,16]' or '[1.0,0.5]'."""
    try:
        values = json.loads(text)
        if not isinstance(values, list) or len(values) != length:
            raise ValueError
        return [kind(v) for v in values]
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{flag} takes a list of {length} numbers like {example}, got {text!r}") from None


def _add_reference_flags(p):
    """Flags shared by the reference's FM.py and AFM.py, with their defaults."""
    p.add_argument("--process", default="train", choices=("train", "evaluate"),
                   help="train, or evaluate a saved model on the test file")
    p.add_argument("--path", default=DEFAULT_PATH, help="input data path (default ../data/)")
    p.add_argument("--dataset", default=None,
                   help="reads <path>/<dataset>/<dataset>.{train,validation,test}.libfm and "
                   "names the pretrain files (default: the name of the --train/--test file "
                   "without .libfm and .train/.validation/.test, else ml-tag)")
    p.add_argument("--epoch", type=int, default=20, help="number of epochs (default 20)")
    p.add_argument("--batch_size", type=int, default=4096, help="batch size (default 4096)")
    p.add_argument("--optimizer", default="AdagradOptimizer",
                   help="AdagradOptimizer, AdamOptimizer, GradientDescentOptimizer, "
                   "MomentumOptimizer (or adagrad, adam, sgd, momentum)")
    p.add_argument("--verbose", type=int, default=1, help="print every epoch (1) or not (0)")
    p.add_argument("--train", help="training file or store directory (afmfast convert), "
                   "instead of --path/--dataset")
    p.add_argument("--validation", help="validation file or store")
    p.add_argument("--test", help="test file or store")
    p.add_argument("--save", help="also save the trained model to this path; with "
                   "--process evaluate, the model to load")
    p.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: all CPUs of this process)")
    p.add_argument("--backend", default="auto", choices=backends.BACKEND_NAMES,
                   help="kernel backend (default: auto = cython, else numba)")
    p.add_argument("--seed", type=int, default=2016, help="random seed (default 2016)")
    p.add_argument("--shuffle_unit", type=int, default=1, metavar="N",
                   help="shuffle runs of N consecutive rows as wholes: faster epochs for "
                   "rows stored in random order (default 1: single rows)")
    p.add_argument("--loss", default="squared", choices=("squared", "logistic"),
                   help="squared: regression, reports RMSE (the reference); logistic: a "
                   "binary classifier for labels {0,1} or {-1,1}, reports logloss, AUC and "
                   "accuracy (default squared)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="afmfast", description="Fast (Attentional) Factorization Machines on CPUs.")
    parser.add_argument("--version", action="version", version=dispatch.version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    fm = sub.add_parser("fm", help="train or evaluate a Factorization Machine "
                        "(flags and defaults of the reference FM.py)")
    _add_reference_flags(fm)
    fm.add_argument("--pretrain", type=int, default=-1, choices=(-1, 0, 1),
                    help="-1: save the model to pretrain/fm_<dataset>_<k>.npz; "
                    "0: random init, no save; 1: start from that file (default -1)")
    fm.add_argument("--hidden_factor", type=int, default=None,
                    help="number of factors k (default 256; with --process evaluate, that "
                    "of the one saved FM of the dataset)")
    fm.add_argument("--lamda", type=float, default=0.0,
                    help="L2 regulariser of the embeddings (default 0)")
    fm.add_argument("--keep", type=float, default=0.7,
                    help="keep probability of the interaction dropout; 1: none (default 0.7)")
    fm.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    fm.add_argument("--batch_norm", type=int, default=1, choices=(0, 1),
                    help="batch normalisation of the interactions (default 1)")
    fm.add_argument("--method", default="sgd", choices=("sgd", "mcmc"),
                    help="sgd: the reference's training (default); mcmc: the Bayesian FM "
                    "by Gibbs sampling, as libFM's -method mcmc (--epoch samples, "
                    "averaged; --lr, --lamda, --keep, --batch_norm and --optimizer do not "
                    "apply)")
    fm.add_argument("--init_stdev", type=float, default=0.1,
                    help="--method mcmc: standard deviation of the initial factors, as "
                    "libFM's -init_stdev (default 0.1)")

    afm = sub.add_parser("afm", help="train or evaluate an Attentional Factorization "
                         "Machine (flags and defaults of the reference AFM.py)")
    _add_reference_flags(afm)
    afm.add_argument("--pretrain", type=int, default=-1, choices=(-1, 0, 1, 2),
                     help="1: start from pretrain/fm_<dataset>_<k>.npz (written by "
                     "'afmfast fm --pretrain -1'); -1: random init; both save the AFM to "
                     "pretrain/afm_<dataset>_<k>.npz; 0: random init, no save; 2: as 1 "
                     "(default -1)")
    afm.add_argument("--hidden_factor", default=None,
                     type=lambda s: _number_list(s, 2, int, "--hidden_factor", "[16, 16]"),
                     help="[attention size t, factors k] (default [16,16]; with --process "
                     "evaluate, that of the one saved AFM of the dataset)")
    afm.add_argument("--keep", default=[1.0, 0.5],
                     type=lambda s: _number_list(s, 2, float, "--keep", "[1.0, 0.5]"),
                     help="[keep of the attention weights, keep of the pooled vector] "
                     "(default [1.0,0.5])")
    afm.add_argument("--lamda_attention", type=float, default=100.0,
                     help="L2 regulariser of the attention weights W (default 100)")
    afm.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    afm.add_argument("--attention", type=int, default=1, choices=(0, 1),
                     help="1: attention; 0: every pair weighs 1 (default 1)")
    afm.add_argument("--freeze_fm", type=int, default=0, choices=(0, 1),
                     help="1: keep the pretrained V, w, w0 fixed (default 0)")
    afm.add_argument("--activation", default="relu",
                     choices=("relu", "sigmoid", "tanh", "identity"),
                     help="activation of the attention network (default relu)")
    afm.add_argument("--batch_norm", type=int, default=0, choices=(0,),
                     help="accepted for compatibility; the reference AFM applies no batch "
                     "normalisation, so only 0")
    afm.add_argument("--decay", type=float, default=0.999,
                     help="accepted for compatibility (the reference's batch-norm decay, "
                     "unused because its AFM applies no batch normalisation)")
    afm.add_argument("--valid_dimen", type=int, default=3,
                     help="accepted for compatibility; afmfast handles any row length")
    afm.add_argument("--mla", type=int, default=0, choices=(0, 1),
                     help="1: print each pair's attention weight and interaction value "
                     "for the first test rows")

    convert = sub.add_parser(
        "convert", help="convert libFM text or raw Criteo/CSV logs (plain or .gz, "
        "hashed) into a binary store that --train/--validation/--test read memory-mapped")
    convert.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="text files, concatenated in this order")
    convert.add_argument("-o", "--output", required=True, metavar="STORE",
                         help="the store directory to write (an existing store is replaced "
                         "once the new one is complete)")
    convert.add_argument("--format", default="libfm",
                         choices=("libfm", "libsvm", "criteo", "csv"),
                         help="input layout: label id:value ... (libfm, libsvm; the "
                         "default), or raw logs whose values are hashed: criteo (label, "
                         "13 integer and 26 categorical columns, tab-separated) or csv "
                         "(a header line; see --label, --columns, --integer, --numeric)")
    convert.add_argument("--hash-bits", type=int, default=None, metavar="B",
                         help="criteo/csv: hash the values into 2^B ids (default 22)")
    convert.add_argument("--integers", default="bucket", choices=("bucket", "value"),
                         help="criteo/csv: integer columns become log2 buckets (default) "
                         "or one feature per column with the integer as its value")
    convert.add_argument("--label", default=None, metavar="COL",
                         help="csv: the label column")
    convert.add_argument("--columns", default=None, metavar="A,B,...",
                         help="csv: the feature columns, comma-separated (default: all "
                         "but the label); their order numbers the fields")
    convert.add_argument("--integer", default="", metavar="A,B,...",
                         help="csv: feature columns of integers (default: categorical)")
    convert.add_argument("--numeric", default="", metavar="A,B,...",
                         help="csv: feature columns of real numbers, kept as values")
    convert.add_argument("--n_features", type=int, default=None,
                         help="feature count; every id must be below it (default: the "
                         "largest id + 1)")
    convert.add_argument("--threads", type=int, default=None,
                         help="parser threads (default: all CPUs of this process)")
    convert.add_argument("--no-sync", action="store_true",
                         help="do not wait for the disk: faster, but after a power "
                         "failure the new store may be incomplete (an interrupted "
                         "conversion never leaves a half store)")

    demo = sub.add_parser("demo", help="train FM and AFM on built-in synthetic data")
    demo.add_argument("--threads", type=int, default=None,
                      help="kernel threads (default: all CPUs of this process)")
    demo.add_argument("--backend", default="auto", choices=backends.BACKEND_NAMES,
                      help="kernel backend (default: auto = cython, else numba)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--plot", metavar="PNG",
                      help="save the AFM's field-attention heatmap there (needs matplotlib)")
    return parser


#: the parts of a data file's name (frappe.train.libfm) that name the split, not the data
_SPLIT_NAMES = ("train", "validation", "valid", "test")


def _dataset_name(args):
    """(name, derived): ``--dataset``, else the name of the first file given by
    --train/--validation/--test without its extension and split (``frappe.train.libfm``
    names ``frappe``), else the reference's ml-tag. The name labels the run and its
    pretrain files."""
    if args.dataset is not None:
        return args.dataset, False
    for given in (args.train, args.validation, args.test):
        if given:
            name = os.path.splitext(os.path.basename(os.path.normpath(given)))[0]
            stem, dot, split = name.rpartition(".")
            return (stem if dot and stem and split in _SPLIT_NAMES else name), True
    return "ml-tag", False


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


def _read_data(path):
    """A data file: a store directory (``afmfast convert``) memory-mapped, else libFM text."""
    if os.path.isdir(path):
        from afmfast.data.store import open_store

        return open_store(path)
    from afmfast.data.libfm import load_libfm

    return load_libfm(path)


def _convert(args):
    from afmfast.data.store import convert

    kinds = {name: kind for kind, given in (("integer", args.integer),
                                            ("numeric", args.numeric))
             for name in given.split(",") if name}
    header = convert(args.inputs, args.output, format=args.format,
                     hash_bits=args.hash_bits, n_features=args.n_features,
                     n_threads=args.threads, label=args.label,
                     columns=None if args.columns is None else args.columns.split(","),
                     kinds=kinds or None,
                     integers=args.integers, durable=not args.no_sync)
    print(f"{args.output}: {header['n_rows']} rows, {header['n_features']} features, "
          f"{header['nnz']} nonzeros")
    return 0


def _load_all(files):
    """Read every file; give them one feature count (max id + 1 over all)."""
    data = {part: _read_data(path) for part, path in files.items()}
    n_features = max(d.n_features for d in data.values())
    return {part: d.with_n_features(n_features) for part, d in data.items()}


def _k(args):
    """Embedding size: --hidden_factor is k for fm and [t,k] for afm."""
    return args.hidden_factor[1] if args.command == "afm" else args.hidden_factor


def _pretrain_file(args, model="fm", k=None):
    k = _k(args) if k is None else k
    return os.path.join("pretrain", f"{model}_{args.dataset}_{k}.npz")


def _source_flags(args):
    """The flags that name this run's data, for a suggested command."""
    if args.train:
        return f"--train {args.train}" + ("" if args.dataset_derived
                                          else f" --dataset {args.dataset}")
    path = "" if args.path == DEFAULT_PATH else f"--path {args.path} "
    return f"{path}--dataset {args.dataset}"


def _writer_command(args, model, k="K"):
    """The command that writes pretrain/<model>_<dataset>_<k>.npz."""
    if model == "fm":
        return f"afmfast fm {_source_flags(args)} --hidden_factor {k} --pretrain -1"
    t = args.hidden_factor[0] if args.command == "afm" and args.hidden_factor else "T"
    return f"afmfast afm {_source_flags(args)} --hidden_factor [{t},{k}] --pretrain 1"


def _existing_model_file(path, writer):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file; '{writer}' writes it")
    return path


def _saved_model_file(args):
    """The model that --process evaluate loads: --save, else
    pretrain/<model>_<dataset>_<k>.npz, where without --hidden_factor k is that of the one
    such file (several: a usage error listing them)."""
    model = args.command
    if args.save:
        return args.save
    if args.hidden_factor is not None:
        return _existing_model_file(_pretrain_file(args, model),
                                    _writer_command(args, model, _k(args)))
    pattern = re.compile(re.escape(f"{model}_{args.dataset}_") + r"(\d+)\.npz")
    names = os.listdir("pretrain") if os.path.isdir("pretrain") else []
    found = sorted((int(m.group(1)), os.path.join("pretrain", m.group(0)))
                   for m in map(pattern.fullmatch, names) if m)
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise FileNotFoundError(
            f"{_pretrain_file(args, model, 'K')}: no saved {model.upper()} of dataset "
            f"{args.dataset}; '{_writer_command(args, model)}' writes one")
    example = "K" if model == "fm" else "[T,K]"
    raise UsageError(
        f"--hidden_factor: pretrain holds {len(found)} {model.upper()} models of dataset "
        f"{args.dataset} ({', '.join(path for _, path in found)}); pass --hidden_factor "
        f"{example} to pick one")


def _save_targets(args):
    """(path, message) of each file the flags ask the trained model to be saved to: the
    pretrain file (fm --pretrain -1; afm --pretrain -1, 1 or 2), then --save."""
    targets = []
    if args.pretrain == -1 or (args.command == "afm" and args.pretrain in (1, 2)):
        targets.append((_pretrain_file(args, args.command),
                        "Save model to file as pretrain: {}"))
    if args.save:
        targets.append((args.save, "Saved model to {}"))
    return targets


def _save(model, path):
    if os.path.dirname(path) == "pretrain":
        os.makedirs("pretrain", exist_ok=True)
    model.save(path)


def _optimizer(args):
    optimizer = OPTIMIZER_ALIASES.get(args.optimizer.lower())
    if optimizer is None:
        raise UsageError(f"--optimizer: unknown optimizer {args.optimizer!r}; choose "
                         "AdagradOptimizer, AdamOptimizer, GradientDescentOptimizer or "
                         "MomentumOptimizer")
    return optimizer


def _build_model(args):
    """The estimator the flags describe, validated (a bad flag is a UsageError)."""
    common = dict(learning_rate=args.lr, batch_size=args.batch_size, n_epochs=args.epoch,
                  optimizer=_optimizer(args), random_state=args.seed,
                  shuffle_unit=args.shuffle_unit, n_threads=args.threads,
                  backend=args.backend, verbose=args.verbose)
    logistic = args.loss == "logistic"
    if args.command == "fm" and args.method == "mcmc":
        from afmfast.models.fm import FM, FMClassifier

        model = (FMClassifier if logistic else FM)(
            n_factors=args.hidden_factor, solver="mcmc", n_iter=args.epoch,
            init_stdev=args.init_stdev, random_state=args.seed, n_threads=args.threads,
            backend=args.backend, verbose=args.verbose)
    elif args.command == "fm":
        from afmfast.models.fm import FM, FMClassifier

        model = (FMClassifier if logistic else FM)(
            n_factors=args.hidden_factor, keep=args.keep, batch_norm=bool(args.batch_norm),
            l2=args.lamda, **common)
    else:
        from afmfast.models.afm import AFM, AFMClassifier

        model = (AFMClassifier if logistic else AFM)(
            n_factors=args.hidden_factor[1], attention_size=args.hidden_factor[0],
            keep=tuple(args.keep), l2_attention=args.lamda_attention,
            attention=bool(args.attention), activation=args.activation,
            batch_norm=bool(args.batch_norm), freeze_fm=bool(args.freeze_fm), **common)
    try:
        model._validate()
    except ValueError as exc:
        raise UsageError(_flag_message(str(exc))) from exc
    return model


def _describe(args):
    loss = "" if args.loss == "squared" else f", loss={args.loss}"
    if args.command == "fm" and args.method == "mcmc":
        return (f"FM: dataset={args.dataset}, factors={args.hidden_factor}, method=mcmc, "
                f"#iter={args.epoch}, init_stdev={args.init_stdev}{loss}")
    if args.command == "fm":
        return (f"FM: dataset={args.dataset}, factors={args.hidden_factor}, "
                f"#epoch={args.epoch}, batch={args.batch_size}, lr={args.lr:.4f}, "
                f"lambda={args.lamda:.1e}, keep={args.keep:.2f}, "
                f"optimizer={args.optimizer}, batch_norm={args.batch_norm}{loss}")
    t, k = args.hidden_factor
    return (f"AFM: dataset={args.dataset}, factors={k}, attention={args.attention}, "
            f"attention_size={t}, #epoch={args.epoch}, batch={args.batch_size}, "
            f"lr={args.lr:.4f}, lambda_attention={args.lamda_attention:.1e}, "
            f"keep=[{args.keep[0]:.1f},{args.keep[1]:.1f}], optimizer={args.optimizer}, "
            f"activation={args.activation}, freeze_fm={args.freeze_fm}{loss}")


def _label_hint(args, path, y):
    """One line on stderr when the squared loss trains on labels that look binary."""
    if args.loss != "squared":
        return
    labels = set(np.unique(y).tolist())
    for pair, text in (({0.0, 1.0}, "{0, 1}"), ({-1.0, 1.0}, "{-1, 1}")):
        if labels <= pair:
            print(f"afmfast: note: the labels of {path} are all in {text}; --loss logistic "
                  "trains a classifier instead (logloss, AUC)", file=sys.stderr)
            return


_METRIC_NAMES = {"rmse": "RMSE", "auc": "AUC"}


def _metrics_text(metrics):
    """'RMSE: 0.1234' (regression) or 'logloss: ..., AUC: ..., accuracy: ...'."""
    return ", ".join(f"{_METRIC_NAMES.get(name, name)}: {value:.4f}"
                     for name, value in metrics.items())


def _train(args):
    from afmfast.models.persistence import load

    if args.hidden_factor is None:
        args.hidden_factor = DEFAULT_HIDDEN_FACTOR[args.command]
    model = _build_model(args)
    init_from = None
    if args.pretrain in (1, 2):
        init_from = load(_existing_model_file(_pretrain_file(args, "fm"),
                                              _writer_command(args, "fm", _k(args))))
    files = _data_files(args)
    data = _load_all(files)
    if args.verbose:
        print(_describe(args))
        _label_hint(args, files["train"], data["train"].y)
    t0 = time.perf_counter()
    try:
        # score_train: the reference prints the training metric every epoch
        model.fit(data["train"], validation=data.get("validation"), init_from=init_from,
                  score_train=True)
    except KeyboardInterrupt:
        return _interrupted(args, model)
    except ValueError as exc:
        if str(exc).startswith("y:"):  # the labels: name their file
            raise ValueError(f"{files['train']}: {exc}") from exc
        raise
    h = model.history_
    if h:
        metric = model._monitor
        label = "" if metric == "rmse" else f" {metric}"
        best = h[model.best_epoch_ - 1]
        valid = best[f"valid_{metric}"]
        valid = f"{valid:.4f}" if valid is not None else "n/a"
        print(f"Best Iter(validation)= {best['epoch']}\t train{label} = "
              f"{best[f'train_{metric}']:.4f}, valid{label} = {valid} "
              f"[{time.perf_counter() - t0:.1f} s]")
    if "test" in data:
        print(f"Test {_metrics_text(model.evaluate(data['test']))}")
    for path, message in _save_targets(args):
        _save(model, path)
        print(message.format(path))
    if getattr(args, "mla", 0):
        _micro_level_analysis(model, data.get("test", data.get("validation", data["train"])))
    return 0


def _interrupted(args, model):
    """Ctrl-C during fit, which left the model at its best epoch so far: save it where
    the flags ask and say so in one line."""
    epoch = getattr(model, "best_epoch_", 0)
    paths = [path for path, _ in _save_targets(args)]
    if epoch and paths:
        for path in paths:
            _save(model, path)
        note = f"saved epoch {epoch} (the best so far) to {' and '.join(paths)}"
    elif epoch:
        note = f"epoch {epoch} (the best so far) not saved (no --save; --pretrain " \
               f"{args.pretrain})"
    else:
        note = "no epoch finished; nothing saved"
    print(f"afmfast: interrupted; {note}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _micro_level_analysis(model, data, n_rows=5):
    """The reference's --mla: each pair's attention weight and interaction value
    (p . e_ij) for the first rows."""
    record = model.explain(data[np.arange(min(n_rows, len(data)))])
    for r in range(len(record.indptr) - 1):
        print(f"Row {r + 1}: label={data.y[r]:.4f}")
        for q in range(record.indptr[r], record.indptr[r + 1]):
            w = record.weight[q]
            value = record.contribution[q] / w if w != 0 else 0.0
            print(f"  pair ({record.i[q]}, {record.j[q]}): attention={w:.4f}, "
                  f"interaction={value:.4f}")


def _evaluate(args):
    from afmfast.models.persistence import load

    model = load(_saved_model_file(args))
    test = _read_data(_data_files(args)["test"])
    print(f"Test {_metrics_text(model.evaluate(test))}")
    if getattr(args, "mla", 0):
        _micro_level_analysis(model, test)
    return 0


_FLAGS = {"n_factors": "--hidden_factor", "attention_size": "--hidden_factor",
          "learning_rate": "--lr", "batch_size": "--batch_size", "n_epochs": "--epoch",
          "keep": "--keep", "keep[0]": "--keep", "keep[1]": "--keep", "l2": "--lamda",
          "l2_attention": "--lamda_attention", "n_threads": "--threads",
          "random_state": "--seed", "activation": "--activation",
          "batch_norm": "--batch_norm", "n_iter": "--epoch", "init_stdev": "--init_stdev",
          "shuffle_unit": "--shuffle_unit"}


def _flag_message(message):
    name = message.split(" ", 1)[0]
    return message.replace(name, _FLAGS.get(name, name), 1)


def _stdout_to_devnull():
    """After EPIPE on stdout: point it at /dev/null, so that the interpreter's final
    flush of the output still buffered does not fail (and complain) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # no file descriptor (an in-process caller's stream): nothing to flush


def _run(argv):
    from afmfast.models.training import TrainingDivergedError

    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {args.threads}")
        if args.command == "demo":
            from afmfast.demo import run_demo

            run_demo(backend=args.backend, n_threads=args.threads, seed=args.seed,
                     plot=args.plot)
            return 0
        if args.command == "convert":
            return _convert(args)
        args.dataset, args.dataset_derived = _dataset_name(args)
        return _train(args) if args.process == "train" else _evaluate(args)
    except UsageError as exc:
        print(f"afmfast: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # an OSError, but not a data error: main ends quietly
    except TrainingDivergedError as exc:
        # the estimator names its argument; the command line has a flag for it
        print(f"afmfast: error: {str(exc).replace('learning_rate', '--lr')}",
              file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as exc:
        print(f"afmfast: error: {exc}", file=sys.stderr)
        return 1


def main(argv=None):
    """Entry point of the ``afmfast`` command; returns the exit status."""
    try:
        status = _run(argv)
        sys.stdout.flush()  # a broken pipe fails here, not at the interpreter's exit
        return status
    except KeyboardInterrupt:  # outside fit (reading data, evaluating, saving)
        print("afmfast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output is gone, e.g. `... | head`
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
