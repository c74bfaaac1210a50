"""Estimators: parameters, argument validation, input coercion, prediction, evaluation.

``FactorizationModel`` holds what every model shares (scikit-learn style parameters, input
coercion, ``fit``'s set-up, prediction and evaluation, pickling, save); the training
itself (epoch loop, early stopping, best-epoch restore, divergence stop) is a
``afmfast.models.training.Trainer``. ``FM`` and ``AFM`` add their parameter tables and
kernels; ``BinaryClassifier`` the logistic loss and labels.
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import TYPE_CHECKING

import numpy as np

from afmfast.data.dataset import Dataset
from afmfast.data.encoding import FeatureMap, is_dataframe
from afmfast.kernels import backends
from afmfast.kernels.api import LOGISTIC, OPTIMIZER_CODES, SQUARED, aligned_copy
from afmfast.kernels.threads import resolve_threads
from afmfast.metrics import rmse
from afmfast.models import persistence
from afmfast.models.training import Trainer
from afmfast.models.inputs import as_real, binary_classes, check_columns, label_vector, n_rows

if TYPE_CHECKING:  # annotations only
    import os
    from collections.abc import Callable, Sequence

    from numpy.typing import ArrayLike

    from afmfast.models.inputs import ModelInput


try:  # scikit-learn is optional: with it, models are full scikit-learn estimators
    from sklearn.base import BaseEstimator as _SkBase
    from sklearn.base import ClassifierMixin as _SkClassifier
    from sklearn.base import RegressorMixin as _SkRegressor
    from sklearn.exceptions import NotFittedError as _SkNotFittedError

    _SKLEARN_BASES, REGRESSOR_BASES, CLASSIFIER_BASES = (_SkBase,), (_SkRegressor,), \
        (_SkClassifier,)
    _NOT_FITTED_BASES = (_SkNotFittedError,)  # itself a ValueError and AttributeError
except ImportError:
    _SKLEARN_BASES = REGRESSOR_BASES = CLASSIFIER_BASES = ()
    _NOT_FITTED_BASES = (ValueError, AttributeError)


class NotFittedError(*_NOT_FITTED_BASES):
    """A model was asked to predict (or save, explain, ...) before ``fit`` or ``load``.

    A ``ValueError`` and an ``AttributeError``, and with scikit-learn installed also
    ``sklearn.exceptions.NotFittedError``, so that code catching any of them works.

    Examples
    --------
    >>> import afmfast
    >>> try:
    ...     afmfast.FM().predict([[1.0, 0.0]])
    ... except afmfast.NotFittedError as exc:
    ...     print(exc)
    this FM is not fitted yet: call fit() or afmfast.load() first
    """


#: Parameter tables (parameters and optimiser state) larger than this are refused when the
#: feature count was derived from the data's largest id rather than given explicitly:
#: one stray id like 2_000_000_000 must not allocate hundreds of gigabytes.
MAX_PARAMETER_BYTES = 4 << 30

def _largest_batch_total(train, batch_size, per_row):
    """The most that a batch of ``batch_size`` rows of ``train`` can hold of a quantity
    ``per_row(n)`` of a row with n nonzeros (non-decreasing in n, vectorised): its sum
    over the longest rows, from the row-length histogram (no O(n_rows) scratch)."""
    counts = train.row_length_counts()[::-1]  # longest rows first
    lengths = np.arange(len(counts) - 1, -1, -1, dtype=np.int64)
    before = np.cumsum(counts) - counts  # rows longer than each length
    taken = np.clip(min(batch_size, train.n_rows) - before, 0, counts)
    return int((taken * per_row(lengths)).sum())


def as_dataset(X, y=None, *, name="X"):
    """A ``Dataset`` from a Dataset (y then must be None or override its labels), a
    CSR-like object (``indptr/indices/data/shape``; other scipy.sparse formats are
    converted to CSR) with y, or a dense 2-D array with y (its nonzeros become the
    stored values). This is how ``fit``, ``predict`` and ``evaluate`` read their X.

    Examples
    --------
    >>> ds = as_dataset([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]], [1.0, 0.0])
    >>> ds
    Dataset(n_rows=2, n_features=3, nnz=3, max_row_nnz=2)
    >>> ds.indices.tolist(), ds.values.tolist()
    ([0, 2, 1], [1.0, 2.0, 3.0])
    """
    if isinstance(X, Dataset):
        return X if y is None else X.with_labels(y)
    if y is None:
        raise ValueError(f"{name}: labels y are required unless {name} is an afmfast.Dataset")
    if getattr(X, "format", "csr") != "csr" and hasattr(X, "tocsr"):
        X = X.tocsr()  # scipy CSC/COO/...: CSC also has indptr/indices, but over columns
    if all(hasattr(X, a) for a in ("indptr", "indices", "data", "shape")):
        as_real(X.data, name)
        return Dataset.from_csr(X, y)
    dense = as_real(X, name)
    if dense.ndim != 2:
        raise ValueError(
            f"{name} must be an afmfast.Dataset, a CSR matrix or a 2-D array, got "
            f"{type(X).__name__} with shape {dense.shape}. Reshape your data: "
            "array.reshape(-1, 1) for a single feature, array.reshape(1, -1) for one row."
        )
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    return Dataset(indptr, cols.astype(np.int32), dense[rows, cols], y, dense.shape[1])


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_real(name, value, low, high, low_open=False):
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
        raise ValueError(f"{name} must be True or False, got {value!r}")


class FactorizationModel(*_SKLEARN_BASES):
    """Shared machinery of ``FM`` and ``AFM``; not used directly.

    When scikit-learn is importable the models inherit its ``BaseEstimator`` and
    ``RegressorMixin`` or ``ClassifierMixin`` (so ``clone``, ``cross_val_score``,
    ``GridSearchCV`` and ``Pipeline`` work, and ``score`` is R^2 or accuracy); without it
    they are plain classes with the same ``get_params``/``set_params``/``fit``/``predict``
    protocol.

    Examples
    --------
    >>> import afmfast
    >>> isinstance(afmfast.AFM(), FactorizationModel)
    True
    >>> sorted(set(afmfast.AFM().get_params()) - set(afmfast.FM().get_params()))
    ['activation', 'attention', 'attention_size', 'fold_fm', 'freeze_fm', 'l2_attention']
    """

    #: set by subclasses: the class name saved in model files, the kernel family
    #: ("fm" or "afm") and the namedtuple class of the parameters
    _kind = None
    _model = None
    _params_class = None
    _loss = SQUARED
    _is_classifier = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_kind" in cls.__dict__:  # a concrete model: its files load as this class
            persistence.register_model_class(cls)

    # ----- scikit-learn parameter protocol -------------------------------------------
    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def _set_constructor_args(self, args):
        """Keep each constructor argument (``locals()`` of ``__init__``) unchanged under
        its own name: scikit-learn's rule that ``__init__`` validates nothing (``fit``
        does), which ``clone`` and ``set_params`` rely on."""
        for name in self._get_param_names():
            setattr(self, name, args[name])

    def get_params(self, deep=True):
        """Constructor arguments as a dict (scikit-learn protocol); ``deep`` is accepted
        for scikit-learn and changes nothing (the models hold no sub-estimators).

        Examples
        --------
        >>> import afmfast
        >>> params = afmfast.FM(n_factors=8).get_params()
        >>> params["n_factors"], params["keep"], len(params)
        (8, 0.7, 20)
        """
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        """Set constructor arguments (scikit-learn protocol); returns self. An unknown
        name raises ``ValueError`` listing the valid ones; values are checked by ``fit``.

        Examples
        --------
        >>> import afmfast
        >>> model = afmfast.FM().set_params(n_factors=32, keep=1.0)
        >>> model.n_factors, model.keep
        (32, 1.0)
        """
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                 f"valid parameters: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ----- validation -----------------------------------------------------------------
    def _validate_common(self):
        _check_real("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("n_epochs", self.n_epochs, 0)
        _check_real("l2", self.l2, 0.0, math.inf)
        if self.optimizer not in OPTIMIZER_CODES:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_CODES)}, "
                             f"got {self.optimizer!r}")
        _check_bool("early_stopping", self.early_stopping)
        if self.patience is not None:
            _check_int("patience", self.patience, 1)
        _check_bool("batch_norm", self.batch_norm)
        if self.random_state is not None:
            _check_int("random_state", self.random_state, 0)
        _check_int("shuffle_unit", self.shuffle_unit, 1)
        _check_int("verbose", self.verbose, 0)
        _check_bool("adaptive_threads", self.adaptive_threads)
        if self.backend not in backends.BACKEND_NAMES:
            raise ValueError(f"backend must be one of {backends.BACKEND_NAMES}, "
                             f"got {self.backend!r}")

    # ----- training -------------------------------------------------------------------
    def fit(self, X: ModelInput, y: ArrayLike | str | None = None, *,
            validation: ModelInput | tuple | None = None,
            init_from: FactorizationModel | str | os.PathLike | None = None,
            callbacks: Sequence[Callable] | None = None, metric: str | None = None,
            score_train: bool = False,
            categorical: Sequence[str] | None = None,
            groups: ArrayLike | None = None) -> FactorizationModel:
        """Train; from scratch unless ``init_from`` is given.

        Parameters
        ----------
        X : Dataset, CSR-like matrix, 2-D array or pandas DataFrame
            Training rows; ``y`` is taken from a Dataset unless given. A DataFrame is
            encoded by a ``FeatureMap`` fitted on it (kept as ``feature_map_`` and saved
            with the model), so later DataFrames predict with the same features.
        y : array of float, or a column name when X is a DataFrame
        validation : Dataset or (X, y) tuple, optional
            Evaluated after every epoch; drives early stopping and the best-epoch restore.
            X and y as ``fit`` takes them (a DataFrame with its label column's name, for
            a model fitted on DataFrames); anything else is a ``ValueError``.
        init_from : fitted model or path of a saved one, optional
            Warm start: copy its parameters (same n_factors and feature count required);
            the optimiser state starts afresh.
        callbacks : list of callables, optional
            Each is called as ``callback(model, record)`` after every epoch with that
            epoch's ``history_`` record; a truthy return value stops training (the usual
            best-epoch restore still applies).
        metric : str, optional
            The validation metric that picks the best epoch and drives early stopping:
            one of the model's ``evaluate`` metrics ("rmse" for regressors; "logloss"
            (default), "auc" or "accuracy" for classifiers).
        score_train : bool, default False
            Also re-score the whole training set after every epoch (no dropout, the
            epoch's final parameters) and record ``train_<metric>`` for each evaluation
            metric. Off by default: it costs about a forward pass over the training set
            per epoch. Every epoch records ``train_loss`` either way: the training
            objective per row that the optimiser saw during the epoch (with dropout,
            before each batch's update, L2 terms included).
        categorical : list of str, optional
            With a DataFrame X: columns to one-hot encode even though they hold numbers
            (integer ids, as ``pandas.read_csv`` reads them); see ``FeatureMap.fit``.
        groups : array of int, one per feature, optional
            ``FM(solver="mcmc")`` only: the field of each feature, which gives the
            hyperprior groups and the blocks the sampler runs in parallel (by default
            the DataFrame's columns for a model fitted on one, else one group).

        Returns
        -------
        self

        Each epoch is one pass over a seeded shuffle of the rows (``random_state`` and
        the epoch number give the order, the same for any ``n_threads``) in batches of
        ``batch_size``, handed to the kernel in runs of batches (about 0.1 s each).
        The runs' thread count is ``n_threads_``, or with ``adaptive_threads`` whatever
        count up to it trains fastest while the run lasts (``afmfast.kernels.threads``); each
        ``history_`` record names the count that trained most of its epoch's rows.
        With a validation set and ``early_stopping``, training stops once the validation
        metric has not improved for ``patience`` epochs (None: once it got worse in each
        of the last 4 epochs, after more than 5) and the parameters of the best
        validation epoch are restored (``best_epoch_``).

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)
        >>> stop_after_2 = lambda model, record: record["epoch"] == 2
        >>> model = afmfast.FM(n_factors=4, n_epochs=10, n_threads=1, verbose=0)
        >>> model = model.fit(data.train, validation=data.valid, callbacks=[stop_after_2])
        >>> len(model.history_), sorted(model.history_[0]), model.best_epoch_
        (2, ['epoch', 'seconds', 'threads', 'train_loss', 'valid_rmse'], 2)
        """
        self._validate()
        threads = resolve_threads(self.n_threads)
        _check_bool("score_train", score_train)
        monitor = self._task_metrics[0] if metric is None else metric
        if monitor not in self._task_metrics:
            raise ValueError(f"metric must be one of {self._task_metrics}, got {metric!r}")
        if is_dataframe(X):
            self.feature_map_ = FeatureMap.fit(
                X, [c for c in X.columns if c != y] if isinstance(y, str) else None,
                categorical=categorical)
        else:
            if categorical is not None:
                raise ValueError("categorical: names DataFrame columns to one-hot encode; "
                                 f"X is a {type(X).__name__}, not a DataFrame")
            if hasattr(self, "feature_map_"):
                del self.feature_map_  # fit starts from scratch
        train = self._dataset(X, y, fit=True)
        self._keep_fields(X if isinstance(X, Dataset) else None)
        if train.n_rows == 0:
            raise ValueError("X: cannot fit on an empty data set")
        if train.n_features == 0:  # scikit-learn's wording, which its checks expect
            raise ValueError(f"X: found array with 0 feature(s) (shape=({train.n_rows}, 0)) "
                             "while a minimum of 1 is required.")
        valid = None if validation is None else self._validation_dataset(validation)
        _check_parameter_budget(train, self.n_factors)
        self._training = True
        try:
            trainer = self._trainer = self._new_trainer(train, threads, groups)
            self.n_features_in_ = train.n_features
            if not self._is_classifier:
                self._record_label_range(train.y)
            self._monitor = monitor
            self._backend = trainer.backend
            self.backend_ = backends.backend_name(trainer.backend)
            self.n_threads_ = self._threads = threads
            if init_from is not None:
                self._warm_start(_as_model(init_from), train.n_features,
                                 train.row_length_counts())
            trainer.run_epochs(train, valid, list(callbacks or ()), monitor, bool(score_train))
        finally:
            self._training = False
            self.__dict__.pop("_trainer", None)
        return self

    def _keep_fields(self, X):
        """Keep the field of each feature id of a training Dataset that has them (a
        hashed store's) as ``fields_`` and ``field_names_``: saved with the model, they
        are ``AFM.field_attention``'s default."""
        self.__dict__.pop("fields_", None)
        self.__dict__.pop("field_names_", None)
        if X is not None and X.fields is not None:
            self.fields_ = np.array(X.fields, np.int32)  # a store's are a memory map
            self.field_names_ = X.field_names

    def _new_trainer(self, train, threads, groups):
        """The fit's trainer: a ``Trainer`` (SGD-family optimisers); models with other
        solvers override this."""
        if groups is not None:
            raise ValueError(f"groups: only FM(solver='mcmc') uses feature groups; this "
                             f"is a {type(self).__name__} with SGD-family training")
        return Trainer(self, train, threads=threads)

    def _validation_dataset(self, validation):
        """``fit``'s validation argument (a Dataset or an (X, y) tuple) as a Dataset."""
        if isinstance(validation, tuple) and len(validation) == 2:
            return self._dataset(*validation, name="validation")
        if isinstance(validation, Dataset):
            return self._dataset(validation, name="validation")
        got = (f"a tuple of {len(validation)} items" if isinstance(validation, tuple)
               else f"a {type(validation).__name__}")
        hint = (" (Dataset.X is (indptr, indices, values): pass the Dataset itself)"
                if isinstance(validation, tuple) and len(validation) == 3 else "")
        raise ValueError(f"validation must be an afmfast.Dataset or an (X, y) tuple, got "
                         f"{got}{hint}: pass validation=valid_dataset or "
                         f"validation=(X_valid, y_valid)")

    def _max_batch_nnz(self, train):
        # at least 1: the Cython workspaces refuse a bound of 0, while a data set without
        # nonzeros still trains w0 (as the Numba backend always did)
        return max(1, _largest_batch_total(train, self.batch_size, lambda n: n))

    def _log(self, text):
        if self.verbose:
            print(text, file=sys.stdout, flush=True)

    #: the metrics ``evaluate`` reports, the first one monitored by default
    _task_metrics = ("rmse",)

    def _header_extras(self):
        """JSON-able fitted state beyond the arrays (saved in model files)."""
        return {"y_range": list(self.y_range_)} if hasattr(self, "y_range_") else {}

    def _load_header_extras(self, extras):
        y_range = extras.get("y_range")
        if y_range is None:  # saved before fit recorded it
            self.__dict__.pop("y_range_", None)
            return
        ok = (isinstance(y_range, list) and len(y_range) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) for v in y_range) and y_range[0] <= y_range[1])
        if not ok:
            raise ValueError(f"y_range {y_range!r} is not a [low, high] pair of finite "
                             f"numbers")
        self.y_range_ = (float(y_range[0]), float(y_range[1]))

    def _initial_bias(self, label_sum: float, n_rows: int) -> float:
        """w0 at the start of SGD training: the mean training label, from which the
        model's zero-mean interaction terms start (w0 = 0 on raw 1-5 ratings leaves
        the first epochs to learn the offset)."""
        return label_sum / max(n_rows, 1)

    def _record_label_range(self, y):
        """Keep the training labels' [min, max] as ``y_range_`` (``evaluate``'s clip)."""
        self.y_range_ = (float(np.min(y)), float(np.max(y)))

    def _evaluate_scores(self, y, scores, bounds=None):
        return {"rmse": rmse(y, scores, clip=bounds)}

    def _measure(self, data):
        """(raw scores, metrics) of a data set, a regressor's clipped as ``evaluate``
        clips by default."""
        scores = self._predict_dataset(data)
        return scores, self._evaluate_scores(data.y, scores, self._clip_bounds("train"))

    # ----- prediction -----------------------------------------------------------------
    def _check_fitted(self):
        # Predicting while fit() mutates the parameters in another thread would read
        # half-updated tables: refuse rather than return inconsistent scores.
        if getattr(self, "_training", False):
            raise RuntimeError(f"this {type(self).__name__} is being trained by fit() in "
                               "another thread; predict after fit returns, or predict with "
                               "a copy loaded by afmfast.load()")
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() "
                                 "or afmfast.load() first")

    def __sklearn_is_fitted__(self):
        # what sklearn.utils.validation.check_is_fitted asks
        return hasattr(self, "n_features_in_")

    def _rows(self, X, y=None, *, need_labels=False):
        """X (and y) of predict, evaluate and explain, for a fitted model: an array or
        matrix must have ``n_features_in_`` columns (a Dataset may hold larger ids)."""
        self._check_fitted()
        return self._dataset(X, y, need_labels=need_labels, n_features=self.n_features_in_)

    def predict(self, X: ModelInput) -> np.ndarray:
        """Raw scores (float32, one per row). X is a Dataset, a CSR-like matrix, a dense
        2-D array or (for a model fitted on one) a DataFrame; no labels needed. A matrix
        or array must have ``n_features_in_`` columns; a Dataset (a libFM file read on
        its own) may hold feature ids at or above it, which were never seen in training
        and contribute nothing.

        Examples
        --------
        >>> import numpy as np, afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)
        >>> model = afmfast.FM(n_factors=4, n_epochs=2, n_threads=1, verbose=0).fit(data.train)
        >>> scores = model.predict(data.valid)
        >>> scores.dtype, scores.shape
        (dtype('float32'), (200,))
        >>> seen = afmfast.Dataset([0, 1], [0], [1.0], [0.0])
        >>> unseen = afmfast.Dataset([0, 2], [0, model.n_features_in_ + 5], [1.0, 1.0], [0.0])
        >>> bool(model.predict(seen)[0] == model.predict(unseen)[0])
        True
        """
        return self._predict_dataset(self._rows(X))

    def evaluate(self, X: ModelInput, y: ArrayLike | str | None = None, *,
                 clip: str | tuple[float, float] | None = "train") -> dict[str, float]:
        """``{"rmse": ...}`` on X (classifiers: logloss, AUC and accuracy). ``y`` is
        needed unless X is a Dataset (or, for a DataFrame, the label column's name).

        A regressor's predictions are clipped before the RMSE: by default ("train") to
        the range of the training labels, ``y_range_``, which fit records (a model
        saved without one: to the evaluated labels' own [min, max], the reference's
        rule, which is wrong for a single row); to ``clip`` = (low, high) when given;
        not at all with ``clip=None``. ``predict`` never clips.

        Examples
        --------
        >>> import afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)
        >>> model = afmfast.FM(n_factors=4, n_epochs=2, n_threads=1, verbose=0).fit(data.train)
        >>> {name: round(value, 2) for name, value in model.evaluate(data.valid).items()}
        {'rmse': 2.17}
        """
        bounds = self._clip_bounds(clip)
        data = self._rows(X, y, need_labels=True)
        return self._evaluate_scores(data.y, self._predict_dataset(data), bounds)

    def _clip_bounds(self, clip):
        """``evaluate``'s clip argument as ``afmfast.metrics.rmse``'s: None for the
        labels' own range, False for none, or a (low, high) pair."""
        if isinstance(clip, str) and clip == "train":
            return getattr(self, "y_range_", None)
        if self._is_classifier:
            raise ValueError(f"clip: a classifier's metrics do not clip; leave clip at "
                             f"'train', got {clip!r}")
        if clip is None:
            return False
        try:
            low, high = (float(v) for v in clip)
        except (TypeError, ValueError):
            low = high = math.nan
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"clip must be 'train', None or a (low, high) pair of finite "
                             f"numbers with low <= high, got {clip!r}")
        return low, high

    def _dataset(self, X, y=None, *, name="X", need_labels=True, fit=False,
                 n_features=None):
        """``X`` (and labels ``y``) as a Dataset: DataFrames go through the feature map
        learned by fit, and y may then be a column name. Labels (given, or a Dataset's
        own) are checked and encoded by ``_encode_labels``, ``fit`` telling that they
        are this fit's training labels. ``n_features``: the column count that an array
        or matrix X must have."""
        if isinstance(X, Dataset):
            X.validate(name)  # its arrays may have changed since it was built
        frame = is_dataframe(X)
        if frame:
            fmap = getattr(self, "feature_map_", None)
            if fmap is None:
                raise ValueError(f"{name} is a DataFrame, but this model was fitted on "
                                 "sparse rows: pass rows of the same kind")
            if isinstance(y, str):
                y = X[y].to_numpy()
        elif n_features is not None and not isinstance(X, Dataset):
            check_columns(X, n_features, name, type(self).__name__)
        own = y is None and need_labels and isinstance(X, Dataset)
        if own:
            y = X.y
        if y is not None:
            y = self._encode_labels(y, "y" if name == "X" else f"{name} labels", fit, own)
        elif need_labels:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target "
                             f"y is None (labels may be left out only when {name} is an "
                             "afmfast.Dataset, which holds its own)")
        if frame:
            return fmap.transform(X, y)
        if y is None and not isinstance(X, Dataset):
            y = np.zeros(n_rows(X), np.float32)
        # a Dataset whose labels encode to themselves (regression, or classes {0, 1}) is
        # used as it is: the caller's object, not a relabelled copy
        data = X if own and (y is X.y or np.array_equal(y, X.y)) else \
            as_dataset(X, y, name=name)
        row = data.first_nonfinite_row()
        if row is not None:
            raise ValueError(f"{name}: row {row} holds a NaN or infinite value")
        return data

    def _encode_labels(self, y, name, fit, own):
        """Regression targets as float32 (a column (n, 1) is raveled with a warning);
        refused unless finite real numbers. ``name`` names y in errors; ``fit`` and
        ``own`` (the labels are a Dataset's) matter to classifiers only."""
        y = as_real(label_vector(y, name), name)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            y32 = np.asarray(y, dtype=np.float32)
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(y32))):
            raise ValueError(f"{name}: labels must be finite numbers within the float32 "
                             "range (|y| < 3.4e38)")
        return y32

    # ----- pickling and copies ---------------------------------------------------------
    #: state that pickles, deep copies and joblib.dump leave out: the backend module (no
    #: module pickles; re-resolved on first use) and, during fit, the Trainer (thread
    #: planner, native workspace, optimiser state: a fit starts its own)
    _TRANSIENT = ("_backend", "_trainer", "_training")

    def __getstate__(self):
        getstate = getattr(super(), "__getstate__", None)  # scikit-learn's, or Python's
        state = getstate() if getstate is not None else None
        state = dict(self.__dict__ if state is None else state)  # a copy, never __dict__
        for key in self._TRANSIENT:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        if hasattr(super(), "__setstate__"):
            super().__setstate__(state)
        else:
            self.__dict__.update(state)
        if "_params" in state:
            # unpickled arrays are NumPy's copies: back on cache lines as fit leaves
            # them, with the fitted attributes (V_, ...) views of them again
            self._set_arrays(self._arrays())

    # ----- scikit-learn tags -------------------------------------------------------------
    def __sklearn_tags__(self):
        """scikit-learn >= 1.6 tags: sparse input accepted, labels required."""
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.target_tags.required = True
        return tags

    def _more_tags(self):
        # the same for scikit-learn < 1.6
        return {"X_types": ["2darray", "sparse"], "requires_y": True}

    def _kernel_backend(self):
        """The backend module (resolved once; models loaded from files resolve lazily)."""
        if getattr(self, "_backend", None) is None:
            self._backend = backends.get_backend(self.backend, self._model)
        return self._backend

    def _kernel_threads(self):
        """Threads of a kernel call outside the training runs: during fit the planner's
        current count, after it the fit's ``n_threads_``."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            return trainer.planner.current
        if getattr(self, "_threads", None) is None:
            self._threads = resolve_threads(self.n_threads)
        return self._threads

    def _check_same_shape(self, source, n_features):
        """A warm-start source must have this model's n_factors and feature count."""
        if source.n_factors != self.n_factors:
            raise ValueError(f"init_from: n_factors differ (source {source.n_factors}, "
                             f"this model {self.n_factors})")
        if source.n_features_in_ != n_features:
            raise ValueError(f"init_from: n_features differ (source {source.n_features_in_}, "
                             f"training data {n_features})")

    def _arrays(self):
        return dict(zip(self._params_class._fields, self._params))

    def _set_arrays(self, arrays):
        # on cache lines, as new parameters are (kernels.api.aligned_empty)
        self._params = self._params_class(*(aligned_copy(arrays[n])
                                            for n in self._params_class._fields))
        self._publish()

    def _max_batch_pairs(self, train):
        return _largest_batch_total(train, self.batch_size, lambda n: n * (n - 1) // 2)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to one ``.npz`` file atomically (see ``afmfast.load``).

        Examples
        --------
        >>> import os, tempfile, afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=500, seed=0)
        >>> model = afmfast.FM(n_factors=4, n_epochs=1, n_threads=1, verbose=0).fit(data.train)
        >>> path = os.path.join(tempfile.mkdtemp(), "fm.npz")
        >>> model.save(path)
        >>> afmfast.load(path).get_params() == model.get_params()
        True
        """

        self._check_fitted()
        persistence.save_model(self, path)


def _check_parameter_budget(train, n_factors):
    # V, w and their two optimiser slots, float32
    size = train.n_features * (n_factors + 1) * 4 * 3
    if size > MAX_PARAMETER_BYTES and not train.n_features_explicit:
        raise ValueError(
            f"X: the largest feature id is {train.n_features - 1}, so the parameter tables "
            f"would take {size / 2**30:.1f} GiB (limit {MAX_PARAMETER_BYTES / 2**30:.0f} "
            f"GiB for a feature count derived from the data). Remap the ids to 0..n-1, or "
            f"pass n_features explicitly (load_libfm(path, n_features=...) or "
            f"Dataset(..., n_features=...)) if the size is intended.")


def _as_model(source):
    if isinstance(source, FactorizationModel):
        source._check_fitted()
        return source
    return persistence.load(source)


class BinaryClassifier:
    """Binary classification on top of a factorization model: logistic loss in the
    kernels, any two labels (kept sorted in ``classes_``, the second one positive),
    probabilities, logloss/AUC/accuracy. A mix-in of ``FMClassifier`` and
    ``AFMClassifier``; not used directly.

    Examples
    --------
    >>> import afmfast
    >>> [issubclass(cls, BinaryClassifier) for cls in (afmfast.FMClassifier, afmfast.FM)]
    [True, False]
    >>> clf = afmfast.FMClassifier(n_factors=2, n_epochs=1, verbose=0)
    >>> clf.fit([[1.0, 0.0], [0.0, 1.0]], ["spam", "ham"]).classes_.tolist()
    ['ham', 'spam']
    """

    _loss = LOGISTIC
    _task_metrics = ("logloss", "auc", "accuracy")
    _is_classifier = True

    def _initial_bias(self, label_sum: float, n_rows: int) -> float:
        """w0 at the start of training: the log-odds of the positive rate (the 0/1
        targets' mean), clipped away from 0 and 1."""
        rate = min(max(label_sum / max(n_rows, 1), 1e-6), 1.0 - 1e-6)
        return math.log(rate / (1.0 - rate))

    def _encode_labels(self, y, name, fit, own):
        """Labels as float32 targets for the kernels: 1.0 for ``classes_[1]``, 0.0 for
        ``classes_[0]``. Fitting (``fit``) sets ``classes_`` = np.unique(y), which must
        hold exactly two labels; a Dataset's own float32 labels (``own``) that are whole
        numbers give int64 classes. Otherwise y may hold only the fitted classes."""
        y = label_vector(y, name)
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError(f"{name}: labels must not be NaN or infinite")
        if fit:
            if y.size == 0:
                return np.zeros(0, np.float32)  # fit's empty-data error follows
            self.classes_ = binary_classes(y, name, own)
        elif not np.all(known := np.isin(y, self.classes_)):
            unknown = np.unique(y[~known])
            raise ValueError(f"{name} holds labels {unknown[:5].tolist()} that are not "
                             f"among the fitted classes_ {self.classes_.tolist()}")
        return (y == self.classes_[1]).astype(np.float32)

    def __sklearn_tags__(self):
        """scikit-learn >= 1.6 tags: a binary classifier (the estimators also inherit
        the regressor's mix-in through FM and AFM, so its tags are cleared here)."""
        tags = super().__sklearn_tags__()
        tags.estimator_type = "classifier"
        tags.regressor_tags = None
        tags.classifier_tags.multi_class = False
        return tags

    def _more_tags(self):
        return {"binary_only": True}

    def _evaluate_scores(self, y, scores, bounds=None):
        from afmfast.metrics import auc, logloss

        p = self._probability(scores)
        return {"logloss": logloss(y, p), "auc": auc(y, scores),
                "accuracy": float(np.mean((scores > 0) == (np.asarray(y) > 0)))}

    def _probability(self, scores):
        """The positive class's probability of raw scores: the sigmoid (logistic loss),
        or Phi for ``FM(solver="mcmc")``'s probit model (of its averaged score)."""
        if getattr(self, "solver", "sgd") == "mcmc":
            from afmfast.models.mcmc import sampler_preparation

            return sampler_preparation().normal_cdf(np.asarray(scores, np.float64))
        return _sigmoid(scores)

    def decision_function(self, X: ModelInput) -> np.ndarray:
        """Raw scores (the log-odds of the positive class; the probit model's latent
        mean with ``solver="mcmc"``), float32.

        Examples
        --------
        >>> import numpy as np, afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)
        >>> clf = afmfast.FMClassifier(n_factors=4, n_epochs=2, n_threads=1, verbose=0)
        >>> clf = clf.fit(data.train, data.train.y > np.median(data.train.y))
        >>> scores = clf.decision_function(data.valid)
        >>> scores.dtype, bool(((scores > 0) == clf.predict(data.valid)).all())
        (dtype('float32'), True)
        """
        return FactorizationModel.predict(self, X)

    def predict_proba(self, X: ModelInput) -> np.ndarray:
        """Probabilities of (negative, positive) class per row, float64 (n_rows, 2): the
        sigmoid of ``decision_function`` (with ``solver="mcmc"``, Phi of it).

        Examples
        --------
        >>> import numpy as np, afmfast
        >>> X = np.eye(4)  # four one-hot rows
        >>> clf = afmfast.FMClassifier(n_factors=2, n_epochs=3, n_threads=1, verbose=0)
        >>> proba = clf.fit(X, [1, 0, 1, 0]).predict_proba(X)
        >>> proba.shape, bool(np.allclose(proba.sum(axis=1), 1.0))
        ((4, 2), True)
        """
        p = self._probability(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: ModelInput) -> np.ndarray:
        """Predicted labels, from ``classes_`` (the positive class ``classes_[1]`` where
        the raw score is above 0), of the dtype of ``classes_``.

        Examples
        --------
        >>> import afmfast
        >>> X = [[1.0, 0.0], [0.0, 1.0]] * 50
        >>> clf = afmfast.FMClassifier(n_factors=2, learning_rate=0.1, n_epochs=10,
        ...                            n_threads=1, verbose=0)
        >>> clf.fit(X, ["spam", "ham"] * 50).predict([[1.0, 0.0], [0.0, 1.0]]).tolist()
        ['spam', 'ham']
        """
        positive = self.decision_function(X) > 0  # first: unfitted, no classes_ yet
        return self.classes_[positive.astype(np.int64)]

    def _header_extras(self):
        return {**super()._header_extras(), "classes": self.classes_.tolist()}

    def _load_header_extras(self, extras):
        super()._load_header_extras(extras)
        classes = extras.get("classes")
        numbers = (int, float)
        ok = isinstance(classes, list) and len(classes) == 2 and (
            all(isinstance(c, str) for c in classes)
            or all(isinstance(c, bool) for c in classes)
            or all(isinstance(c, numbers) and not isinstance(c, bool) for c in classes))
        if not ok or not classes[0] < classes[1]:
            raise ValueError(f"classes {classes!r} are not two sorted distinct labels of "
                             "one kind (numbers, strings or booleans)")
        self.classes_ = np.array(classes)  # int64, float64, str or bool, as saved


def _sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))
