"""The checks that the FM and AFM kernel contract tests (``tests/kernels/``) share: the
``check_*`` / ``assert_*`` helpers hold the assertions, each taking the backend's step
function."""
import time

import numpy as np
import pytest

from helpers.problems import cast_tuple, copy_tuple


def finite_differences(loss, params, name, eps=1e-6):
    """Central differences of ``loss(params)`` with respect to each entry of the array
    ``name`` of ``params`` (a namedtuple of arrays, left unchanged)."""
    p = getattr(params, name)
    fd = np.zeros(p.shape)
    for idx in np.ndindex(p.shape):
        plus, minus = copy_tuple(params), copy_tuple(params)
        getattr(plus, name)[idx] += eps
        getattr(minus, name)[idx] -= eps
        fd[idx] = (loss(plus) - loss(minus)) / (2 * eps)
    return fd


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
