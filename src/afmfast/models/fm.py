"""The Factorization Machine estimator (``afmfast.FM``)."""
import math

import numpy as np

from afmfast.models.base import (
    CLASSIFIER_BASES,
    REGRESSOR_BASES,
    BinaryClassifier,
    FactorizationModel,
    _check_int,
    _check_real,
)
from afmfast.models.mcmc import McmcTrainer
from afmfast.models.training import _copy_params
from afmfast.kernels.api import BN_EPS, OPTIMIZER_CODES, FMParams, StepConfig, new_fm_params


SOLVERS = ("sgd", "mcmc")


class FM(*REGRESSOR_BASES, FactorizationModel):
    """Factorization Machine (Rendle 2010) trained as the AFM authors train it: the
    bi-interaction vector, optional batch normalisation, dropout, squared loss and
    Adagrad, with native kernels.

    Parameters
    ----------
    n_factors : int >= 1
        Embedding size k.
    learning_rate : float > 0
    batch_size : int >= 1
    n_epochs : int >= 0
    keep : float in (0, 1]
        Keep probability of the dropout on the interaction vector (1: no dropout).
    batch_norm : bool
        Batch normalisation of the interaction vector (running statistics, decay 0.9,
        epsilon 1e-3, for prediction).
    l2 : float >= 0
        L2 penalty on the embedding rows a batch touches (lazy), l2/2 ||V_row||^2.
    optimizer : {"adagrad", "sgd", "momentum", "adam"}
        Hand-written optimisers; sparse rows are updated only when touched (lazy Adam).
    early_stopping : bool
        With a validation set, stop early (see ``patience``) and restore the best epoch.
    patience : int >= 1 or None
        Stop once the validation metric has not improved on its best for this many
        epochs. None: the reference's rule, which stops once it got worse in each of the
        last 4 epochs (after more than 5), and which the CLI keeps.
    random_state : int >= 0 or None
        Seed of initialisation, shuffling and dropout (None means 2016).
    shuffle_unit : int >= 1
        Rows that an epoch's shuffle keeps together: 1 shuffles single rows; n > 1
        shuffles runs of n consecutive rows, each run's rows in their stored order,
        which reads the rows nearly in sequence, faster for large data (README,
        "Reading rows in runs"); n at or beyond the rows (of a store's window) keeps
        them in stored order. Only for rows stored in random order: runs of rows
        sorted by user, item or time make each batch less random.
    n_threads : int >= 1 or None
        Most kernel threads (None: ``afmfast.kernels.threads.default_threads()``, the CPUs of
        this process within its cgroup quota, ``OMP_NUM_THREADS``,
        ``AFMFAST_NUM_THREADS`` and threadpoolctl's OpenMP limit). Results are
        bit-identical for a seed whatever the thread count. The count used is the
        fitted ``n_threads_``.
    adaptive_threads : bool
        Let fit run on fewer threads than ``n_threads_`` while that is faster, as when
        other processes keep CPUs busy (``afmfast.kernels.threads.RunPlanner``); False runs
        every batch on ``n_threads_`` threads.
    backend : {"auto", "cython", "numba"}
    verbose : int
        0 silent; 1 one line per epoch; 2 also a progress line within each epoch (rows/s,
        ETA) on stderr.
    solver : {"sgd", "mcmc"}
        "sgd": the arguments above train the model. "mcmc": the Bayesian FM (Rendle
        2012, libFM's default) by Gibbs sampling (``FMClassifier``: the probit model by
        data augmentation, probabilities Phi of the averaged score): Normal
        priors with Normal-Gamma hyperpriors per feature group (``fit(groups=...)``;
        by default the fields of a DataFrame's columns or of a hashed store),
        predictions averaged over the kept samples (``afmfast.kernels.mcmc``,
        ``afmfast.models.mcmc``). It uses n_factors, random_state, n_threads, backend,
        verbose and the three arguments below; the optimiser arguments, dropout, batch
        normalisation and early stopping do not apply.
    n_iter : int >= 1
        MCMC only: Gibbs iterations (samples drawn).
    n_burn_in : int in [0, n_iter)
        MCMC only: the first samples, left out of the average (0 keeps all, as libFM).
    init_stdev : float >= 0
        MCMC only: V and w start from N(0, init_stdev^2) (as in libFM); w0 from 0.

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=2000, seed=0)
    >>> model = afmfast.FM(n_factors=8, n_epochs=2, verbose=0)
    >>> model = model.fit(data.train, validation=data.valid)
    >>> model.predict(data.valid).shape == (len(data.valid),)
    True
    """

    _kind = "FM"
    _model = "fm"
    _params_class = FMParams

    def __init__(self, n_factors=16, learning_rate=0.01, batch_size=4096, n_epochs=20,
                 keep=0.7, batch_norm=True, l2=0.0, optimizer="adagrad",
                 early_stopping=True, patience=None, random_state=2016, shuffle_unit=1,
                 n_threads=None, adaptive_threads=True, backend="auto", verbose=1,
                 solver="sgd", n_iter=100,
                 n_burn_in=0, init_stdev=0.1):
        self._set_constructor_args(locals())

    def _validate(self):
        _check_int("n_factors", self.n_factors, 1)
        _check_real("keep", self.keep, 0.0, 1.0, low_open=True)
        self._validate_common()
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        _check_int("n_iter", self.n_iter, 1)
        _check_int("n_burn_in", self.n_burn_in, 0)
        if self.n_burn_in >= self.n_iter:
            raise ValueError(f"n_burn_in must be below n_iter ({self.n_iter}) so that a "
                             f"sample is kept, got {self.n_burn_in}")
        _check_real("init_stdev", self.init_stdev, 0.0, math.inf)

    def _new_trainer(self, train, threads, groups):
        if self.solver != "mcmc":
            return super()._new_trainer(train, threads, groups)
        if groups is None:  # the fields of a DataFrame's columns or of a hashed store
            fmap = getattr(self, "feature_map_", None)
            groups = fmap.fields if fmap is not None else getattr(self, "fields_", None)
        return McmcTrainer(self, train, threads, groups)

    def _new_params(self, n_features, rng):
        return new_fm_params(n_features, self.n_factors, rng)

    def _new_workspace(self, backend, train):
        return backend.fm_workspace(min(self.batch_size, train.n_rows),
                                    self._max_batch_nnz(train), train.n_features,
                                    self.n_factors, np.float32)

    def _step_config(self, seed, step, threads):
        return StepConfig(float(self.learning_rate), float(self.l2), float(self.keep),
                          OPTIMIZER_CODES[self.optimizer], int(bool(self.batch_norm)),
                          seed, step, threads, self._loss)

    def _interaction_affine(self) -> tuple[np.ndarray, float]:
        """(scale (k,), shift) with which the prediction's interaction term is
        sum_f scale_f f_f + shift for the raw pairwise interactions f (the batch norm
        with its running statistics written out; scale 1, shift 0 without it): what an
        AFM warm-started from this FM folds into its p and w0."""
        k = self.n_factors
        if not self.batch_norm:
            return np.ones(k), 0.0
        dense = self._params.dense.astype(np.float64)
        gamma, beta = dense[1:1 + k], dense[1 + k:1 + 2 * k]
        mean, var = self._params.bn_stats.astype(np.float64)
        scale = gamma / np.sqrt(var + BN_EPS)
        return scale, float(np.sum(beta - scale * mean))

    def _warm_start(self, source, n_features, row_lengths=None):
        if self.solver == "mcmc" or getattr(source, "solver", "sgd") == "mcmc":
            raise ValueError("init_from: solver='mcmc' models neither start from nor "
                             "seed another model")
        if not isinstance(source, FM):
            raise ValueError(f"init_from: an FM can start only from an FM, got "
                             f"{type(source).__name__}")
        self._check_same_shape(source, n_features)
        _copy_params(self._params, source._params)

    def _predict_dataset(self, data):
        out = np.empty(data.n_rows, dtype=np.float32)
        # an MCMC model's averaged predictor has no batch normalisation
        batch_norm = bool(self.batch_norm) and getattr(self, "solver", "sgd") == "sgd"
        self._kernel_backend().fm_predict(data.X, self._params, int(batch_norm),
                                          self._kernel_threads(), out)
        return out

    def _publish(self):
        """Expose the live parameters as fitted attributes (views, no copies)."""
        p = self._params
        k = p.V.shape[1]
        self.V_, self.w_ = p.V, p.w
        self.w0_ = float(p.dense[0])
        self.bn_gamma_, self.bn_beta_ = p.dense[1:1 + k], p.dense[1 + k:]
        self.bn_mean_, self.bn_var_ = p.bn_stats[0], p.bn_stats[1]

    # ----- persistence hooks ------------------------------------------------------------
    def _array_shapes(self, n_features):
        # an MCMC model's V holds its kept samples side by side (models.mcmc)
        k = self.n_factors * (self.n_samples_ if self.solver == "mcmc" else 1)
        return {"V": (n_features, k), "w": (n_features,), "dense": (1 + 2 * k,),
                "bn_stats": (2, k)}

    def _header_extras(self):
        extras = super()._header_extras()
        if self.solver == "mcmc":
            extras["n_samples"] = self.n_samples_
        return extras

    def _load_header_extras(self, extras):
        super()._load_header_extras(extras)
        if self.solver == "mcmc":
            n = extras.get("n_samples")
            if not (isinstance(n, int) and not isinstance(n, bool)
                    and 1 <= n <= self.n_iter):
                raise ValueError(f"extras.n_samples is {n!r}, expected an integer in "
                                 f"[1, {self.n_iter}] (n_iter)")
            self.n_samples_ = n


class FMClassifier(BinaryClassifier, *CLASSIFIER_BASES, FM):
    """Factorization Machine for binary targets: the same model and arguments as ``FM``
    (see there), trained with the logistic loss (``solver="mcmc"``: the probit model).

    Labels are any two values (numbers, strings or booleans), kept sorted in
    ``classes_``; the second class is the positive one. ``predict`` returns labels,
    ``predict_proba`` the probabilities of both classes (in ``classes_`` order),
    ``decision_function`` the raw scores (the positive class's log-odds), and
    ``evaluate`` the logloss, AUC and accuracy. ``fit(..., metric="auc")`` picks the
    best epoch by validation AUC instead of logloss.

    Examples
    --------
    >>> import numpy as np, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=2000, seed=0)
    >>> clicks = (data.train.y > np.median(data.train.y)).astype(int)
    >>> clf = afmfast.FMClassifier(n_factors=4, n_epochs=2, verbose=0)
    >>> clf = clf.fit(data.train, clicks)
    >>> clf.classes_.tolist(), clf.predict_proba(data.valid).shape
    ([0, 1], (400, 2))
    """

    _kind = "FMClassifier"
