"""The Bayesian FM (Rendle 2012, libFM's MCMC solver): the model, the Gibbs sweep that
every backend implements, and its backend-independent parts (hyperprior constants, the
counter-based normal draws, the scalar draws of one iteration).

Model (regression). yhat_i = w0 + sum_j w_j x_ij + sum_f 1/2((sum_j v_jf x_ij)^2 -
sum_j (v_jf x_ij)^2); y_i ~ N(yhat_i, 1/alpha), alpha ~ Gamma(ALPHA_0/2, rate GAMMA_0/2);
w0 ~ N(W0_MEAN, 1/W0_PRECISION); per hyperprior group g (a field, or one group for all
features): w_j ~ N(mu_w[g], 1/lam_w[g]) and v_jf ~ N(mu_v[g, f], 1/lam_v[g, f]), each
(mu, lam) pair with the Normal-Gamma prior lam ~ Gamma(ALPHA_0/2, rate GAMMA_0/2),
mu | lam ~ N(MU_0, 1/(BETA_0 lam)).

One Gibbs iteration (``iteration`` counts from 0):
    1. alpha | e, and every group's (lam, mu) jointly from its Normal-Gamma posterior
       (``draw_scalars``, NumPy, the generator ``scalar_rng(seed, iteration)``);
    2. w0 | the rest (``draw_scalars`` too: O(n_rows) from the residuals);
    3. the coordinate sweep (the backends' ``mcmc_sweep``): for each block of the plan in
       order, for each feature j of the block: w_j, then v_j0, ..., v_j(k-1), each from
       its Gaussian conditional.
Any fixed scan order leaves the posterior invariant; feature-major order lets one pass
over a column's rows apply one coordinate's update and gather the next one's sums.

Conditional of one coordinate theta (w_j or v_jf) with residuals e_i = y_i - yhat_i and
h_i = d yhat_i / d theta (x_ij for w_j; x_ij (q_if - v_jf x_ij) for v_jf, where q_if =
sum_l v_lf x_il), over the rows i of column j (``theta_conditional``):
    precision P = lam + alpha sum h_i^2,
    mean m = (alpha sum h_i (e_i + theta h_i) + lam mu) / P,
    theta' = m + z / sqrt(P), z the coordinate's standard normal (``coordinate_normals``);
    then e_i -= (theta' - theta) h_i, and for v_jf also q_if += (theta' - theta) x_ij.

Parallel exactness. Features that never share a row (the values of one one-hot field)
have disjoint row sets: sampling one reads and writes only its own rows' e and q, so
sampling a block of them in any order, or at once on several threads, gives bit for bit
what the serial order gives. The plan (``mcmc_plan`` of a backend) partitions the
features into blocks in a fixed order: the given groups, or greedily (ascending feature
id, each feature to the first block none of whose features shares a row with it); a
block whose features do share rows (a given group that is no one-hot field) is sampled
serially. With the normal draws keyed by (seed, iteration, coordinate) rather than taken
from a shared stream, samples do not depend on the thread count.

Sums. A pass's sums over a column's rows (sum h e and sum h^2) are added by chunks of
SUM_CHUNK rows: each chunk's sum in row order from its first row, then the chunks' sums
in chunk order (a column of at most SUM_CHUNK rows is one plain sum). The backends may
then split a long column's chunks between threads, pass by pass, without changing a
bit: the Cython sweep does so (``team_counts``) for a parallel block's columns of at
least COOPERATIVE_MIN_CHUNKS chunks that hold more than 1 / (2 n_threads) of their
block's nonzeros, which on one thread would leave the others idle (a binary field, or a
popular item).

Normal draws (counter based, the same in every backend): key = mix64(mix64(seed +
MCMC_STREAM * GOLDEN) + iteration); for coordinate c (w_j: c = j (k + 1); v_jf: c = j (k
+ 1) + 1 + f), h1 = mix64(key + (2c + 1) GOLDEN), h2 = mix64(key + (2c + 2) GOLDEN),
u1 = ((h1 >> 11) + 1) 2^-53 in (0, 1], u2 = (h2 >> 11) 2^-53, z = sqrt(-2 ln u1)
cos(2 pi u2) (Box-Muller).

State is float64 throughout: the residual cache e is updated in place millions of
times per iteration, and float32 rounding would let it drift away from y - yhat over a
long chain; float64 keeps that drift far below the noise.
"""
from collections import namedtuple

import numpy as np

from afmfast.kernels.api import GOLDEN, _mix64, _stream_key

# Hyperprior constants, as libFM (Rendle 2012): weak priors that the data override.
ALPHA_0 = 1.0   # shape (times 2) of the Gamma priors on alpha and on every lam
GAMMA_0 = 1.0   # rate (times 2) of those Gamma priors
BETA_0 = 1.0    # mu | lam ~ N(MU_0, 1 / (BETA_0 lam))
MU_0 = 0.0
W0_MEAN = 0.0   # w0 ~ N(W0_MEAN, 1 / W0_PRECISION); 0 precision is libFM's flat prior
W0_PRECISION = 0.0

MCMC_STREAM = 4  # kernels.api's RNG streams: dropout 0-2, epoch order 3
SUM_CHUNK = 1024  # rows per partial sum of a pass (module docstring, "Sums")
# a column is split between threads from this many chunks on: fewer, and the barrier
# before every draw costs more than the idle thread would
COOPERATIVE_MIN_CHUNKS = 4
_TWO_PI = 2.0 * np.pi
_MASK64 = (1 << 64) - 1

Hyper = namedtuple("Hyper", "alpha mu_w lam_w mu_v lam_v")
Hyper.__doc__ = """The scalars a sweep conditions on: alpha (float), mu_w and lam_w
float64 (G,), mu_v and lam_v float64 (G, k), G hyperprior groups."""


def coordinate_normals(seed, iteration, coords):
    """The standard normal draws of coordinates ``coords`` (int array) in iteration
    ``iteration``: the definition that every backend computes (module docstring).

    >>> z = coordinate_normals(7, 0, np.arange(3))
    >>> z.shape, bool(np.all(np.isfinite(z)))
    ((3,), True)
    """
    key = _stream_key(seed, MCMC_STREAM, iteration)
    c = np.asarray(coords, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h1 = _mix64(key + (np.uint64(2) * c + np.uint64(1)) * np.uint64(GOLDEN))
        h2 = _mix64(key + (np.uint64(2) * c + np.uint64(2)) * np.uint64(GOLDEN))
    u1 = ((h1 >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)


def coordinate_id(feature, factor, n_factors):
    """The coordinate number of w_j (``factor`` None) or v_jf in ``coordinate_normals``."""
    base = feature * (n_factors + 1)
    return base if factor is None else base + 1 + factor


def scalar_rng(seed, iteration):
    """The generator of iteration ``iteration``'s scalar draws (alpha, hyperparameters,
    w0): NumPy's PCG64 seeded from (seed, MCMC_STREAM, iteration), so that any iteration
    can be replayed on its own."""
    return np.random.default_rng([int(seed) & _MASK64, MCMC_STREAM, int(iteration)])


def latent_rng(seed, iteration):
    """The generator of iteration ``iteration``'s probit latent targets
    (``truncated_normals``): seeded from (seed, MCMC_STREAM, iteration, 1), a stream of
    its own beside ``scalar_rng``'s."""
    return np.random.default_rng([int(seed) & _MASK64, MCMC_STREAM, int(iteration), 1])


def theta_conditional(sum_he, sum_hh, theta, alpha, mu, lam):
    """(mean, precision) of one coordinate's Gaussian conditional from the sums over its
    column of h e and h^2 (module docstring)."""
    precision = lam + alpha * sum_hh
    return (alpha * (sum_he + theta * sum_hh) + lam * mu) / precision, precision


def normal_gamma_draw(values, rng):
    """(mu, lam) drawn jointly from the Normal-Gamma posterior given ``values`` (float64
    (n,) or (n, k): one draw per column), under the prior of the module docstring."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = values.mean(axis=0) if n else np.zeros(values.shape[1:])
    spread = ((values - mean) ** 2).sum(axis=0)
    beta_n = BETA_0 + n
    mu_n = (BETA_0 * MU_0 + n * mean) / beta_n
    rate = 0.5 * (GAMMA_0 + spread + BETA_0 * n * (mean - MU_0) ** 2 / beta_n)
    lam = rng.gamma(0.5 * (ALPHA_0 + n), 1.0 / rate)
    mu = mu_n + rng.standard_normal(np.shape(lam)) / np.sqrt(beta_n * lam)
    return mu, lam


def sum_of_squares(e):
    """e @ e (float) without BLAS. A multithreaded BLAS (OpenBLAS) computes a long dot
    product on its own threads, which then spin waiting for more work while the sweep's
    threads need the same CPUs; NumPy's einsum sums on the calling thread.

    >>> sum_of_squares(np.array([3.0, 4.0]))
    25.0
    """
    return float(np.einsum("i,i->", e, e))


def draw_scalars(w0, w, V, e, groups, n_groups, seed, iteration, alpha=None):
    """Steps 1 and 2 of an iteration: returns (Hyper, the new w0). ``groups`` int
    (n_features,) holds each feature's hyperprior group in [0, n_groups); ``e`` (the
    residuals y - yhat at the current w0) is left alone: the caller subtracts the change
    of w0 from it. With ``alpha`` given, the noise precision is that (the probit
    model's 1) instead of a draw.

    >>> rng = np.random.default_rng(0)
    >>> hyper, w0 = draw_scalars(0.0, rng.normal(size=4), rng.normal(size=(4, 2)),
    ...                          rng.normal(size=50), np.zeros(4, int), 1, seed=1,
    ...                          iteration=0)
    >>> hyper.mu_v.shape, bool(hyper.alpha > 0)
    ((1, 2), True)
    """
    rng = scalar_rng(seed, iteration)
    e = np.asarray(e, dtype=np.float64)
    n = e.shape[0]
    if alpha is None:
        alpha = float(rng.gamma(0.5 * (ALPHA_0 + n), 2.0 / (GAMMA_0 + sum_of_squares(e))))
    k = V.shape[1]
    mu_w, lam_w = np.empty(n_groups), np.empty(n_groups)
    mu_v, lam_v = np.empty((n_groups, k)), np.empty((n_groups, k))
    for g in range(n_groups):
        members = slice(None) if n_groups == 1 else groups == g  # no copy for one group
        mu_w[g], lam_w[g] = normal_gamma_draw(w[members], rng)
        mu_v[g], lam_v[g] = normal_gamma_draw(V[members], rng)
    mean, precision = theta_conditional(float(e.sum()), float(n), w0, alpha, W0_MEAN,
                                        W0_PRECISION)
    new_w0 = mean + float(rng.standard_normal()) / np.sqrt(precision)
    return Hyper(alpha, mu_w, lam_w, mu_v, lam_v), new_w0


def team_counts(columns, plan, n_threads):
    """int64 (B,): how many of each block's first features the whole team of
    ``n_threads`` threads samples together, chunk by chunk (the Cython sweep; none on
    one thread). ``plan`` orders a parallel block's features longest column first
    (``mcmc_plan``); a column is sampled so when it is at least COOPERATIVE_MIN_CHUNKS
    chunks long and holds more than 1 / (2 n_threads) of its block's nonzeros: on its
    own thread it would leave the others idle (a binary field's larger value, or one
    popular item, against the rest of the block)."""
    starts, is_parallel = plan.starts, plan.parallel
    B = starts.shape[0] - 1
    if n_threads <= 1 or starts[B] <= starts[0]:
        return np.zeros(B, np.int64)
    block = np.repeat(np.arange(B), np.diff(starts))
    seg = plan.order[starts[0]:starts[B]]
    length = np.where(is_parallel[block], columns.colptr[seg + 1] - columns.colptr[seg], 0)
    total = np.bincount(block, weights=length, minlength=B)
    team = ((length >= COOPERATIVE_MIN_CHUNKS * SUM_CHUNK)
            & (length * 2 * n_threads > total[block]))
    return np.bincount(block[team], minlength=B).astype(np.int64)


def sum_buffers(longest, n_threads):
    """Partial sums of a sweep on ``n_threads`` threads whose longest column has
    ``longest`` rows: float64 (n_threads + 1, 2, chunks, 2) (each thread's set, then the
    whole team's; two halves, by pass parity, of chunk sums of h e and h^2)."""
    chunks = max(1, -(-int(longest) // SUM_CHUNK))
    return np.zeros((int(n_threads) + 1, 2, chunks, 2))


def truncated_normals(mean: np.ndarray, positive: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Draws of z ~ N(mean, 1) conditioned on z > 0 where ``positive``, z < 0 elsewhere:
    the probit model's latent targets (Albert and Chib's data augmentation, as libFM
    samples them). z = mean + sign x, where x is N(0, 1) conditioned on x > a (sign +1
    and a = -mean on the positive side, -1 and mean on the negative): below a = 0.5 by
    plain rejection (acceptance at least 31%), above by Robert's exponential
    rejection (1995), whose acceptance stays above 75% however far the tail.

    >>> rng = np.random.default_rng(0)
    >>> z = truncated_normals(np.array([0.0, 3.0, -3.0] * 2000),
    ...                       np.array([True, False, True] * 2000), rng)
    >>> bool(np.all(z[0::3] > 0) and np.all(z[1::3] < 0) and np.all(z[2::3] > 0))
    True
    >>> round(float(z[0::3].mean()), 1)  # E[z | z > 0] for N(0, 1): sqrt(2 / pi)
    0.8
    """
    mean = np.asarray(mean, np.float64)
    sign = np.where(positive, 1.0, -1.0)
    a = -sign * mean
    x = np.empty_like(a)
    todo = np.arange(len(a))
    while len(todo):
        at = a[todo]
        plain = at < 0.5
        rate = (at + np.sqrt(at * at + 4.0)) / 2.0  # Robert's optimal exponential rate
        draw = np.where(plain, rng.standard_normal(len(todo)),
                        at + rng.standard_exponential(len(todo)) / rate)
        u = rng.random(len(todo))
        accept = np.where(plain, draw > at, u <= np.exp(-0.5 * (draw - rate) ** 2))
        x[todo[accept]] = draw[accept]
        todo = todo[~accept]
    return mean + sign * x


def hyper_groups(groups, n_features):
    """(groups int64 (n_features,), n_groups) from a ``groups`` argument: None (one
    group) or one integer per feature, renumbered 0..G-1 in increasing order of value.

    >>> g, n = hyper_groups([5, 5, 2], 3)
    >>> g.tolist(), n
    ([1, 1, 0], 2)
    """
    if groups is None:
        return np.zeros(n_features, np.int64), 1
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n_features or arr.dtype.kind not in "iu":
        raise ValueError(f"groups must hold one integer per feature ({n_features}), got "
                         f"an array of dtype {arr.dtype} and shape {arr.shape}")
    values, inverse = np.unique(arr, return_inverse=True)
    return inverse.astype(np.int64), len(values)
