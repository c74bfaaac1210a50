"""Feature hashing of DataFrame partitions: rows as a ``Dataset`` without a global
vocabulary, so that every Dask worker encodes its own partitions alone.

Each feature column gives one nonzero per row: a float column the id hash(column) with
the cell as its value; any other column (strings, categories, integers, booleans) the id
hash(column=cell) with value 1. Ids are taken modulo ``n_features``. The hash is
pandas' ``hash_array`` (SipHash with a fixed key), the same in every process and on
every machine, so a model fitted on one partitioning predicts any other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from afmfast.data.dataset import Dataset

if TYPE_CHECKING:  # annotations only
    from collections.abc import Sequence

#: default size of the hashed feature space
DEFAULT_HASH_FEATURES = 1 << 20


def feature_columns(frame, label: str | None) -> list[str]:
    """The columns that ``hash_encode`` turns into features: all but ``label``.

    Examples
    --------
    >>> import pandas as pd
    >>> feature_columns(pd.DataFrame({"user": ["a"], "rating": [1.0]}), "rating")
    ['user']
    """
    return [c for c in frame.columns if c != label]


def hash_encode(frame, label: str | None, n_features: int = DEFAULT_HASH_FEATURES,
                categorical: Sequence[str] | None = None) -> Dataset:
    """The rows of the pandas DataFrame ``frame`` as a Dataset of hashed features
    (see the module docstring); labels from the column ``label`` (zeros if None).
    ``categorical`` names float columns to hash as categories instead.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"user": ["ann", "bob", "ann"], "age": [30.0, 41.0, 30.0],
    ...                       "rating": [1.0, 0.0, 1.0]})
    >>> data = hash_encode(frame, "rating", n_features=1000)
    >>> data.n_features, data.nnz, data.y.tolist()
    (1000, 6, [1.0, 0.0, 1.0])
    >>> bool(data.indices[0] == data.indices[4]), data.values[1::2].tolist()
    (True, [30.0, 41.0, 30.0])
    """
    from pandas.util import hash_array

    if not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise ValueError(f"n_features must be an integer >= 1, got {n_features!r}")
    if label is not None and label not in frame.columns:
        raise ValueError(f"label column {label!r} is not in the DataFrame (columns: "
                         f"{list(frame.columns)[:10]})")
    columns = feature_columns(frame, label)
    if not columns:
        raise ValueError("the DataFrame has no feature column besides the label")
    categorical = set(categorical or ())
    n = len(frame)
    ids = np.empty((n, len(columns)), np.int64)
    values = np.ones((n, len(columns)), np.float32)
    for j, column in enumerate(columns):
        series = frame[column]
        name = str(column)
        if series.dtype.kind == "f" and column not in categorical:
            key = hash_array(np.array([name], dtype=object))[0]
            ids[:, j] = int(key % np.uint64(n_features))
            values[:, j] = np.nan_to_num(series.to_numpy(np.float64), nan=0.0)
        else:
            cells = (name + "=" + series.astype(str)).to_numpy(dtype=object)
            ids[:, j] = (hash_array(cells) % np.uint64(n_features)).astype(np.int64)
    y = (np.zeros(n, np.float32) if label is None
         else frame[label].to_numpy(np.float32))
    indptr = np.arange(0, ids.size + 1, max(len(columns), 1), dtype=np.int64)[:n + 1]
    return Dataset(indptr, ids.reshape(-1).astype(np.int32), values.reshape(-1), y,
                   n_features=int(n_features))
