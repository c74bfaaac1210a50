"""Built-in synthetic data (no download) and the ``afmfast demo`` run.

The data: one-hot rows over several categorical fields; the label is a sum of per-feature
biases plus a few planted field-pair interactions (dot products of hidden factors of the
two features) plus Gaussian noise. A linear model cannot express the planted pairs; an
FM must fit them while holding every other pair of fields at zero with the same
embeddings; an AFM can learn to attend to the planted pairs only.
"""
from collections import namedtuple

import numpy as np

from afmfast.data.dataset import Dataset

DemoData = namedtuple("DemoData", "train valid fields planted_pairs noise")
DemoData.__doc__ = """train, valid: Datasets; fields: int32 (n_features,) field of each
feature; planted_pairs: list of (field a, field b) whose interaction drives the label;
noise: the label noise's standard deviation (the best achievable RMSE); what
``make_demo_data`` returns.

Examples
--------
>>> data = make_demo_data(n_rows=1000, seed=0)
>>> len(data.train), len(data.valid), data.fields.shape, data.planted_pairs, data.noise
(800, 200, (160,), [(0, 1), (2, 3), (1, 4)], 0.1)
"""

FIELD_SIZES = (60, 40, 25, 12, 8, 7, 5, 3)
PLANTED_PAIRS = ((0, 1), (2, 3), (1, 4))


def make_demo_data(n_rows=30000, valid_fraction=0.2, seed=0, noise=0.1):
    """Seeded synthetic one-hot data with planted pairwise interactions.

    Examples
    --------
    >>> data = make_demo_data(n_rows=1000, seed=1)
    >>> len(data.train) + len(data.valid)
    1000
    """
    rng = np.random.default_rng(seed)
    sizes = np.array(FIELD_SIZES)
    n_features = int(sizes.sum())
    fields = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    ids = onehot_field_ids(rng, FIELD_SIZES, n_rows)
    bias = rng.normal(0.0, 0.3, size=n_features)
    hidden = rng.normal(0.0, 1.0, size=(n_features, 4))
    y = bias[ids].sum(axis=1)
    for a, b in PLANTED_PAIRS:
        y += (hidden[ids[:, a]] * hidden[ids[:, b]]).sum(axis=1) * 0.5
    y += rng.normal(0.0, noise, size=n_rows)
    indptr = np.arange(0, ids.size + 1, len(sizes), dtype=np.int64)
    data = Dataset(indptr, ids.reshape(-1).astype(np.int32),
                   np.ones(ids.size, dtype=np.float32), y.astype(np.float32), n_features)
    n_valid = int(round(n_rows * valid_fraction))
    perm = rng.permutation(n_rows)
    return DemoData(data[np.sort(perm[n_valid:])], data[np.sort(perm[:n_valid])], fields,
                    list(PLANTED_PAIRS), noise)


def onehot_field_ids(rng, field_sizes, n_rows):
    """(n_rows, n_fields) int64 global feature ids, one per field (field f owns the ids
    after those of fields 0..f-1), drawn with skewed popularity p ~ rank^-0.8 inside
    each field, as in real logs.

    Examples
    --------
    >>> import numpy as np
    >>> onehot_field_ids(np.random.default_rng(0), (3, 2), 4).tolist()
    [[1, 4], [0, 4], [0, 3], [0, 4]]
    """
    offset, columns = 0, []
    for size in field_sizes:
        p = 1.0 / np.arange(1, size + 1) ** 0.8
        columns.append(offset + rng.choice(size, size=n_rows, p=p / p.sum()))
        offset += size
    return np.stack(columns, axis=1)


#: Frappe's 10 fields (5,382 features): shape of the data benchmarks and tests use when
#: the licensed file is absent
FRAPPE_FIELD_SIZES = (957, 4082, 7, 7, 2, 3, 2, 9, 80, 233)


def frappe_like(n_rows, seed=0):
    """(X, y): one-hot CSR rows shaped like Frappe (``FRAPPE_FIELD_SIZES``, one nonzero
    per field, values 1) as (indptr int64, indices int32, values float32), and labels
    +-1 float32. Used by the kernel benchmarks and tests; carries no signal.

    Examples
    --------
    >>> X, y = frappe_like(3)
    >>> X[0].tolist(), y.shape
    ([0, 10, 20, 30], (3,))
    """
    rng = np.random.default_rng(seed)
    indices = onehot_field_ids(rng, FRAPPE_FIELD_SIZES, n_rows).reshape(-1).astype(np.int32)
    indptr = np.arange(0, indices.size + 1, len(FRAPPE_FIELD_SIZES), dtype=np.int64)
    values = np.ones(indices.size, dtype=np.float32)
    y = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n_rows)
    return (indptr, indices, values), y


def linear_baseline_rmse(train, valid, ridge=1e-3):
    """Validation RMSE of the least-squares linear model (bias + one weight per
    feature), the best any model without interactions can do on this data.

    Examples
    --------
    >>> data = make_demo_data(n_rows=1000, seed=0)
    >>> round(linear_baseline_rmse(data.train, data.valid), 2)
    2.04
    """
    from afmfast.metrics import rmse

    def dense(ds):
        out = np.zeros((ds.n_rows, ds.n_features + 1))
        rows = np.repeat(np.arange(ds.n_rows), np.diff(ds.indptr))
        out[rows, ds.indices] = ds.values
        out[:, -1] = 1.0
        return out

    A = dense(train)
    coef = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ train.y)
    return rmse(valid.y, dense(valid.with_n_features(train.n_features)) @ coef)


def top_field_pairs(matrix, n):
    """The n field pairs (a < b) with the largest entries of a symmetric matrix, best
    first, ignoring NaN, as ``(a, b, value)``.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([[np.nan, 0.2, 0.5], [0.2, np.nan, 0.1], [0.5, 0.1, np.nan]])
    >>> top_field_pairs(m, 2)
    [(0, 2, 0.5), (0, 1, 0.2)]
    """
    a, b = np.triu_indices(matrix.shape[0], 1)
    values = matrix[a, b]
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:n]
    return [(int(a[o]), int(b[o]), float(values[o])) for o in order]


def run_demo(backend="auto", n_threads=None, seed=0, verbose=1, plot=None):
    """Train an FM, then an AFM warm-started from it, on the demo data; print their
    epochs, their validation RMSEs next to the best linear model, and the field pairs the
    AFM attends to most next to the planted ones. Returns ``(fm_rmse, afm_rmse,
    linear_rmse, top_pairs)``. ``plot``: a path to save the field-attention heatmap to
    (needs matplotlib).

    Both models get k = 8 factors: too few for an FM to fit every planted interaction
    while keeping all other pairs at zero, enough for an AFM whose attention mutes the
    uninformative pairs.

    Examples
    --------
    This one trains both models for real, so it is the slowest example of the package:

    >>> fm_rmse, afm_rmse, linear_rmse, top = run_demo(n_threads=1, verbose=0)
    afmfast demo: 24000 training and 6000 validation rows, 8 one-hot fields, ...
    field pairs by mean AFM attention (* = planted):
    ...
    >>> afm_rmse < fm_rmse < linear_rmse
    True
    >>> sorted((a, b) for a, b, _ in top[:3])  # the planted pairs
    [(0, 1), (1, 4), (2, 3)]
    """
    from afmfast.models.afm import AFM
    from afmfast.models.fm import FM

    data = make_demo_data(seed=seed)
    print(f"afmfast demo: {len(data.train)} training and {len(data.valid)} validation rows, "
          f"{len(FIELD_SIZES)} one-hot fields, {data.train.n_features} features, planted "
          f"interactions between fields {data.planted_pairs}, label noise {data.noise}")
    common = dict(batch_size=512, n_epochs=30, backend=backend, n_threads=n_threads,
                  random_state=seed, verbose=verbose)
    print("FM, k=8:")
    fm = FM(n_factors=8, learning_rate=0.05, keep=1.0, batch_norm=False, **common)
    fm.fit(data.train, validation=data.valid)
    print("AFM, k=8, t=16, warm-started from the FM:")
    afm = AFM(n_factors=8, attention_size=16, learning_rate=0.1, keep=(1.0, 1.0),
              l2_attention=0.0, **common)
    afm.fit(data.train, validation=data.valid, init_from=fm)
    fm_rmse = fm.evaluate(data.valid)["rmse"]
    afm_rmse = afm.evaluate(data.valid)["rmse"]
    linear = linear_baseline_rmse(data.train, data.valid)
    print(f"validation RMSE ({afm.backend_} kernels): FM {fm_rmse:.4f} (epoch "
          f"{fm.best_epoch_}), AFM {afm_rmse:.4f} (epoch {afm.best_epoch_}), best linear "
          f"model {linear:.4f}, noise floor {data.noise}")
    top = top_field_pairs(afm.field_attention(data.valid, data.fields), 5)
    print("field pairs by mean AFM attention (* = planted):")
    planted = {tuple(sorted(p)) for p in data.planted_pairs}
    for a, b, weight in top:
        print(f"  fields ({a}, {b}): {weight:.3f}{' *' if (a, b) in planted else ''}")
    if plot is not None:
        from afmfast.plotting import plot_field_attention

        ax = plot_field_attention(afm, data.valid, data.fields)
        ax.figure.tight_layout()
        ax.figure.savefig(plot, dpi=120)
        print(f"field-attention heatmap saved to {plot}")
    return fm_rmse, afm_rmse, linear, top
