"""The C library's allocator settings while a fit trains on a Dask worker.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (the
``distributed.nanny.pre-spawn-environ`` setting), so that freed memory goes back to the
system promptly. Setting it also freezes glibc's mmap threshold at 128 KiB. Training
allocates and frees transient arrays every batch and every round (orders, losses, the
synchronisation payloads); with those settings each one is mapped anew or trimmed off
the heap, and its pages fault in again on first touch. ``bench/distributed.py`` shows
what that costs a 2-worker epoch. So while at least one fit's actor trains in a worker
process, its allocator runs with glibc's usual ceilings (an mmap threshold of 32 MiB, a
trim threshold of 64 MiB); when the last one ends, the environment's values come back
and ``malloc_trim(0)`` returns the free memory, which is what the nanny's setting is for.

Elsewhere than on glibc (musl, macOS, Windows) this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import threading

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: glibc's defaults, which its environment variables override
DEFAULT_THRESHOLD = 128 * 1024
#: while training: the ceilings up to which glibc raises both thresholds by itself
TRAINING = {M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_TRIM_THRESHOLD: 64 * 1024 * 1024}

_lock = threading.Lock()
_users = 0
_libc = None


def _glibc():
    """glibc's mallopt and malloc_trim, or None elsewhere."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None)
            mallopt, trim = libc.mallopt, libc.malloc_trim
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
            _libc = (mallopt, trim)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _environment_value(name: str) -> int:
    try:
        return int(os.environ.get(name, DEFAULT_THRESHOLD))
    except ValueError:
        return DEFAULT_THRESHOLD


def acquire() -> bool:
    """A fit starts training in this process: the training settings apply until the
    matching ``release``. Returns whether the allocator is glibc's (else nothing
    changes).

    Examples
    --------
    >>> changed = acquire()
    >>> release()
    """
    global _users
    libc = _glibc()
    with _lock:
        _users += 1
        if libc is not None and _users == 1:
            for option, value in TRAINING.items():
                libc[0](option, value)
    return libc is not None


def release() -> None:
    """A fit's training ends: the last one out restores the environment's thresholds
    (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``; glibc's defaults without
    them) and returns the free memory to the system."""
    global _users
    libc = _glibc()
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if libc is not None and _users == 0:
            libc[0](M_TRIM_THRESHOLD, _environment_value("MALLOC_TRIM_THRESHOLD_"))
            libc[0](M_MMAP_THRESHOLD, _environment_value("MALLOC_MMAP_THRESHOLD_"))
            libc[1](0)
