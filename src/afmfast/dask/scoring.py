"""Validation on the workers of a Dask fit: what each worker sums over its validation
shards (``score_sums``), the metrics those sums give (``summed_metrics``), and the
per-epoch decisions that a single process takes from its validation metric (best
epoch, early stop, divergence), taken here by every worker alike
(``SummedEpochJudge``), so that the workers run epoch after epoch without a call from
the driver between them.
"""
from __future__ import annotations

import math

import numpy as np

from afmfast.metrics import auc_from_histograms, logloss, score_histograms
from afmfast.models.training import EpochJudge


def score_sums(model, datasets, bounds):
    """Sums over ``datasets`` from which the driver computes its metrics: regression,
    the squared error with predictions clipped to ``bounds`` (the labels' range over
    every worker, as ``afmfast.metrics.rmse`` clips); classification, the logloss sum,
    the correct predictions and the positives' and negatives' histograms of the
    probabilities (``afmfast.metrics.score_histograms``, for the AUC); both, the rows
    and whether every score is finite.

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=500, seed=0)
    >>> model = afmfast.FM(n_factors=4, n_epochs=1, n_threads=1, verbose=0).fit(data.train)
    >>> sums = score_sums(model, [data.valid[:50], data.valid[50:]],
    ...                   (float(data.valid.y.min()), float(data.valid.y.max())))
    >>> sums["rows"], bool(np.isclose(np.sqrt(sums["sse"] / sums["rows"]),
    ...                               model.evaluate(data.valid)["rmse"]))
    (100, True)
    """
    out = {"finite": True, "rows": 0, "sse": 0.0, "logloss_sum": 0.0, "correct": 0,
           "auc_histograms": None}
    for data in datasets:
        if data.n_rows == 0:
            continue
        scores = model._predict_dataset(data).astype(np.float64)
        y = np.asarray(data.y, np.float64)
        out["rows"] += data.n_rows
        if model._is_classifier:
            p = model._probability(scores)
            out["logloss_sum"] += logloss(y, p) * data.n_rows
            out["correct"] += int(np.sum((scores > 0) == (y > 0)))
            histograms = score_histograms(y, p)
            if out["auc_histograms"] is not None:
                histograms = tuple(a + b for a, b in zip(out["auc_histograms"], histograms))
            out["auc_histograms"] = histograms
        else:
            out["sse"] += math.fsum((y - np.clip(scores, bounds[0], bounds[1])) ** 2)
        out["finite"] = out["finite"] and bool(np.all(np.isfinite(scores)))
    return out


def summed_metrics(model, sums: list[dict]) -> dict:
    """The validation metrics of ``model``'s task from the workers' ``score_sums``
    (NaN for every metric when no worker scored a row).

    Examples
    --------
    >>> import afmfast
    >>> summed_metrics(afmfast.FM(), [{"rows": 2, "sse": 1.0}, {"rows": 2, "sse": 3.0}])
    {'rmse': 1.0}
    """
    rows = sum(s["rows"] for s in sums)
    if rows == 0:
        return dict.fromkeys(model._task_metrics, float("nan"))
    if model._is_classifier:
        histograms = [s["auc_histograms"] for s in sums if s["auc_histograms"] is not None]
        return {"logloss": sum(s["logloss_sum"] for s in sums) / rows,
                "auc": auc_from_histograms(sum(h[0] for h in histograms),
                                           sum(h[1] for h in histograms)),
                "accuracy": sum(s["correct"] for s in sums) / rows}
    return {"rmse": math.sqrt(math.fsum(s["sse"] for s in sums) / rows)}


class SummedEpochJudge(EpochJudge):
    """``afmfast.models.training.EpochJudge`` fed with the workers' ``score_sums``:
    every worker of a Dask fit holds one and feeds it the same sums in the same order,
    so all of them decide alike, as a single process does; scores that are not finite
    mean the training diverged.

    Examples
    --------
    >>> import afmfast
    >>> judge = SummedEpochJudge(afmfast.FM(patience=1), "rmse", validated=True)
    >>> [judge.judge_sums(e, [{"rows": 1, "sse": s, "finite": True}])["improved"]
    ...  for e, s in ((1, 4.0), (2, 1.0))]
    [True, True]
    >>> verdict = judge.judge_sums(3, [{"rows": 1, "sse": 9.0, "finite": True}])
    >>> verdict["improved"], verdict["best_epoch"], verdict["stop"]
    (False, 2, 'did not improve for 1 epochs')
    """

    def judge_sums(self, epoch: int, sums: list[dict]) -> dict:
        """The verdict on ``epoch`` from every worker's ``score_sums`` (worker order):
        {"metrics": the validation metrics (None when diverged), "improved",
        "best_epoch", "stop": why training stops after it (or None), "diverged"}."""
        if not all(s["finite"] for s in sums):
            return {"metrics": None, "improved": False, "best_epoch": self.best_epoch,
                    "stop": None, "diverged": True}
        metrics = (summed_metrics(self.model, sums) if self.validated
                   else dict.fromkeys(self.model._task_metrics))
        improved, stop = self.judge(epoch, metrics)
        return {"metrics": metrics, "improved": improved, "best_epoch": self.best_epoch,
                "stop": stop, "diverged": False}
