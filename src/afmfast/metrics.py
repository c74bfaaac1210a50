"""Evaluation metrics, computed as the reference code computes them."""
import numpy as np


def rmse(y_true, y_pred, clip: tuple[float, float] | bool | None = None) -> float:
    """Root mean squared error after clipping predictions: to [min(y_true),
    max(y_true)] by default, as the reference does; to ``clip`` = (low, high) when
    given; not at all with ``clip=False``. An empty set has RMSE NaN.

    Examples
    --------
    >>> rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])  # 5 is clipped to 3
    0.0
    >>> round(rmse([1.0, 2.0, 3.0], [1.0, 2.0, 2.0]), 4)
    0.5774
    >>> rmse([3.0], [4.0]), rmse([3.0], [6.0], clip=(1, 5)), rmse([3.0], [4.0], clip=False)
    (0.0, 2.0, 1.0)
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    if y_true.size == 0:
        return float("nan")
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if clip is None:
        y_pred = np.clip(y_pred, y_true.min(), y_true.max())
    elif clip is not False:
        y_pred = np.clip(y_pred, clip[0], clip[1])
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


#: metrics where a larger value is better (the others: smaller is better)
HIGHER_IS_BETTER = frozenset({"auc", "accuracy"})


def logloss(y_true, p, eps=1e-15):
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [eps, 1 - eps]) for
    targets y > 0, so labels {0, 1} and {-1, 1} give the same value; NaN when empty.

    Examples
    --------
    >>> round(logloss([1, 0], [0.9, 0.2]), 4), round(logloss([1, -1], [0.9, 0.2]), 4)
    (0.1643, 0.1643)
    """
    t = np.asarray(y_true) > 0
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(np.where(t, np.log(p), np.log1p(-p)))) if t.size else float("nan")


def auc(y_true, scores):
    """Area under the ROC curve for targets y > 0 (ties count one half); NaN unless both
    classes occur.

    Examples
    --------
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auc([1, 1], [0.1, 0.2])
    nan
    """
    t = np.asarray(y_true) > 0
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    uniq, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct score
    ranks = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = ranks[inverse.reshape(-1)][t].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


#: bins of ``score_histograms``: pairs of a positive and a negative whose probabilities
#: are closer than 1 / AUC_BINS may share a bin, and count one half as ties do
AUC_BINS = 1 << 14


def score_histograms(y_true, p, bins: int = AUC_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the positives (y > 0) and of the negatives over ``bins`` equal bins of
    the probabilities ``p`` in [0, 1]: they add up over the parts of a data set (the
    workers of ``afmfast.dask``), and ``auc_from_histograms`` turns their sums into
    the AUC.

    Examples
    --------
    >>> pos, neg = score_histograms([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], bins=10)
    >>> np.flatnonzero(pos).tolist(), np.flatnonzero(neg).tolist()
    ([3, 8], [1, 4])
    """
    index = np.minimum((np.asarray(p, np.float64) * bins).astype(np.int64), bins - 1)
    index = np.maximum(index, 0)
    t = np.asarray(y_true) > 0
    return (np.bincount(index[t], minlength=bins).astype(np.int64),
            np.bincount(index[~t], minlength=bins).astype(np.int64))


def auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The AUC from (summed) ``score_histograms``: ``auc`` of the binned probabilities,
    so a positive and a negative in one bin count one half; NaN unless both classes
    occur.

    Examples
    --------
    >>> auc_from_histograms(*score_histograms([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    positives = np.asarray(positives, np.float64)
    negatives = np.asarray(negatives, np.float64)
    n_pos, n_neg = positives.sum(), negatives.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives
    return float(np.sum(positives * (below + 0.5 * negatives)) / (n_pos * n_neg))
