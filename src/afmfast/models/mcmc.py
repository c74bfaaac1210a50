"""One fit of ``FM(solver="mcmc")``: the Bayesian FM's Gibbs sampler (libFM's default
solver; the model and the sweep are in ``afmfast.kernels.mcmc``) and the averaged
predictor it leaves.

What the model keeps. Predictions average the kept samples' predictions, as libFM and
myFM do. The average of FMs is an FM too, of rank k S for S kept samples: with w0 and w
the sample means and V the samples' factor tables side by side, each scaled by
1/sqrt(S), the pairwise term sum_s <v_j^s, v_l^s> / S is exactly <v_j, v_l>. So the
fitted FM holds that (M, k S) table (``V_``, float32), predicts through the ordinary FM
prediction kernels (batch normalisation off) and saves and loads as any FM. Keeping the
samples themselves would cost the same memory and need a prediction kernel of its own;
keeping only mean parameters would predict with the FM of the mean, which is not the
mean prediction (the interaction is not linear in V).

The chain's state is float64 (``kernels.mcmc``). ``backend`` picks the sweep's backend
(``kernels.backends``, model "mcmc": "auto" takes Cython when it is built) and the
prediction kernels; the column view, the plan and the scores, computed once per fit or
once per iteration in O(nnz), come from the Numba module whichever backend sweeps. The
two backends' samples are bit-identical.
"""
from __future__ import annotations

import importlib
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from afmfast.kernels.api import FMParams, aligned_empty
from afmfast.kernels.mcmc import (draw_scalars, hyper_groups, latent_rng, sum_of_squares,
                                   truncated_normals)
from afmfast.kernels import backends
from afmfast.kernels.threads import RunPlanner
from afmfast.models.training import TrainingDivergedError, _model_seed

if TYPE_CHECKING:  # annotations only
    from collections.abc import Callable, Sequence

    from afmfast.data.dataset import Dataset
    from afmfast.models.fm import FM


def sampler_backend(name: str = "auto"):
    """The module that implements the Gibbs sweep (``mcmc_workspace``, ``mcmc_sweep``)
    for ``backend`` ``name``: ``afmfast._mcmc_cython`` or ``afmfast.kernels.numba.mcmc``."""
    return backends.get_backend(name, "mcmc")


def sampler_preparation():
    """The module that builds the sweep's column view and plan and computes the scores
    and the q cache (``afmfast.kernels.numba.mcmc``), imported on first use."""
    return importlib.import_module("afmfast.kernels.numba.mcmc")


class McmcTrainer:
    """The per-fit state of ``FM(solver="mcmc")``: the column view of the training rows,
    the sweep's plan, the chain (w0, w, V and the caches e = y - yhat and q), and the
    running sums of the kept samples.

    Parameters
    ----------
    model : FM
        A validated FM with ``solver="mcmc"``.
    train : Dataset
    threads : int
        The sweep's thread count (the samples do not depend on it).
    groups : array of int (n_features,) or None
        Hyperprior groups, also the sweep's blocks when given; None: one hyperprior
        group, blocks found greedily from the rows.

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.demo import make_demo_data
    >>> train = make_demo_data(n_rows=300, seed=0).train
    >>> model = afmfast.FM(n_factors=2, solver="mcmc", n_iter=3, verbose=0)
    >>> model._validate()
    >>> trainer = McmcTrainer(model, train, threads=1)
    >>> trainer.run_epochs(train, None, [], "rmse", False)
    >>> len(model.history_), model.V_.shape[1]
    (3, 6)
    """

    def __init__(self, model: FM, train: Dataset, threads: int, groups=None):
        self.model = model
        self.backend = backends.get_backend(model.backend, "fm")
        self.sampler = sampler_backend(model.backend)
        self.prep = sampler_preparation()
        self.threads = threads
        # the samples do not depend on the thread count, so the planner may move it
        # (afmfast.kernels.threads): each iteration is one run of one "batch" of all rows
        self.planner = RunPlanner(threads, adaptive=bool(model.adaptive_threads))
        self.seed = _model_seed(model)
        M, k = train.n_features, model.n_factors
        self.groups, self.n_groups = hyper_groups(groups, M)
        self.columns = self.prep.mcmc_columns(train.X, M)
        self.plan = self.prep.mcmc_plan(train.X, self.columns,
                                           None if groups is None else self.groups)
        rng = np.random.default_rng(self.seed)
        self.w0 = 0.0
        # w starts from N(0, init_stdev^2) as V does (libFM's MCMC does too): from w = 0
        # the first draw of lam_w sees no spread at all and is about M, which holds every
        # w_j near mu_w for many iterations (the chain then needs far more than 100
        # iterations to let the linear terms grow)
        self.V = rng.normal(0.0, float(model.init_stdev), size=(M, k))
        self.w = rng.normal(0.0, float(model.init_stdev), size=M)
        # rows of q on their own cache lines (at k = 8, 16, ...): threads write
        # different rows
        self.q = aligned_empty((train.n_rows, k), np.float64)
        self.e = np.empty(train.n_rows)
        self.workspace = self.sampler.mcmc_workspace(self.columns, k, threads)

    def _scores(self, data, q, out):
        self.prep.mcmc_scores(data.X, self.w0, self.w, self.V, q, out, self.threads)
        return out

    def run_epochs(self, train: Dataset, valid: Dataset | None,
                   callbacks: Sequence[Callable], monitor: str, score_train: bool) -> None:
        """Run ``n_iter`` Gibbs iterations (fewer if a callback stops them or Ctrl-C),
        recording one ``history_`` record an iteration: ``train_rmse`` of that sample,
        ``valid_rmse`` of the average of the samples kept so far (None during burn-in or
        without validation), ``alpha`` (the noise precision drawn), ``seconds`` (the
        iteration's sampling time) and ``threads`` (its thread count: with the model's
        ``adaptive_threads`` the planner may use fewer while that is faster, as for the
        SGD solver; the samples are the same). The model is left predicting with the
        average of the kept samples (with the last sample when none was kept yet).
        ``monitor`` and ``score_train`` are accepted for the fit protocol: every record
        has the training RMSE, and the average is never "early stopped"."""
        model = self.model
        model.history_ = []
        y = np.asarray(train.y, np.float64)
        probit = model._is_classifier
        positive = y > 0
        # the probit model regresses latent targets z (drawn each iteration, y the
        # labels only decide their sign) with the noise precision fixed at 1
        target = np.zeros_like(y) if probit else y
        self.e[:] = target - self._scores(train, self.q, np.empty(train.n_rows))
        M, k = self.V.shape
        S = model.n_iter - model.n_burn_in
        V_sum = np.zeros((M, k * S), np.float32)
        w_sum, w0_sum, kept = np.zeros(M), 0.0, 0
        if valid is not None:
            q_valid, p_valid = np.empty((valid.n_rows, k)), np.empty(valid.n_rows)
            valid_sum = np.zeros(valid.n_rows)
        try:
            n = train.n_rows
            for it in range(model.n_iter):
                threads, _ = self.planner.next_run(n, n * (model.n_iter - it))
                t0 = time.perf_counter()
                if probit:
                    z = truncated_normals(target - self.e, positive,
                                          latent_rng(self.seed, it))
                    self.e += z - target
                    target = z
                hyper, w0 = draw_scalars(self.w0, self.w, self.V, self.e, self.groups,
                                         self.n_groups, self.seed, it,
                                         alpha=1.0 if probit else None)
                self.e -= w0 - self.w0
                self.w0 = w0
                self.sampler.mcmc_sweep(self.columns, self.plan, self.groups, self.w,
                                        self.V, self.e, self.q, hyper, self.seed, it,
                                        threads, self.workspace)
                seconds = time.perf_counter() - t0
                self.planner.record(threads, n, 1, seconds)
                train_rmse = math.sqrt(sum_of_squares(self.e) / len(self.e))
                if not math.isfinite(train_rmse):
                    raise TrainingDivergedError(
                        f"the Gibbs sampler's residuals stopped being finite in iteration "
                        f"{it + 1}; check the labels' scale")
                record = {"epoch": it + 1, "train_rmse": train_rmse,
                          "alpha": float(hyper.alpha)}
                if probit:  # of this sample's scores (target - e)
                    record["train_accuracy"] = float(np.mean(
                        ((target - self.e) > 0) == positive))
                record.update((f"valid_{name}", None) for name in model._task_metrics)
                if it >= model.n_burn_in:
                    V_sum[:, kept * k:(kept + 1) * k] = self.V
                    w_sum += self.w
                    w0_sum += self.w0
                    kept += 1
                    if valid is not None:
                        valid_sum += self._scores(valid, q_valid, p_valid)
                        metrics = model._evaluate_scores(valid.y, valid_sum / kept,
                                                         model._clip_bounds("train"))
                        record.update((f"valid_{name}", value)
                                      for name, value in metrics.items())
                record.update(seconds=seconds, threads=threads)
                model.history_.append(record)
                shown = record[f"valid_{monitor}"]
                model._log(f"Iteration {it + 1} [{seconds:.3f} s]\ttrain rmse (this "
                           f"sample)={train_rmse:.4f}" + (
                               "" if shown is None else
                               f", validation {monitor} (average)={shown:.4f}"))
                if any([bool(callback(model, record)) for callback in callbacks]):
                    model._log(f"Stopped by a callback after iteration {it + 1}.")
                    break
        finally:
            if kept == 0:  # nothing kept yet: the last sample stands alone
                V_sum[:, :k], w_sum, w0_sum, kept = self.V, self.w.copy(), self.w0, 1
            self._publish(V_sum[:, :k * kept], w_sum, w0_sum, kept)

    def _publish(self, V_kept, w_sum, w0_sum, kept):
        """Give the model the averaged predictor of ``kept`` samples (module docstring)."""
        V_kept *= np.float32(1.0 / math.sqrt(kept))
        width = V_kept.shape[1]
        dense = np.zeros(1 + 2 * width, np.float32)
        dense[0] = w0_sum / kept
        dense[1:1 + width] = 1.0
        bn_stats = np.zeros((2, width), np.float32)
        bn_stats[1] = 1.0
        model = self.model
        model.n_samples_ = kept
        model.best_epoch_ = len(model.history_)
        model._set_arrays(dict(zip(FMParams._fields, (
            V_kept, (w_sum / kept).astype(np.float32), dense, bn_stats))))
