"""Numba helpers shared by the FM and AFM Numba kernels (``afmfast._fm_numba`` and later
the AFM kernel): the counter-based dropout hash and the optimiser update.

All functions are ``@njit`` and meant to be called from other jitted code (they also work
from Python, which the tests use).

Dropout hash (see ``afmfast.kernel_api``): every operand is ``np.uint64``. Numba types
``uint64 op int64`` as float64, which would silently break the mod 2^64 arithmetic, so
every constant below is a ``np.uint64`` and every caller casts its integers first.

Optimiser update: ``opt_scalar`` / ``opt_row`` update one parameter (or one contiguous
row) in place from its gradient and its two state slots. Arithmetic is float64 whatever
the storage dtype, as in ``afmfast.reference``; results are rounded once on store.
Widen with ``np.float64(x)``, never ``float(x)``: Numba types ``float(float32)`` as float32.
"""
import math

import numpy as np
from numba import njit

from .kernel_api import (
    ADAGRAD,
    ADAM,
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    GOLDEN,
    MOMENTUM,
    MOMENTUM_COEF,
    SGD,
)

_GOLDEN = np.uint64(GOLDEN)
_ONE = np.uint64(1)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)

_ADAGRAD, _SGD, _MOMENTUM, _ADAM = ADAGRAD, SGD, MOMENTUM, ADAM

_JIT = dict(cache=True, nogil=True, fastmath=False)


@njit(**_JIT)
def mix64(z):
    """splitmix64 finaliser of a uint64 (wrapping arithmetic)."""
    z = np.uint64(z)
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


@njit(**_JIT)
def step_key(seed, stream, step):
    """Per-(seed, stream, step) part of the key; seed, stream, step as np.uint64."""
    return mix64(mix64(np.uint64(seed) + np.uint64(stream) * _GOLDEN) + np.uint64(step))


@njit(**_JIT)
def row_key(skey, row):
    """Key of one dataset row from ``step_key``; row as np.uint64."""
    return mix64(np.uint64(skey) + np.uint64(row))


@njit(**_JIT)
def keep_unit(rkey, unit, threshold):
    """True when ``unit`` (int, 0-based) is kept; threshold from
    ``kernel_api.dropout_threshold`` as np.uint64."""
    bits = mix64(rkey + (np.uint64(unit) + _ONE) * _GOLDEN)
    return (bits >> _S11) < threshold


@njit(**_JIT)
def fill_dropout_mask(seed, stream, step, rows, threshold, out):
    """out[b, u] = keep_unit(...) for dataset row rows[b]: the jitted twin of
    ``kernel_api.dropout_mask`` (used by tests and as an example of the call order)."""
    skey = step_key(seed, stream, step)
    for b in range(rows.shape[0]):
        rkey = row_key(skey, np.uint64(rows[b]))
        for u in range(out.shape[1]):
            out[b, u] = keep_unit(rkey, u, threshold)


@njit(**_JIT)
def effective_lr(optimizer, lr, step):
    """Learning rate of this step: Adam's bias correction folded in (t = step + 1)."""
    if optimizer == _ADAM:
        t = np.float64(step + 1)
        return lr * math.sqrt(1.0 - ADAM_BETA2**t) / (1.0 - ADAM_BETA1**t)
    return lr


@njit(**_JIT)
def opt_update(p, g, s0, s1, optimizer, lr_eff):
    """One scalar update with the step's ``effective_lr``; returns (p, s0, s1) as
    float64. Unknown optimizer codes leave everything unchanged (validated upstream)."""
    p = np.float64(p)
    s0 = np.float64(s0)
    s1 = np.float64(s1)
    if optimizer == _ADAGRAD:
        s0 += g * g
        p -= lr_eff * g / math.sqrt(s0)
    elif optimizer == _SGD:
        p -= lr_eff * g
    elif optimizer == _MOMENTUM:
        s0 = MOMENTUM_COEF * s0 + g
        p -= lr_eff * s0
    elif optimizer == _ADAM:
        s0 = ADAM_BETA1 * s0 + (1.0 - ADAM_BETA1) * g
        s1 = ADAM_BETA2 * s1 + (1.0 - ADAM_BETA2) * g * g
        p -= lr_eff * s0 / (math.sqrt(s1) + ADAM_EPS)
    return p, s0, s1


@njit(**_JIT)
def opt_scalar(p, g, s0, s1, optimizer, lr, step):
    """Scalar update from the raw lr and step: returns (p, s0, s1) as float64."""
    return opt_update(p, g, s0, s1, optimizer, effective_lr(optimizer, lr, step))


@njit(**_JIT)
def opt_row(p, g, s0, s1, optimizer, lr_eff):
    """In-place update of the 1-D views p, s0, s1 (storage dtype) from the float64
    gradient g (same length), with the step's ``effective_lr``."""
    # The optimizer branch sits outside the loop so that each loop body is branch-free
    # and contiguous over the row.
    n = p.shape[0]
    if optimizer == _ADAGRAD:
        for i in range(n):
            a = np.float64(s0[i]) + g[i] * g[i]
            s0[i] = a
            p[i] = np.float64(p[i]) - lr_eff * g[i] / math.sqrt(a)
    elif optimizer == _SGD:
        for i in range(n):
            p[i] = np.float64(p[i]) - lr_eff * g[i]
    elif optimizer == _MOMENTUM:
        for i in range(n):
            m = MOMENTUM_COEF * np.float64(s0[i]) + g[i]
            s0[i] = m
            p[i] = np.float64(p[i]) - lr_eff * m
    elif optimizer == _ADAM:
        for i in range(n):
            m = ADAM_BETA1 * np.float64(s0[i]) + (1.0 - ADAM_BETA1) * g[i]
            v = ADAM_BETA2 * np.float64(s1[i]) + (1.0 - ADAM_BETA2) * g[i] * g[i]
            s0[i] = m
            s1[i] = v
            p[i] = np.float64(p[i]) - lr_eff * m / (math.sqrt(v) + ADAM_EPS)
