"""The Bayesian FM's Gibbs sampler (``afmfast.kernels.mcmc``): its float64 reference
against dense linear algebra, each backend's sweep against the reference given the same
draws, the plan's blocks, the counter-based normals, bit-identical samples for any
thread count and across the backends, and the Cython sweep's refusal of bad input."""
import numpy as np
import pytest

from helpers.backends import compiled_module

from afmfast.kernels import mcmc
from afmfast.kernels import mcmc_reference as ref
from afmfast.kernels.numba import mcmc as nb_mcmc

cy_mcmc = compiled_module("afmfast._mcmc_cython")
SWEEPS = [pytest.param(nb_mcmc, id="numba"),
          pytest.param(cy_mcmc, id="cython", marks=[pytest.mark.compiled, pytest.mark.skipif(
              cy_mcmc is None, reason="afmfast._mcmc_cython is not built")])]


def fielded_rows(rng, n_rows, field_sizes, values=False):
    """One-hot rows, one feature per field (fields are consecutive id ranges), as a CSR
    triple; ``values``: real values of both signs instead of ones; "mixed": ones in the
    first half of the rows, real values in the rest (a column, or the chunks of one that
    a team shares, then holds both: the sweeps skip x only where every x is 1)."""
    offsets = np.concatenate([[0], np.cumsum(field_sizes)])
    cols = np.stack([rng.integers(offsets[f], offsets[f + 1], n_rows)
                     for f in range(len(field_sizes))], axis=1)
    indptr = np.arange(0, n_rows * len(field_sizes) + 1, len(field_sizes), dtype=np.int64)
    vals = (rng.uniform(0.5, 1.5, cols.size) * rng.choice([-1, 1], cols.size)
            if values else np.zeros(0))
    if values == "mixed":
        vals[:(n_rows // 2) * len(field_sizes)] = 1.0
    fields = np.repeat(np.arange(len(field_sizes)), field_sizes)
    return (indptr, cols.reshape(-1).astype(np.int32), vals), int(offsets[-1]), fields


def random_hyper(rng, n_groups, k):
    return mcmc.Hyper(float(rng.uniform(0.5, 3.0)), rng.normal(0, 0.2, n_groups),
                      rng.uniform(0.5, 4.0, n_groups), rng.normal(0, 0.2, (n_groups, k)),
                      rng.uniform(0.5, 4.0, (n_groups, k)))


def test_conditional_equals_bayesian_linear_regression_by_least_squares():
    """The reference's conditional of w_j and v_jf (two dense predictions) equals the
    posterior of a one-coefficient Bayesian linear regression, solved as a least-squares
    problem with the design written from the FM's algebra (h = x_j for w_j, x_j sum_{l !=
    j} v_lf x_l for v_jf) and the O(n k) form of the prediction."""
    rng = np.random.default_rng(3)
    n, M, k = 15, 6, 3
    Xd = rng.normal(size=(n, M)) * (rng.random((n, M)) < 0.6)
    y = rng.normal(size=n)
    w0, w, V = 0.3, rng.normal(size=M), rng.normal(size=(M, k))
    alpha, mu, lam = 1.7, 0.2, 2.5
    yhat = w0 + Xd @ w + 0.5 * (((Xd @ V) ** 2) - (Xd ** 2) @ (V ** 2)).sum(axis=1)
    for j in range(M):
        for f in [None, *range(k)]:
            if f is None:
                h, theta = Xd[:, j], w[j]
            else:
                others = Xd @ V[:, f] - Xd[:, j] * V[j, f]
                h, theta = Xd[:, j] * others, V[j, f]
            target = y - (yhat - theta * h)
            A = np.concatenate([np.sqrt(alpha) * h, [np.sqrt(lam)]])[:, None]
            b = np.concatenate([np.sqrt(alpha) * target, [np.sqrt(lam) * mu]])
            want_mean = np.linalg.lstsq(A, b, rcond=None)[0][0]
            mean, precision = ref.conditional(Xd, y, w0, w, V, alpha, mu, lam, j, f)
            assert precision == pytest.approx(float(A[:, 0] @ A[:, 0]), rel=1e-12)
            assert mean == pytest.approx(want_mean, rel=1e-9, abs=1e-12)


def test_normals_of_the_kernel_are_the_definition():
    coords = np.arange(0, 5000, 7)
    want = mcmc.coordinate_normals(2016, 3, coords)
    got = np.array([nb_mcmc._normal(np.uint64(int(mcmc._stream_key(2016, mcmc.MCMC_STREAM,
                                                                    3)[0])), int(c))
                    for c in coords])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    many = mcmc.coordinate_normals(1, 0, np.arange(200_000))
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1.0) < 0.01
    assert not np.array_equal(want, mcmc.coordinate_normals(2016, 4, coords))


@pytest.mark.parametrize("sweeper", SWEEPS)
@pytest.mark.parametrize("values", [False, True, "mixed"])
@pytest.mark.parametrize("given_groups", [False, True])
def test_one_sweep_of_the_kernel_equals_the_reference(sweeper, values, given_groups):
    """Given the same hyperparameters and counter-based draws, a backend's sweep (fused
    passes, caches, parallel blocks on 2 threads) gives the reference's samples up to
    float rounding, and leaves its caches equal to y - yhat and X V."""
    rng = np.random.default_rng(5)
    X, M, fields = fielded_rows(rng, 40, [4, 3, 5], values)
    k, n = 3, 40
    Xd = ref.dense_rows(X, M)
    y = rng.normal(size=n)
    groups, n_groups = mcmc.hyper_groups(fields if given_groups else None, M)
    w0, w, V = 0.1, rng.normal(0, 0.3, M), rng.normal(0, 0.3, (M, k))
    hyper = random_hyper(rng, n_groups, k)
    cols = nb_mcmc.mcmc_columns(X, M)
    plan = nb_mcmc.mcmc_plan(X, cols, groups if given_groups else None)
    q, yhat = np.empty((n, k)), np.empty(n)
    nb_mcmc.mcmc_scores(X, w0, w, V, q, yhat, 1)
    np.testing.assert_allclose(yhat, ref.predict(Xd, w0, w, V), rtol=1e-12, atol=1e-12)
    e = y - yhat
    w_k, V_k = w.copy(), V.copy()
    sweeper.mcmc_sweep(cols, plan, groups, w_k, V_k, e, q, hyper, 9, 4, 2,
                       sweeper.mcmc_workspace(cols, k, 2))
    w_r, V_r = w.copy(), V.copy()
    ref.sweep(Xd, y, w0, w_r, V_r, hyper, groups, plan.order, 9, 4)
    np.testing.assert_allclose(w_k, w_r, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(V_k, V_r, rtol=1e-9, atol=1e-11)
    assert not np.allclose(V_k, V)
    np.testing.assert_allclose(e, y - ref.predict(Xd, w0, w_k, V_k), atol=1e-11)
    np.testing.assert_allclose(q, Xd @ V_k, atol=1e-11)


def test_plan_blocks_are_disjoint_fields_and_cover_every_feature():
    rng = np.random.default_rng(1)
    X, M, fields = fielded_rows(rng, 300, [6, 4, 9, 3])
    cols = nb_mcmc.mcmc_columns(X, M + 2)  # two features no row holds
    plan = nb_mcmc.mcmc_plan(X, cols)
    assert sorted(plan.order.tolist()) == list(range(M + 2))
    assert plan.parallel.all()
    Xd = ref.dense_rows(X, M + 2) != 0
    lengths = np.diff(cols.colptr)
    for b in range(len(plan.starts) - 1):
        block = plan.order[plan.starts[b]:plan.starts[b + 1]]
        assert Xd[:, block].sum(axis=1).max() <= 1  # no row holds two of them
        # a parallel block: longest column first, ties in ascending id
        assert block.tolist() == sorted(block.tolist(), key=lambda j: (-lengths[j], j))
    # given groups: one block per group; a group sharing rows is sampled serially
    mixed = np.append(fields, [0, 0])
    mixed[0] = 1  # feature 0 joins field 1, whose rows it shares
    plan = nb_mcmc.mcmc_plan(X, cols, mixed)
    assert plan.parallel.tolist() == [True, False, True, True]
    assert plan.order[plan.starts[1]:plan.starts[2]].tolist() == [0, 6, 7, 8, 9]  # serial


def test_column_view_refuses_repeated_and_out_of_range_ids():
    X = (np.array([0, 2, 4]), np.array([0, 1, 2, 2], np.int32), np.zeros(0))
    with pytest.raises(ValueError, match="row 1 holds a feature id twice"):
        nb_mcmc.mcmc_columns(X, 3)
    X = (np.array([0, 2]), np.array([0, 5], np.int32), np.zeros(0))
    with pytest.raises(ValueError, match=r"row 0 holds a feature id outside \[0, 3\)"):
        nb_mcmc.mcmc_columns(X, 3)


@pytest.mark.parametrize("sweeper", SWEEPS)
def test_whole_iteration_and_reference_iteration_agree(sweeper):
    """Scalars (alpha, hyperparameters, w0) drawn from the same generator and the sweep:
    two whole iterations of the reference and of the kernel path agree."""
    rng = np.random.default_rng(8)
    X, M, fields = fielded_rows(rng, 30, [3, 4, 2])
    n, k = 30, 2
    Xd = ref.dense_rows(X, M)
    y = rng.normal(size=n)
    groups, G = mcmc.hyper_groups(fields, M)
    cols = nb_mcmc.mcmc_columns(X, M)
    plan = nb_mcmc.mcmc_plan(X, cols)
    w0_r, w_r, V_r = 0.0, np.zeros(M), rng.normal(0, 0.1, (M, k))
    w0_k, w_k, V_k = w0_r, w_r.copy(), V_r.copy()
    q, yhat = np.empty((n, k)), np.empty(n)
    nb_mcmc.mcmc_scores(X, w0_k, w_k, V_k, q, yhat, 1)
    e = y - yhat
    for it in range(2):
        w0_r, _ = ref.iteration(Xd, y, w0_r, w_r, V_r, groups, G, plan.order, 3, it)
        hyper, w0 = mcmc.draw_scalars(w0_k, w_k, V_k, e, groups, G, 3, it)
        e -= w0 - w0_k
        w0_k = w0
        sweeper.mcmc_sweep(cols, plan, groups, w_k, V_k, e, q, hyper, 3, it, 1,
                           sweeper.mcmc_workspace(cols, k, 1))
    assert w0_k == pytest.approx(w0_r, rel=1e-9)
    np.testing.assert_allclose(V_k, V_r, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w_k, w_r, rtol=1e-8, atol=1e-10)


def three_iterations(sweeper, threads, values=True, k=4, n=5000):
    """(w, V, e) after three iterations of ``sweeper`` on one-hot rows whose plan has
    parallel blocks, with the scalars drawn as a fit draws them. From 9000 rows on, the
    binary field's columns are long enough for the whole team to sample each."""
    rng = np.random.default_rng(2)
    X, M, _ = fielded_rows(rng, n, [40, 7, 300, 2], values=values)
    y = rng.normal(size=n)
    cols = nb_mcmc.mcmc_columns(X, M)
    plan = nb_mcmc.mcmc_plan(X, cols)
    assert plan.parallel.any()
    if n >= 9000:
        assert mcmc.team_counts(cols, plan, 2).tolist() == [0, 0, 0, 2]
    groups = np.zeros(M, np.int64)
    w, V = np.zeros(M), np.random.default_rng(0).normal(0, 0.1, (M, k))
    q, yhat = np.empty((n, k)), np.empty(n)
    nb_mcmc.mcmc_scores(X, 0.0, w, V, q, yhat, threads)
    e = y - yhat
    ws = sweeper.mcmc_workspace(cols, k, threads)
    for it in range(3):
        hyper, _ = mcmc.draw_scalars(0.0, w, V, e, groups, 1, 5, it)
        sweeper.mcmc_sweep(cols, plan, groups, w, V, e, q, hyper, 5, it, threads, ws)
    return w, V, e


@pytest.mark.parametrize("n,values", [(5000, True), (12000, True), (12000, "mixed")])
@pytest.mark.parametrize("sweeper", SWEEPS)
def test_samples_are_bit_identical_for_any_thread_count(sweeper, n, values):
    """12,000 rows: the binary field's two columns span several chunks each (the Cython
    sweep's whole team samples each of them, its chunks split between the threads);
    "mixed": some of those chunks hold only ones, others not."""
    runs = [three_iterations(sweeper, threads, values=values, n=n)
            for threads in (1, 2, 3)]
    for w, V, e in runs[1:]:
        assert np.array_equal(w, runs[0][0]) and np.array_equal(V, runs[0][1])
        assert np.array_equal(e, runs[0][2])


@pytest.mark.compiled
@pytest.mark.skipif(cy_mcmc is None, reason="afmfast._mcmc_cython is not built")
@pytest.mark.parametrize("values,k,n", [(True, 4, 5000), (False, 3, 5000), (True, 0, 5000),
                                        (True, 4, 12000), (True, 0, 12000),
                                        ("mixed", 4, 12000)])
def test_cython_and_numba_samples_are_bit_identical(values, k, n):
    """The Cython sweep does the Numba sweep's operations in the same order, without
    fused multiply-adds (its module is built at the baseline level only); 12,000 rows
    with columns that the whole team samples."""
    want = three_iterations(nb_mcmc, 2, values, k, n)
    got = three_iterations(cy_mcmc, 2, values, k, n)
    assert not np.array_equal(want[0], np.zeros_like(want[0]))
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def _sweep_args(k=2):
    rng = np.random.default_rng(0)
    X, M, _ = fielded_rows(rng, 30, [3, 4])
    cols = nb_mcmc.mcmc_columns(X, M)
    plan = nb_mcmc.mcmc_plan(X, cols)
    hyper = random_hyper(rng, 1, k)
    return dict(columns=cols, plan=plan, groups=np.zeros(M, np.int64), w=np.zeros(M),
                V=rng.normal(size=(M, k)), e=rng.normal(size=30), q=np.zeros((30, k)),
                hyper=hyper, seed=1, iteration=0, n_threads=2,
                ws=cy_mcmc.mcmc_workspace(cols, k, 2) if cy_mcmc else None)


def _bad(args, name, **fields):
    return {**args, name: args[name]._replace(**fields)}


@pytest.mark.compiled
@pytest.mark.skipif(cy_mcmc is None, reason="afmfast._mcmc_cython is not built")
def test_cython_sweep_refuses_what_would_leave_its_arrays():
    args = _sweep_args()
    cy_mcmc.mcmc_sweep(**args)  # the good arguments pass
    M = args["w"].shape[0]
    bad_rows = args["columns"].rows.copy()
    bad_rows[3] = 30
    short = args["columns"].colptr.copy()
    short[-1] += 1
    order = args["plan"].order.copy()
    order[0] = -1
    cases = [
        (dict(args, w=np.zeros(M + 1)), r"w must have shape \(%d,\)" % M),
        (dict(args, V=np.asfortranarray(args["V"])), "V must be a C-contiguous float64"),
        (dict(args, q=np.zeros((29, 2))), r"q must have shape \(30, 2\)"),
        (dict(args, e=args["e"].astype(np.float32)), "e must be a C-contiguous float64"),
        (_bad(args, "columns", rows=bad_rows), r"columns.rows holds an index outside"),
        (_bad(args, "columns", colptr=short), "columns.colptr must rise"),
        (_bad(args, "plan", order=order), "plan.order holds an index outside"),
        (_bad(args, "plan", starts=args["plan"].starts + 5), "plan.starts must rise"),
        (dict(args, groups=np.ones(M, np.int64)),
         r"groups holds an index outside \[0, 1\)"),
        (_bad(args, "hyper", lam_v=np.ones((1, 3))), r"hyper.lam_v must have shape"),
        (dict(args, ws=_sweep_args(3)["ws"]), "ws.Q must have shape"),
        (dict(args, ws=cy_mcmc.Workspace(np.empty((2, 1)), np.empty((2, 2, 1)))),
         "ws was made for other columns"),
        (dict(args, n_threads=0), "n_threads must be a positive integer"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            cy_mcmc.mcmc_sweep(**bad)


def test_normal_gamma_draw_matches_importance_sampling_from_the_prior():
    """The joint (mu, lam) draw against the posterior estimated without its formulas:
    prior draws weighted by the likelihood of the values."""
    values = np.array([0.8, 1.3, 0.4, 1.1, 0.9, 1.6])
    rng = np.random.default_rng(4)
    draws = [mcmc.normal_gamma_draw(values, rng) for _ in range(20000)]
    mu, lam = np.array(draws).T
    prior_lam = rng.gamma(mcmc.ALPHA_0 / 2, 2 / mcmc.GAMMA_0, 1_000_000)
    prior_mu = mcmc.MU_0 + rng.standard_normal(prior_lam.size) / np.sqrt(
        mcmc.BETA_0 * prior_lam)
    loglik = (0.5 * len(values) * np.log(prior_lam)
              - 0.5 * prior_lam * ((values[None, :] - prior_mu[:, None]) ** 2).sum(axis=1))
    weight = np.exp(loglik - loglik.max())
    weight /= weight.sum()
    assert mu.mean() == pytest.approx(weight @ prior_mu, abs=0.02)
    assert lam.mean() == pytest.approx(weight @ prior_lam, rel=0.05)


@pytest.mark.parametrize("lengths,want", [([15842, 30336], [0, 1, 2]),
                                          ([30336, 15842], [0, 1, 2]),
                                          ([5, 5, 5, 5], [0, 2, 4]),
                                          ([100], [0, 0, 1])])
def test_split_of_a_parallel_block_gives_each_thread_its_share(lengths, want):
    """Runs of about equal nonzeros; a block of two very unequal columns (a binary
    field) still gives each of 2 threads one."""
    colptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bounds = np.empty(3, np.int64)
    nb_mcmc._split(colptr, np.arange(len(lengths), dtype=np.int64), 0, len(lengths), 2,
                   bounds)
    assert bounds.tolist() == want


def test_team_counts_give_the_team_the_columns_that_would_idle_it():
    """At the start of each parallel block (the plan's order: longest first), the columns
    of at least COOPERATIVE_MIN_CHUNKS chunks holding more than 1 / (2 n_threads) of the
    block's nonzeros; none on one thread or in a serial block."""
    long_ = mcmc.COOPERATIVE_MIN_CHUNKS * mcmc.SUM_CHUNK
    lengths = [10, long_, 3 * long_, 30, long_ - 1, 20, 20, 5]
    colptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cols = nb_mcmc.Columns(colptr, np.zeros(colptr[-1], np.int64), np.ones(colptr[-1]))
    plan = nb_mcmc.Plan(np.array([2, 1, 3, 0, 4, 5, 6, 7]), np.array([0, 4, 5, 8]),
                        np.array([True, True, False]))
    # block 0 holds 4 long_ + 40 nonzeros: on 2 threads only 3 long_ is over a quarter,
    # on 4 and 8 long_ is over an eighth too; block 1's column is one chunk too short
    assert mcmc.team_counts(cols, plan, 2).tolist() == [1, 0, 0]
    assert mcmc.team_counts(cols, plan, 4).tolist() == [2, 0, 0]
    assert mcmc.team_counts(cols, plan, 8).tolist() == [2, 0, 0]
    assert mcmc.team_counts(cols, plan, 1).tolist() == [0, 0, 0]


@pytest.mark.parametrize("sweeper", SWEEPS)
def test_sweep_leaves_the_callers_mxcsr_as_it_was(sweeper):
    """The sweep sets FTZ/DAZ for itself (kernels.api's "Denormals") and puts the calling
    thread's MXCSR back."""
    from afmfast.kernels.numba.common import current_mxcsr
    before = int(current_mxcsr())
    three_iterations(sweeper, 2, k=2)
    assert int(current_mxcsr()) == before


def test_prefetch_is_only_a_hint():
    """The Numba sweeps' prefetch compiles to a hint that changes nothing and never
    faults, even for an index far outside the array."""
    from numba import njit

    from afmfast.kernels.numba.common import prefetch

    @njit
    def touch(a):
        for i in (0, a.shape[0] - 1, a.shape[0] + 10**9, -10**9):
            prefetch(a, i)
        return a.sum()

    a = np.arange(100.0)
    assert touch(a) == a.sum()
    assert np.array_equal(a, np.arange(100.0))
