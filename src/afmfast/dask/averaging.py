"""Periodic averaging of data-parallel training: what a worker sends at a synchronisation
and how the workers' copies are merged into one.

Every worker trains the same parameter tables on its own rows. At a synchronisation each
worker exports a ``Payload``: the changes since the last synchronisation of the embedding
rows (``V``, ``w`` and their optimiser state) that its batches touched, and copies of all
of the dense parameters (FM: w0, batch-norm scale, shift and running statistics; AFM: w0,
p and the attention network) with their optimiser state. Every worker then merges the
same payloads in the same order (worker index), so all of them end with bit-identical
tables (``merge_into`` says how).

The row changes travel as bfloat16 (the top half of a float32: its exponent range and 8
significant bits, rounded to nearest even): half the bytes to gather, send and merge,
and a relative error of at most 2^-8 on each change, far below the noise of the
stochastic gradients that made it. A worker applies its own change in that rounded
form too, so the tables stay identical on every worker. Dense tables are small and
travel as float32.
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
    deltas : per sparse table (``row_tables`` order), uint16 (n, width): the bfloat16
        bit patterns of those rows' changes since the last synchronisation.
    dense : copies of the dense tables (``dense_tables`` order).
    batches : batches trained since the last synchronisation (0: the dense tables are
        left out of the mean).
    notes : what else the worker tells its peers at this synchronisation, or None (a
        Dask worker: its validation sums of the epoch before, ``afmfast.dask.worker``).

    Examples
    --------
    >>> p = Payload(np.array([4], np.int32), (to_bfloat16(np.ones((1, 2))),), (), 1)
    >>> p.ids.tolist(), p.batches, p.nbytes
    ([4], 1, 8)
    """

    ids: np.ndarray
    deltas: tuple
    dense: tuple
    batches: int
    notes: object = None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what goes over the network to each peer).

        Examples
        --------
        >>> Payload(np.zeros(2, np.int32), (np.zeros((2, 4), np.uint16),), (), 1).nbytes
        24
        """
        return int(self.ids.nbytes + sum(a.nbytes for a in self.deltas)
                   + sum(a.nbytes for a in self.dense))


def to_bfloat16(x) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of ``x`` (converted to float32 first),
    rounded to nearest even.

    Examples
    --------
    >>> to_bfloat16([1.0, -2.0, 1.0 + 2.0 ** -9]).tolist()  # the last rounds to even
    [16256, 49152, 16256]
    """
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.uint16)
    _round_bfloat16(x.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


def from_bfloat16(bits) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (``to_bfloat16``'s inverse, exact).

    Examples
    --------
    >>> from_bfloat16(to_bfloat16([0.5, 3.0, -1e30])).tolist()  # 8 significant bits
    [0.5, 3.0, -1.0002555517425873e+30]
    """
    bits = np.asarray(bits, np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@numba.njit(cache=True, nogil=True, inline="always")
def _bfloat16_of(b):  # pragma: no cover - compiled
    # float32 bits b to bfloat16 bits: add half a unit of the kept part, ties to even
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@numba.njit(cache=True, nogil=True)
def _round_bfloat16(bits, out):  # pragma: no cover - compiled
    for i in range(len(bits)):
        out[i] = _bfloat16_of(bits[i])


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


def export(rows, synced_rows, dense: list[np.ndarray], ids: np.ndarray,
           batches: int) -> Payload:
    """A worker's payload: the changes of the rows ``ids`` of the sparse tables
    ``rows`` since their synchronised copies ``synced_rows``, as bfloat16, and copies
    of the tables ``dense``.

    Examples
    --------
    >>> V = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> payload = export([V], [np.ones((6, 2), np.float32)], [np.ones(3, np.float32)],
    ...                  np.array([1, 4], np.int32), 2)
    >>> from_bfloat16(payload.deltas[0]).tolist(), payload.nbytes
    ([[1.0, 2.0], [7.0, 8.0]], 28)
    """
    deltas = []
    for live, synced in zip(rows, synced_rows):
        out = np.empty((len(ids), live.shape[1]), np.uint16)
        _gather_deltas(live, synced, ids, out)
        deltas.append(out)
    return Payload(ids, tuple(deltas), tuple(t.copy() for t in dense), int(batches))


@numba.njit(cache=True, nogil=True)
def _gather_deltas(live, synced, ids, out):  # pragma: no cover - compiled
    width = live.shape[1]
    change = np.empty(width, np.float32)
    bits = change.view(np.uint32)
    for j in range(len(ids)):
        r = ids[j]
        for c in range(width):
            change[c] = live[r, c] - synced[r, c]
        for c in range(width):
            out[j, c] = _bfloat16_of(bits[c])


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


def merge_into(payloads: list[Payload], rows, synced_rows, dense: list[np.ndarray],
               synced_dense: list[np.ndarray],
               additive: tuple[list[bool], list[bool]] | None, count: np.ndarray) -> None:
    """Merge the workers' ``payloads`` (in worker order) into the live tables (``rows``,
    ``dense``: ``row_tables`` and ``dense_tables``) and record the result as the last
    synchronisation's (``synced_rows``, ``synced_dense``, copies laid out alike).

    A sparse row that some worker touched becomes its synchronised value plus the sum
    of the workers' changes (a table marked additive by ``additive_tables``: as if one
    process had trained all their batches) or plus their mean over the workers that
    touched it (any other table; a row that one worker alone touched takes that
    worker's change whole: averaging it with the others' zero change would shrink it
    by the worker count). A dense table becomes, likewise, the synchronised value plus
    the sum of the changes (additive) or the mean of the copies, over the workers that
    trained since the last synchronisation (all of them if none did). Without
    ``additive`` every table is a mean. Every worker runs the same operations in the
    same order on the same payloads, so all of them end with identical tables.
    ``count`` is int32 scratch of one entry per feature, zero between calls.

    Examples
    --------
    >>> V, base = np.zeros((6, 1), np.float32), np.zeros((6, 1), np.float32)
    >>> a = Payload(np.array([0, 2], np.int32), (to_bfloat16([[1.0], [3.0]]),),
    ...             (np.array([1.0], np.float32),), 1)
    >>> b = Payload(np.array([2, 5], np.int32), (to_bfloat16([[5.0], [7.0]]),),
    ...             (np.array([3.0], np.float32),), 1)
    >>> d, d0 = [np.zeros(1, np.float32)], [np.zeros(1, np.float32)]
    >>> scratch = np.zeros(6, np.int32)
    >>> merge_into([a, b], [V], [base], d, d0, None, scratch)  # means
    >>> V.ravel().tolist(), d[0].tolist(), base.ravel().tolist() == V.ravel().tolist()
    ([1.0, 0.0, 4.0, 0.0, 0.0, 7.0], [2.0], True)
    >>> V[...] = base[...] = 0; d0[0][...] = 0
    >>> merge_into([a, b], [V], [base], d, d0, ([True], [True]), scratch)  # sums
    >>> V.ravel().tolist(), d[0].tolist()  # row 2: 0 + (3 + 5)
    ([1.0, 0.0, 8.0, 0.0, 0.0, 7.0], [4.0])
    """
    row_add, dense_add = additive if additive is not None else (
        [False] * len(rows), [False] * len(dense))
    # a table at a time (each compiled call sees one width and one rule), the payloads
    # in worker order: the changes are summed into the live rows, then each touched
    # row is finished once, at its first payload, from its synchronised value
    for p in payloads:
        for live, delta in zip(rows, p.deltas):
            _add_deltas(live, p.ids, delta, count)
        _count_rows(p.ids, count)
    for p in payloads:
        for t, (live, synced) in enumerate(zip(rows, synced_rows)):
            _finish_rows(live, synced, p.ids, count, row_add[t])
        count[p.ids] = 0
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
def _add_deltas(live, ids, delta, count):  # pragma: no cover - compiled
    # a row's first payload (count 0) starts its sum of changes
    width = live.shape[1]
    change = np.empty(width, np.uint32)
    values = change.view(np.float32)
    for j in range(len(ids)):
        r = ids[j]
        for c in range(width):
            change[c] = np.uint32(delta[j, c]) << np.uint32(16)
        if count[r] == 0:
            for c in range(width):
                live[r, c] = values[c]
        else:
            for c in range(width):
                live[r, c] += values[c]


@numba.njit(cache=True, nogil=True)
def _count_rows(ids, count):  # pragma: no cover - compiled
    for r in ids:
        count[r] += 1


@numba.njit(cache=True, nogil=True)
def _finish_rows(live, synced, ids, count, additive):  # pragma: no cover - compiled
    # live holds the row's summed change; a row already finished (at an earlier
    # payload that shares it) has count 0
    width = live.shape[1]
    for j in range(len(ids)):
        r = ids[j]
        n = count[r]
        if n == 0:
            continue
        for c in range(width):
            change = live[r, c] if additive else live[r, c] / np.float32(n)
            live[r, c] = synced[r, c] + change
            synced[r, c] = live[r, c]


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
