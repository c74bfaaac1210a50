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
    """2-D views (M, width) of the sparse tables, the feature id first: ``V``, ``w``,
    then each optimiser slot in use of ``V`` and ``w``. Writing a view's rows writes
    the tables themselves.

    Examples
    --------
    >>> from afmfast.kernels.api import new_fm_params, new_opt_state, ADAGRAD
    >>> params = new_fm_params(10, 4, np.random.default_rng(0))
    >>> [t.shape for t in row_tables(params, new_opt_state(params, ADAGRAD), "adagrad")]
    [(10, 4), (10, 1), (10, 4), (10, 1)]
    """
    tables = [params.V, params.w.reshape(-1, 1)]
    for slot in range(SLOTS[optimizer]):
        tables += [state.V[slot], state.w[slot].reshape(-1, 1)]
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
    rows = [True] * len(SPARSE_FIELDS) + [state] * (len(SPARSE_FIELDS) * slots)
    dense_names = [n for n in params._fields if n not in SPARSE_FIELDS]
    dense = [n != "bn_stats" for n in dense_names]
    if slots:
        dense += [state] * len([n for n in dense_names if n != "bn_stats"])
    return rows, dense


def merge_into(payloads: list[Payload], rows: list[np.ndarray], synced_rows: list[np.ndarray],
               dense: list[np.ndarray], synced_dense: list[np.ndarray],
               additive: tuple[list[bool], list[bool]] | None, count: np.ndarray) -> None:
    """Merge the workers' ``payloads`` (in worker order) into the live tables (``rows``,
    ``dense``: ``row_tables`` and ``dense_tables``) and record the result as the last
    synchronisation's (``synced_rows``, ``synced_dense``, copies laid out alike).

    A table marked additive (``additive_tables``) becomes its synchronised value plus
    the sum of the workers' changes, as if one process had trained all their batches;
    any other table becomes the mean over the workers that touched the row (sparse
    tables) or that trained (dense tables; all of them if none did). Without
    ``additive`` every table is a mean. Every worker runs the same operations in the
    same order on the same payloads, so all of them end with identical tables.
    ``count`` is int32 scratch of one entry per feature, zero between calls.

    Examples
    --------
    >>> V, base = np.zeros((6, 1), np.float32), np.zeros((6, 1), np.float32)
    >>> a = Payload(np.array([0, 2], np.int32), (np.array([[1.0], [3.0]], np.float32),),
    ...             (np.array([1.0], np.float32),), 1)
    >>> b = Payload(np.array([2, 5], np.int32), (np.array([[5.0], [7.0]], np.float32),),
    ...             (np.array([3.0], np.float32),), 1)
    >>> d, d0 = [np.zeros(1, np.float32)], [np.zeros(1, np.float32)]
    >>> scratch = np.zeros(6, np.int32)
    >>> merge_into([a, b], [V], [base], d, d0, None, scratch)  # means
    >>> V.ravel().tolist(), d[0].tolist(), base.ravel().tolist() == V.ravel().tolist()
    ([1.0, 0.0, 4.0, 0.0, 0.0, 7.0], [2.0], True)
    >>> V[...] = base[...] = 0; d0[0][...] = 0
    >>> merge_into([a, b], [V], [base], d, d0, ([True], [True]), scratch)  # sums
    >>> V.ravel().tolist(), d[0].tolist()  # row 2: 0 + (3 - 0) + (5 - 0)
    ([1.0, 0.0, 8.0, 0.0, 0.0, 7.0], [4.0])
    """
    row_add, dense_add = additive if additive is not None else (
        [False] * len(rows), [False] * len(dense))
    for t, (live, synced) in enumerate(zip(rows, synced_rows)):
        for p in payloads:
            values = p.sparse[t].reshape(len(p.ids), live.shape[1])
            _add_rows(live, synced, p.ids, values, count, row_add[t])
        for p in payloads:
            _finish_rows(live, synced, p.ids, count, row_add[t])
    trained = [p for p in payloads if p.batches > 0] or payloads
    for t, (live, synced) in enumerate(zip(dense, synced_dense)):
        total = sum(p.dense[t].astype(np.float64) for p in trained)
        if dense_add[t]:
            total -= (len(trained) - 1) * synced.astype(np.float64)
        else:
            total /= len(trained)
        live[...] = total
        synced[...] = live


@numba.njit(cache=True, nogil=True)
def _add_rows(live, synced, ids, values, count, additive):  # pragma: no cover - compiled
    # one payload's rows, the payloads in worker order: the same float32 operations in
    # the same order on every worker; a row's first payload starts it from its
    # synchronised value (sums) or zero (means)
    width = live.shape[1]
    for j in range(len(ids)):
        r = ids[j]
        if count[r] == 0:
            for c in range(width):
                live[r, c] = synced[r, c] if additive else 0.0
        count[r] += 1
        for c in range(width):
            if additive:
                live[r, c] += values[j, c] - synced[r, c]
            else:
                live[r, c] += values[j, c]


@numba.njit(cache=True, nogil=True)
def _finish_rows(live, synced, ids, count, additive):  # pragma: no cover - compiled
    width = live.shape[1]
    for j in range(len(ids)):
        r = ids[j]
        if count[r] == 0:
            continue  # done: a row that several workers touched
        for c in range(width):
            if not additive:
                live[r, c] /= count[r]
            synced[r, c] = live[r, c]
        count[r] = 0


class TouchedRows:
    """The feature ids that a worker's batches touch between two synchronisations: the
    kernels mark them in ``marks`` as they train (kernels.api's ``track_touched``), and
    ``take`` collects them with one O(n_features) scan a synchronisation.

    Examples
    --------
    >>> touched = TouchedRows(10)
    >>> touched.marks[[7, 1, 2]] = 1  # what the kernels do for the features they touch
    >>> touched.take().tolist(), touched.take().tolist()
    ([1, 2, 7], [])
    """

    def __init__(self, n_features: int):
        self.marks = np.zeros(n_features, np.uint8)

    def take(self) -> np.ndarray:
        """The ids marked since the last ``take`` (int32, sorted); clears the marks.

        Examples
        --------
        >>> touched = TouchedRows(5)
        >>> touched.marks[4] = 1
        >>> touched.take().tolist(), bool(touched.marks.any())
        ([4], False)
        """
        ids = np.flatnonzero(self.marks).astype(np.int32)
        self.marks[ids] = 0
        return ids
