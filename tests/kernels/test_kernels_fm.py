"""Contract tests of the FM kernels (``afmfast.kernels.api``), run against every backend
that imports here (``backend`` fixture): finite-difference gradient checks, agreement
with the float64 reference for every optimiser over several steps, bit-identical
determinism across runs and thread counts, predict, and agreement between backends.
The Numba helpers shared with the AFM kernel (dropout hash, optimiser update) are
checked directly at the end."""
import numpy as np
import pytest
from helpers import contract
from helpers.backends import BACKENDS
from helpers.problems import (
    OPTIMIZERS,
    STABLE_LR,
    batch_nnz,
    copy_tuple,
    make_cfg,
    make_problem,
    with_unseen_ids,
)

from afmfast.kernels import api
from afmfast.kernels import reference as ref
from afmfast.kernels.backends import get_backend


def _run_step(backend, X, y, rows, params, state, cfg):
    ws = backend.fm_workspace(len(rows), max(1, batch_nnz(X, rows)), params.V.shape[0],
                              params.V.shape[1], params.V.dtype)
    return backend.fm_step(X, y, rows, params, state, cfg, ws)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("batch_norm", [0, 1])
@pytest.mark.parametrize("keep", [1.0, 0.7])
def test_gradient_matches_finite_differences(backend, batch_norm, keep):
    rng = np.random.default_rng(11)
    M, k = 25, 4
    X, y, params = make_problem(rng, 6, M, k, [0, 1, 2, 10, 40, 3])
    # Duplicate rows in the batch, and the empty row among them.
    rows = np.array([3, 1, 4, 0, 4, 2, 5, 1], dtype=np.int64)
    cfg = make_cfg(lr=1.0, l2=0.3, keep=keep, optimizer=api.SGD, batch_norm=batch_norm,
                   seed=123, step=5)
    ref_loss = ref.fm_loss(X, y, rows, params, cfg)

    new = copy_tuple(params)
    state = api.new_opt_state(new, api.SGD)
    loss = _run_step(backend, X, y, rows, new, state, cfg)
    assert loss == pytest.approx(ref_loss, rel=1e-12)

    for name in ("V", "w", "dense"):
        p = getattr(params, name)
        fd = contract.finite_differences(lambda q: ref.fm_loss(X, y, rows, q, cfg), params,
                                         name)
        grad = p - getattr(new, name)  # SGD with lr = 1: old - new is the gradient
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * max(1.0, np.abs(fd).max()),
                                   err_msg=name)
        if name != "dense":
            # Lazy update: rows the batch does not touch stay bit-identical.
            touched = np.zeros(M, bool)
            touched[ref._batch_rows(X, rows)[1]] = True
            assert np.array_equal(getattr(new, name)[~touched], p[~touched])
            assert touched.sum() < M
    if batch_norm:
        assert not np.array_equal(new.bn_stats, params.bn_stats)
    else:
        assert np.array_equal(new.bn_stats, params.bn_stats)


# --------------------------------------------------------------- reference, all optimisers

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("batch_norm,keep,l2", [(1, 0.7, 0.05), (0, 1.0, 0.05), (1, 0.7, 0.0)])
def test_steps_match_reference(backend, dtype, opt, batch_norm, keep, l2):
    """l2 = 0 is the estimators' default, where the kernels skip the l2 terms."""
    rng = np.random.default_rng(3)
    M, k, B = 40, 5, 24
    X, y, params = make_problem(rng, 120, M, k, [0, 1, 2, 5, 10, 3, 7], dtype=dtype)
    code = OPTIMIZERS[opt]
    state = api.new_opt_state(params, code)
    ws = backend.fm_workspace(B, B * 10, M, k, dtype)
    contract.check_steps_match_reference(
        backend.fm_step, ref.fm_step, X, y, params, state, ws, rng.permutation(120), B,
        lambda step: make_cfg(lr=STABLE_LR[code], optimizer=code, batch_norm=batch_norm,
                              keep=keep, step=step, seed=99, l2=l2),
        tol32=(1e-5, 1e-6))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch_norm,keep", [(1, 0.7), (0, 1.0)])
def test_batch_over_output_chunks_matches_reference(backend, dtype, batch_norm, keep):
    """A batch of several of the Cython output pass's chunks (32 rows) and a short last
    one, k with a partial 16-column block: each row's prediction and residual as the
    reference's."""
    rng = np.random.default_rng(8)
    M, k, B = 50, 20, 77
    X, y, params = make_problem(rng, 400, M, k, [0, 1, 2, 5, 9, 3], dtype=dtype)
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = backend.fm_workspace(B, B * 9, M, k, dtype)
    contract.check_steps_match_reference(
        backend.fm_step, ref.fm_step, X, y, params, state, ws, rng.permutation(400), B,
        lambda step: make_cfg(lr=STABLE_LR[api.ADAGRAD], optimizer=api.ADAGRAD,
                              batch_norm=batch_norm, keep=keep, step=step, seed=5),
        tol32=(1e-5, 1e-6))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_float32_step_matches_reference(backend, opt):
    """One float32 step against the float64 reference started from the same values."""
    rng = np.random.default_rng(5)
    M, k = 40, 6
    X, y, params = make_problem(rng, 60, M, k, [1, 2, 5, 10, 3], dtype=np.float32)
    code = OPTIMIZERS[opt]
    state = api.new_opt_state(params, code)
    # Non-trivial optimiser state, as after a few steps.
    state.V[:] = rng.uniform(0.1, 1.0, size=state.V.shape)
    state.w[:] = rng.uniform(0.1, 1.0, size=state.w.shape)
    state.dense[:] = rng.uniform(0.1, 1.0, size=state.dense.shape)
    rows = rng.permutation(60)[:32].astype(np.int64)
    cfg = make_cfg(lr=STABLE_LR[code], optimizer=code, step=3)
    ws = backend.fm_workspace(32, batch_nnz(X, rows), M, k, np.float32)
    contract.check_one_step(backend.fm_step, ref.fm_step, X, y, rows, params, state, cfg, ws,
                            rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- determinism

def _train(backend, n_threads, dtype=np.float32, steps=4):
    rng = np.random.default_rng(21)
    M, k, B = 300, 8, 256
    # Feature 0 in every row: one feature with many occurrences per batch.
    X, y, params = make_problem(rng, 1024, M, k, [1, 3, 10, 25, 6, 0, 12], dtype=dtype)
    X[1][X[0][:-1][np.diff(X[0]) > 0]] = 0
    state = api.new_opt_state(params, api.ADAM)
    ws = backend.fm_workspace(B, B * 25, M, k, dtype)
    return contract.train_steps(backend.fm_step, X, y, params, state, ws, B, steps,
                                lambda step: make_cfg(optimizer=api.ADAM, lr=0.01, step=step,
                                                      n_threads=n_threads))


def test_repeated_runs_bit_identical(backend):
    contract.assert_bit_identical(_train(backend, 2), _train(backend, 2))


def test_thread_count_does_not_change_results(backend):
    contract.assert_bit_identical(_train(backend, 1), _train(backend, 2))


def test_row_width_of_kernel_x_keeps_the_bits(backend):
    """Every backend takes a KernelX (Dataset.X); a kernel that finds rows by their
    row_width trains as one that reads indptr."""
    def run(as_kernel_x):
        X, y, params = make_problem(np.random.default_rng(4), 512, 200, 8, [5],
                                    dtype=np.float32)
        if as_kernel_x:
            X = api.KernelX(*X, row_width=5)
        state = api.new_opt_state(params, api.ADAGRAD)
        ws = backend.fm_workspace(128, 128 * 5, 200, 8, np.float32)
        return contract.train_steps(backend.fm_step, X, y, params, state, ws, 128, 3,
                                    lambda step: make_cfg(step=step, n_threads=2))
    contract.assert_bit_identical(run(False), run(True))


# ----------------------------------------------------------------------------- predict

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch_norm", [0, 1])
def test_predict_matches_reference(backend, dtype, batch_norm):
    rng = np.random.default_rng(8)
    M, k = 30, 4
    X, _, params = make_problem(rng, 50, M, k, [0, 1, 2, 10, 4], dtype=dtype)
    # Ids >= M (features unseen in training) must contribute nothing.
    X_unseen, X_kept, _ = with_unseen_ids(rng, X, M)
    expected = ref.fm_predict(X_kept, params, batch_norm)
    np.testing.assert_allclose(ref.fm_predict(X_unseen, params, batch_norm), expected,
                               rtol=1e-12)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for n_threads in (1, 2):
        out = np.full(50, np.nan, dtype=dtype)
        backend.fm_predict(X_unseen, params, batch_norm, n_threads, out)
        np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol)


# ------------------------------------------------------------------- backends agree

@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both the Cython and Numba backends")
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_backends_agree(opt):
    code = OPTIMIZERS[opt]
    runs = []
    for name in ("cython", "numba"):
        backend = get_backend(name)
        rng = np.random.default_rng(4)
        M, k, B = 200, 8, 128
        X, y, params = make_problem(rng, 512, M, k, [1, 2, 10, 5, 0, 20], dtype=np.float32)
        state = api.new_opt_state(params, code)
        ws = backend.fm_workspace(B, B * 20, M, k, np.float32)
        runs.append(contract.train_and_predict(
            backend.fm_step, lambda X_, p, out: backend.fm_predict(X_, p, 1, 2, out),
            X, y, params, state, ws, B,
            lambda step: make_cfg(lr=STABLE_LR[code] / 4, optimizer=code, step=step)))
    contract.assert_runs_agree(*runs)


# ------------------------------------------------------------------- invalid batches

def test_step_rejects_invalid_batches(backend):
    """The FM step validates its batch as the AFM step does (``helpers.contract``'s check): bad
    row or feature ids and empty batches raise, nothing is modified."""
    X, y, params = make_problem(np.random.default_rng(13), 20, 15, 3, [4, 6])
    ws = backend.fm_workspace(8, batch_nnz(X, np.arange(8)), 15, 3, np.float64)
    contract.check_rejects_invalid_batches(backend.fm_step, X, y, params,
                                           api.new_opt_state(params, api.ADAGRAD), ws,
                                           make_cfg(), 15)


@pytest.mark.parametrize("indptr", [[0, 3, 2, 4], [0, 5, 3], [-2, 1, 4]])
def test_malformed_indptr_is_refused(backend, indptr):
    """Every backend refuses an indptr whose rows are not ranges of X.indices (a row
    running backwards, past indptr[-1], or before 0), in a step and in predict, instead
    of reading outside X or copying past its workspace."""
    n = len(indptr) - 1
    X = (np.array(indptr, np.int64), np.zeros(5, np.int32), np.empty(0, np.float32))
    y = np.zeros(n, np.float32)
    params = api.new_fm_params(60, 4, np.random.default_rng(0))
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = backend.fm_workspace(n, 3, 60, 4, np.float32)
    with pytest.raises(ValueError, match="not a valid CSR triple"):
        backend.fm_step(X, y, np.arange(n, dtype=np.int64), params, state, make_cfg(), ws)
    with pytest.raises(ValueError, match="not a valid CSR triple"):
        backend.fm_predict(X, params, 1, 1, np.empty(n, np.float32))


# ------------------------------------------------------- Numba helpers (AFM reuses them)

@pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend unavailable")
def test_numba_dropout_hash_matches_kernel_api():
    from afmfast.kernels.numba.common import fill_dropout_mask

    rng = np.random.default_rng(0)
    rows = np.r_[0, 1, rng.integers(0, 2**40, size=60)].astype(np.int64)
    for seed in (0, 1, 12345, 2**63 + 5, 2**64 - 1):
        for step in (0, 7, 2**33 + 1):
            for keep in (0.05, 0.5, 0.7, 0.999):
                for stream in (0, 1):
                    out = np.zeros((rows.size, 13), dtype=np.bool_)
                    fill_dropout_mask(np.uint64(seed), np.uint64(stream), np.uint64(step),
                                      rows, np.uint64(api.dropout_threshold(keep)), out)
                    expected = api.dropout_mask(seed, stream, step, rows, 13, keep)
                    assert np.array_equal(out, expected), (seed, step, keep, stream)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.7, 0.95])
def test_dropout_mask_rates_and_independence(keep):
    """kernels.api's mask (the one every backend reproduces) keeps units at rate keep,
    independently across units, rows (consecutive ids too) and steps: rates, pair
    agreement and unit-to-unit correlation within a few standard errors."""
    rows = np.arange(20_000, dtype=np.int64)
    a = api.dropout_mask(7, 0, 3, rows, 64, keep)
    b = api.dropout_mask(7, 0, 4, rows, 64, keep)  # next step, same rows
    c = api.dropout_mask(7, 1, 3, rows, 64, keep)  # other stream
    n = a.size
    se = np.sqrt(keep * (1 - keep) / n)
    for m in (a, b, c):
        assert abs(m.mean() - keep) < 5 * se
    both = keep * keep  # rate at which two independent masks both keep a unit
    se2 = np.sqrt(both * (1 - both) / n)
    for u, v in ((a, b), (a, c), (a[1:], a[:-1]), (a[:, 1:], a[:, :-1])):
        assert abs((u & v).mean() - both) < 5 * se2
    per_unit = a.mean(axis=0)  # no unit is favoured
    assert np.all(np.abs(per_unit - keep) < 5 * np.sqrt(keep * (1 - keep) / rows.size))


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend unavailable")
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_numba_optimizer_helpers_match_reference(opt):
    from afmfast.kernels.numba.common import effective_lr, opt_row, opt_scalar

    code = OPTIMIZERS[opt]
    rng = np.random.default_rng(2)
    p, g = rng.normal(size=9), rng.normal(size=9)
    st = np.abs(rng.normal(size=(2, 9))) + 0.1
    cfg = make_cfg(lr=0.03, optimizer=code, step=4)
    p_ref, st_ref = p.copy(), st.copy()
    ref._apply(p_ref, g, st_ref, cfg)
    p_row, st_row = p.copy(), st.copy()
    opt_row(p_row, g, st_row[0], st_row[1], code, effective_lr(code, 0.03, 4))
    np.testing.assert_allclose(p_row, p_ref, rtol=1e-14)
    np.testing.assert_allclose(st_row, st_ref, rtol=1e-14)
    for i in range(9):
        pi, s0, s1 = opt_scalar(p[i], g[i], st[0, i], st[1, i], code, 0.03, 4)
        assert pi == pytest.approx(p_ref[i], rel=1e-14)
        assert (s0, s1) == pytest.approx((st_ref[0, i], st_ref[1, i]), rel=1e-14)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba backend unavailable")
def test_numba_workspace_errors_and_slot_reset():
    nb = get_backend("numba")
    rng = np.random.default_rng(6)
    X, y, params = make_problem(rng, 20, 15, 3, [4, 6])
    state = api.new_opt_state(params, api.ADAGRAD)
    rows = np.arange(8, dtype=np.int64)
    ws = nb.fm_workspace(8, batch_nnz(X, rows) - 1, 15, 3, np.float64)
    before = copy_tuple(params)
    with pytest.raises(ValueError, match="max_batch_nnz"):
        nb.fm_step(X, y, rows, params, state, make_cfg(), ws)
    contract.assert_tuple_close(params, before, 0.0, 0.0, "params")
    ws = nb.fm_workspace(8, batch_nnz(X, rows), 15, 3, np.float64)
    nb.fm_step(X, y, rows, params, state, make_cfg(), ws)
    assert (ws.slot == -1).all()
    with pytest.raises(ValueError, match="workspace"):
        nb.fm_step(X, y, np.arange(9, dtype=np.int64), params, state, make_cfg(), ws)
    with pytest.raises(ValueError, match="workspace"):
        nb.fm_step(X, y, np.arange(0, dtype=np.int64), params, state, make_cfg(), ws)


def test_initial_parameters_are_drawn_in_chunks_without_changing_them(monkeypatch):
    # V (and AFM's W) are filled NORMAL_CHUNK draws at a time, so that a large table
    # needs no float64 copy of itself; the values are those of one rng.normal call
    from afmfast.kernels import api
    monkeypatch.setattr(api, "NORMAL_CHUNK", 7)
    M, k, t = 50, 5, 3
    rng = np.random.default_rng(11)
    V = rng.normal(0.0, 0.01, size=(M, k))
    W = rng.normal(0.0, np.sqrt(2.0 / (t + k)), size=(t, k))
    for dtype in (np.float32, np.float64):
        fm = api.new_fm_params(M, k, np.random.default_rng(11), dtype)
        afm = api.new_afm_params(M, k, t, np.random.default_rng(11), dtype)
        assert np.array_equal(fm.V, V.astype(dtype)) and np.array_equal(afm.V, fm.V)
        assert np.array_equal(afm.W, W.astype(dtype))
