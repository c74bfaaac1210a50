"""Contract tests of the AFM kernels (AFM section of ``afmfast.kernels.api``), run against
every backend whose module ``afmfast._afm_<backend>`` imports: finite-difference
gradient checks of ``afm_step`` (every activation, attention on/off, dropout on/off,
l2 terms, freeze_fm), agreement with ``reference.afm_step`` for every optimiser over
several steps (float64 and float32, optimiser state included), bit-identical determinism
across runs and thread counts, ``afm_predict``/``afm_explain`` against the reference, and
agreement between backends."""
import numpy as np
import pytest
from helpers import contract
from helpers.problems import (
    OPTIMIZERS,
    STABLE_LR,
    batch_nnz,
    batch_pairs,
    copy_tuple,
    make_afm_problem,
    with_unseen_ids,
)

from afmfast.kernels import api
from afmfast.kernels import reference as ref
from afmfast.kernels.backends import available_backends, get_backend
from afmfast.demo import frappe_like

AFM_BACKENDS = available_backends("afm")
pytestmark = pytest.mark.skipif(not AFM_BACKENDS, reason="no AFM kernel backend imports")

ACTIVATIONS = {"relu": api.RELU, "sigmoid": api.SIGMOID, "tanh": api.TANH,
               "identity": api.IDENTITY}


@pytest.fixture(params=AFM_BACKENDS or ["none"])
def afm_backend(request):
    """Each available AFM kernel backend module (Cython first); named apart from
    conftest's ``backend``, which gives the FM modules."""
    return get_backend(request.param, model="afm")


def make_cfg(**kw):
    """AFMStepConfig with test defaults, overridden by keyword."""
    base = dict(lr=0.05, l2=0.05, l2_attention=0.1, keep_attention=0.8, keep_pooled=0.7,
                optimizer=api.ADAGRAD, attention=1, activation=api.RELU, freeze_fm=0,
                seed=7, step=0, n_threads=2)
    base.update(kw)
    return api.AFMStepConfig(**base)


def make_ws(afm_backend, X, rows, params, batch=None):
    M, k = params.V.shape
    return afm_backend.afm_workspace(batch or len(rows), max(1, batch_nnz(X, rows)),
                                 max(1, batch_pairs(X, rows)), M, k, params.W.shape[0],
                                 params.V.dtype)


def _touched(X, rows, M):
    mask = np.zeros(M, bool)
    mask[ref._batch_rows(X, rows)[1]] = True
    return mask


# --------------------------------------------------------------------------- gradients

GRAD_CASES = (
    [(1, act, keep, 0) for act in ACTIVATIONS for keep in (1.0, 0.6)]
    + [(0, "relu", 1.0, 0), (0, "relu", 0.6, 0)]
    + [(1, "tanh", 0.6, 1), (0, "sigmoid", 0.6, 1)]
)


@pytest.mark.parametrize("attention,activation,keep,freeze_fm", GRAD_CASES)
def test_gradient_matches_finite_differences(afm_backend, attention, activation, keep,
                                             freeze_fm):
    rng = np.random.default_rng(11)
    M, k, t = 24, 4, 3
    X, y, params = make_afm_problem(rng, 6, M, k, t, [0, 1, 2, 10, 40, 3])
    # Duplicate rows in the batch, the empty row and the one-nonzero row among them.
    rows = np.array([3, 1, 4, 0, 4, 2, 5, 1], dtype=np.int64)
    cfg = make_cfg(lr=1.0, l2=0.3, l2_attention=0.2, keep_attention=keep,
                   keep_pooled=min(1.0, keep + 0.1), optimizer=api.SGD,
                   attention=attention, activation=ACTIVATIONS[activation],
                   freeze_fm=freeze_fm, seed=123, step=5)
    new = copy_tuple(params)
    state = api.new_opt_state(new, api.SGD)
    state_before = copy_tuple(state)
    loss = afm_backend.afm_step(X, y, rows, new, state, cfg, make_ws(afm_backend, X, rows, params))
    assert loss == pytest.approx(ref.afm_loss(X, y, rows, params, cfg), rel=1e-12)
    assert all(np.array_equal(a, b) for a, b in zip(state, state_before))  # SGD: no state

    k_, t_ = k, t
    trained = np.ones(1 + k_ + 2 * t_, bool)  # dense = [w0, p, b, h]
    if freeze_fm:
        trained[0] = False
    if not attention:
        trained[1 + k_:] = False
    for name in ("V", "w", "W", "dense"):
        p = getattr(params, name)
        grad = p - getattr(new, name)  # SGD with lr = 1: old - new is the gradient
        if (name in ("V", "w") and freeze_fm) or (name == "W" and not attention):
            assert np.array_equal(getattr(new, name), p), name
            continue
        fd = contract.finite_differences(lambda q: ref.afm_loss(X, y, rows, q, cfg), params,
                                         name)
        if name == "dense":
            assert np.array_equal(new.dense[~trained], p[~trained])
            grad, fd = grad[trained], fd[trained]
        np.testing.assert_allclose(grad, fd, rtol=1e-6,
                                   atol=1e-7 * max(1.0, np.abs(fd).max()), err_msg=name)
        if name in ("V", "w"):
            # Lazy update: rows the batch does not touch stay bit-identical.
            touched = _touched(X, rows, M)
            assert np.array_equal(getattr(new, name)[~touched], p[~touched])
            assert 0 < touched.sum() < M


def test_step_loss_and_untouched_state(afm_backend):
    """attention off / freeze_fm leave the unused parameters and their Adagrad state
    bit-identical; the returned loss is the reference's for every configuration."""
    rng = np.random.default_rng(12)
    M, k, t = 30, 5, 4
    X, y, params = make_afm_problem(rng, 20, M, k, t, [3, 0, 7, 2, 12, 1])
    rows = np.arange(20, dtype=np.int64)[::-1].copy()
    for attention, freeze_fm in ((0, 0), (1, 1), (0, 1)):
        cfg = make_cfg(attention=attention, freeze_fm=freeze_fm, step=3)
        new = copy_tuple(params)
        state = api.new_opt_state(new, api.ADAGRAD)
        before = copy_tuple(state)
        loss = afm_backend.afm_step(X, y, rows, new, state, cfg,
                                make_ws(afm_backend, X, rows, params))
        assert loss == pytest.approx(ref.afm_loss(X, y, rows, params, cfg), rel=1e-12)
        frozen = [] if attention else ["W"]
        if freeze_fm:
            frozen += ["V", "w"]
        for name in frozen:
            assert np.array_equal(getattr(new, name), getattr(params, name)), name
            assert np.array_equal(getattr(state, name), getattr(before, name)), name
        idx = np.zeros(1 + k + 2 * t, bool)
        idx[0] = bool(freeze_fm)
        idx[1 + k:] = not attention
        assert np.array_equal(new.dense[idx], params.dense[idx])
        assert np.array_equal(state.dense[:, idx], before.dense[:, idx])
        assert not np.array_equal(new.dense[~idx], params.dense[~idx])


# --------------------------------------------------------------- reference, all optimisers

VARIANTS = {
    "attention-dropout": dict(attention=1, activation=api.RELU, keep_attention=0.8,
                              keep_pooled=0.7),
    "no-attention": dict(attention=0, keep_attention=1.0, keep_pooled=1.0),
    "freeze-tanh": dict(attention=1, activation=api.TANH, freeze_fm=1,
                        keep_attention=1.0, keep_pooled=0.8),
    # the estimators' default l2 = 0, where the kernels skip the l2 terms
    "no-l2": dict(attention=1, activation=api.RELU, keep_attention=1.0, keep_pooled=0.5,
                  l2=0.0),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_steps_match_reference(afm_backend, dtype, opt, variant):
    rng = np.random.default_rng(3)
    M, k, t, B = 40, 5, 6, 24
    X, y, params = make_afm_problem(rng, 120, M, k, t, [0, 1, 2, 5, 10, 3, 7],
                                    dtype=dtype, v_scale=0.3)
    code = OPTIMIZERS[opt]
    state = api.new_opt_state(params, code)
    ws = afm_backend.afm_workspace(B, B * 10, B * 45, M, k, t, dtype)
    contract.check_steps_match_reference(
        afm_backend.afm_step, ref.afm_step, X, y, params, state, ws, rng.permutation(120), B,
        lambda step: make_cfg(lr=STABLE_LR[code], optimizer=code, step=step, seed=99,
                              **VARIANTS[variant]),
        tol32=(1e-4, 1e-5))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_float32_step_matches_reference(afm_backend, opt):
    """One float32 step with non-trivial optimiser state, k = t = 16 (the vectorised
    paths), against the float64 reference started from the same values."""
    rng = np.random.default_rng(5)
    M, k, t = 60, 16, 16
    X, y, params = make_afm_problem(rng, 60, M, k, t, [1, 2, 5, 10, 3, 9],
                                    dtype=np.float32, v_scale=0.3)
    code = OPTIMIZERS[opt]
    state = api.new_opt_state(params, code)
    for s in state:
        s[:] = rng.uniform(0.1, 1.0, size=s.shape)
    rows = rng.permutation(60)[:32].astype(np.int64)
    cfg = make_cfg(lr=STABLE_LR[code], optimizer=code, step=3)
    contract.check_one_step(afm_backend.afm_step, ref.afm_step, X, y, rows, params, state, cfg,
                            make_ws(afm_backend, X, rows, params), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- determinism

def _train(afm_backend, n_threads, attention, steps=3, dtype=np.float32):
    rng = np.random.default_rng(21)
    M, k, t, B = 300, 8, 12, 256
    X, y, params = make_afm_problem(rng, 1024, M, k, t, [1, 3, 10, 25, 6, 0, 12],
                                    dtype=dtype, v_scale=0.2)
    # Feature 0 in every row: one feature with many occurrences per batch.
    X[1][X[0][:-1][np.diff(X[0]) > 0]] = 0
    state = api.new_opt_state(params, api.ADAM)
    ws = afm_backend.afm_workspace(B, B * 25, B * 300, M, k, t, dtype)
    return contract.train_steps(afm_backend.afm_step, X, y, params, state, ws, B, steps,
                                lambda step: make_cfg(optimizer=api.ADAM, lr=0.01, step=step,
                                                      n_threads=n_threads, attention=attention,
                                                      activation=api.TANH))


@pytest.mark.parametrize("attention", [1, 0])
def test_repeated_runs_bit_identical(afm_backend, attention):
    contract.assert_bit_identical(_train(afm_backend, 2, attention),
                                  _train(afm_backend, 2, attention))


@pytest.mark.parametrize("attention", [1, 0])
def test_thread_count_does_not_change_results(afm_backend, attention):
    contract.assert_bit_identical(_train(afm_backend, 1, attention),
                                  _train(afm_backend, 2, attention))


# ----------------------------------------------------------------- predict and explain

class _Cfg:
    def __init__(self, attention, activation):
        self.attention = attention
        self.activation = activation


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("attention,activation", [(1, "relu"), (1, "sigmoid"),
                                                  (1, "identity"), (0, "relu")])
def test_predict_and_explain_match_reference(afm_backend, dtype, attention, activation):
    rng = np.random.default_rng(8)
    M, k, t, n = 30, 6, 5, 50
    X, _, params = make_afm_problem(rng, n, M, k, t, [0, 1, 2, 10, 4, 70, 3], dtype=dtype)
    X_unseen, X_kept, counts = with_unseen_ids(rng, X, M)
    act = ACTIVATIONS[activation]
    cfg = _Cfg(attention, act)
    expected = ref.afm_predict(X_kept, params, cfg)
    np.testing.assert_allclose(ref.afm_predict(X_unseen, params, cfg), expected, rtol=1e-12)
    e_indptr, e_i, e_j, e_w, e_c = ref.afm_explain(X_kept, params, cfg)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts * (counts - 1) // 2, out=indptr[1:])
    assert np.array_equal(indptr, e_indptr)
    total = int(indptr[-1])
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for n_threads in (1, 2):
        out = np.full(n, np.nan, dtype=dtype)
        afm_backend.afm_predict(X_unseen, params, attention, act, n_threads, out)
        np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol)

        i_out, j_out = np.full(total, -1, np.int64), np.full(total, -1, np.int64)
        w_out, c_out = np.full(total, np.nan, dtype), np.full(total, np.nan, dtype)
        afm_backend.afm_explain(X_unseen, params, attention, act, n_threads, indptr,
                            i_out, j_out, w_out, c_out)
        assert np.array_equal(i_out, e_i) and np.array_equal(j_out, e_j)
        assert (i_out < M).all() and (j_out < M).all()
        np.testing.assert_allclose(w_out, e_w, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(c_out, e_c, rtol=rtol, atol=rtol * np.abs(e_c).max())
        # Weights sum to 1 over each row with >= 2 known nonzeros (1 per pair when off).
        row_w = np.add.reduceat(np.r_[w_out, 0.0].astype(np.float64), indptr[:-1])
        many = counts >= 2
        if attention:
            np.testing.assert_allclose(row_w[many], 1.0, rtol=1e-5)
        else:
            assert (w_out == 1.0).all()
        # w0 + sum w x + sum of the row's contributions is the prediction.
        V, w, W, dense = (np.asarray(a, np.float64) for a in params)
        lin = np.zeros(n)
        row_of = np.repeat(np.arange(n), np.diff(X_kept[0]))
        np.add.at(lin, row_of, w[X_kept[1]] * X_kept[2])
        row_c = np.add.reduceat(np.r_[c_out, 0.0].astype(np.float64), indptr[:-1])
        row_c[~many] = 0.0
        np.testing.assert_allclose(dense[0] + lin + row_c, out, rtol=10 * rtol,
                                   atol=10 * rtol * np.abs(out).max())


def test_explain_rejects_inconsistent_pair_indptr(afm_backend):
    rng = np.random.default_rng(9)
    X, _, params = make_afm_problem(rng, 5, 10, 3, 2, [3, 4])
    indptr = np.array([0, 3, 9, 12, 18, 22], dtype=np.int64)  # row 4 has 6 pairs, not 4
    outs = [np.zeros(30, np.int64), np.zeros(30, np.int64), np.zeros(30), np.zeros(30)]
    with pytest.raises(ValueError, match="pair_indptr"):
        afm_backend.afm_explain(X, params, 1, api.RELU, 2, indptr, *outs)


# ------------------------------------------------------------------- backends agree

@pytest.mark.skipif(len(AFM_BACKENDS) < 2, reason="needs both the Cython and Numba AFM "
                    "backends")
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_backends_agree(opt):
    code = OPTIMIZERS[opt]
    runs = []
    for name in ("cython", "numba"):
        afm_backend = get_backend(name, model="afm")
        rng = np.random.default_rng(4)
        M, k, t, B = 200, 8, 8, 128
        X, y, params = make_afm_problem(rng, 512, M, k, t, [1, 2, 10, 5, 0, 20],
                                        dtype=np.float32, v_scale=0.3)
        state = api.new_opt_state(params, code)
        ws = afm_backend.afm_workspace(B, B * 20, B * 190, M, k, t, np.float32)
        runs.append(contract.train_and_predict(
            afm_backend.afm_step,
            lambda X_, p, out: afm_backend.afm_predict(X_, p, 1, api.RELU, 2, out),
            X, y, params, state, ws, B,
            lambda step: make_cfg(lr=STABLE_LR[code] / 4, optimizer=code, step=step)))
    contract.assert_runs_agree(*runs)


# ------------------------------------------------------------------- invalid batches

def test_step_rejects_invalid_batches(afm_backend):
    """Empty batch, row id outside X, feature id outside [0, M): ValueError, parameters
    and optimiser state untouched (every afm_backend)."""
    rng = np.random.default_rng(13)
    M = 15
    X, y, params = make_afm_problem(rng, 20, M, 3, 2, [4, 6])
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = make_ws(afm_backend, X, np.arange(8, dtype=np.int64), params)
    contract.check_rejects_invalid_batches(afm_backend.afm_step, X, y, params, state, ws,
                                           make_cfg(), M)


@pytest.mark.parametrize("indptr", [[0, 3, 2, 4], [0, 5, 3], [-2, 1, 4]])
def test_malformed_indptr_is_refused(afm_backend, indptr):
    """As for FM: a row of indptr that is not a range of X.indices is refused by the step,
    predict and explain of every afm_backend, never read."""
    n = len(indptr) - 1
    X = (np.array(indptr, np.int64), np.zeros(5, np.int32), np.empty(0, np.float32))
    y = np.zeros(n, np.float32)
    params = api.new_afm_params(60, 4, 3, np.random.default_rng(0))
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = afm_backend.afm_workspace(n, 3, 3, 60, 4, 3, np.float32)
    with pytest.raises(ValueError, match="not a valid CSR triple"):
        afm_backend.afm_step(X, y, np.arange(n, dtype=np.int64), params, state, make_cfg(),
                             ws)
    with pytest.raises(ValueError, match="not a valid CSR triple"):
        afm_backend.afm_predict(X, params, 1, api.RELU, 1, np.empty(n, np.float32))
    with pytest.raises(ValueError, match="not a valid CSR triple"):
        afm_backend.afm_explain(X, params, 1, api.RELU, 1, np.zeros(n + 1, np.int64),
                                *(np.empty(8, dt) for dt in (np.int64, np.int64,
                                                             np.float32, np.float32)))


# ------------------------------------------------------------- Numba workspace checks

@pytest.mark.skipif("numba" not in AFM_BACKENDS, reason="numba AFM backend unavailable")
def test_numba_workspace_errors_and_slot_reset():
    nb = get_backend("numba", model="afm")
    rng = np.random.default_rng(6)
    X, y, params = make_afm_problem(rng, 20, 15, 3, 2, [4, 6])
    state = api.new_opt_state(params, api.ADAGRAD)
    rows = np.arange(8, dtype=np.int64)
    nnz, pairs = batch_nnz(X, rows), batch_pairs(X, rows)
    before = copy_tuple(params)
    ws = nb.afm_workspace(8, nnz - 1, pairs, 15, 3, 2, np.float64)
    with pytest.raises(ValueError, match="max_batch_nnz"):
        nb.afm_step(X, y, rows, params, state, make_cfg(), ws)
    ws = nb.afm_workspace(8, nnz, pairs - 1, 15, 3, 2, np.float64)
    with pytest.raises(ValueError, match="max_batch_pairs"):
        nb.afm_step(X, y, rows, params, state, make_cfg(), ws)
    contract.assert_tuple_close(params, before, 0.0, 0.0, "params")
    ws = nb.afm_workspace(8, nnz, pairs, 15, 3, 2, np.float64)
    nb.afm_step(X, y, rows, params, state, make_cfg(), ws)
    assert (ws.slot == -1).all()
    with pytest.raises(ValueError, match="workspace"):
        nb.afm_step(X, y, np.arange(9, dtype=np.int64), params, state, make_cfg(), ws)


@pytest.mark.skipif("numba" not in AFM_BACKENDS, reason="numba AFM backend unavailable")
@pytest.mark.parametrize("k,t", [(16, 16), (13, 7), (3, 33)])
def test_numba_step_on_one_hot_rows(k, t):
    """Frappe-shaped one-hot batch (the benchmark's data) at sizes that hit the
    vectorised bodies and the remainders of the blocked products: one float64 step
    against the reference."""
    nb = get_backend("numba", model="afm")
    X, y = frappe_like(300, seed=3)
    X = (X[0], X[1], X[2].astype(np.float64))
    rng = np.random.default_rng(7)
    params = api.new_afm_params(5382, k, t, rng, dtype=np.float64)
    params.V[:] = rng.normal(0.0, 0.3, size=params.V.shape)
    state = api.new_opt_state(params, api.ADAGRAD)
    p_ref, s_ref = copy_tuple(params), copy_tuple(state)
    rows = rng.permutation(300)[:200].astype(np.int64)
    cfg = make_cfg(step=1)
    loss = nb.afm_step(X, y.astype(np.float64), rows, params, state, cfg,
                       make_ws(nb, X, rows, params))
    loss_ref = ref.afm_step(X, y.astype(np.float64), rows, p_ref, s_ref, cfg)
    assert loss == pytest.approx(loss_ref, rel=1e-9)
    contract.assert_tuple_close(params, p_ref, 1e-9, 1e-12, "params")
    contract.assert_tuple_close(state, s_ref, 1e-9, 1e-12, "state")


# ------------------------------------------------------------------- predict's work

def _distinct_pairs_of(X, rows):
    """Distinct (id_p, id_q) pairs, p < q in row order, among the rows ``rows`` of
    one-hot rows of equal length (the pairs the kernels evaluate once)."""
    indptr, indices, _ = X
    n = int(indptr[1] - indptr[0])
    ids = indices.reshape(-1, n)[rows].astype(np.int64)
    p, q = np.triu_indices(n, 1)
    return np.unique(ids[:, p] * (int(indices.max()) + 1) + ids[:, q]).size


def test_predict_does_less_attention_work_than_a_training_epoch(afm_backend):
    """Predicting the training rows evaluates the attention MLP (2 k t flops forward
    per distinct pair) for no more distinct pairs than a training epoch's forward over
    batches of 4,096 shuffled rows, which also runs twice that backward: so predict
    costs at most about a third of an epoch's attention work. Counted, not timed."""
    X, _ = frappe_like(20000, seed=3)
    params = api.new_afm_params(int(X[1].max()) + 1, 4, 4, np.random.default_rng(0))
    out = np.empty(20000, np.float32)
    evaluated = afm_backend.afm_predict(X, params, 1, api.RELU, 2, out)
    order = api.shuffled_rows_reference(20000, 2016, 1)
    epoch = sum(_distinct_pairs_of(X, order[s:s + 4096]) for s in range(0, 20000, 4096))
    assert 0 < evaluated <= epoch
    assert afm_backend.afm_predict(X, params, 0, api.RELU, 2, out) == 0  # no attention


@pytest.mark.parametrize("k", [16, 64, 256])
def test_predict_chunks_hold_at_least_a_training_batch(k):
    """Pairs recur more in larger chunks: on rows shaped like Frappe's (10 nonzeros)
    predict's chunks are at least the default batch of 4,096 rows at every k."""
    indptr = np.arange(0, 10 * 50000 + 1, 10, dtype=np.int64)
    rows, nnz, pairs = api.predict_chunks(indptr, k)
    assert rows >= 4096 and nnz == 10 * rows and pairs == 45 * rows


def test_predict_is_identical_for_any_thread_count_over_several_chunks(afm_backend):
    """Rows of several chunks, repeated pairs, unseen ids: the scores are bit-identical
    on 1 and 2 threads."""
    X, _ = frappe_like(3 * api.PREDICT_ROWS // 2, seed=5)
    indices = X[1].copy()
    indices[::17] = indices.max() + 5   # unseen: forms no pairs
    X = (X[0], indices, X[2])
    params = api.new_afm_params(int(X[1].max()), 8, 6, np.random.default_rng(1))
    outs = []
    for n_threads in (1, 2):
        outs.append(np.empty(len(X[0]) - 1, np.float32))
        afm_backend.afm_predict(X, params, 1, api.SIGMOID, n_threads, outs[-1])
    assert np.isfinite(outs[0]).all() and np.array_equal(outs[0], outs[1])
