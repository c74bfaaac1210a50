"""Shared fixtures, problem generators and checks of the kernel tests
(``test_kernels_fm.py``, ``test_kernels_afm.py``; AFM problems in ``afm_problems.py``).

``random_csr`` builds a small random CSR matrix (ragged rows, real values, repeated
feature ids inside a row); ``make_problem`` adds targets and non-trivial FM parameters,
so every term of the FM gradient is exercised; ``backend`` runs a test once per kernel
backend that imports here. The ``check_*`` / ``assert_*`` helpers hold the assertions
that the FM and AFM contract tests share; each takes the backend's step function.
"""
import time

import numpy as np
import pytest

from afmfast.kernels import api
from afmfast.kernels.backends import available_backends, get_backend

BACKENDS = available_backends()
# Whether afmfast was installed with its compiled extensions (an install without a C
# compiler has only Numba): tests marked ``compiled`` are skipped without them.
HAVE_COMPILED = "cython" in BACKENDS and "cython" in available_backends("afm")


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: needs afmfast's compiled (Cython) "
                            "extensions; skipped when afmfast was installed without them")


def pytest_collection_modifyitems(config, items):
    if HAVE_COMPILED:
        return
    skip = pytest.mark.skip(reason="afmfast was installed without its compiled extensions")
    for item in items:
        if item.get_closest_marker("compiled"):
            item.add_marker(skip)


def compiled_module(name):
    """The compiled extension ``name`` (e.g. "afmfast._fm_cython"), or None when afmfast
    was installed without it; a test module that needs it is marked ``compiled``."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        return None

OPTIMIZERS = {"adagrad": api.ADAGRAD, "sgd": api.SGD, "momentum": api.MOMENTUM,
              "adam": api.ADAM}
# Step sizes that keep several steps on the test problems far from divergence (the loss
# is a sum over the batch, so plain SGD needs a small one).
STABLE_LR = {api.ADAGRAD: 0.05, api.SGD: 2e-3, api.MOMENTUM: 1e-3, api.ADAM: 0.05}


def random_csr(rng, n_rows, n_features, row_lengths, dtype=np.float64):
    """X = (indptr int64, indices int32, values dtype) with values of both signs and
    magnitude in [0.5, 1.5]. Row b has ``row_lengths[b % len(row_lengths)]`` nonzeros; in
    every row of 2 or more nonzeros the last id repeats the first, so duplicate ids
    within a row always occur."""
    lengths = np.array([row_lengths[b % len(row_lengths)] for b in range(n_rows)])
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_features, size=int(indptr[-1])).astype(np.int32)
    for b in range(n_rows):
        lo, hi = indptr[b], indptr[b + 1]
        if hi - lo >= 2:
            indices[hi - 1] = indices[lo]
    values = (rng.uniform(0.5, 1.5, size=indices.shape) * rng.choice([-1, 1], indices.shape))
    return (indptr, indices, values.astype(dtype))


def make_problem(rng, n_rows, n_features, k, row_lengths, dtype=np.float64, v_scale=0.3):
    """Random problem: X from ``random_csr``, y (n_rows,) and FMParams with
    V ~ N(0, v_scale), w ~ N(0, 0.1), w0/beta near 0, gamma near 1 and running BN
    statistics away from (0, 1)."""
    X = random_csr(rng, n_rows, n_features, row_lengths, dtype)
    y = rng.normal(0.0, 1.0, size=n_rows).astype(dtype)
    params = api.new_fm_params(n_features, k, rng, dtype=dtype)
    params.V[:] = rng.normal(0.0, v_scale, size=params.V.shape)
    params.w[:] = rng.normal(0.0, 0.1, size=params.w.shape)
    params.dense[:] = rng.normal(0.0, 0.1, size=params.dense.shape)
    params.dense[1 : 1 + k] += 1.0
    params.bn_stats[0] = rng.normal(0.0, 0.1, size=k)
    params.bn_stats[1] = rng.uniform(0.5, 2.0, size=k)
    return X, y, params


def with_unseen_ids(rng, X, M):
    """X with ~20% of its ids replaced by ids >= M (unseen in training), the same X
    without them, and the number of kept ids per row."""
    indptr, indices, values = X
    unseen = rng.random(indices.shape) < 0.2
    X_unseen = (indptr, np.where(unseen, M + 3, indices).astype(np.int32), values)
    keep = ~unseen
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    counts = np.bincount(row_of[keep], minlength=len(indptr) - 1)
    X_kept = (np.r_[0, np.cumsum(counts)].astype(np.int64), indices[keep], values[keep])
    return X_unseen, X_kept, counts


def copy_tuple(t):
    """Deep copy of a namedtuple of arrays (FMParams, FMOptState)."""
    return type(t)(*(np.array(a, copy=True) for a in t))


def cast_tuple(t, dtype):
    """Copy of a namedtuple of arrays in another dtype."""
    return type(t)(*(np.asarray(a, dtype=dtype).copy() for a in t))


def make_cfg(**kw):
    """StepConfig with test defaults, overridden by keyword."""
    base = dict(lr=0.05, l2=0.05, keep=0.7, optimizer=api.ADAGRAD, batch_norm=1, seed=7,
                step=0, n_threads=2)
    base.update(kw)
    return api.StepConfig(**base)


def batch_nnz(X, rows):
    indptr = X[0]
    return int((indptr[rows + 1] - indptr[rows]).sum())


# --------------------------------------------------------------------- shared checks

def assert_tuple_close(actual, desired, rtol, atol_scale, what):
    """Elementwise |a - d| <= rtol |d| + atol_scale * max|d| for every array."""
    for name, a, d in zip(actual._fields, actual, desired):
        d64 = np.asarray(d, dtype=np.float64)
        atol = atol_scale * max(1e-30, float(np.abs(d64).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), d64, rtol=rtol,
                                   atol=atol, err_msg=f"{what}.{name}")


def assert_bit_identical(run_a, run_b):
    """Two (losses, params, state, ...) runs agree bit for bit."""
    assert run_a[0] == run_b[0]
    for ta, tb in zip(run_a[1:], run_b[1:]):
        for name, a, b in zip(ta._fields, ta, tb):
            assert np.array_equal(a, b), name


def assert_runs_agree(run_a, run_b):
    """Two (losses, params, state, predictions) runs of different backends agree to
    float32 accuracy."""
    (l_a, p_a, s_a, o_a), (l_b, p_b, s_b, o_b) = run_a, run_b
    np.testing.assert_allclose(l_b, l_a, rtol=1e-4)
    assert_tuple_close(p_b, p_a, 1e-4, 1e-5, "params")
    assert_tuple_close(s_b, s_a, 1e-4, 1e-5, "state")
    np.testing.assert_allclose(o_b, o_a, rtol=1e-4, atol=1e-4 * np.abs(o_a).max())


def train_and_predict(step, predict, X, y, params, state, ws, B, cfg_of_step, steps=3):
    """``steps`` batches of B consecutive rows, then the scores of every row of X
    (``predict(X, params, out)``); returns (losses, params, state, scores) for
    ``assert_runs_agree``."""
    losses = []
    for i in range(steps):
        rows = np.arange(i * B, (i + 1) * B, dtype=np.int64)
        losses.append(step(X, y, rows, params, state, cfg_of_step(i), ws))
    out = np.empty(X[0].shape[0] - 1, dtype=params.V.dtype)
    predict(X, params, out)
    return losses, params, state, out


def check_one_step(step, ref_step, X, y, rows, params, state, cfg, ws, rtol, atol):
    """One ``step`` against ``ref_step`` on float64 copies of the same values."""
    p_ref, s_ref = cast_tuple(params, np.float64), cast_tuple(state, np.float64)
    loss = step(X, y, rows, params, state, cfg, ws)
    loss_ref = ref_step(X, y, rows, p_ref, s_ref, cfg)
    assert loss == pytest.approx(loss_ref, rel=rtol)
    assert_tuple_close(params, p_ref, rtol, atol, "params")
    assert_tuple_close(state, s_ref, rtol, atol, "state")


def check_steps_match_reference(step, ref_step, X, y, params, state, ws, perm, B,
                                cfg_of_step, tol32):
    """Five steps of ``step`` and ``ref_step`` (the last one a short batch of 7 rows in
    a workspace sized for B) on the batches of ``perm``. float64: one run each, rtol 1e-9;
    float32: the reference restarts from the backend's values every step (float32
    storage makes the runs drift apart slowly), tolerances ``tol32`` = (rtol, atol)."""
    dtype = params.V.dtype
    p_ref, s_ref = cast_tuple(params, np.float64), cast_tuple(state, np.float64)
    for i in range(5):
        rows = perm[i * B:(i + 1) * B].astype(np.int64)
        if i == 4:
            rows = rows[:7]
        if dtype == np.float32:
            p_ref, s_ref = cast_tuple(params, np.float64), cast_tuple(state, np.float64)
        cfg = cfg_of_step(i)
        loss = step(X, y, rows, params, state, cfg, ws)
        loss_ref = ref_step(X, y, rows, p_ref, s_ref, cfg)
        rtol, atol = (1e-9, 1e-12) if dtype == np.float64 else tol32
        assert loss == pytest.approx(loss_ref, rel=rtol)
        assert_tuple_close(params, p_ref, rtol, atol, f"params step {i}")
        assert_tuple_close(state, s_ref, rtol, atol, f"state step {i}")
    for tup in (params, state):
        assert all(a.dtype == dtype for a in tup)


def train_steps(step, X, y, params, state, ws, B, steps, cfg_of_step):
    """``steps`` batches of B rows of a fixed permutation; returns (losses, params,
    state) for the determinism tests."""
    perm = np.random.default_rng(1).permutation(X[0].shape[0] - 1)
    losses = []
    for i in range(steps):
        rows = perm[i * B:(i + 1) * B].astype(np.int64)
        losses.append(step(X, y, rows, params, state, cfg_of_step(i), ws))
    return losses, params, state


def check_phase_times(module, ws, run_step):
    """After run_step() (one step of ``module`` with workspace ``ws``),
    ``module._phase_times(ws)`` (what
    bench/profile_phases.py prints) names every phase of ``module.PHASES`` with a
    non-negative time, and together they fit in the step's wall time."""
    t0 = time.perf_counter()
    run_step()
    wall = time.perf_counter() - t0
    phases = module._phase_times(ws)
    assert list(phases) == list(module.PHASES)
    assert all(v >= 0 for v in phases.values())
    assert 0 < sum(phases.values()) <= wall


def check_rejects_invalid_batches(step, X, y, params, state, ws, cfg, M):
    """An empty batch, a row id outside X and a feature id >= M raise ValueError and
    leave the parameters and optimiser state untouched (X has >= 8 rows of >= 3
    nonzeros; the workspace fits rows 0..7)."""
    rows = np.arange(8, dtype=np.int64)
    n_rows = X[0].shape[0] - 1
    p0, s0 = copy_tuple(params), copy_tuple(state)
    bad_ids = (X[0], X[1].copy(), X[2])
    bad_ids[1][X[0][2] + 1] = M
    negative = (X[0], X[1].copy(), X[2])
    negative[1][X[0][5]] = -1
    for X_, rows_ in ((X, rows[:0]), (X, np.r_[rows[:7], n_rows]),
                      (X, np.r_[-1, rows[1:]]), (bad_ids, rows), (negative, rows)):
        with pytest.raises(ValueError):
            step(X_, y, rows_, params, state, cfg, ws)
        assert_tuple_close(params, p0, 0.0, 0.0, "params")
        assert_tuple_close(state, s0, 0.0, 0.0, "state")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available FM kernel backend module (Cython first); AFM's kernel tests have
    their own fixture, ``afm_backend``."""
    return get_backend(request.param)
