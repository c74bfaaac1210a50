"""From pandas DataFrames to sparse rows: ``FeatureMap`` and ``encode``.

A categorical column (object, string, category or bool dtype, or any column named in
``categorical=``) becomes one field with one feature per category seen when the map was
fitted (value 1); a numeric column becomes one field with a single feature whose value is
the number. An integer column with many distinct values is most likely an id: it is
encoded as a number as its dtype says, with a warning that names it and the
``categorical=`` argument. Missing values (NaN, None) and categories never seen when
fitting contribute nothing, so a map fitted on training data can encode any later frame.
pandas is optional: only the DataFrame passed in is used.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import TYPE_CHECKING

import numpy as np

from afmfast.data.dataset import Dataset

if TYPE_CHECKING:  # annotations only
    from collections.abc import Sequence

    import pandas as pd
    from numpy.typing import ArrayLike


def is_dataframe(X):
    """True for a pandas DataFrame (checked without importing pandas).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> is_dataframe(pd.DataFrame({"a": [1]})), is_dataframe(np.zeros((1, 1)))
    (True, False)
    """
    return hasattr(X, "columns") and hasattr(X, "dtypes") and hasattr(X, "iloc")


class FeatureMap:
    """How the columns of a DataFrame map to feature ids and fields.

    Build one with ``FeatureMap.fit(df, columns=None, categorical=None)``;
    ``transform(df, y)`` gives a
    ``Dataset``. ``fields`` (int32, one per feature) is the field of each feature, as
    ``AFM.field_attention`` wants it; ``feature_names`` reads ``"column=category"`` or
    ``"column"``.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"user": ["a", "b", "a"], "hour": [1.0, 2.5, None]})
    >>> fmap = FeatureMap.fit(df)
    >>> fmap.feature_names
    ['user=a', 'user=b', 'hour']
    >>> fmap.transform(df, [1, 0, 1]).indices.tolist()
    [0, 2, 1, 2, 0]
    """

    def __init__(self, columns, categories):
        self.columns = list(columns)
        # None for a numeric column, else the list of category labels (as str)
        self.categories = [None if c is None else list(c) for c in categories]
        self._offsets = np.cumsum([0] + [1 if c is None else len(c)
                                         for c in self.categories])
        self._lookup = [None if c is None else {label: i for i, label in enumerate(c)}
                        for c in self.categories]

    @classmethod
    def fit(cls, df: pd.DataFrame, columns: Sequence[str] | None = None,
            categorical: Sequence[str] | None = None) -> FeatureMap:
        """Learn the categories of ``columns`` (default: every column) of ``df``: sorted
        labels (as str) of each categorical column, missing values left out.

        Parameters
        ----------
        df : pandas.DataFrame
        columns : list of column names, optional
            The columns to encode, in this order (default: all of them).
        categorical : list of column names, optional
            Columns to one-hot encode although their dtype is numeric, such as integer
            ids (one feature per distinct value). An integer column with more than
            ``ID_LIKE_DISTINCT`` distinct values that is not named here is encoded as a
            number with a ``UserWarning``; cast it to float to keep it numeric silently.

        Examples
        --------
        >>> import pandas as pd
        >>> df = pd.DataFrame({"user": ["b", "a", None], "hour": [1.0, 2.5, 3.0]})
        >>> FeatureMap.fit(df, columns=["user"]).categories
        [['a', 'b']]
        >>> ids = pd.DataFrame({"item": [7, 3, 7], "hour": [1.0, 2.5, 3.0]})
        >>> FeatureMap.fit(ids, categorical=["item"]).feature_names
        ['item=3', 'item=7', 'hour']
        """
        columns = list(df.columns if columns is None else columns)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"columns {missing} are not in the DataFrame "
                             f"(it has {list(df.columns)})")
        if isinstance(categorical, str):
            categorical = [categorical]  # one name, not its letters
        categorical = list(categorical or ())
        stray = [c for c in categorical if c not in columns]
        if stray:
            raise ValueError(f"categorical: columns {stray} are not among the encoded "
                             f"columns {columns}")
        categories = []
        for name in columns:
            col = df[name]
            if name not in categorical and _is_numeric(col):
                _warn_if_id_like(name, col)
                categories.append(None)
            else:
                labels = _labels(col)[np.asarray(col.notna())]
                categories.append(sorted(set(labels.tolist())))
        return cls(columns, categories)

    @property
    def n_features(self):
        """Number of features: one per category plus one per numeric column.

        Examples
        --------
        >>> import pandas as pd
        >>> df = pd.DataFrame({"user": ["a", "b", "a"], "hour": [1.0, 2.5, 3.0]})
        >>> FeatureMap.fit(df).n_features
        3
        """
        return int(self._offsets[-1])

    @property
    def fields(self):
        """The field (column position) of each feature, int32 (n_features,): the
        ``fields`` argument of ``AFM.field_attention``.

        Examples
        --------
        >>> import pandas as pd
        >>> df = pd.DataFrame({"user": ["a", "b", "a"], "hour": [1.0, 2.5, 3.0]})
        >>> FeatureMap.fit(df).fields.tolist()
        [0, 0, 1]
        """
        return np.repeat(np.arange(len(self.columns)),
                         np.diff(self._offsets)).astype(np.int32)

    @property
    def feature_names(self):
        """Name of each feature, ``"column=category"`` or ``"column"`` (numeric).

        Examples
        --------
        >>> import pandas as pd
        >>> df = pd.DataFrame({"user": ["a", "b", "a"], "hour": [1.0, 2.5, 3.0]})
        >>> FeatureMap.fit(df).feature_names
        ['user=a', 'user=b', 'hour']
        """
        names = []
        for name, cats in zip(self.columns, self.categories):
            names.extend([str(name)] if cats is None else [f"{name}={c}" for c in cats])
        return names

    def transform(self, df: pd.DataFrame, y: ArrayLike | None = None) -> Dataset:
        """The rows of ``df`` as a ``Dataset`` (labels ``y``, zeros when None), one
        nonzero per column at most, in column order. Missing values and categories not
        seen by ``fit`` give no nonzero.

        Examples
        --------
        >>> import pandas as pd
        >>> fmap = FeatureMap.fit(pd.DataFrame({"user": ["a", "b"], "hour": [1.0, 2.5]}))
        >>> data = fmap.transform(pd.DataFrame({"user": ["c", "b"], "hour": [3.0, 1.0]}))
        >>> data.indptr.tolist(), data.indices.tolist(), data.values.tolist()
        ([0, 1, 3], [2, 1, 2], [3.0, 1.0, 1.0])
        """
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(f"the DataFrame lacks the columns {missing} this feature map "
                             f"was fitted on")
        n = len(df)
        ids = np.full((n, len(self.columns)), -1, dtype=np.int64)
        values = np.ones((n, len(self.columns)), dtype=np.float64)
        for j, name in enumerate(self.columns):
            col = df[name]
            if self.categories[j] is None:
                x = np.asarray(col, dtype=np.float64)
                ok = np.isfinite(x)
                ids[ok, j] = self._offsets[j]
                values[:, j] = np.where(ok, x, 0.0)
            else:
                uniq, inverse = np.unique(_labels(col), return_inverse=True)
                # one dictionary look-up per distinct label, not per row
                codes = np.array([self._lookup[j].get(u, -1) for u in uniq], dtype=np.int64)
                code = codes[inverse.reshape(-1)] if n else np.zeros(0, np.int64)
                code[~np.asarray(col.notna())] = -1
                ids[:, j] = np.where(code >= 0, code + self._offsets[j], -1)
        keep = ids >= 0
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=indptr[1:])
        labels = np.zeros(n, np.float32) if y is None else np.asarray(y, dtype=np.float32)
        return Dataset(indptr, ids[keep].astype(np.int32), values[keep], labels,
                       self.n_features)

    def to_json(self):
        """A JSON string (saved inside model files); ``from_json`` reads it back.

        Examples
        --------
        >>> import pandas as pd
        >>> FeatureMap.fit(pd.DataFrame({"user": ["a", "b"], "hour": [1.0, 2.5]})).to_json()
        '{"columns": ["user", "hour"], "categories": [["a", "b"], null]}'
        """
        return json.dumps({"columns": [str(c) for c in self.columns],
                           "categories": self.categories})

    @classmethod
    def from_json(cls, text):
        """The ``FeatureMap`` that ``to_json`` wrote.

        Examples
        --------
        >>> text = '{"columns": ["user", "hour"], "categories": [["a", "b"], null]}'
        >>> FeatureMap.from_json(text).feature_names
        ['user=a', 'user=b', 'hour']
        """
        data = json.loads(text)
        return cls(data["columns"], data["categories"])


def _labels(col):
    """A column's values as str labels (numpy array), "" where missing."""
    values = col.to_numpy(dtype=object, na_value="")
    return values.astype(str)


def _is_numeric(col):
    kind = getattr(col.dtype, "kind", "O")
    return kind in "iuf"


#: an integer column with more distinct values than this reads as an id (see _warn_if_id_like)
ID_LIKE_DISTINCT = 20


def _warn_if_id_like(name, col):
    """Warn when an integer column may be an id: more than ID_LIKE_DISTINCT distinct
    values. Ids (users, items, cities: int64 from pandas.read_csv) have many, and one
    weight times an id is noise; a true quantity with many values needs only a cast to
    float to silence it."""
    if getattr(col.dtype, "kind", "O") not in "iu":
        return
    distinct = int(col.nunique())
    if distinct > ID_LIKE_DISTINCT:
        warnings.warn(
            f"column {name!r} holds integers with {distinct} distinct values and is "
            f"encoded as one numeric feature; if it is an id, pass categorical=[{name!r}] "
            f"(one feature per value); to keep it numeric without this warning, cast it "
            f"to float (df[{name!r}].astype(float))", UserWarning,
            stacklevel=_caller_stacklevel())


def _caller_stacklevel():
    """The warnings stacklevel of the first frame outside afmfast (the user's call to
    encode, FeatureMap.fit or an estimator's fit), seen from the function that warns."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # afmfast/
    frame, level = sys._getframe(2), 2  # 1: the function calling warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def encode(df: pd.DataFrame, columns: Sequence[str] | None = None,
           y: str | ArrayLike | None = None,
           categorical: Sequence[str] | None = None) -> tuple[Dataset, FeatureMap]:
    """Encode a DataFrame: returns ``(Dataset, FeatureMap)``. ``y`` may be a column name
    (then that column is the label and not a feature) or an array; ``categorical`` names
    numeric columns to one-hot encode (see ``FeatureMap.fit``).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"user": ["a", "b"], "item": ["x", "x"], "rating": [4.0, 2.0]})
    >>> data, fmap = encode(df, y="rating")
    >>> data.n_features, fmap.fields.tolist(), data.y.tolist()
    (3, [0, 0, 1], [4.0, 2.0])
    """
    if isinstance(y, str):
        labels = df[y].to_numpy()
        if columns is None:
            columns = [c for c in df.columns if c != y]
    else:
        labels = y
    fmap = FeatureMap.fit(df, columns, categorical=categorical)
    return fmap.transform(df, labels), fmap
