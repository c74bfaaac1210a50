"""Tests of the Cython FM kernels that the shared backend-contract tests
(test_kernels_fm.py) do not cover: its hard-coded constants, its dropout hash bit for
bit, thread-count determinism, workspace reuse and error paths, plus a quick agreement
check with ``afmfast.kernels.reference``."""
import copy

import numpy as np
import pytest
from helpers.backends import compiled_module
from helpers.contract import assert_bit_identical, check_phase_times, train_steps

from afmfast.kernels import api
from afmfast.kernels import reference as ref

pytestmark = pytest.mark.compiled
cy = compiled_module("afmfast._fm_cython")

OPTIMIZERS = [api.ADAGRAD, api.SGD, api.MOMENTUM, api.ADAM]
# step sizes that keep a few steps on the test data from diverging (losses are sums)
# step sizes that keep several steps of this module's FM problems stable; the shared
# contract tests use helpers.problems.STABLE_LR on theirs
FM_PROBLEM_LR = {api.ADAGRAD: 0.05, api.SGD: 1e-3, api.MOMENTUM: 5e-4, api.ADAM: 0.05}


def make_data(n_rows=300, n_features=60, dtype=np.float64, seed=0, max_len=7,
              spread=False):
    """Random CSR with ragged rows (some empty), repeated ids inside a row, real values.
    Ids skewed so that some features occur many times a batch, or with ``spread`` drawn
    evenly over the features (an ml-tag-like batch: most features once or twice)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, size=n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if spread:
        indices = rng.integers(0, n_features, size=indptr[-1])
    else:
        indices = (rng.pareto(1.2, size=indptr[-1]) * 5).astype(np.int64) % n_features
    indices = indices.astype(np.int32)
    values = rng.uniform(0.5, 1.5, size=indptr[-1]).astype(dtype)
    y = rng.normal(size=n_rows).astype(dtype)
    return (indptr, indices, values), y


def make_params(n_features, k, dtype, optimizer, seed=1):
    rng = np.random.default_rng(seed)
    p = api.new_fm_params(n_features, k, rng, dtype=dtype)
    # non-trivial parameters everywhere, so every gradient term matters
    p.V[:] = rng.normal(0, 0.3, size=p.V.shape)
    p.w[:] = rng.normal(0, 0.1, size=p.w.shape)
    p.dense[:] = rng.normal(0.0, 0.1, size=p.dense.shape)
    p.dense[1 : 1 + k] += 1.0  # gamma near 1, w0 and beta near 0
    p.bn_stats[0] = rng.normal(0, 0.1, size=k)
    p.bn_stats[1] = rng.uniform(0.5, 2.0, size=k)
    return p, api.new_opt_state(p, optimizer)


def clone(obj):
    return copy.deepcopy(obj)


def cfg_for(optimizer, step=0, keep=0.7, batch_norm=1, n_threads=1, lr=0.05, l2=0.01):
    return api.StepConfig(lr=lr, l2=l2, keep=keep, optimizer=optimizer,
                          batch_norm=batch_norm, seed=12345, step=step, n_threads=n_threads)


def run_steps(params, state, X, y, n_steps, batch, cfg_kw, backend=True, ws=None):
    """n_steps of fm_step (or the reference) over a fixed shuffled permutation."""
    perm = np.random.default_rng(7).permutation(len(y)).astype(np.int64)
    losses = []
    if backend and ws is None:
        ws = cy.fm_workspace(batch, batch * 8, params.V.shape[0], params.V.shape[1],
                             params.V.dtype)
    for t in range(n_steps):
        rows = perm[(t * batch) % len(y):][:batch]
        cfg = cfg_for(step=t, **cfg_kw)
        if backend:
            losses.append(cy.fm_step(X, y, rows, params, state, cfg, ws))
        else:
            losses.append(ref.fm_step(X, y, rows, params, state, cfg))
    return losses


def test_constants_match_kernel_api():
    c = cy._constants()
    for name in ("ADAGRAD", "SGD", "MOMENTUM", "ADAM", "BN_EPS", "BN_DECAY", "MOMENTUM_COEF",
                 "ADAM_BETA1", "ADAM_BETA2", "ADAM_EPS"):
        assert c[name] == getattr(api, name), name


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7, 0.999, 1.0])
@pytest.mark.parametrize("seed,step", [(0, 0), (12345, 17), (-3, 2**40), (2**64 - 1, 5)])
def test_dropout_mask_bit_for_bit(keep, seed, step):
    rows = np.array([0, 1, 2, 99, 12345, 2**40, 2**62], dtype=np.int64)
    for stream in (0, 1, 2):
        want = api.dropout_mask(seed, stream, step, rows, 67, keep)
        got = cy._dropout_mask_for_test(seed, stream, step, rows, 67, keep)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch_norm", [0, 1])
@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_sgd_lr1_update_is_reference_gradient(batch_norm, keep):
    X, y = make_data()
    params, state = make_params(60, 8, np.float64, api.SGD)
    rows = np.random.default_rng(3).permutation(len(y))[:97].astype(np.int64)
    cfg = cfg_for(api.SGD, step=4, keep=keep, batch_norm=batch_norm, lr=1.0)
    loss, touched, gV, gw, g_dense, _, _ = ref.fm_gradients(X, y, rows, params, cfg)
    old = clone(params)
    ws = cy.fm_workspace(128, 1024, 60, 8, np.float64)
    got_loss = cy.fm_step(X, y, rows, params, state, cfg, ws)
    assert got_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(old.V[touched] - params.V[touched], gV, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(old.w[touched] - params.w[touched], gw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(old.dense - params.dense, g_dense, rtol=1e-9, atol=1e-12)
    untouched = np.setdiff1d(np.arange(60), touched)
    np.testing.assert_array_equal(params.V[untouched], old.V[untouched])
    np.testing.assert_array_equal(params.w[untouched], old.w[untouched])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch_norm,keep", [(1, 0.7), (0, 1.0), (1, 1.0), (0, 0.5)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_steps_match_reference(optimizer, batch_norm, keep, dtype, rtol):
    X, y = make_data(dtype=dtype)
    p_ref, s_ref = make_params(60, 8, dtype, optimizer)
    p_cy, s_cy = clone(p_ref), clone(s_ref)
    kw = dict(optimizer=optimizer, keep=keep, batch_norm=batch_norm, lr=FM_PROBLEM_LR[optimizer])
    l_ref = run_steps(p_ref, s_ref, X, y, 4, 64, kw, backend=False)
    l_cy = run_steps(p_cy, s_cy, X, y, 4, 64, kw)
    assert np.abs(p_ref.V).max() < 10  # a diverging run would compare nothing useful
    np.testing.assert_allclose(l_cy, l_ref, rtol=rtol)
    atol = 1e-12 if dtype == np.float64 else 2e-5  # float32: ill-conditioned Adagrad steps
    for a, b in zip(p_cy + s_cy, p_ref + s_ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("k,optimizer,batch_norm,keep,l2", [
    (8, api.ADAGRAD, 1, 0.7, 0.0),     # l2 = 0, the estimators' default: l2 terms skipped
    (8, api.ADAGRAD, 0, 1.0, 0.0),
    (300, api.ADAGRAD, 0, 1.0, 0.01),  # k > GRAD_SPAN (256): gradient and optimiser step
    (300, api.ADAM, 0, 1.0, 0.01),     # in two spans
    # without batch norm or dropout the gradient reads the residual, not df: 16 columns
    # in registers, and 16 + the generic loop's 8
    (16, api.ADAGRAD, 0, 1.0, 0.0),
    (24, api.ADAM, 0, 1.0, 0.01),
    (24, api.ADAGRAD, 0, 0.7, 0.01),   # dropout alone, and batch norm alone: df is read
    (16, api.ADAGRAD, 1, 1.0, 0.0),
])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_feature_update_paths_match_reference(k, optimizer, batch_norm, keep, l2, n_threads):
    X, y = make_data()
    p_ref, s_ref = make_params(60, k, np.float64, optimizer)
    p_cy, s_cy = clone(p_ref), clone(s_ref)
    kw = dict(optimizer=optimizer, keep=keep, batch_norm=batch_norm,
              lr=FM_PROBLEM_LR[optimizer], l2=l2)
    l_ref = run_steps(p_ref, s_ref, X, y, 3, 64, kw, backend=False)
    l_cy = run_steps(p_cy, s_cy, X, y, 3, 64, dict(kw, n_threads=n_threads))
    np.testing.assert_allclose(l_cy, l_ref, rtol=1e-9)
    for a, b in zip(p_cy + s_cy, p_ref + s_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k,batch_norm,keep", [(16, 0, 1.0), (24, 0, 1.0), (16, 1, 0.7)])
def test_spread_batches_match_reference(k, batch_norm, keep):
    """Batches whose features occur about once each (ml-tag-like), on two threads: the
    feature updates' prefetch of the rows of the occurrences ahead (OCC_PREFETCH) then
    reaches across many features, and must leave the arithmetic as it is."""
    X, y = make_data(n_rows=600, n_features=5000, max_len=3, spread=True)
    assert X[0][-1] / len(np.unique(X[1])) < 2  # occurrences per feature, all rows
    rows_per_batch = 200
    p_ref, s_ref = make_params(5000, k, np.float64, api.ADAGRAD)
    p_cy, s_cy = clone(p_ref), clone(s_ref)
    kw = dict(optimizer=api.ADAGRAD, keep=keep, batch_norm=batch_norm, lr=0.05, l2=0.01)
    l_ref = run_steps(p_ref, s_ref, X, y, 3, rows_per_batch, kw, backend=False)
    l_cy = run_steps(p_cy, s_cy, X, y, 3, rows_per_batch, dict(kw, n_threads=2))
    np.testing.assert_allclose(l_cy, l_ref, rtol=1e-9)
    for a, b in zip(p_cy + s_cy, p_ref + s_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch_norm", [0, 1])
def test_predict_matches_reference_and_skips_unknown_ids(dtype, batch_norm):
    (indptr, indices, values), _ = make_data(n_features=80, dtype=dtype, seed=5)
    params, _ = make_params(60, 8, dtype, api.ADAGRAD)  # ids 60..79 are unknown
    assert (indices >= 60).any()
    X = (indptr, indices, values)
    want = ref.fm_predict(X, params, batch_norm)
    for n_threads in (1, 2, 3):
        out = np.full(len(indptr) - 1, np.nan, dtype=dtype)
        cy.fm_predict(X, params, batch_norm, n_threads, out)
        rtol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(out, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch_norm,keep", [(1, 0.7), (0, 1.0)])
@pytest.mark.parametrize("spread", [False, True])
def test_float32_bit_identical_for_1_2_3_threads(optimizer, batch_norm, keep, spread):
    # spread: features about once each a batch, where the prefetch of the rows of the
    # occurrences ahead (OCC_PREFETCH, several threads) reaches across many features
    n_features = 20000 if spread else 300
    X, y = make_data(n_rows=2000, n_features=n_features, dtype=np.float32,
                     max_len=3 if spread else 12, spread=spread)
    base = make_params(n_features, 16, np.float32, optimizer)
    results = []
    for n_threads in (1, 2, 3):
        params, state = clone(base)
        kw = dict(optimizer=optimizer, keep=keep, batch_norm=batch_norm, n_threads=n_threads,
                  lr=FM_PROBLEM_LR[optimizer] / 10)  # batches 8x larger than FM_PROBLEM_LR's
        losses = run_steps(params, state, X, y, 5, 500, kw)
        out = np.empty(len(y), np.float32)
        cy.fm_predict(X, params, batch_norm, n_threads, out)
        results.append((losses, params + state, out))
    assert np.isfinite(results[0][0]).all() and np.isfinite(results[0][2]).all()
    for losses, arrays, out in results[1:]:
        assert losses == results[0][0]
        for a, b in zip(arrays, results[0][1]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(out, results[0][2])


def test_workspace_reused_across_batches_and_after_errors():
    X, y = make_data()
    params, state = make_params(60, 8, np.float64, api.ADAGRAD)
    p2, s2 = clone(params), clone(state)
    ws = cy.fm_workspace(64, 512, 60, 8, np.float64)
    # A failing step (bad feature id mid-batch) must leave the workspace usable.
    bad_indices = X[1].copy()
    bad_row = next(r for r in range(170, 200) if X[0][r + 1] > X[0][r])
    bad_indices[X[0][bad_row + 1] - 1] = 60
    with pytest.raises(ValueError, match="feature id"):
        cy.fm_step((X[0], bad_indices, X[2]), y, np.arange(140, 200, dtype=np.int64),
                   params, state, cfg_for(api.ADAGRAD), ws)
    for a, b in zip(params + state, p2 + s2):
        np.testing.assert_array_equal(a, b)  # nothing was mutated
    l_ws = run_steps(params, state, X, y, 6, 64, dict(optimizer=api.ADAGRAD), ws=ws)
    l_new = [0.0] * 6
    perm = np.random.default_rng(7).permutation(len(y)).astype(np.int64)
    for t in range(6):  # a fresh workspace every step gives the same bits
        ws_t = cy.fm_workspace(64, 512, 60, 8, np.float64)
        rows = perm[(t * 64) % len(y):][:64]
        l_new[t] = cy.fm_step(X, y, rows, p2, s2, cfg_for(api.ADAGRAD, step=t), ws_t)
    assert l_ws == l_new
    for a, b in zip(params + state, p2 + s2):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_problem():
    X, y = make_data()
    params, state = make_params(60, 8, np.float32, api.SGD)
    X32 = (X[0], X[1], X[2].astype(np.float32))
    y32 = y.astype(np.float32)
    rows = np.arange(10, dtype=np.int64)
    ws = cy.fm_workspace(8, 100, 60, 8, np.float32)
    with pytest.raises(ValueError, match="batch_size"):
        cy.fm_step(X32, y32, rows, params, state, cfg_for(api.SGD), ws)
    ws = cy.fm_workspace(16, 2, 60, 8, np.float32)
    with pytest.raises(ValueError, match="max_batch_nnz"):
        cy.fm_step(X32, y32, rows, params, state, cfg_for(api.SGD), ws)
    ws = cy.fm_workspace(16, 200, 60, 8, np.float64)
    with pytest.raises(ValueError, match="workspace"):
        cy.fm_step(X32, y32, rows, params, state, cfg_for(api.SGD), ws)
    ws = cy.fm_workspace(16, 200, 60, 8, np.float32)
    with pytest.raises(ValueError, match="rows"):
        cy.fm_step(X32, y32, np.array([0, 300], dtype=np.int64), params, state,
                   cfg_for(api.SGD), ws)
    with pytest.raises(ValueError, match="optimizer"):
        cy.fm_step(X32, y32, rows, params, state, cfg_for(7), ws)


def test_phase_times_cover_the_last_step():
    X, y = make_data(n_rows=200)
    params, state = make_params(60, 8, np.float32, api.ADAGRAD)
    X = (X[0], X[1], X[2].astype(np.float32))
    ws = cy.fm_workspace(100, 800, 60, 8, np.float32)
    check_phase_times(cy, ws, lambda: cy.fm_step(
        X, y.astype(np.float32), np.arange(100, dtype=np.int64), params, state,
        cfg_for(api.ADAGRAD, n_threads=2), ws))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_batch_errors_name_the_first_offender_for_any_thread_count(n_threads):
    """The rows' lengths are read in parts in parallel: the error is still the first
    invalid row in batch order, and nothing is mutated."""
    X, y = make_data(n_rows=300)
    params, state = make_params(60, 8, np.float64, api.ADAGRAD)
    before = clone(params + state)
    ws = cy.fm_workspace(128, 1000, 60, 8, np.float64)
    rows = np.arange(100, 228, dtype=np.int64)
    rows[[40, 90, 120]] = [-3, 300, 10**9]
    with pytest.raises(ValueError, match=r"rows\[40\] = -3 is not a row of X"):
        cy.fm_step(X, y, rows, params, state, cfg_for(api.ADAGRAD, n_threads=n_threads), ws)
    small = cy.fm_workspace(128, 10, 60, 8, np.float64)
    with pytest.raises(ValueError, match="max_batch_nnz = 10"):
        cy.fm_step(X, y, np.arange(128, dtype=np.int64), params, state,
                   cfg_for(api.ADAGRAD, n_threads=n_threads), small)
    for a, b in zip(params + state, before):
        np.testing.assert_array_equal(a, b)


def fixed_width_data(n_rows=300, width=4, n_features=60, seed=3):
    """One-hot rows of ``width`` ids each (values empty), float32 labels."""
    rng = np.random.default_rng(seed)
    indptr = np.arange(n_rows + 1, dtype=np.int64) * width
    indices = (rng.pareto(1.2, size=n_rows * width) * 5).astype(np.int64) % n_features
    X = (indptr, indices.astype(np.int32), np.empty(0, np.float32))
    return X, rng.normal(size=n_rows).astype(np.float32)


def train_fixed_width(X, y, n_threads, batch=64, steps=4):
    params, state = make_params(60, 16, np.float32, api.ADAGRAD)
    ws = cy.fm_workspace(batch, batch * 8, 60, 16, np.float32)
    return train_steps(cy.fm_step, X, y, params, state, ws, batch, steps,
                       lambda step: cfg_for(api.ADAGRAD, step=step, n_threads=n_threads))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_row_width_gives_the_bits_of_indptr(n_threads):
    """A KernelX's row_width locates the rows without their indptr entries: the same
    bits as the plain triple, and the same errors, naming the same entries."""
    X, y = fixed_width_data()
    assert_bit_identical(train_fixed_width(X, y, n_threads),
                         train_fixed_width(api.KernelX(*X, row_width=4), y, n_threads))
    bad = (X[0], X[1].copy(), X[2])
    bad[1][4 * 17 + 2] = 60
    params, state = make_params(60, 16, np.float32, api.ADAGRAD)
    ws = cy.fm_workspace(64, 512, 60, 16, np.float32)
    rows = np.arange(10, 74, dtype=np.int64)
    for data in (bad, api.KernelX(*bad, row_width=4)):
        with pytest.raises(ValueError, match=r"X.indices\[70\] = 60 is not a feature id"):
            cy.fm_step(data, y, rows, params, state, cfg_for(api.ADAGRAD), ws)
        with pytest.raises(ValueError, match=r"rows\[3\] = 300 is not a row of X"):
            cy.fm_step(data, y, np.array([1, 2, 3, 300, 4], np.int64), params, state,
                       cfg_for(api.ADAGRAD), ws)


def test_row_width_that_does_not_fit_indptr_is_refused():
    X, y = make_data(n_rows=50)
    params, state = make_params(60, 8, np.float64, api.ADAGRAD)
    ws = cy.fm_workspace(16, 200, 60, 8, np.float64)
    rows = np.arange(16, dtype=np.int64)
    n, nnz = 50, int(X[0][-1])
    width = nnz // n + 1  # the rows of make_data are ragged: no width fits
    with pytest.raises(ValueError, match=rf"X.row_width = {width} does not fit indptr"):
        cy.fm_step(api.KernelX(*X, row_width=width), y, rows, params, state,
                   cfg_for(api.ADAGRAD), ws)
    for width in (-1, "3", 2**70):
        with pytest.raises(ValueError, match="X.row_width must be an integer >= 0"):
            cy.fm_step(_with_width(X, width), y, rows, params, state,
                       cfg_for(api.ADAGRAD), ws)


def _with_width(X, width):
    """A KernelX whose row_width is set as is (the constructor would convert it)."""
    kx = api.KernelX(*X)
    kx.row_width = width
    return kx


def test_false_row_width_that_fits_is_trusted_inside_X():
    """Rows of 2 and 4 nonzeros promised as rows of 3 (the same total): the kernel
    trains on the ids cut into rows of 3, as the contract says, and reads nothing
    outside X."""
    X, y = fixed_width_data(n_rows=300, width=3)
    lengths = np.tile([2, 4], 150)
    ragged = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), X[1], X[2])
    assert_bit_identical(train_fixed_width(api.KernelX(*ragged, row_width=3), y, 1),
                         train_fixed_width(X, y, 1))


@pytest.mark.parametrize("indptr,bad_row", [
    ([0, 3, 2, 4], 1),    # row 1 runs backwards
    ([0, 5, 3], 0),       # row 0 ends past indptr[-1] (as many ids as the workspace's
                          # room: the copy would have overrun it)
    ([0, 2, 7, 4], 1),    # row 1 too
    ([-2, 1, 4], 0),      # row 0 starts before X.indices
])
def test_malformed_indptr_is_an_error_not_a_wild_read(indptr, bad_row):
    """The kernel API trusts no caller: a row whose indptr entries are not a range of
    X.indices is named, before anything is copied into the workspace."""
    n_rows = len(indptr) - 1
    X = (np.array(indptr, np.int64), np.zeros(5, np.int32), np.empty(0, np.float32))
    y = np.zeros(n_rows, np.float32)
    params, state = make_params(60, 4, np.float32, api.ADAGRAD)
    ws = cy.fm_workspace(n_rows, 3, 60, 4, np.float32)
    rows = np.arange(n_rows, dtype=np.int64)
    with pytest.raises(ValueError, match=rf"indptr\[{bad_row}\]:indptr\[{bad_row + 1}\], "
                                         rf"the nonzeros of rows\[{bad_row}\], is not a range"):
        cy.fm_step(X, y, rows, params, state, cfg_for(api.ADAGRAD, n_threads=2), ws)


def test_predict_refuses_a_malformed_indptr():
    """Scoring reads whole rows of X: an indptr that falls anywhere is refused first."""
    params, _ = make_params(60, 4, np.float32, api.ADAGRAD)
    X = (np.array([0, 3, 2, 4], np.int64), np.zeros(4, np.int32), np.empty(0, np.float32))
    with pytest.raises(ValueError, match=r"indptr\[2\] = 2 < indptr\[1\] = 3"):
        cy.fm_predict(X, params, 1, 2, np.empty(3, np.float32))
