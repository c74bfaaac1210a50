"""Checking and converting what users pass as X and y (helpers of
``afmfast.models.base``): real-valued arrays, label vectors, column counts, class labels.
Errors name the argument and use scikit-learn's wording where its checks expect it."""
import warnings
from typing import TYPE_CHECKING, Union

import numpy as np

from afmfast.data.dataset import Dataset

if TYPE_CHECKING:  # annotations only
    import pandas as pd
    import scipy.sparse

#: What the estimators take as X: a Dataset, a dense 2-D array, a CSR-like sparse matrix
#: or (for a model fitted on one) a DataFrame.
ModelInput = Union[Dataset, np.ndarray, "scipy.sparse.spmatrix", "pd.DataFrame"]

try:
    from sklearn.exceptions import DataConversionWarning
except ImportError:
    class DataConversionWarning(UserWarning):
        """Input data was converted (scikit-learn's warning of that name, when it is
        not installed)."""


def as_real(a, name):
    """``a`` as an array of real numbers: booleans, integers and floats as they are,
    other dtypes (object, strings) converted to float64. Complex numbers are refused
    rather than cut to their real part; an entry that is not a number raises NumPy's
    TypeError or ValueError, naming ``name``."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise ValueError(f"{name}: Complex data not supported (dtype {a.dtype}); pass "
                         "real numbers")
    if a.dtype.kind in "biuf":
        return a
    try:
        return a.astype(np.float64)
    except (TypeError, ValueError) as exc:
        # the error type NumPy chose (TypeError for an object that is no number at all)
        raise type(exc)(f"{name} must hold numbers; its {a.dtype} entries do not all "
                        f"convert to float: {exc}") from None


def check_columns(X, n_features, name, owner):
    """An array or matrix X (with a 2-D shape) must have ``n_features`` columns:
    scikit-learn's rule and wording."""
    shape = getattr(X, "shape", None)
    shape = np.asarray(X).shape if shape is None else shape
    if len(shape) == 2 and shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features, but {owner} is expecting "
                         f"{n_features} features as input (an afmfast.Dataset may also "
                         "hold larger feature ids, which count as unseen)")


def label_vector(y, name):
    """Labels as a 1-D array: a column (n, 1) is raveled with scikit-learn's warning;
    other shapes and complex labels are refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn("A column-vector y was passed when a 1d array was expected. Please "
                      f"change the shape of y to (n_samples,), for example using ravel() "
                      f"({name} is raveled here).", DataConversionWarning,
                      stacklevel=5)  # the caller of fit (through the estimator's helpers)
        y = y.ravel()
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (n_samples,) or a column "
                         f"(n_samples, 1), got shape {y.shape}")
    if y.dtype.kind == "c":
        raise ValueError(f"{name}: Complex data not supported (labels of dtype {y.dtype})")
    return y


def n_rows(X):
    """The row count of an array-like or matrix X."""
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) == 2:
        return shape[0]
    return np.asarray(X).shape[0]


def binary_classes(y, name, own):
    """np.unique(y) of training labels, which must be two (``own``: see
    ``BinaryClassifier._encode_labels``)."""
    try:
        classes = np.unique(y)
    except TypeError as exc:  # mixed label types, which do not sort
        raise ValueError(f"{name}: labels of mixed types cannot be classes ({exc})") from None
    if classes.dtype == object:  # e.g. y.astype(object): the labels' own dtype
        classes = np.array(classes.tolist())
    if classes.size == 2:
        if own and np.all(classes == np.round(classes)):
            classes = classes.astype(np.int64)
        return classes
    if classes.size > 2 and classes.dtype.kind == "f" and \
            not np.all(classes == np.round(classes)):
        raise ValueError(f"{name}: Unknown label type: continuous ({classes.size} distinct "
                         "values, not all whole numbers); a binary classifier needs exactly "
                         "two classes: use a regressor for a continuous target")
    found = "only one class" if classes.size == 1 else f"{classes.size} classes"
    raise ValueError(f"{name}: Only binary classification is supported: a classifier needs "
                     f"exactly two classes, but {name} holds {found}: "
                     f"{classes[:10].tolist()}")
