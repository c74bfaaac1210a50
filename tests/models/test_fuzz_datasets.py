"""Fuzzing the boundary between the estimators and the kernels: whatever a user writes
into a Dataset after building it (through arrays it shares with the Dataset, or after
setting ``flags.writeable`` back to True), and whatever thread count they ask for,
fit, predict, evaluate, explain and field_attention return or raise a Python exception
(ValueError naming the array for broken rows), never crash the process or hang.

The kernel calls run in this process: a segfault would take pytest down with it, which
fails the run as surely as a failed assertion. The thread counts run in a subprocess,
since an OpenMP runtime that cannot start its threads aborts the process.
"""
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import afmfast
from afmfast import Dataset, load_libfm
from afmfast.kernels.backends import available_backends, backend_name

N_FEATURES = 8  # of the fitted models; the fuzzed rows use ids below it
FIELDS = np.arange(N_FEATURES) % 3
CASES = 40  # fuzzed Datasets per backend
CALL_SECONDS = 10.0  # a call slower than this on a few rows counts as a hang
TINY = dict(n_factors=2, n_epochs=1, batch_size=4, n_threads=2, verbose=0)


def tiny_models(name):
    """Fresh FM and AFM of ``TINY`` size on backend ``name``."""
    return (afmfast.FM(**TINY, backend=name),
            afmfast.AFM(**TINY, attention_size=2, backend=name))


@pytest.fixture(scope="module")
def fitted():
    """{backend name: (FM, AFM)} fitted on clean rows with N_FEATURES features, every
    kernel called once (Numba compiles on first use: not a hang)."""
    rng = np.random.default_rng(0)
    indptr = np.arange(0, 61, 3, dtype=np.int64)
    clean = Dataset(indptr, rng.integers(0, N_FEATURES, 60), rng.normal(size=60),
                    rng.normal(size=20), N_FEATURES)
    models = {name: tuple(m.fit(clean) for m in tiny_models(name))
              for name in available_backends()}
    for fm, afm in models.values():
        fm.predict(clean)
        afm.predict(clean)
        afm.explain(clean)
    return models


def unlock(a):
    """``a`` writeable again, as a user can make it: flags.writeable = True on every
    array of its chain of bases, the one that owns the memory first."""
    chain = []
    while isinstance(a, np.ndarray):
        chain.append(a)
        a = a.base
    for arr in reversed(chain):
        arr.flags.writeable = True
    return chain[0]


def random_dataset(rng, tmp_path):
    """(Dataset, {name: an array through which its rows can be changed}) for valid
    random rows, held in one of the ways a Dataset holds arrays."""
    n_rows = int(rng.integers(1, 9))
    n_features = int(rng.integers(2, N_FEATURES + 1))
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 5, n_rows))]).astype(np.int64)
    nnz = int(indptr[-1])
    arrays = (indptr, rng.integers(0, n_features, nnz).astype(np.int32),
              rng.normal(size=nnz).astype(np.float32),
              rng.normal(size=n_rows).astype(np.float32))
    kind = rng.choice(["shared", "lists", "rows", "slice", "libfm"])
    if kind == "shared":  # the caller keeps arrays the Dataset uses: no flags needed
        ds = Dataset(*arrays, n_features)
        return ds, dict(zip(("indptr", "indices", "values", "y"), arrays))
    if kind == "lists":
        ds = Dataset(*(a.tolist() for a in arrays), n_features)
    elif kind == "rows":
        ds = Dataset(*arrays, n_features)[rng.permutation(n_rows)]
    elif kind == "slice":
        ds = Dataset(*arrays, n_features)[:]
    else:
        path = tmp_path / "fuzz.libfm"
        with open(path, "w") as fh:
            for r in range(n_rows):
                lo, hi = indptr[r], indptr[r + 1]
                fh.write(" ".join([repr(float(arrays[3][r]))] + [
                    f"{i}:{float(v)!r}" for i, v in zip(arrays[1][lo:hi], arrays[2][lo:hi])])
                    + "\n")
        ds = load_libfm(path, n_features)
    return ds, {name: None for name in ("indptr", "indices", "values", "y")}


def writable(ds, handles, name):
    return handles[name] if handles[name] is not None else unlock(getattr(ds, name))


def rows_are_valid(ds):
    """The rows' validity, checked one row at a time (the oracle for Dataset.validate)."""
    indptr, indices = ds.indptr, ds.indices
    if indptr[0] != 0 or indptr[-1] != len(indices):
        return False
    for r in range(len(indptr) - 1):
        if indptr[r + 1] < indptr[r]:
            return False
        if any(not 0 <= i < ds.n_features for i in indices[indptr[r]:indptr[r + 1]]):
            return False
    return True


def mutate(rng, ds, handles):
    """Write garbage (or, sometimes, other valid rows) into the Dataset's arrays; returns
    the name of the array changed."""
    name = rng.choice(["indptr", "indptr", "indices", "indices", "values", "y"])
    a = writable(ds, handles, name)
    if a.size == 0:
        return name
    pos = int(rng.integers(0, a.size))
    if name == "indptr":
        how = rng.integers(0, 3)
        if how == 0:
            a[pos] = rng.choice([-1, -10**9, 10**9, 2**62, -2**63, int(a[-1]) + 1])
        elif how == 1 and a.size > 2:  # in-range values in a wrong order
            a[1:-1] = rng.permutation(a[1:-1])
        elif 0 < pos < a.size - 1:  # another valid split of the same nonzeros
            a[pos] = rng.integers(a[pos - 1], a[pos + 1] + 1)
    elif name == "indices":
        a[pos] = rng.choice([-1, -10**9, 10**9, 2**31 - 1, ds.n_features, N_FEATURES])
    else:
        a[pos] = rng.choice([np.nan, np.inf, -np.inf, 1e38, -1e9, 1e9])
    return name


def calls(models, name, ds):
    """(what, call) of every public entry point that hands ``ds`` to a kernel."""
    fm, afm = models
    fresh_fm, fresh_afm = tiny_models(name)
    clean = Dataset([0, 2, 3], [0, 1, 2], [1.0, 1.0, 1.0], [1.0, 0.0], N_FEATURES)
    return [
        ("FM.predict", lambda: fm.predict(ds)),
        ("FM.evaluate", lambda: fm.evaluate(ds)),
        ("AFM.predict", lambda: afm.predict(ds)),
        ("AFM.evaluate", lambda: afm.evaluate(ds)),
        ("AFM.explain", lambda: afm.explain(ds)),
        ("AFM.field_attention", lambda: afm.field_attention(ds, FIELDS)),
        ("FM.fit", lambda: fresh_fm.fit(ds)),
        ("AFM.fit", lambda: fresh_afm.fit(ds)),
        ("FM.fit validation", lambda: tiny_models(name)[0].fit(clean, validation=ds)),
    ]


def check_calls(models, name, ds, changed, case):
    valid_rows = rows_are_valid(ds)
    finite_values = bool(np.isfinite(ds.values).all())
    for what, call in calls(models, name, ds):
        t0 = time.perf_counter()
        try:
            call()
            raised = None
        except (ValueError, FloatingPointError) as exc:  # FloatingPointError: diverged
            raised = exc
        took = time.perf_counter() - t0
        label = f"case {case}, {name}, {what}, {changed} changed: {raised!r}"
        assert took < CALL_SECONDS, label
        if not valid_rows:
            # broken rows never reach a kernel, and the error names the array
            assert isinstance(raised, ValueError) and changed in str(raised), label
        elif not finite_values:
            assert isinstance(raised, ValueError) and "NaN or infinite" in str(raised), label
        elif isinstance(raised, ValueError):
            # valid rows: only labels that fit or evaluate cannot use are refused
            assert "labels must be finite" in str(raised), label
            assert "fit" in what or "evaluate" in what, label


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_changed_datasets_never_reach_a_kernel(backend, fitted, tmp_path):
    name = backend_name(backend)
    rng = np.random.default_rng(12345 + len(name))
    for case in range(CASES):
        ds, handles = random_dataset(rng, tmp_path)
        changed = mutate(rng, ds, handles)
        check_calls(fitted[name], name, ds, changed, case)


@pytest.mark.parametrize("change,names_it", [
    (lambda a: a.astype(np.float64), True), (lambda a: np.repeat(a, 2)[::2], True),
    (lambda a: a.reshape(-1, 1), True), (lambda a: a.tolist(), True),
    (lambda a: np.append(a, a[-1]), False), (lambda a: a[:-1], False),
])
@pytest.mark.parametrize("name", ["indptr", "indices", "values", "y"])
def test_replaced_arrays_never_reach_a_kernel(backend, fitted, name, change, names_it):
    # the attributes cannot be assigned; the private slots behind them can, past the API
    # (a wrong length may be reported as the other array's: "y must have n_rows = ...")
    ds = Dataset([0, 2, 3, 5], [0, 1, 2, 3, 4], [1.0] * 5, [1.0, 0.0, 2.0], N_FEATURES)
    with pytest.raises(AttributeError):
        setattr(ds, name, getattr(ds, name).copy())
    setattr(ds, "_" + name, change(getattr(ds, name)))
    for what, call in calls(fitted[backend_name(backend)], backend_name(backend), ds):
        with pytest.raises(ValueError, match=name if names_it else None):
            call()


@pytest.mark.parametrize("attr,value", [("shape", (-1, 1)), ("dtype", np.uint8)])
@pytest.mark.parametrize("name", ["indptr", "indices", "values", "y"])
def test_reinterpreted_arrays_never_reach_a_kernel(backend, fitted, name, attr, value):
    # NumPy lets anyone reshape or retype an array object in place, read-only or not
    ds = Dataset([0, 2, 3, 5], [0, 1, 2, 3, 4], [1.0] * 5, [1.0, 0.0, 2.0], N_FEATURES)
    setattr(getattr(ds, name), attr, value)
    for what, call in calls(fitted[backend_name(backend)], backend_name(backend), ds):
        with pytest.raises(ValueError, match=f"{name} must be a C-contiguous 1-D"):
            call()


THREADS_SCRIPT = textwrap.dedent("""
    import warnings
    import numpy as np
    import afmfast
    from afmfast.kernels.backends import available_backends
    from afmfast.demo import make_demo_data

    warnings.simplefilter("ignore")
    N = 100_000
    data = make_demo_data(n_rows=300, seed=0)
    with open("tiny.libfm", "w") as fh:
        fh.write("1 0:1 3:0.5\\n-1 2:1\\n")
    assert len(afmfast.load_libfm("tiny.libfm", n_threads=N)) == 2
    for name in available_backends("afm"):
        afmfast.FM(n_threads=N, n_epochs=1, backend=name, verbose=0).fit(
            np.eye(6), np.arange(6.0))
        for model in (afmfast.FM(n_factors=4, n_epochs=1, n_threads=N, backend=name,
                                 verbose=0),
                      afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, n_threads=N,
                                  backend=name, verbose=0)):
            model.fit(data.train, validation=data.valid)
            model.predict(data.valid)
            model.evaluate(data.valid)
            if isinstance(model, afmfast.AFM):
                model.explain(data.valid)
                model.field_attention(data.valid, data.fields)
            print(name, type(model).__name__, "ok")
""")


def test_absurd_thread_counts_do_not_crash(tmp_path):
    """n_threads=100000 once took the process down (exit 139) in the Cython kernels:
    every entry point, both models and backends, in a process of its own."""
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split()
    assert lines.count("ok") == 2 * len(available_backends("afm"))
