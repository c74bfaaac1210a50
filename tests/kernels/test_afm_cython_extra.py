"""Tests of the Cython AFM kernels (``afmfast._afm_cython``) beyond the shared contract
tests: gradients against ``afmfast.kernels.reference`` through an SGD step with lr = 1 (float64),
full steps for every optimiser, predict and explain, the GEMM routine, the dropout hash,
thread-count determinism (bit for bit) and error paths."""
import numpy as np
import pytest
from helpers.backends import compiled_module
from helpers.contract import assert_bit_identical, check_phase_times, train_steps
from helpers.problems import make_afm_problem

from afmfast.kernels import api
from afmfast.kernels import reference as ref

pytestmark = pytest.mark.compiled
cy = compiled_module("afmfast._afm_cython")

OPTIMIZERS = [api.ADAGRAD, api.SGD, api.MOMENTUM, api.ADAM]
ACTIVATIONS = [api.RELU, api.SIGMOID, api.TANH, api.IDENTITY]
# step sizes that keep several steps of this module's AFM problems (make_problem) stable;
# the shared contract tests use helpers.problems.STABLE_LR on theirs
AFM_PROBLEM_LR = {api.ADAGRAD: 0.02, api.SGD: 1e-3, api.MOMENTUM: 5e-4, api.ADAM: 0.02}


def make_problem(n_rows=60, n_features=50, k=12, t=10, dtype=np.float64, seed=0,
                 lengths=(0, 1, 2, 10, 40, 3, 7), v_scale=0.3):
    """Ragged rows (0, 1, 2, 10, 40 ... nonzeros), real signed values, duplicate ids
    (the last id of a row repeats its first), non-trivial AFM parameters: the shared
    ``helpers.problems.make_afm_problem`` with W scaled to N(0, 0.5)."""
    X, y, p = make_afm_problem(np.random.default_rng(seed), n_rows, n_features, k, t,
                               lengths, dtype=dtype, v_scale=v_scale)
    p.W[:] *= 0.5
    return X, y, p


def copy_tuple(tup):
    return type(tup)(*(np.array(a, copy=True) for a in tup))


def cfg_for(optimizer=api.SGD, lr=1.0, keep=(0.7, 0.6), attention=1, activation=api.RELU,
            freeze_fm=0, step=3, n_threads=1, l2=0.03, l2_attention=0.05, seed=11):
    return api.AFMStepConfig(lr=lr, l2=l2, l2_attention=l2_attention,
                             keep_attention=keep[0], keep_pooled=keep[1],
                             optimizer=optimizer, attention=attention,
                             activation=activation, freeze_fm=freeze_fm, seed=seed,
                             step=step, n_threads=n_threads)


def workspace_for(X, rows, params, batch=None):
    n = np.diff(X[0])[rows]
    return cy.afm_workspace(batch or len(rows), max(int(n.sum()), 1),
                            int((n * (n - 1) // 2).sum()), params.V.shape[0],
                            params.V.shape[1], params.W.shape[0], params.V.dtype)


def assert_thread_counts_agree(run, thread_counts=(1, 2, 3)):
    """run(n_threads) returns a sequence of results (arrays, losses); every thread count
    gives the first one's, bit for bit."""
    results = [run(n_threads) for n_threads in thread_counts]
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(other, results[0]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("freeze_fm", [0, 1])
@pytest.mark.parametrize("keep", [(1.0, 1.0), (0.7, 0.6)])
@pytest.mark.parametrize("attention", [1, 0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_sgd_step_is_reference_gradient(activation, attention, keep, freeze_fm):
    X, y, params = make_problem()
    rows = np.random.default_rng(3).permutation(len(y))[:45].astype(np.int64)
    cfg = cfg_for(keep=keep, attention=attention, activation=activation,
                  freeze_fm=freeze_fm, n_threads=2)
    check_sgd_step(X, y, rows, params, cfg)


def check_sgd_step(X, y, rows, params, cfg):
    """One SGD step with lr = 1 moves every parameter by minus the reference gradient."""
    attention, freeze_fm = cfg.attention, cfg.freeze_fm
    loss_ref, touched, gV, gw, gW, g_dense = ref.afm_gradients(X, y, rows, params, cfg)
    old = copy_tuple(params)
    state = api.new_opt_state(params, api.SGD)
    loss = cy.afm_step(X, y, rows, params, state, cfg, workspace_for(X, rows, params))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-10)
    k, t = params.V.shape[1], params.W.shape[0]
    dV, dw = old.V - params.V, old.w - params.w
    untouched = np.setdiff1d(np.arange(len(params.w)), touched)
    assert not dV[untouched].any() and not dw[untouched].any()
    if freeze_fm:
        assert not dV.any() and not dw.any()
    else:
        np.testing.assert_allclose(dV[touched], gV, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dw[touched], gw, rtol=1e-9, atol=1e-12)
    d_dense = old.dense - params.dense
    lo = 1 if freeze_fm else 0
    hi = 1 + k + 2 * t if attention else 1 + k
    # a bias gradient that cancels to about 0 keeps the rounding of its largest terms:
    # the absolute tolerance follows the gradient's scale (without FMA, as in the
    # baseline build, scaled logits leave 1e-12 in such an entry)
    scale = max(1.0, float(np.abs(g_dense[lo:hi]).max(initial=0.0)))
    np.testing.assert_allclose(d_dense[lo:hi], g_dense[lo:hi], rtol=1e-9, atol=1e-12 * scale)
    assert not d_dense[:lo].any() and not d_dense[hi:].any()
    if attention:
        np.testing.assert_allclose(old.W - params.W, gW, rtol=1e-9, atol=1e-12)
    else:
        assert np.array_equal(old.W, params.W)


def row_logits(X, rows, params):
    """The attention logits h . relu(W e + b) of each row's pairs (float64)."""
    indptr, indices, values = X
    k, t = params.V.shape[1], params.W.shape[0]
    b, h = params.dense[1 + k:1 + k + t], params.dense[1 + k + t:]
    out = []
    for r in rows:
        vx = params.V[indices[indptr[r]:indptr[r + 1]]] * values[indptr[r]:indptr[r + 1], None]
        i, j = np.triu_indices(len(vx), k=1)
        out.append(np.maximum((vx[i] * vx[j]) @ params.W.T + b, 0) @ h)
    return out


def test_softmax_when_rows_logits_are_far_below_the_batchs_largest():
    """The kernel shares exp(s - the batch's largest logit) between rows; a row whose
    logits are all more than ~700 below it would underflow to 0/0 and must take its own
    maximum instead. Logits spread over thousands: the step is still the reference's."""
    X, y, params = make_problem(n_rows=60, lengths=(2, 3, 5, 4))
    params.dense[1 + 12 + 10:] *= 3000.0
    rows = np.arange(len(y), dtype=np.int64)
    peaks = [s.max() for s in row_logits(X, rows, params) if len(s)]
    assert max(peaks) - min(peaks) > 2000   # so some rows underflow against the largest
    cfg = cfg_for(keep=(1.0, 1.0), activation=api.RELU, n_threads=2)
    check_sgd_step(X, y, rows, params, cfg)


def repeated_pairs_problem(dtype=np.float64, n_rows=300, seed=4, k=12, t=10):
    """Few features and values from a small set (0 included): many rows share a pair of
    (feature, value) classes, which the kernel evaluates once per distinct pair."""
    X, y, params = make_problem(n_rows=n_rows, n_features=7, k=k, t=t, dtype=dtype,
                                seed=seed, lengths=(2, 5, 8, 3, 0, 1), v_scale=0.3)
    rng = np.random.default_rng(seed)
    X[2][:] = rng.choice(np.array([1.0, 1.0, 1.0, -0.5, 0.0]), size=X[2].shape)
    return X, y, params


@pytest.mark.parametrize("keep", [(1.0, 1.0), (0.7, 0.6)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_repeated_pairs_sgd_step_is_reference_gradient(activation, keep):
    X, y, params = repeated_pairs_problem()
    rows = np.random.default_rng(3).permutation(len(y))[:200].astype(np.int64)
    check_sgd_step(X, y, rows, params, cfg_for(keep=keep, activation=activation,
                                               n_threads=2))


@pytest.mark.parametrize("activation", [api.RELU, api.TANH])
def test_attention_wider_than_the_backward_span_is_reference_gradient(activation):
    """t = 300 > HD_SPAN (256): the distinct backward forms h act'(u) in two spans."""
    X, y, params = repeated_pairs_problem(n_rows=80, k=5, t=300)
    rows = np.arange(len(y), dtype=np.int64)
    check_sgd_step(X, y, rows, params, cfg_for(activation=activation, n_threads=2))


@pytest.mark.parametrize("optimizer", [api.SGD, api.ADAGRAD])
def test_factors_wider_than_the_update_span_match_reference(optimizer):
    """k = 300 > GRAD_SPAN (256): the feature update forms a V row's gradient and its
    optimiser step in two spans."""
    X, y, params = repeated_pairs_problem(n_rows=80, k=300, t=6)
    rows = np.arange(len(y), dtype=np.int64)
    if optimizer == api.SGD:
        check_sgd_step(X, y, rows, params, cfg_for(n_threads=2))
        return
    state = api.new_opt_state(params, optimizer)
    p_ref, s_ref = copy_tuple(params), copy_tuple(state)
    ws = workspace_for(X, rows, params)
    for step in range(2):
        cfg = cfg_for(optimizer, lr=AFM_PROBLEM_LR[optimizer], step=step, n_threads=2)
        loss = cy.afm_step(X, y, rows, params, state, cfg, ws)
        np.testing.assert_allclose(loss, ref.afm_step(X, y, rows, p_ref, s_ref, cfg),
                                   rtol=1e-9)
    for a, b in zip(params + state, p_ref + s_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def wide_rows_problem():
    """One-hot rows of 3 to 60 nonzeros over 90 features: the widest rows bring more new
    distinct pairs than a backward group's C' buffer holds (DBLOCK), so their C' is formed
    in several pieces, and narrow rows share groups around them."""
    rng = np.random.default_rng(8)
    lengths = [3, 60, 4, 5, 45, 3, 30, 58, 2, 6, 3, 50] * 3
    indices = np.concatenate([rng.choice(90, size=n, replace=False) for n in lengths])
    X = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
         indices.astype(np.int32), np.ones(len(indices)))
    y = rng.normal(size=len(lengths))
    params = api.new_afm_params(90, 6, 5, rng, dtype=np.float64)
    params.V[:] = rng.normal(0.0, 0.3, size=params.V.shape)
    params.W[:] = rng.normal(0.0, 0.5, size=params.W.shape)
    params.dense[1 + 6 + 5:] = rng.normal(0.0, 1.5, size=5)
    return X, y, params


@pytest.mark.parametrize("freeze_fm", [0, 1])
def test_rows_wider_than_a_backward_group_are_reference_gradient(freeze_fm):
    X, y, params = wide_rows_problem()
    assert 60 * 59 // 2 > cy._constants()["DBLOCK"]
    rows = np.random.default_rng(2).permutation(len(y)).astype(np.int64)
    check_sgd_step(X, y, rows, params, cfg_for(keep=(1.0, 1.0), freeze_fm=freeze_fm,
                                               n_threads=2))

    def run(n_threads):
        p, s = copy_tuple(params), api.new_opt_state(params, api.ADAGRAD)
        cy.afm_step(X, y, rows, p, s, cfg_for(api.ADAGRAD, lr=0.05, n_threads=n_threads,
                                             freeze_fm=freeze_fm),
                    workspace_for(X, rows, p))
        return p + s

    assert_thread_counts_agree(run)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_pairs_thread_count_is_bit_identical(dtype):
    def run(n_threads):
        X, y, params = repeated_pairs_problem(dtype)
        state = api.new_opt_state(params, api.ADAGRAD)
        perm = np.random.default_rng(6).permutation(len(y)).astype(np.int64)
        ws = workspace_for(X, perm, params, batch=150)
        for step in range(2):
            rows = perm[step * 150:(step + 1) * 150]
            cfg = cfg_for(api.ADAGRAD, lr=0.05, step=step, n_threads=n_threads)
            cy.afm_step(X, y, rows, params, state, cfg, ws)
        return params + state

    assert_thread_counts_agree(run)


@pytest.mark.parametrize("dtype,rtol,l2", [(np.float64, 1e-9, 0.03), (np.float32, 2e-3, 0.03),
                                           (np.float64, 1e-9, 0.0)])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_steps_match_reference(optimizer, dtype, rtol, l2):
    """Also l2 = 0 (the estimators' default), which skips the l2 terms."""
    X, y, params = make_problem(n_rows=80, k=20, t=18, dtype=dtype, v_scale=0.2)
    state = api.new_opt_state(params, optimizer)
    p_ref, s_ref = copy_tuple(params), copy_tuple(state)
    perm = np.random.default_rng(5).permutation(len(y)).astype(np.int64)
    ws = workspace_for(X, perm, params)
    for step in range(4):
        rows = perm[step * 20:(step + 1) * 20]
        cfg = cfg_for(optimizer, lr=AFM_PROBLEM_LR[optimizer], step=step, n_threads=2, l2=l2)
        loss = cy.afm_step(X, y, rows, params, state, cfg, ws)
        loss_ref = ref.afm_step(X, y, rows, p_ref, s_ref, cfg)
        np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
    # Adam's and Adagrad's normalised steps turn float32 rounding of a near-zero gradient
    # into a visible fraction of lr: the float32 comparison allows for that.
    atol = rtol * 1e-2
    if dtype == np.float32 and optimizer in (api.ADAM, api.ADAGRAD):
        atol = 0.25 * AFM_PROBLEM_LR[optimizer]
    for name in api.AFMParams._fields:
        np.testing.assert_allclose(getattr(params, name), getattr(p_ref, name), rtol=rtol,
                                   atol=atol, err_msg=name)
        np.testing.assert_allclose(getattr(state, name), getattr(s_ref, name), rtol=rtol,
                                   atol=rtol * 1e-2, err_msg=name)


@pytest.mark.parametrize("k,t", [(16, 16), (64, 64), (40, 24), (5, 3), (136, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("attention", [1, 0])
def test_thread_count_is_bit_identical(dtype, attention, k, t):
    X, y, params = make_problem(n_rows=120, k=k, t=t, dtype=dtype, v_scale=0.2)

    def run(n_threads):
        p, s = copy_tuple(params), api.new_opt_state(params, api.ADAGRAD)
        perm = np.random.default_rng(5).permutation(len(y)).astype(np.int64)
        ws = workspace_for(X, perm, p)
        losses = [cy.afm_step(X, y, perm[i * 40:(i + 1) * 40], p, s,
                              cfg_for(api.ADAGRAD, lr=0.02, step=i, n_threads=n_threads,
                                      attention=attention), ws) for i in range(3)]
        return (losses, *p, *s)

    assert_thread_counts_agree(run)


@pytest.mark.parametrize("n_rows", [3, 10, 60])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_w_gradient_chunks_are_the_reference_and_thread_count_independent(dtype, n_rows):
    """Rows of 40 nonzeros over many features: 3 rows give about 9 blocks of distinct
    pairs (9 chunks, fewer than 16 threads: columns split too), 10 rows about 29 (chunks
    of one or two blocks), 60 rows about 173 (chunks of several): the W gradient, summed
    over the chunks, is the reference's, and bit for bit the same for any thread
    count."""
    X, y, params = make_problem(n_rows=n_rows, n_features=4000, k=40, t=24, dtype=dtype,
                                lengths=(40,), v_scale=0.2)
    rows = np.arange(n_rows, dtype=np.int64)
    if dtype == np.float64:
        check_sgd_step(X, y, rows, copy_tuple(params), cfg_for(keep=(1.0, 1.0), n_threads=3))

    def run(n_threads):
        p, s = copy_tuple(params), api.new_opt_state(params, api.ADAGRAD)
        loss = cy.afm_step(X, y, rows, p, s, cfg_for(api.ADAGRAD, lr=0.02, n_threads=n_threads),
                           workspace_for(X, rows, p))
        return (loss, *p, *s)

    assert_thread_counts_agree(run, (1, 2, 3, 16))


def test_workspace_reuse_and_large_batch():
    """A workspace bigger than the batch, reused across batches, gives the same result as
    a fresh exact-size one (slot array reset, no stale scratch)."""
    X, y, params = make_problem(n_rows=90, k=16, t=16)
    perm = np.random.default_rng(1).permutation(90).astype(np.int64)
    big = workspace_for(X, perm, params)
    p1, s1 = copy_tuple(params), api.new_opt_state(params, api.ADAM)
    p2, s2 = copy_tuple(params), api.new_opt_state(params, api.ADAM)
    for i in range(3):
        rows = perm[i * 30:(i + 1) * 30]
        cfg = cfg_for(api.ADAM, lr=0.01, step=i, n_threads=2)
        l1 = cy.afm_step(X, y, rows, p1, s1, cfg, big)
        l2 = cy.afm_step(X, y, rows, p2, s2, cfg, workspace_for(X, rows, params))
        assert l1 == l2
    for a, b in zip(p1 + s1, p2 + s2):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("k", [64, 200])
def test_predict_in_several_chunks_with_repeated_pairs_matches_reference(k):
    """afm_predict runs the rows in chunks (fewer rows per chunk at large k, here several
    chunks) with the attention MLP once per distinct pair of a chunk, and keeps its
    workspace for the next call: predictions of data sets of different shapes, one after
    the other, each match the reference; negative and unseen ids form no pairs."""
    X, y, params = make_problem(n_rows=300, n_features=9, k=k, t=k, seed=8,
                                lengths=(40, 12, 0, 1, 30), v_scale=0.15)
    X[2][:] = np.random.default_rng(8).choice([1.0, 1.0, -0.5], size=X[2].shape)
    cfg = cfg_for()
    for rows in (slice(None), slice(3, 50), slice(None)):
        indptr = X[0][rows.start or 0:(rows.stop or len(y)) + 1]
        part = (indptr - indptr[0], X[1][indptr[0]:indptr[-1]].copy(),
                X[2][indptr[0]:indptr[-1]])
        part[1][::11] = -2
        part[1][5::13] = params.V.shape[0]
        out = np.empty(len(indptr) - 1)
        cy.afm_predict(part, params, 1, api.RELU, 2, out)
        np.testing.assert_allclose(out, ref.afm_predict(part, params, cfg), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("attention", [1, 0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_predict_and_explain_match_reference(activation, attention, dtype, rtol):
    X, y, params = make_problem(n_rows=40, k=17, t=9, dtype=dtype, v_scale=0.2)
    # unseen ids (>= M) form no pairs
    indices = X[1].copy()
    indices[::7] = params.V.shape[0] + 3
    X = (X[0], indices, X[2])
    cfg = cfg_for(attention=attention, activation=activation)
    out = np.empty(len(y), dtype=dtype)
    cy.afm_predict(X, params, attention, activation, 2, out)
    np.testing.assert_allclose(out, ref.afm_predict(X, params, cfg), rtol=rtol, atol=rtol)
    indptr, i, j, weight, contribution = ref.afm_explain(X, params, cfg)
    n = len(i)
    outs = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, dtype),
            np.empty(n, dtype))
    cy.afm_explain(X, params, attention, activation, 3, indptr, *outs)
    assert np.array_equal(outs[0], i) and np.array_equal(outs[1], j)
    np.testing.assert_allclose(outs[2], weight, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_allclose(outs[3], contribution, rtol=rtol, atol=rtol * 1e-3)
    for n_threads in (1, 3):
        other = np.empty_like(out)
        cy.afm_predict(X, params, attention, activation, n_threads, other)
        assert np.array_equal(other, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 16, 5), (13, 64, 33), (50, 100, 70),
                                   (25, 256, 256), (6, 7, 3), (30, 24, 9), (12, 40, 2)])
def test_gemm(dtype, M, N, K):
    rng = np.random.default_rng(0)
    A, B, C = (rng.normal(size=s).astype(dtype) for s in ((M, K), (K, N), (M, N)))
    expect = C.astype(np.float64) + A.astype(np.float64) @ B.astype(np.float64)
    out = C.copy()
    cy._gemm_for_test(A, B, out)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(out, expect, rtol=tol, atol=tol * K)
    out = C.copy()
    cy._gemm_for_test(np.ascontiguousarray(A.T), B, out, transpose_a=True)
    np.testing.assert_allclose(out, expect, rtol=tol, atol=tol * K)
    # the packed layouts change where the operands are read from, never the arithmetic
    for transpose_a in (False, True):
        a = np.ascontiguousarray(A.T) if transpose_a else A
        plain, packed = C.copy(), C.copy()
        cy._gemm_for_test(a, B, plain, transpose_a=transpose_a)
        cy._gemm_for_test(a, B, packed, transpose_a=transpose_a, packed=True)
        assert np.array_equal(plain, packed)


def test_dropout_hash_and_constants():
    rows = np.array([0, 5, 2**40, 17], dtype=np.int64)
    for keep in (0.3, 0.7, 1.0):
        for stream in (1, 2):
            assert np.array_equal(cy._dropout_mask_for_test(9, stream, 4, rows, 45, keep),
                                  api.dropout_mask(9, stream, 4, rows, 45, keep))
    c = cy._constants()
    assert (c["ADAGRAD"], c["SGD"], c["MOMENTUM"], c["ADAM"]) == \
        (api.ADAGRAD, api.SGD, api.MOMENTUM, api.ADAM)
    assert (c["RELU"], c["SIGMOID"], c["TANH"], c["IDENTITY"]) == \
        (api.RELU, api.SIGMOID, api.TANH, api.IDENTITY)


def test_errors():
    X, y, params = make_problem(n_rows=20, k=4, t=3)
    state = api.new_opt_state(params, api.SGD)
    rows = np.arange(10, dtype=np.int64)
    ws = workspace_for(X, rows, params)
    with pytest.raises(ValueError, match="not a row of X"):
        cy.afm_step(X, y, np.array([0, 99], np.int64), params, state, cfg_for(), ws)
    bad = X[1].copy()
    bad[X[0][3]] = 10**6
    with pytest.raises(ValueError, match="not a feature id"):
        cy.afm_step((X[0], bad, X[2]), y, rows, params, state, cfg_for(), ws)
    small = cy.afm_workspace(10, 1000, 1, 50, 4, 3, np.float64)
    with pytest.raises(ValueError, match="max_batch_pairs"):
        cy.afm_step(X, y, rows, params, state, cfg_for(), small)
    # pairs are numbered in int32: refused before anything is allocated
    with pytest.raises(ValueError, match="max_batch_pairs must be in"):
        cy.afm_workspace(10, 1000, 2**31, 50, 4, 3, np.float64)
    with pytest.raises(ValueError, match="keep_pooled"):
        cy.afm_step(X, y, rows, params, state, cfg_for(keep=(1.0, 0.0)), ws)
    with pytest.raises(ValueError, match="workspace"):
        cy.afm_step(X, y, rows, params, state, cfg_for(),
                    cy.afm_workspace(10, 1000, 1000, 50, 4, 3, np.float32))
    with pytest.raises(ValueError, match="activation"):
        cy.afm_predict(X, params, 1, 7, 1, np.empty(20))


def test_phase_times_cover_the_last_step():
    X, y, params = make_problem(n_rows=80, dtype=np.float32)
    rows = np.arange(len(y), dtype=np.int64)
    ws = workspace_for(X, rows, params)
    check_phase_times(cy, ws, lambda: cy.afm_step(
        X, y, rows, params, api.new_opt_state(params, api.ADAGRAD),
        cfg_for(api.ADAGRAD, n_threads=2), ws))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_batch_errors_name_the_first_offender_for_any_thread_count(n_threads):
    """As for FM: the first invalid row in batch order, whatever the thread count."""
    X, y, params = make_problem(n_rows=200, k=4, t=3)
    state = api.new_opt_state(params, api.ADAGRAD)
    rows = np.arange(150, dtype=np.int64)
    ws = workspace_for(X, rows, params)
    rows[[33, 34, 140]] = [200, -1, 7 * 10**9]
    with pytest.raises(ValueError, match=r"rows\[33\] = 200 is not a row of X"):
        cy.afm_step(X, y, rows, params, state, cfg_for(api.ADAGRAD, n_threads=n_threads), ws)


def train_rows_of(X, y, params, n_threads, batch=40, steps=3):
    params = copy_tuple(params)
    ws = workspace_for(X, np.arange(len(y)), params, batch=batch)  # room for any batch
    return train_steps(cy.afm_step, X, y, params, api.new_opt_state(params, api.ADAGRAD), ws,
                       batch, steps,
                       lambda step: cfg_for(api.ADAGRAD, step=step, n_threads=n_threads))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_row_width_gives_the_bits_of_indptr(n_threads):
    """As for FM: rows located by a KernelX's row_width train bit for bit as through
    indptr; a false width that fits indptr's ends is trusted (the ids cut into rows of
    that width), never read outside X."""
    X, y, params = make_problem(n_rows=150, lengths=(5,), dtype=np.float32)
    assert set(np.diff(X[0])) == {5}
    plain = train_rows_of(X, y, params, n_threads)
    assert_bit_identical(plain, train_rows_of(api.KernelX(*X, row_width=5), y, params,
                                              n_threads))
    ragged = (np.concatenate([[0], np.cumsum(np.tile([4, 6], 75))]).astype(np.int64),
              X[1], X[2])
    assert_bit_identical(plain, train_rows_of(api.KernelX(*ragged, row_width=5), y, params,
                                              n_threads))
    with pytest.raises(ValueError, match="X.row_width = 4 does not fit indptr"):
        train_rows_of(api.KernelX(*X, row_width=4), y, params, n_threads)


def test_malformed_indptr_is_an_error_not_a_wild_read():
    """As for FM: a row whose span ends past indptr[-1] is named, not copied."""
    X = (np.array([0, 5, 3], np.int64), np.zeros(5, np.int32), np.empty(0, np.float32))
    y = np.zeros(2, np.float32)
    _, _, params = make_problem(n_rows=4, n_features=60, k=4, t=3, dtype=np.float32)
    ws = cy.afm_workspace(2, 3, 3, 60, 4, 3, np.float32)
    with pytest.raises(ValueError, match=r"indptr\[0\]:indptr\[1\], the nonzeros of "
                                         r"rows\[0\], is not a range"):
        cy.afm_step(X, y, np.arange(2, dtype=np.int64), params,
                    api.new_opt_state(params, api.ADAGRAD), cfg_for(api.ADAGRAD), ws)


def test_scoring_refuses_a_malformed_indptr():
    """afm_predict and afm_explain read whole rows: an indptr that falls is refused."""
    _, _, params = make_problem(n_rows=4, n_features=60, k=4, t=3, dtype=np.float32)
    X = (np.array([0, 3, 2, 4], np.int64), np.zeros(4, np.int32), np.empty(0, np.float32))
    with pytest.raises(ValueError, match=r"indptr\[2\] = 2 < indptr\[1\] = 3"):
        cy.afm_predict(X, params, 1, api.RELU, 2, np.empty(3, np.float32))
    with pytest.raises(ValueError, match=r"indptr\[0\] = -1 < 0"):
        cy.afm_predict((np.array([-1, 2, 4], np.int64),) + X[1:], params, 1, api.RELU, 2,
                       np.empty(2, np.float32))
    with pytest.raises(ValueError, match=r"indptr\[2\] = 2 < indptr\[1\] = 3"):
        cy.afm_explain(X, params, 1, api.RELU, 2, np.zeros(4, np.int64),
                       np.empty(8, np.int64), np.empty(8, np.int64),
                       np.empty(8, np.float32), np.empty(8, np.float32))
