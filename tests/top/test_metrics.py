"""Metrics: RMSE as the reference computes it; logloss and AUC against scikit-learn."""
import numpy as np
import pytest

from afmfast.metrics import auc, logloss, rmse


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
