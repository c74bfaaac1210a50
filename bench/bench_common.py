"""What ``bench/compare.py`` and its comparison under load (``bench/fit_times.py``,
``bench/load.py``) share: the data sets, the estimators as timed, the environment of
their worker processes and the table formatting.

Data
- frappe-mini train split: ``../shared/data/frappe/frappe.validation.libfm`` beside the
  repository (research data, read in place, never copied), rows whose 1-based line number
  is not divisible by 5.
- synthetic, shaped like ml-tag (``synthetic_mltag``) or like Frappe
  (``afmfast.demo.frappe_like``, for when the Frappe file is absent).
"""
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
FRAPPE = REPO.parent / "shared" / "data" / "frappe" / "frappe.validation.libfm"
try:
    import afmfast  # noqa: F401  (installed)
except ImportError:  # run from a checkout: use it
    sys.path.insert(0, str(REPO))
    import afmfast  # noqa: F401

def packages_before_bench():
    """Put this folder after site-packages on ``sys.path``: ``bench/distributed.py``
    shares its name with the ``distributed`` package, which a bench run from here would
    otherwise import in its place (the bench modules still import from the folder)."""
    here = str(BENCH)
    sys.path[:] = ([p for p in sys.path if os.path.abspath(p or os.curdir) != here]
                   + [here])


MLTAG_FIELDS = (17_000, 23_500, 49_500)  # user, item, tag ids: 90,000 features
FRAPPE_MINI_ROWS = 46_178  # rows of the frappe-mini train split
# FM without dropout or batch norm: the model Spark's FMRegressor trains
PLAIN_FM = {"keep": 1.0, "batch_norm": False}


def log(text):
    """Print a progress line on stderr (the tables go to stdout)."""
    print(text, file=sys.stderr, flush=True)


# ----- data ----------------------------------------------------------------------------
def frappe_mini_train():
    """The frappe-mini train split (every row whose 1-based line number is not divisible
    by 5) of the Frappe file beside the repository."""
    data = afmfast.load_libfm(FRAPPE)
    return data[(np.arange(1, len(data) + 1) % 5) != 0]


def frappe_like_train(n_rows=FRAPPE_MINI_ROWS, seed=0):
    """Synthetic rows of Frappe's shape (``afmfast.demo.frappe_like``) as a Dataset:
    the stand-in for frappe-mini when the research file is absent."""
    from afmfast.demo import FRAPPE_FIELD_SIZES, frappe_like

    (indptr, indices, values), y = frappe_like(n_rows, seed)
    return afmfast.Dataset(indptr, indices, values, y, n_features=sum(FRAPPE_FIELD_SIZES))


def frappe_mini_or_like():
    """(name, Dataset): frappe-mini train when the Frappe file is there, else synthetic
    rows of its shape and size."""
    if FRAPPE.exists():
        return "frappe-mini train", frappe_mini_train()
    return "synthetic frappe-like", frappe_like_train()


def synthetic_mltag(n_rows, seed=0):
    """One-hot rows of 3 fields with Zipf-like popularity; labels -1/1 from planted
    factors (one third positive)."""
    rng = np.random.default_rng(seed)
    cols, offset, factors = [], 0, []
    for size in MLTAG_FIELDS:
        p = 1.0 / (np.arange(size) + 10.0) ** 0.9
        ids = rng.choice(size, size=n_rows, p=p / p.sum()).astype(np.int32)
        cols.append(ids + offset)
        factors.append(rng.normal(size=(size, 4)).astype(np.float32)[ids])
        offset += size
    score = (factors[0] * factors[1]).sum(1) + (factors[1] * factors[2]).sum(1)
    y = np.where(score > np.quantile(score, 2 / 3), 1.0, -1.0).astype(np.float32)
    indices = np.stack(cols, axis=1).ravel()
    indptr = np.arange(0, 3 * n_rows + 1, 3, dtype=np.int64)
    return afmfast.Dataset(indptr, indices, np.ones(indices.size, np.float32), y,
                           n_features=offset)


def mltag_splits(n_rows, seed=0):
    """``synthetic_mltag`` rows split 8:1:1 by row number: {"train", "valid", "test"}."""
    data = synthetic_mltag(n_rows, seed)
    part = np.arange(len(data)) % 10
    return {"train": data[part < 8], "valid": data[part == 8], "test": data[part == 9]}


def write_stores(parts, folder):
    """{name: the path of its binary store} of a dict of Datasets, each written into
    ``folder`` as ``<name>.store``."""
    paths = {}
    for name, data in parts.items():
        paths[name] = os.path.join(folder, f"{name}.store")
        afmfast.write_store(data, paths[name])
    return paths


def save_dataset(data, path):
    """Write a Dataset to an .npz file for the worker processes (``load_dataset``)."""
    np.savez(path, indptr=data.indptr, indices=data.indices, values=data.values, y=data.y,
             n_features=np.int64(data.n_features))


def load_dataset(path):
    """The Dataset that ``save_dataset`` wrote to path."""
    with np.load(path, allow_pickle=False) as z:
        return afmfast.Dataset(z["indptr"], z["indices"], z["values"], z["y"],
                               int(z["n_features"]))


def make_estimator(model, k, backend="auto", threads=1, **params):
    """afmfast.FM (model "fm") or afmfast.AFM (attention size k too) with the estimators'
    default hyperparameters, k factors, quiet; params override the rest."""
    common = dict(n_factors=k, n_threads=threads, backend=backend, verbose=0, **params)
    return (afmfast.FM(**common) if model == "fm"
            else afmfast.AFM(attention_size=k, **common))


def worker_env(env=None):
    """env (default: this process's environment) with PYTHONPATH leading to the afmfast
    that this process imported, so that worker processes time the same build."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(afmfast.__file__).resolve().parents[1]), str(BENCH)]
        + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return full_env


def torch_available():
    """(True, PyTorch's version) or (False, why it does not import)."""
    try:
        import torch  # noqa: F401
        return True, torch.__version__
    except ImportError as exc:
        return False, str(exc)


def cpu_description():
    """The CPU's model name, its widest SIMD and the CPU count, for a run's header."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {simd}{' + FMA' if 'fma' in flags else ''}, {os.cpu_count()} CPUs"


def print_run_header(title, torch_note=""):
    """Print a run's first lines: title and time, the machine and its load, the versions
    of Python, NumPy and afmfast (and where afmfast comes from), afmfast's backends and
    PyTorch's version (torch_note after it) or why it is skipped. Returns (PyTorch
    importable, {"fm": backends, "afm": backends})."""
    from afmfast.kernels.backends import available_backends

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    has_torch, torch_info = torch_available()
    print(f"{title}: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: {cpu_description()}; load at start: {uptime}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, afmfast "
          f"{afmfast.__version__} from {Path(afmfast.__file__).parent}")
    backends = {m: available_backends(m) for m in ("fm", "afm")}
    print(f"afmfast backends: FM {backends['fm']}, AFM {backends['afm']}")
    if has_torch:
        print(f"PyTorch {torch_info}{torch_note}")
    else:
        print(f"PyTorch not importable ({torch_info}): PyTorch columns skipped. "
              "Install the bench extra: pip install \".[bench]\"")
    return has_torch, backends


# ----- formatting ----------------------------------------------------------------------
def med(values):
    """Median of values, NaN when there are none."""
    return float(np.median(values)) if values else float("nan")


def mean(values):
    """Mean of values, NaN when there are none."""
    return float(np.mean(values)) if values else float("nan")


def fmt_s(x):
    """Seconds with 3 significant digits ("-" for NaN)."""
    if not np.isfinite(x):
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def fmt_x(x):
    """A ratio as "1.23x" ("-" for NaN)."""
    return f"{x:.2f}x" if np.isfinite(x) else "-"


def mb(x):
    """Bytes as MiB with one decimal."""
    return f"{x / 2**20:.1f}"


def table(header, rows):
    """A plain-text table: the first two columns left-aligned, the others right."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 or i == 1 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
