"""The order in which an epoch visits the training rows.

- **In memory** (a ``Dataset`` of ordinary arrays): the backend's ``shuffled_rows``, a
  uniform permutation of all rows from (seed, epoch), drawn on the kernels' threads
  (``afmfast.kernels.api``). It costs 8 bytes a row for the epoch.
- **Memory-mapped** (``Dataset.memory_mapped``: a store from ``afmfast.open_store``, or
  arrays from ``numpy.load(..., mmap_mode="r")``): a windowed order, so that an epoch
  reads the files nearly in sequence and allocates nothing of O(n_rows). The rows are
  cut into blocks of ``BLOCK_ROWS`` consecutive rows; the blocks are shuffled and taken
  ``WINDOW_BLOCKS`` at a time, and each window's rows are shuffled together, as the
  shuffle buffers of tf.data and WebDataset do. Both shuffles are ``shuffled_rows`` of
  (seed, a key of the epoch and the window), so the order is a function of (seed,
  epoch) alone, the same for any thread count. While a window trains, the pages of the
  next one are requested from the disk (``madvise(MADV_WILLNEED)``), so that reading
  and training overlap.

``fit`` chooses by ``Dataset.memory_mapped``; ``order_segments`` makes the choice.

**Units** (the estimators' ``shuffle_unit``): either order may shuffle runs of ``unit``
consecutive rows as wholes instead of single rows, the rows of a run kept in their
order. A batch's rows then lie in runs that the processor's prefetchers read in
sequence, instead of each row costing its own cache misses. That is only as random as
the rows' stored order allows: meant for rows stored in random order already (logs
shuffled on writing, synthetic rows), not for rows sorted by user, item or time.

With ``reuse=True`` (training does this) the windows of an epoch are written into
three buffers allocated once an epoch, not into new arrays: a window of a few hundred
thousand rows is large enough for the C library to map fresh pages for every new array
(always so in a Dask worker, whose nanny sets ``MALLOC_TRIM_THRESHOLD_``), and the page
faults then cost a measurable part of an epoch. A window is then valid until the
generator has been advanced twice, which is how ``Trainer.train_epoch`` and
``_whole_batches`` consume it.
"""
from __future__ import annotations

import ctypes
import mmap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    from collections.abc import Callable, Iterator

    from afmfast.data.dataset import Dataset

#: consecutive rows that the windowed order keeps together (read in sequence)
BLOCK_ROWS = 1 << 16
#: blocks whose rows are shuffled together: the window's order takes 3 arrays of
#: 8 bytes a row, about 12 MB
WINDOW_BLOCKS = 8


def window_key(epoch: int, window: int) -> int:
    """The ``epoch`` argument of ``shuffled_rows`` for one shuffle of the windowed order:
    window 0 is the blocks' shuffle, window w + 1 the rows of window w.

    Examples
    --------
    >>> window_key(3, 0), window_key(3, 1) - window_key(3, 0)
    (12884901888, 1)
    """
    return (int(epoch) << 32) + int(window)


def shuffled_units(n: int, unit: int, seed: int, key: int, shuffle: Callable[..., np.ndarray],
                   out: np.ndarray | None = None,
                   scratch: np.ndarray | None = None) -> np.ndarray:
    """A seeded order of ``range(n)`` that keeps runs of ``unit`` consecutive numbers
    (the last run shorter when ``unit`` does not divide ``n``) and shuffles the runs:
    ``shuffle(n, seed, key)`` itself for ``unit`` 1. ``out`` (at least ``ceil(n / unit)
    * unit`` long) and ``scratch`` (at least ``ceil(n / unit)``) are optional buffers;
    the order is in ``out[:n]``.

    Examples
    --------
    >>> from afmfast.kernels.numba.common import shuffled_rows
    >>> shuffle = lambda n, seed, key, out=None: shuffled_rows(n, seed, key, 1, out=out)
    >>> shuffled_units(10, 4, 2016, 2, shuffle).tolist()  # the last run is shorter
    [8, 9, 4, 5, 6, 7, 0, 1, 2, 3]
    """
    # a unit beyond n is one run of all n numbers (and must not size a buffer)
    unit = max(1, min(int(unit), n))
    if unit == 1:
        return shuffle(n, seed, key) if out is None else shuffle(n, seed, key, out=out[:n])
    n_units = -(-n // unit)
    units = (shuffle(n_units, seed, key) if scratch is None
             else shuffle(n_units, seed, key, out=scratch[:n_units]))
    if out is None:
        out = np.empty(n_units * unit, np.int64)
    runs = out[:n_units * unit].reshape(n_units, unit)
    np.multiply(units[:, None], unit, out=runs)
    runs += np.arange(unit, dtype=np.int64)
    short = n_units * unit - n  # the last run's missing numbers
    if short:
        # drop them: the rows after the last run's place move up over its gap (a copy
        # of that tail: once an epoch at most, as only the data's last window can
        # hold a short run when the unit divides BLOCK_ROWS)
        at = int(np.flatnonzero(units == n_units - 1)[0])
        flat = out[:n_units * unit]
        end = (at + 1) * unit
        flat[end - short:n_units * unit - short] = flat[end:].copy()
    return out[:n]


def windowed_order(data: Dataset, seed: int, epoch: int,
                   shuffle: Callable[..., np.ndarray], *,
                   block_rows: int | None = None, window_blocks: int | None = None,
                   prefetch: bool = True, reuse: bool = False,
                   unit: int = 1) -> Iterator[np.ndarray]:
    """The windowed order of an epoch (see the module docstring), window by window: int64
    arrays of row numbers that together hold every row once. ``shuffle(n, seed, key,
    out=None)`` is the backend's ``shuffled_rows`` on the fit's threads. ``reuse``: the
    windows are written into buffers that the next window but one overwrites (module
    docstring); the order is the same. ``unit``: a window's rows are shuffled in runs
    of that many (``shuffled_units``).

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.kernels.numba.common import shuffled_rows
    >>> data = afmfast.Dataset([0] * 11, [], [], [0.0] * 10)
    >>> shuffle = lambda n, seed, key, out=None: shuffled_rows(n, seed, key, 1, out=out)
    >>> windows = list(windowed_order(data, 2016, 1, shuffle, block_rows=2, window_blocks=2))
    >>> [len(w) for w in windows], sorted(np.concatenate(windows).tolist()) == list(range(10))
    ([4, 4, 2], True)
    >>> again = [w.copy() for w in windowed_order(data, 2016, 1, shuffle, block_rows=2,
    ...                                            window_blocks=2, reuse=True)]
    >>> all(np.array_equal(a, b) for a, b in zip(windows, again))
    True
    """
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    window_blocks = WINDOW_BLOCKS if window_blocks is None else window_blocks
    n = data.n_rows
    n_blocks = -(-n // block_rows)
    blocks = shuffle(n_blocks, seed, window_key(epoch, 0))
    windows = [blocks[w:w + window_blocks] for w in range(0, n_blocks, window_blocks)]
    largest = min(n, window_blocks * block_rows)
    iota = np.arange(min(n, block_rows), dtype=np.int64)
    unit = max(1, min(int(unit), largest))  # as shuffled_units takes it
    if reuse:
        positions = np.empty(-(-largest // unit) * unit, np.int64)
        scratch = np.empty(-(-largest // unit), np.int64) if unit > 1 else None
        laid_out = np.empty(largest, np.int64)
        out = (np.empty(largest, np.int64), np.empty(largest, np.int64))
    for w, chosen in enumerate(windows):
        if prefetch:
            if w == 0:
                _prefetch(data, chosen, block_rows)
            if w + 1 < len(windows):
                _prefetch(data, windows[w + 1], block_rows)
        starts = [int(b) * block_rows for b in chosen]
        lengths = [min(n, start + block_rows) - start for start in starts]
        size = sum(lengths)
        key = window_key(epoch, w + 1)
        if reuse:
            order = shuffled_units(size, unit, seed, key, shuffle, out=positions,
                                   scratch=scratch)
            blocks, rows = laid_out[:size], out[w % 2][:size]
        else:
            order = shuffled_units(size, unit, seed, key, shuffle)
            blocks, rows = np.empty(size, np.int64), np.empty(size, np.int64)
        # the window's blocks' rows laid end to end, then taken in the shuffled order
        # (mode="clip": unbuffered; every index is in range)
        offset = 0
        for start, length in zip(starts, lengths):
            np.add(iota[:length], start, out=blocks[offset:offset + length])
            offset += length
        np.take(blocks, order, out=rows, mode="clip")
        yield rows


def order_segments(data: Dataset, seed: int, epoch: int, shuffle: Callable[..., np.ndarray],
                   *, reuse: bool = False, unit: int = 1) -> Iterator[np.ndarray]:
    """The epoch's order as segments to train in turn: the whole shuffle in one piece for
    an in-memory Dataset, window by window for a memory-mapped one (``reuse``: see
    ``windowed_order``), in runs of ``unit`` rows (``shuffled_units``).

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.kernels.numba.common import shuffled_rows
    >>> shuffle = lambda n, seed, key: shuffled_rows(n, seed, key, 1)
    >>> data = afmfast.Dataset([0] * 6, [], [], [0.0] * 5)
    >>> [len(s) for s in order_segments(data, 2016, 1, shuffle)]
    [5]
    """
    if data.memory_mapped:
        return windowed_order(data, seed, epoch, shuffle, reuse=reuse, unit=unit)
    return iter([shuffled_units(data.n_rows, unit, seed, epoch, shuffle)])


_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
_madvise = None


def _advise_willneed(array, lo, hi):
    """Ask the kernel to read ``array[lo:hi]`` (memory-mapped) ahead of use; a no-op
    where madvise is missing. Advice only: a failure changes nothing but speed."""
    global _madvise
    if hi <= lo or _MADV_WILLNEED is None:
        return
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    start = array.ctypes.data + lo * array.itemsize
    aligned = start - start % mmap.PAGESIZE
    _madvise(aligned, (hi - lo) * array.itemsize + start - aligned, _MADV_WILLNEED)


def _prefetch(data, blocks, block_rows):
    """Request the pages of the rows of ``blocks`` in every column of ``data``."""
    n = data.n_rows
    indptr = data.indptr
    for b in blocks:
        r0, r1 = int(b) * block_rows, min(n, (int(b) + 1) * block_rows)
        _advise_willneed(indptr, r0, r1 + 1)
        _advise_willneed(data.y, r0, r1)
        k0, k1 = int(indptr[r0]), int(indptr[r1])
        _advise_willneed(data.indices, k0, k1)
        values = data.X[2]  # empty for one-hot rows
        if values.size:
            _advise_willneed(values, k0, k1)
