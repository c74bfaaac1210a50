"""The Attentional Factorization Machine estimator (``afmfast.AFM``) and its
explanations (``Attention`` records, field-pair attention)."""
from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING

import numpy as np

from afmfast.models.base import (
    CLASSIFIER_BASES,
    REGRESSOR_BASES,
    BinaryClassifier,
    FactorizationModel,
    _check_bool,
    _check_int,
    _check_real,
)
from afmfast.kernels.api import (
    ACTIVATION_CODES,
    OPTIMIZER_CODES,
    AFMParams,
    AFMStepConfig,
    new_afm_params,
)
from afmfast.models.fm import FM
from afmfast.models.training import _copy_params

if TYPE_CHECKING:  # annotations only
    from numpy.typing import ArrayLike

    from afmfast.models.inputs import ModelInput

Attention = namedtuple("Attention", "indptr i j weight contribution")
Attention.__doc__ = """Per-pair explanation of AFM predictions, as flat arrays.

Row r's pairs are ``indptr[r]:indptr[r + 1]`` (int64, n_rows + 1); ``i``, ``j`` (int64)
are the pair's feature ids (i before j in the row); ``weight`` is the attention a_ij
(summing to 1 over a row's pairs; 1 for every pair when attention is off);
``contribution`` is the pair's share of the prediction, a_ij p . e_ij, so that
w0 + sum w x + the row's contributions equals ``predict``. ``AFM.explain`` returns one.

Examples
--------
>>> import afmfast
>>> from afmfast.demo import make_demo_data
>>> data = make_demo_data(n_rows=1000, seed=0)
>>> afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, n_threads=1, verbose=0)
>>> record = afm.fit(data.train).explain(data.valid[:2])
>>> record._fields
('indptr', 'i', 'j', 'weight', 'contribution')
>>> record.indptr.tolist(), record.i[:3].tolist(), record.j[:3].tolist()
([0, 28, 56], [14, 14, 14], [62, 118, 129])
"""


class AFM(*REGRESSOR_BASES, FactorizationModel):
    """Attentional Factorization Machine (Xiao et al., IJCAI 2017), the paper's model:
    the softmax runs over each row's pairs.

    Parameters
    ----------
    n_factors : int >= 1
        Embedding size k.
    attention_size : int >= 1
        Attention network size t.
    keep : (float, float) in (0, 1]
        Keep probabilities of the dropout on the attention weights and on the pooled
        interaction vector (the reference's ``--keep [k0,k1]``).
    l2_attention : float >= 0
        L2 penalty l2_attention/2 ||W||^2 on the attention network's weights.
    l2 : float >= 0
        L2 penalty on the embedding rows a batch touches (lazy).
    learning_rate : float > 0
    batch_size : int >= 1
    n_epochs : int >= 0
    attention : bool
        False gives the reference's "no attention" model (every pair weighs 1).
    activation : {"relu", "sigmoid", "tanh", "identity"}
        Activation of the attention network.
    batch_norm : bool
        Must stay False: the reference AFM defines the flag but never applies batch
        normalisation, and afmfast does not invent one.
    freeze_fm : bool
        Keep V, w and w0 fixed (with ``init_from``: the pretrained FM's), training only
        the attention network and p (the reference's ``--freeze_fm``).
    optimizer, early_stopping, patience, random_state, shuffle_unit, n_threads,
    adaptive_threads, backend, verbose
        As for ``afmfast.FM``.
    fold_fm : bool
        With ``init_from`` an FM: fold the FM's interaction term (its batch norm) into
        p and w0 and start with uniform attention (h = 0), so that the AFM starts
        where the FM ends; False: the reference's warm start (V, w and w0 only). Pair
        it with a smaller ``learning_rate``: Adagrad's first steps move every touched
        coordinate by about the learning rate, which throws a fitted model far off.

    Examples
    --------
    >>> import numpy as np, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=2000, seed=0)
    >>> fm = afmfast.FM(n_factors=8, n_epochs=2, verbose=0).fit(data.train)
    >>> afm = afmfast.AFM(n_factors=8, attention_size=8, n_epochs=2, verbose=0)
    >>> afm = afm.fit(data.train, init_from=fm)
    >>> record = afm.explain(data.valid)
    >>> bool(np.allclose(np.add.reduceat(record.weight, record.indptr[:-1]), 1.0))
    True
    """

    _kind = "AFM"
    _model = "afm"
    _params_class = AFMParams

    def __init__(self, n_factors=16, attention_size=16, keep=(1.0, 0.5), l2_attention=100.0,
                 l2=0.0, learning_rate=0.1, batch_size=4096, n_epochs=20, attention=True,
                 activation="relu", batch_norm=False, freeze_fm=False, optimizer="adagrad",
                 early_stopping=True, patience=None, random_state=2016, shuffle_unit=1,
                 n_threads=None, adaptive_threads=True, backend="auto", verbose=1,
                 fold_fm=False):
        self._set_constructor_args(locals())

    def _validate(self):
        _check_int("n_factors", self.n_factors, 1)
        _check_int("attention_size", self.attention_size, 1)
        keep = self.keep
        if not isinstance(keep, (tuple, list)) or len(keep) != 2:
            raise ValueError(f"keep must be a pair (attention keep, pooled keep) of numbers "
                             f"in (0, 1], got {keep!r}")
        _check_real("keep[0]", keep[0], 0.0, 1.0, low_open=True)
        _check_real("keep[1]", keep[1], 0.0, 1.0, low_open=True)
        _check_real("l2_attention", self.l2_attention, 0.0, float("inf"))
        _check_bool("attention", self.attention)
        _check_bool("freeze_fm", self.freeze_fm)
        _check_bool("fold_fm", self.fold_fm)
        if self.activation not in ACTIVATION_CODES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, "
                             f"got {self.activation!r}")
        self._validate_common()
        if self.batch_norm:
            raise ValueError("batch_norm=True is not available for AFM: the reference AFM "
                             "never applies batch normalisation; use batch_norm=False")

    def _new_params(self, n_features, rng):
        return new_afm_params(n_features, self.n_factors, self.attention_size, rng)

    def _new_workspace(self, backend, train):
        return backend.afm_workspace(
            min(self.batch_size, train.n_rows), self._max_batch_nnz(train),
            self._max_batch_pairs(train), train.n_features, self.n_factors,
            self.attention_size, np.float32)

    def _step_config(self, seed, step, threads):
        return AFMStepConfig(
            float(self.learning_rate), float(self.l2), float(self.l2_attention),
            float(self.keep[0]), float(self.keep[1]), OPTIMIZER_CODES[self.optimizer],
            int(bool(self.attention)), ACTIVATION_CODES[self.activation],
            int(bool(self.freeze_fm)), seed, step, threads, self._loss)

    def _warm_start(self, source, n_features, row_lengths=None):
        """Start from ``source``: an AFM's parameters, or an FM's V, w and w0 (the
        reference's --pretrain 1), with ``fold_fm`` the FM's interaction term folded
        in, so that the AFM starts where the FM ends. With attention, h = 0 makes every
        pair of a row weigh 1/P (P its pairs) and p = P' scale
        (``FM._interaction_affine``), P' the median pair count of the training rows
        (``row_lengths``, counts of rows by nonzeros); without attention p = scale. w0
        takes the batch norm's shift. Rows of P' pairs (every row of one-hot data with
        a fixed field count) then predict as the FM did; a row of P pairs has its
        interaction term scaled by P'/P. The attention network's W and b keep their
        initial values."""
        if not isinstance(source, (FM, AFM)):
            raise ValueError(f"init_from: an AFM starts from an FM or an AFM, got "
                             f"{type(source).__name__}")
        self._check_same_shape(source, n_features)
        if isinstance(source, FM):
            k, t = self.n_factors, self.attention_size
            dense = self._params.dense
            self._params.V[...] = source._params.V
            self._params.w[...] = source._params.w
            if not self.fold_fm:
                dense[0] = source._params.dense[0]
                return
            scale, shift = source._interaction_affine()
            pairs = typical_pairs(row_lengths) if self.attention else 1.0
            dense[1:1 + k] = scale * pairs
            dense[0] = float(source._params.dense[0]) + shift
            if self.attention:
                dense[1 + k + t:] = 0.0
        else:
            if source.attention_size != self.attention_size:
                raise ValueError(f"init_from: attention_size differs (source "
                                 f"{source.attention_size}, this model {self.attention_size})")
            _copy_params(self._params, source._params)

    def _predict_dataset(self, data):
        out = np.empty(data.n_rows, dtype=np.float32)
        self._kernel_backend().afm_predict(
            data.X, self._params, int(bool(self.attention)),
            ACTIVATION_CODES[self.activation], self._kernel_threads(), out)
        return out

    def _publish(self):
        """Expose the live parameters as fitted attributes (views, no copies)."""
        p = self._params
        k, t = self.n_factors, self.attention_size
        self.V_, self.w_, self.attention_W_ = p.V, p.w, p.W
        self.w0_ = float(p.dense[0])
        self.p_ = p.dense[1:1 + k]
        self.attention_b_ = p.dense[1 + k:1 + k + t]
        self.attention_h_ = p.dense[1 + k + t:]

    def _array_shapes(self, n_features):
        k, t = self.n_factors, self.attention_size
        return {"V": (n_features, k), "w": (n_features,), "W": (t, k),
                "dense": (1 + k + 2 * t,)}

    # ----- explanations -----------------------------------------------------------------
    def explain(self, X: ModelInput) -> Attention:
        """Per-pair attention weights and contributions of every row of X.

        Returns an ``Attention`` record of flat arrays (see its docstring); feature ids
        never seen in training form no pairs.

        Examples
        --------
        >>> import numpy as np, afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)
        >>> afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=2, n_threads=1,
        ...                   verbose=0).fit(data.train)
        >>> X = data.valid[:5]
        >>> record = afm.explain(X)
        >>> starts = record.indptr[:-1]  # every row here has 8 features, so 28 pairs
        >>> linear = afm.w0_ + np.add.reduceat(afm.w_[X.indices] * X.values, X.indptr[:-1])
        >>> pairs = np.add.reduceat(record.contribution, starts)
        >>> bool(np.allclose(linear + pairs, afm.predict(X), atol=1e-5))
        True
        >>> bool(np.allclose(np.add.reduceat(record.weight, starts), 1.0))
        True
        """
        data = self._rows(X)
        n = data.n_rows
        known = data.indices < self.n_features_in_
        row_of = np.repeat(np.arange(n), np.diff(data.indptr))
        counts = np.bincount(row_of[known], minlength=n).astype(np.int64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts * (counts - 1) // 2, out=indptr[1:])
        total = int(indptr[-1])
        record = Attention(indptr, np.empty(total, np.int64), np.empty(total, np.int64),
                           np.empty(total, np.float32), np.empty(total, np.float32))
        self._kernel_backend().afm_explain(
            data.X, self._params, int(bool(self.attention)),
            ACTIVATION_CODES[self.activation], self._kernel_threads(), *record)
        return record

    def field_attention(self, X: ModelInput, fields: ArrayLike | None = None) -> np.ndarray:
        """Mean attention weight per pair of fields over the rows of X.

        ``fields`` is an int array of length ``n_features_in_`` giving each feature's field
        (0..F-1, or -1 for a feature of no field: its pairs are left out); by default,
        the fields of the feature map of a model fitted on a DataFrame (one per column),
        or those of a training Dataset that had them (``fields_``, from a store of raw
        logs converted with hashing). Returns the F x F symmetric float64 matrix of the
        mean weight of the pairs whose features lie in fields (f, g); NaN where no such
        pair occurs in X.

        Examples
        --------
        >>> import numpy as np, afmfast
        >>> from afmfast.demo import make_demo_data
        >>> data = make_demo_data(n_rows=1000, seed=0)  # 8 one-hot fields
        >>> afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=2, n_threads=1,
        ...                   verbose=0).fit(data.train)
        >>> matrix = afm.field_attention(data.valid, data.fields)
        >>> matrix.shape, bool(np.isnan(matrix[0, 0])), bool(matrix[0, 1] == matrix[1, 0])
        ((8, 8), True, True)
        >>> round(float(np.nansum(np.triu(matrix, 1))), 3)  # 28 field pairs, 28 pairs a row
        1.0
        """
        self._check_fitted()
        n_named = 0
        if fields is None:
            if hasattr(self, "feature_map_"):
                fields = self.feature_map_.fields
            elif hasattr(self, "fields_"):
                fields, n_named = self.fields_, len(self.field_names_)
            else:
                raise ValueError("fields is required unless the model was fitted on a "
                                 "DataFrame or on a Dataset with fields (a hashed store)")
        fields = np.asarray(fields)
        if fields.ndim != 1 or fields.shape[0] != self.n_features_in_ or \
                not np.issubdtype(fields.dtype, np.integer) or \
                (fields.size and fields.min() < -1):
            raise ValueError(f"fields must be a 1-D array of ints >= -1 of length "
                             f"n_features_in_ = {self.n_features_in_}, got shape "
                             f"{fields.shape} and dtype {fields.dtype}")
        n_fields = max(int(fields.max()) + 1 if fields.size else 0, n_named)
        record = self.explain(X)
        fi, fj = fields[record.i], fields[record.j]
        known = (fi >= 0) & (fj >= 0)
        fi, fj = fi[known], fj[known]
        cell = np.minimum(fi, fj) * n_fields + np.maximum(fi, fj)
        total = np.bincount(cell, weights=record.weight[known],
                            minlength=n_fields * n_fields)
        count = np.bincount(cell, minlength=n_fields * n_fields)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (total / count).reshape(n_fields, n_fields)
        lower = np.tril_indices(n_fields, -1)
        mean[lower] = mean.T[lower]
        return mean


def typical_pairs(row_lengths: np.ndarray | None) -> float:
    """The median number of pairs n (n - 1) / 2 of rows with ``row_lengths[n]`` rows of
    n nonzeros (at least 1; 1 when unknown).

    Examples
    --------
    >>> typical_pairs(np.array([0, 0, 1, 5, 2]))  # rows of 2, 3 (five) and 4 nonzeros
    3.0
    """
    if row_lengths is None or np.sum(row_lengths) == 0:
        return 1.0
    cumulative = np.cumsum(row_lengths)
    length = int(np.searchsorted(cumulative, (cumulative[-1] + 1) // 2))
    return float(max(1, length * (length - 1) // 2))


class AFMClassifier(BinaryClassifier, *CLASSIFIER_BASES, AFM):
    """Attentional Factorization Machine for binary targets: the same model and
    arguments as ``AFM`` (see there), trained with the logistic loss; labels are any
    two values, as for ``FMClassifier``; ``predict``, ``predict_proba``, ``decision_function`` and ``evaluate`` as
    for ``FMClassifier``. It warm-starts from an ``FM`` or ``FMClassifier``.

    Examples
    --------
    >>> import numpy as np, afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=2000, seed=0)
    >>> clicks = np.where(data.train.y > np.median(data.train.y), 1, -1)
    >>> clf = afmfast.AFMClassifier(n_factors=4, attention_size=4, n_epochs=2, verbose=0)
    >>> sorted(clf.fit(data.train, clicks).evaluate(data.train, clicks))
    ['accuracy', 'auc', 'logloss']
    """

    _kind = "AFMClassifier"
