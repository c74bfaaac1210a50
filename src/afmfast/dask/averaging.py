"""Periodic averaging of data-parallel training: what a worker sends at a synchronisation
and how the workers' copies are merged into one.

Every worker trains the same parameter tables on its own rows. At a synchronisation each
worker exports a ``Payload``: the embedding rows (``V``, ``w`` and their optimiser state)
that its batches touched since the last synchronisation, and all of the dense
parameters (FM: w0, batch-norm scale, shift and running statistics; AFM: w0, p and the
attention network) with their optimiser state. Every worker then merges the same
payloads in the same order (worker index), so all of them end with bit-identical
tables:

- an embedding row is the mean of the copies of the workers that touched it (a row that
  one worker alone touched takes that worker's value unchanged: averaging it with the
  untouched copies of the others would shrink its update by the worker count);
- a dense table is the mean over the workers that trained at least one batch since the
  last synchronisation.

Means are taken in float64 and stored as float32. Optimiser state is averaged like the
parameters (for Adagrad, the accumulators).
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

#: parameter tables indexed by feature id on their first axis (optimiser state: second)
SPARSE_FIELDS = ("V", "w")

#: optimiser-state slots in use per optimiser (SGD keeps none, Adam two moments)
SLOTS = {"adagrad": 1, "momentum": 1, "adam": 2, "sgd": 0}


class Payload(NamedTuple):
    """What one worker sends at a synchronisation.

    ids : int32 (n,), sorted: the feature rows touched since the last synchronisation.
    sparse : arrays of the touched rows, one per sparse table (``row_tables`` order).
    dense : copies of the dense tables (``dense_tables`` order).
    batches : batches trained since the last synchronisation (0: the dense tables are
        left out of the mean).

    Examples
    --------
    >>> p = Payload(np.array([4], np.int32), (np.ones((1, 2), np.float32),), (), 1)
    >>> p.ids.tolist(), p.batches
    ([4], 1)
    """

    ids: np.ndarray
    sparse: tuple
    dense: tuple
    batches: int

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what goes over the network to each peer).

        Examples
        --------
        >>> Payload(np.zeros(2, np.int32), (np.zeros((2, 4), np.float32),), (), 1).nbytes
        40
        """
        return int(self.ids.nbytes + sum(a.nbytes for a in self.sparse)
                   + sum(a.nbytes for a in self.dense))


def row_tables(params, state, optimizer: str) -> list[np.ndarray]:
    """Views of the sparse tables with the feature id on the first axis: ``V``, ``w``
    and the optimiser slots in use of each (state (slots, M, ...) seen as (M, slots,
    ...)). Writing ``view[ids] = rows`` writes the tables themselves.

    Examples
    --------
    >>> from afmfast.kernels.api import new_fm_params, new_opt_state, ADAGRAD
    >>> params = new_fm_params(10, 4, np.random.default_rng(0))
    >>> [t.shape for t in row_tables(params, new_opt_state(params, ADAGRAD), "adagrad")]
    [(10, 4), (10,), (10, 1, 4), (10, 1)]
    """
    slots = SLOTS[optimizer]
    tables = [getattr(params, name) for name in SPARSE_FIELDS]
    if slots:
        tables += [np.moveaxis(getattr(state, name)[:slots], 1, 0) for name in SPARSE_FIELDS]
    return tables


def dense_tables(params, state, optimizer: str) -> list[np.ndarray]:
    """The tables that every batch updates (all but ``V`` and ``w``), with their
    optimiser slots in use.

    Examples
    --------
    >>> from afmfast.kernels.api import new_fm_params, new_opt_state, ADAGRAD
    >>> params = new_fm_params(10, 4, np.random.default_rng(0))
    >>> [t.shape for t in dense_tables(params, new_opt_state(params, ADAGRAD), "adagrad")]
    [(9,), (2, 4), (1, 9)]
    """
    slots = SLOTS[optimizer]
    tables = [a for name, a in zip(params._fields, params) if name not in SPARSE_FIELDS]
    if slots:
        tables += [a[:slots] for name, a in zip(state._fields, state)
                   if name not in SPARSE_FIELDS]
    return tables


def export(rows: list[np.ndarray], dense: list[np.ndarray], ids: np.ndarray,
           batches: int) -> Payload:
    """A worker's payload: copies of the touched rows ``ids`` of the sparse tables
    ``rows`` and of the tables ``dense``.

    Examples
    --------
    >>> V = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> payload = export([V], [np.ones(3, np.float32)], np.array([1, 4], np.int32), 2)
    >>> payload.sparse[0].tolist(), payload.nbytes
    ([[2.0, 3.0], [8.0, 9.0]], 36)
    """
    return Payload(ids, tuple(t[ids] for t in rows), tuple(t.copy() for t in dense),
                   int(batches))


def additive_tables(params, optimizer: str) -> tuple[list[bool], list[bool]]:
    """Which tables of ``row_tables`` and of ``dense_tables`` merge by adding up the
    workers' changes (True) rather than by a mean (False): the trained parameters, and
    Adagrad's accumulators (sums of squared gradients); not the batch-norm running
    statistics nor momentum or Adam's moments (decaying averages).

    Examples
    --------
    >>> from afmfast.kernels.api import new_fm_params
    >>> additive_tables(new_fm_params(10, 4, np.random.default_rng(0)), "adagrad")
    ([True, True, True, True], [True, False, True])
    """
    slots = SLOTS[optimizer]
    state = optimizer == "adagrad"
    rows = [True] * len(SPARSE_FIELDS) + ([state] * len(SPARSE_FIELDS) if slots else [])
    dense_names = [n for n in params._fields if n not in SPARSE_FIELDS]
    dense = [n != "bn_stats" for n in dense_names]
    if slots:
        dense += [state] * len([n for n in dense_names if n != "bn_stats"])
    return rows, dense


def merge(payloads: list[Payload], base_rows=None, base_dense=None,
          additive: tuple[list[bool], list[bool]] | None = None) -> Payload:
    """The merged payload of the workers' ``payloads`` (in worker order); its ids are
    the union of theirs. A table marked additive (``additive_tables``) becomes the last
    synchronisation's value (``base_rows``, ``base_dense``: the synchronised tables,
    as ``row_tables`` and ``dense_tables`` lay them out) plus the sum of the workers'
    changes; any other table the mean over the workers that touched the row (sparse
    tables) or that trained (dense tables; all of them if none did). Without
    ``additive`` every table is a mean.

    Examples
    --------
    >>> a = Payload(np.array([0, 2], np.int32), (np.array([1.0, 3.0], np.float32),),
    ...             (np.array([1.0], np.float32),), 1)
    >>> b = Payload(np.array([2, 5], np.int32), (np.array([5.0, 7.0], np.float32),),
    ...             (np.array([3.0], np.float32),), 1)
    >>> m = merge([a, b])
    >>> m.ids.tolist(), m.sparse[0].tolist(), m.dense[0].tolist()
    ([0, 2, 5], [1.0, 4.0, 7.0], [2.0])
    >>> base = [np.zeros(6, np.float32)], [np.zeros(1, np.float32)]
    >>> m = merge([a, b], *base, additive=([True], [True]))
    >>> m.sparse[0].tolist(), m.dense[0].tolist()  # row 2: 0 + (3 - 0) + (5 - 0)
    ([1.0, 8.0, 7.0], [4.0])
    """
    n_rows = len(payloads[0].sparse)
    n_dense = len(payloads[0].dense)
    row_add, dense_add = additive if additive is not None else ([False] * n_rows,
                                                                 [False] * n_dense)
    ids = np.unique(np.concatenate([p.ids for p in payloads])).astype(np.int32)
    positions = [np.searchsorted(ids, p.ids) for p in payloads]
    counts = np.zeros(len(ids), np.float64)
    for pos in positions:
        counts[pos] += 1.0
    sparse = []
    for t in range(n_rows):
        first = payloads[0].sparse[t]
        total = np.zeros((len(ids),) + first.shape[1:], np.float64)
        for p, pos in zip(payloads, positions):
            total[pos] += p.sparse[t]  # ids are unique within a payload
        shape = (-1,) + (1,) * (total.ndim - 1)
        if row_add[t]:  # base + sum of (x_i - base) over the touchers
            total -= (counts - 1.0).reshape(shape) * base_rows[t][ids]
        else:
            total /= counts.reshape(shape)
        sparse.append(total.astype(first.dtype))
    trained = [p for p in payloads if p.batches > 0] or payloads
    dense = []
    for t in range(n_dense):
        total = sum(p.dense[t].astype(np.float64) for p in trained)
        if dense_add[t]:
            total -= (len(trained) - 1) * base_dense[t].astype(np.float64)
        else:
            total /= len(trained)
        dense.append(total.astype(trained[0].dense[t].dtype))
    return Payload(ids, tuple(sparse), tuple(dense), sum(p.batches for p in payloads))


def apply(payload: Payload, rows: list[np.ndarray], dense: list[np.ndarray]) -> None:
    """Write ``payload`` into the tables (``row_tables`` and ``dense_tables`` views).

    Examples
    --------
    >>> V = np.zeros((4, 2), np.float32)
    >>> apply(Payload(np.array([3], np.int32), (np.ones((1, 2), np.float32),), (), 1), [V], [])
    >>> V[3].tolist(), V[0].tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    for table, values in zip(rows, payload.sparse):
        table[payload.ids] = values
    for table, values in zip(dense, payload.dense):
        table[...] = values


class TouchedRows:
    """The feature ids that a worker's batches touch between two synchronisations,
    collected in O(nonzeros) without scanning all ``n_features`` ids.

    Examples
    --------
    >>> touched = TouchedRows(10)
    >>> indptr, indices = np.array([0, 2, 3, 5]), np.array([7, 1, 7, 2, 1], np.int32)
    >>> touched.add(indptr, indices, np.array([0, 2]))
    >>> touched.take().tolist(), touched.take().tolist()
    ([1, 2, 7], [])
    """

    def __init__(self, n_features: int):
        self.seen = np.zeros(n_features, np.bool_)
        self.ids = np.empty(n_features, np.int32)
        self.n = 0

    def add(self, indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> None:
        """Mark the ids of the rows ``rows`` of a CSR (indptr, indices).

        Examples
        --------
        >>> touched = TouchedRows(5)
        >>> touched.add(np.array([0, 2]), np.array([4, 0], np.int32), np.array([0]))
        >>> touched.n
        2
        """
        self.n = _collect(indptr, indices, np.ascontiguousarray(rows, np.int64),
                          self.seen, self.ids, self.n)

    def take(self) -> np.ndarray:
        """The ids marked since the last ``take``, sorted; clears the marks.

        Examples
        --------
        >>> touched = TouchedRows(5)
        >>> touched.add(np.array([0, 2]), np.array([4, 0], np.int32), np.array([0]))
        >>> touched.take().tolist(), bool(touched.seen.any())
        ([0, 4], False)
        """
        ids = np.sort(self.ids[:self.n])
        self.seen[ids] = False
        self.n = 0
        return ids


@numba.njit(cache=True, nogil=True)
def _collect(indptr, indices, rows, seen, out, n):  # pragma: no cover - compiled
    for r in rows:
        for p in range(indptr[r], indptr[r + 1]):
            f = indices[p]
            if not seen[f]:
                seen[f] = True
                out[n] = f
                n += 1
    return n
