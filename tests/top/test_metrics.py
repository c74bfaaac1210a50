"""Metrics: RMSE as the reference computes it; logloss and AUC against scikit-learn."""
import numpy as np
import pytest

from afmfast.metrics import auc, auc_from_histograms, logloss, rmse, score_histograms


def test_rmse_clips_to_the_label_range():
    assert rmse([-1, 1], [-3, 0.5]) == pytest.approx(np.sqrt(0.25 / 2))
    assert np.isnan(rmse([], []))


def test_logloss_and_auc_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for labels in ([0, 1], [-1, 1]):
        y = rng.choice(labels, size=500)
        scores = np.round(rng.normal(size=500) + (y > 0), 1)  # with ties
        p = 1 / (1 + np.exp(-scores))
        assert auc(y, scores) == pytest.approx(metrics.roc_auc_score(y > 0, scores))
        assert logloss(y, p) == pytest.approx(metrics.log_loss(y > 0, p))
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_from_summed_histograms_is_the_exact_auc_but_for_shared_bins():
    rng = np.random.default_rng(4)
    y = rng.random(20000) < 0.3
    p = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.2 * y)))
    parts = [score_histograms(y[i::3], p[i::3]) for i in range(3)]  # three workers
    summed = auc_from_histograms(sum(h[0] for h in parts), sum(h[1] for h in parts))
    assert abs(summed - auc(y, p)) < 2e-4 and summed != auc(y, p[::-1])
    # probabilities on bin edges, 0 and 1 land in the first and last bins
    pos, neg = score_histograms([1, 0, 1], [0.0, 1.0, 1.0], bins=4)
    assert pos.tolist() == [1, 0, 0, 1] and neg.tolist() == [0, 0, 0, 1]
    assert auc_from_histograms(pos, neg) == auc([1, 0, 1], [0.0, 1.0, 1.0]) == 0.25
    assert np.isnan(auc_from_histograms(pos, np.zeros(4)))
