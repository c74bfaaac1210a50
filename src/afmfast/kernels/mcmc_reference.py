"""Float64 NumPy reference of the Bayesian FM's Gibbs sampler (``afmfast.kernels.mcmc``):
the truth the backends' ``mcmc_sweep`` is tested against.

Dense and from scratch on purpose: X is a dense (n, M) matrix, every prediction is the
FM formula summed over all pairs, and each coordinate's conditional comes from two
predictions (yhat is affine in any single coordinate, so h = yhat(theta = 1) -
yhat(theta = 0) and the residual without the coordinate is y - yhat(theta = 0)). No
cache, no column view, no block: O(n M^2 k) per coordinate, for tiny data only.
"""
import numpy as np

from afmfast.kernels.mcmc import (
    coordinate_id,
    coordinate_normals,
    draw_scalars,
    theta_conditional,
)


def dense_rows(X, n_features):
    """X (CSR triple; empty values mean ones) as a dense float64 (n, n_features) array."""
    indptr, indices, values = X
    n = len(indptr) - 1
    dense = np.zeros((n, n_features))
    vals = np.ones(len(indices)) if len(values) == 0 else np.asarray(values, np.float64)
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            dense[i, indices[p]] += vals[p]
    return dense


def predict(Xd, w0, w, V):
    """yhat of every row of the dense Xd: w0 + X w + sum over pairs j < l of <v_j, v_l>
    x_j x_l, the pairs summed one by one."""
    n, M = Xd.shape
    out = w0 + Xd @ w
    gram = V @ V.T
    for j in range(M):
        for l in range(j + 1, M):
            out = out + gram[j, l] * Xd[:, j] * Xd[:, l]
    return out


def coordinate_design(Xd, w0, w, V, j, f=None):
    """(h, r): yhat's slope in w_j (f None) or v_jf, and y-free prediction without it,
    i.e. yhat = r + theta h for every value theta of the coordinate."""
    w, V = w.copy(), V.copy()
    if f is None:
        w[j] = 0.0
    else:
        V[j, f] = 0.0
    base = predict(Xd, w0, w, V)
    if f is None:
        w[j] = 1.0
    else:
        V[j, f] = 1.0
    return predict(Xd, w0, w, V) - base, base


def conditional(Xd, y, w0, w, V, alpha, mu, lam, j, f=None):
    """(mean, precision) of w_j's (or v_jf's) Gaussian conditional given all else."""
    h, base = coordinate_design(Xd, w0, w, V, j, f)
    theta = w[j] if f is None else V[j, f]
    e = y - (base + theta * h)
    return theta_conditional(float(h @ e), float(h @ h), theta, alpha, mu, lam)


def sweep(Xd, y, w0, w, V, hyper, groups, order, seed, iteration):
    """Step 3 of an iteration (kernels.mcmc), serially in ``order``: w_j then v_j0 ..
    v_j(k-1) for each feature j; mutates w and V."""
    k = V.shape[1]
    M = Xd.shape[1]
    z = coordinate_normals(seed, iteration, np.arange(M * (k + 1)))
    for j in order:
        g = groups[j]
        mean, precision = conditional(Xd, y, w0, w, V, hyper.alpha, hyper.mu_w[g],
                                      hyper.lam_w[g], j)
        w[j] = mean + z[coordinate_id(j, None, k)] / np.sqrt(precision)
        for f in range(k):
            mean, precision = conditional(Xd, y, w0, w, V, hyper.alpha, hyper.mu_v[g, f],
                                          hyper.lam_v[g, f], j, f)
            V[j, f] = mean + z[coordinate_id(j, f, k)] / np.sqrt(precision)


def iteration(Xd, y, w0, w, V, groups, n_groups, order, seed, it):
    """One whole Gibbs iteration (kernels.mcmc); mutates w and V, returns (the new w0,
    the Hyper drawn)."""
    e = y - predict(Xd, w0, w, V)
    hyper, w0 = draw_scalars(w0, w, V, e, groups, n_groups, seed, it)
    sweep(Xd, y, w0, w, V, hyper, groups, order, seed, it)
    return w0, hyper
