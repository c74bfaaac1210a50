"""DataFrames as hashed feature rows: ``hash_frame`` gives the rows of a pandas
DataFrame the ids that ``afmfast.convert(..., format="csv")`` gives the same table as
CSV text, with no vocabulary, so that any process (a Dask worker with its partition)
encodes its rows alone and every process agrees.

The ids, fields and key spelling are those of ``afmfast.data.hashing`` (its module
docstring): MurmurHash3_x86_32 with the column's field (its position among the feature
columns) as the seed, the low ``hash_bits`` bits. A categorical cell is keyed by its text
(``str`` of the value, UTF-8), as a CSV file spells it; an integer cell by its log2
bucket; a numeric column has one id and carries the number. A missing cell (None, NaN,
``pd.NA``) gives no nonzero.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from afmfast.data.dataset import Dataset
from afmfast.data.hashing import (
    DEFAULT_HASH_BITS,
    KINDS,
    _bucket,
    _murmur_bytes,
    _murmur_int64,
)

if TYPE_CHECKING:  # annotations only
    from collections.abc import Mapping, Sequence

__all__ = ["hash_frame"]


@njit(cache=True, nogil=True)
def _hash_fixed_width(flat, width, lengths, seed):
    """MurmurHash3 of each of the keys flat[i width : i width + lengths[i]]."""
    out = np.empty(lengths.shape[0], np.int64)
    for i in range(lengths.shape[0]):
        out[i] = _murmur_bytes(flat, i * width, i * width + lengths[i], seed)
    return out


@njit(cache=True, nogil=True)
def _hash_buckets(values, seed):
    out = np.empty(values.shape[0], np.int64)
    for i in range(values.shape[0]):
        out[i] = _murmur_int64(_bucket(values[i]), seed)
    return out


def _text_ids(texts, seed):
    """The hashes of the UTF-8 bytes of the str array ``texts``."""
    if texts.size == 0:
        return np.zeros(0, np.int64)
    try:
        encoded = texts.astype(np.bytes_)  # fixed width, zero padded: ASCII only
    except UnicodeEncodeError:
        encoded = np.array([t.encode("utf-8") for t in texts.tolist()], dtype=np.bytes_)
    width = encoded.dtype.itemsize
    lengths = np.char.str_len(encoded).astype(np.int64)
    flat = np.frombuffer(encoded.tobytes(), np.uint8)
    return _hash_fixed_width(flat, width, lengths, seed)


def _column_kind(series, kinds, name):
    kind = kinds.get(name)
    if kind is None:
        return "numeric" if series.dtype.kind == "f" else "categorical"
    if kind not in KINDS:
        raise ValueError(f"kinds: {name!r} has kind {kind!r}; kinds are {list(KINDS)}")
    return kind


def hash_frame(frame, label: str | None = None, *, hash_bits: int = DEFAULT_HASH_BITS,
               columns: Sequence[str] | None = None,
               kinds: Mapping[str, str] | None = None) -> Dataset:
    """The rows of the pandas DataFrame ``frame`` as a ``Dataset`` of hashed feature ids
    in ``[0, 2^hash_bits)``, with the field of each id (``Dataset.fields``: the lowest
    field whose values hashed to it, -1 for an id no value hit).

    ``label`` names the label column (None: labels 0); ``columns`` the feature columns
    (default: all but the label), in field order; ``kinds`` maps a column to
    "categorical", "integer" (log2 buckets) or "numeric" (the default is "numeric" for a
    float column and "categorical" for any other). With the same columns and kinds,
    ``convert(csv_of_frame, ..., format="csv")`` gives the same ids.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"user": ["ann", "bob", "ann"], "age": [30.0, None, 30.0],
    ...                       "click": [1.0, 0.0, 1.0]})
    >>> data = hash_frame(frame, "click", hash_bits=12)
    >>> data.n_features, data.nnz, data.y.tolist(), data.field_names
    (4096, 5, [1.0, 0.0, 1.0], ['user', 'age'])
    >>> bool(data.indices[0] == data.indices[3]), data.values.tolist()
    (True, [1.0, 30.0, 1.0, 1.0, 30.0])
    """
    if not isinstance(hash_bits, (int, np.integer)) or not 1 <= hash_bits <= 31:
        raise ValueError(f"hash_bits must be an integer in [1, 31], got {hash_bits!r}")
    if label is not None and label not in frame.columns:
        raise ValueError(f"label: column {label!r} is not in the DataFrame "
                         f"(columns: {list(frame.columns)[:10]})")
    columns = [c for c in frame.columns if c != label] if columns is None else list(columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing or not columns:
        raise ValueError(f"columns: {missing or 'none'} are not feature columns of the "
                         f"DataFrame (columns: {list(frame.columns)[:10]})")
    kinds = dict(kinds or {})
    strays = sorted(set(kinds) - set(columns), key=str)
    if strays:
        raise ValueError(f"kinds: {strays} are not feature columns of the DataFrame")
    n, mask = len(frame), np.uint64((1 << int(hash_bits)) - 1)
    column_kinds = [_column_kind(frame[name], kinds, name) for name in columns]
    stored = "numeric" in column_kinds  # else one-hot rows: no values
    ids = np.zeros((n, len(columns)), np.int64)
    values = np.ones((n, len(columns)), np.float32) if stored else None
    present = np.zeros((n, len(columns)), bool)
    for field, (name, kind) in enumerate(zip(columns, column_kinds)):
        series = frame[name]
        here = ~series.isna().to_numpy()
        present[:, field] = here
        cells = series[here]
        if kind == "numeric":
            ids[:, field] = _murmur_bytes(np.zeros(0, np.uint8), 0, 0, field)
            values[here, field] = cells.to_numpy(np.float32)
        elif kind == "integer":
            numbers = cells.to_numpy()
            if numbers.dtype.kind not in "iub" and not np.all(np.mod(numbers, 1) == 0):
                raise ValueError(f"kinds: column {name!r} is 'integer' but holds "
                                 f"non-integer values")
            ids[here, field] = _hash_buckets(numbers.astype(np.int64), field)
        else:
            ids[here, field] = _text_ids(cells.astype(str).to_numpy(dtype=str), field)
    ids = (ids.astype(np.uint64) & mask).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int64)
    y = np.zeros(n, np.float32) if label is None else frame[label].to_numpy(np.float32)
    field_of = np.broadcast_to(np.arange(len(columns), dtype=np.int32), ids.shape)[present]
    lowest = np.full(1 << int(hash_bits), len(columns), np.int32)  # as convert's rule
    np.minimum.at(lowest, ids[present], field_of)
    fields = np.where(lowest == len(columns), -1, lowest).astype(np.int32)
    data = Dataset(indptr, ids[present], values[present] if stored else None, y,
                   n_features=1 << int(hash_bits))
    return data.with_fields(fields, [str(c) for c in columns])
