"""Numba helpers shared by the FM and AFM Numba kernels (``afmfast.kernels.numba.fm``,
``afmfast.kernels.numba.afm``): the counter-based dropout hash, the optimiser update, the batch
preparation (validation, gather, grouping by feature), the epoch order
(``shuffled_rows``, kernels.api's permutation of the rows) and the Python-side checks.

All functions are ``@njit`` and meant to be called from other jitted code (they also work
from Python, which the tests use).

Dropout hash (see ``afmfast.kernels.api``): every operand is ``np.uint64``. Numba types
``uint64 op int64`` as float64, which would silently break the mod 2^64 arithmetic, so
every constant below is a ``np.uint64`` and every caller casts its integers first. The
per-unit hash ``mix32`` is 32-bit arithmetic done in uint64 and masked to 32 bits after
every operation that can carry (Numba widens uint32 operands to 64 bits).

Optimiser update: ``opt_scalar`` / ``opt_row`` update one parameter (or one contiguous
row) in place from its gradient and its two state slots. Arithmetic is float64 whatever
the storage dtype, as in ``afmfast.kernels.reference``; results are rounded once on store.
Widen with ``np.float64(x)``, never ``float(x)``: Numba types ``float(float32)`` as float32.

Denormals: ``ftz_enter`` / ``ftz_leave`` set flush-to-zero and denormals-are-zero in
the x86 MXCSR of the calling thread and put its previous value back (kernels.api's
"Denormals"). MXCSR is per thread: every kernel runs its serial part between the two,
and every prange body sets them itself, once per block of iterations (a load of MXCSR
costs as much as a short row's arithmetic). Numba has no MXCSR API: the intrinsics emit
LLVM's ``llvm.x86.sse.stmxcsr`` / ``ldmxcsr``. Not x86 (``HAVE_MXCSR`` False): no-ops.

Prefetch: ``prefetch(array, index)`` emits ``llvm.prefetch`` for an element (a hint that
never faults), for gathers through an index whose misses the hardware cannot foresee
(the Gibbs sweep's column rows).

Batch preparation: ``batch_offsets`` (row ids checked, prefix sums of the rows' nonzeros),
``gather_batch`` (the batch's nonzeros copied into contiguous "occurrence" arrays in batch
order, parallel over rows) and ``group_by_feature`` (stable counting sort of the
occurrences by feature; feature ids checked). Status codes below 0 (``BAD_*``) are turned into
ValueError by ``raise_batch_error``; nothing but the workspace is written before them.
"""
import contextlib
import math
import threading
from contextlib import contextmanager

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from afmfast.kernels.api import (
    ADAGRAD,
    ADAM,
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    GOLDEN,
    GOLDEN32,
    MASK32,
    MIX32_C1,
    MIX32_C2,
    MOMENTUM,
    MOMENTUM_COEF,
    OPTIMIZER_CODES,
    SGD,
    aligned_empty,
    order_buffer,
    read_only,
    shuffle_buckets,
    shuffle_keys,
)

_GOLDEN = np.uint64(GOLDEN)
_ONE = np.uint64(1)
_S15 = np.uint64(15)
_S16 = np.uint64(16)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN32 = np.uint64(GOLDEN32)
_M32 = np.uint64(MASK32)
_D1 = np.uint64(MIX32_C1)
_D2 = np.uint64(MIX32_C2)

_ADAGRAD, _SGD, _MOMENTUM, _ADAM = ADAGRAD, SGD, MOMENTUM, ADAM

# error_model="numpy": a float division by zero gives inf/nan instead of raising, so no
# zero check sits in the loops and divisions and square roots vectorise (Adagrad's
# g / sqrt(acc), BN, softmax). No divisor of these kernels can be zero (acc >=
# ADAGRAD_INIT, var + BN_EPS, softmax sums >= 1), so results are unchanged.
_JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")
_JIT_PAR = dict(_JIT, parallel=True)

# ------------------------------------------------------------------------ denormals

# LLVM compiles for the host: its triple says whether there is an MXCSR to set.
HAVE_MXCSR = llvmlite.binding.get_default_triple().split("-")[0] in (
    "x86_64", "i386", "i486", "i586", "i686")
FTZ_DAZ_BITS = 0x8040 if HAVE_MXCSR else 0  # MXCSR bit 15 (FTZ) and bit 6 (DAZ)


def _mxcsr_op(builder, name, slot):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def mxcsr_read(typingctx):
    """The calling thread's MXCSR as uint32 (0 where there is none)."""
    def codegen(context, builder, sig, args):
        if not HAVE_MXCSR:
            return ir.Constant(ir.IntType(32), 0)
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _mxcsr_op(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def mxcsr_write(typingctx, value):
    """Load ``value`` (an integer) into the calling thread's MXCSR (no-op without one)."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        if HAVE_MXCSR:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(context.cast(builder, args[0], sig.args[0], types.uint32), slot)
            _mxcsr_op(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.void(value), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring ``array[index]`` (a 1-D array) into its caches: a hint, which
    never faults, even for an index outside the array (llvm.prefetch: read, keep in all
    levels, data cache)."""
    if not (isinstance(array, types.Array) and array.ndim == 1
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]],
                                       wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, ir.IntType(8).as_pointer()),
                          ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


_FTZ = np.uint32(FTZ_DAZ_BITS)


@njit(**_JIT)
def current_mxcsr():
    """``mxcsr_read`` callable from Python (the tests read a thread's MXCSR with it)."""
    return mxcsr_read()


@njit(**_JIT)
def ftz_enter():
    """Set FTZ and DAZ in this thread's MXCSR; returns the previous MXCSR for
    ``ftz_leave``. A thread already set (the caller's, inside a kernel) skips the load."""
    old = mxcsr_read()
    if old & _FTZ != _FTZ:
        mxcsr_write(old | _FTZ)
    return old


@njit(**_JIT)
def ftz_leave(old):
    """Put back the MXCSR that ``ftz_enter`` returned."""
    if old & _FTZ != _FTZ:
        mxcsr_write(old)


@njit(**_JIT_PAR)
def start_threads(nb):
    """A parallel loop of nb iterations that does nothing else; a kernel runs it before
    it sets FTZ on its calling thread. A pool thread created by the caller copies the
    caller's MXCSR, and its ftz_leave would then keep FTZ and DAZ for good (Numba's
    OpenMP layer creates them at the first parallel loop of a size)."""
    seen = np.empty(nb, dtype=np.int64)
    for i in prange(nb):
        seen[i] = i
    return seen[nb - 1]


@njit(**_JIT)
def block_bounds(n, n_blocks, blk):
    """Iterations [lo, hi) of block ``blk`` of ``n_blocks`` contiguous blocks of range(n):
    a prange over blocks runs ``ftz_enter`` once per block instead of once per row."""
    return blk * n // n_blocks, (blk + 1) * n // n_blocks


# Status codes of the step kernels (negative; 0 is success).
BAD_NNZ, BAD_PAIRS, BAD_ROW, BAD_FEATURE, BAD_INDPTR = -1, -2, -3, -4, -5


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
def mix32(x):
    """kernels.api's 32-bit unit hash of x (a np.uint64 below 2^32)."""
    x = ((x ^ (x >> _S16)) * _D1) & _M32
    x = ((x ^ (x >> _S15)) * _D2) & _M32
    return x ^ (x >> _S16)


@njit(**_JIT)
def keep_unit(rkey, unit, threshold):
    """True when ``unit`` (int, 0-based) is kept; threshold from
    ``kernels.api.dropout_threshold`` as np.uint64."""
    bits = mix32(((rkey & _M32) + (np.uint64(unit) + _ONE) * _GOLDEN32) & _M32)
    return (bits ^ (rkey >> _S32)) < threshold


@njit(**_JIT)
def fill_dropout_mask(seed, stream, step, rows, threshold, out):
    """out[b, u] = keep_unit(...) for dataset row rows[b]: the jitted twin of
    ``kernels.api.dropout_mask`` (used by tests and as an example of the call order)."""
    skey = step_key(seed, stream, step)
    for b in range(rows.shape[0]):
        rkey = row_key(skey, np.uint64(rows[b]))
        for u in range(out.shape[1]):
            out[b, u] = keep_unit(rkey, u, threshold)


@njit(**_JIT)
def row_data_loss(loss, yhat, y):
    """(data loss, dloss/dyhat) of one row; ``loss`` is kernels.api's SQUARED (1/2
    (yhat - y)^2) or LOGISTIC (target t = 1 where y > 0, else 0: softplus(yhat) - t yhat,
    without overflow for any yhat)."""
    if loss == 1:
        t = 1.0 if y > 0 else 0.0
        return (max(yhat, 0.0) - t * yhat + np.log1p(np.exp(-abs(yhat))),
                1.0 / (1.0 + np.exp(-yhat)) - t)
    r = yhat - y
    return 0.5 * r * r, r


def check_loss(fn, code):
    """cfg.loss checked (SQUARED when the config has no such field)."""
    if code not in (0, 1):
        raise ValueError(f"{fn}: cfg.loss must be 0 (squared) or 1 (logistic), got {code!r}")
    return int(code)


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


@njit(**_JIT)
def update_feature(V, w, sV, sw, j, g, gw, optimizer, lr_eff):
    """The optimiser on feature j's V row (float64 gradient g) and w entry (gradient
    gw), with their state rows sV[:, j] and sw[:, j]."""
    opt_row(V[j], g, sV[0, j], sV[1, j], optimizer, lr_eff)
    p, s0, s1 = opt_update(w[j], gw, sw[0, j], sw[1, j], optimizer, lr_eff)
    w[j] = p
    sw[0, j] = s0
    sw[1, j] = s1


# --------------------------------------------------------------------- batch preparation

@njit(**_JIT)
def batch_offsets(indptr, rows, nzoff):
    """nzoff[b] = start of batch row b's nonzeros in the occurrence arrays (B + 1 entries);
    returns the batch's nnz, or BAD_ROW when a row id is outside [0, n_rows), or
    BAD_INDPTR when a row's indptr entries are not a range of [0, indptr[-1]] (the
    caller checked indptr[-1] <= len(indices)): the copy never leaves X."""
    n_rows = indptr.shape[0] - 1
    end = indptr[n_rows]
    nnz = 0
    for b in range(rows.shape[0]):
        r = rows[b]
        if r < 0 or r >= n_rows:
            return BAD_ROW
        if indptr[r] < 0 or indptr[r + 1] < indptr[r] or indptr[r + 1] > end:
            return BAD_INDPTR
        nzoff[b] = nnz
        nnz += indptr[r + 1] - indptr[r]
    nzoff[rows.shape[0]] = nnz
    return nnz


@njit(**_JIT_PAR)
def gather_batch(indptr, indices, values, rows, nzoff, M, occ_feat, occ_x, occ_b, nb):
    """Copy the batch's nonzeros into occ_feat (id, -1 for an id outside [0, M)), occ_x
    (value, float64) and occ_b (batch row), in batch order, from ``batch_offsets``. A
    loop that only copies keeps many cache misses on the random rows of X in flight;
    later passes read the copies. nb: blocks of rows, one per thread. An empty
    ``values`` means every value is 1 (kernels.api)."""
    implied = values.shape[0] == 0
    for blk in prange(nb):
        csr = ftz_enter()
        b0, b1 = block_bounds(rows.shape[0], nb, blk)
        for b in range(b0, b1):
            r = rows[b]
            o = nzoff[b]
            p0 = indptr[r]
            for i in range(indptr[r + 1] - p0):
                j = indices[p0 + i]
                occ_feat[o + i] = j if (j >= 0 and j < M) else -1
                occ_x[o + i] = 1.0 if implied else values[p0 + i]
                occ_b[o + i] = b
        ftz_leave(csr)


@njit(**_JIT)
def group_by_feature(occ_feat, nnz, slot, uniq, ustart, ucur, occ_list, touched):
    """Stable counting sort of the occurrences 0..nnz-1 by feature. Returns the number
    U of unique features: uniq[:U] in order of first appearance, the occurrences of
    uniq[u] are occ_list[ustart[u]:ustart[u + 1]] (positions in the occurrence arrays,
    increasing); or BAD_FEATURE when an id is -1 (outside [0, M), from
    ``gather_batch``). ``slot`` (M,) must be all -1 and is left so; only the touched
    entries are reset, so this never pays O(M). ``touched`` (M,) uint8, unless empty,
    gets a 1 at each touched feature (``track_touched``)."""
    U = 0
    for o in range(nnz):
        j = occ_feat[o]
        if j < 0:
            for u in range(U):
                slot[uniq[u]] = -1
            return BAD_FEATURE
        u = slot[j]
        if u < 0:
            u = U
            slot[j] = U
            uniq[U] = j
            ucur[U] = 0
            U += 1
        ucur[u] += 1
    pos = 0
    for u in range(U):
        ustart[u] = pos
        pos += ucur[u]
        ucur[u] = ustart[u]
    ustart[U] = pos
    for o in range(nnz):
        u = slot[occ_feat[o]]
        q = ucur[u]
        occ_list[q] = o
        ucur[u] = q + 1
    for u in range(U):
        slot[uniq[u]] = -1
    if touched.shape[0] > 0:
        for u in range(U):
            touched[uniq[u]] = 1
    return U


NO_MARKS = np.zeros(0, np.uint8)


def track_touched(ws, marks):
    """kernels.api's ``track_touched`` for the Numba workspaces, which are immutable
    namedtuples: returns a copy of ``ws`` (sharing every buffer) whose training batches
    set ``marks[j] = 1`` for each feature j they touch; None stops."""
    if marks is None:
        return ws._replace(touched=NO_MARKS)
    if not (isinstance(marks, np.ndarray) and marks.dtype == np.uint8 and marks.ndim == 1
            and marks.flags.c_contiguous and marks.flags.writeable):
        raise ValueError("track_touched: marks must be a writable C-contiguous uint8 array")
    if marks.shape[0] != ws.slot.shape[0]:
        raise ValueError(f"track_touched: marks has {marks.shape[0]} entries, the "
                         f"workspace {ws.slot.shape[0]} features")
    return ws._replace(touched=marks)


# ------------------------------------------------------------------------ epoch order

_SHUFFLE_PARTS = 16  # parts of the rows counted and scattered in parallel (any number
                     # gives the same order: the scatter is stable)


@njit(**_JIT)
def _shuffle_bucket(kb, i, R):
    return np.int64(((mix64(kb + np.uint64(i) * _GOLDEN) >> _S32) * R) >> _S32)


@njit(**_JIT_PAR)
def _shuffle_kernel(n, kb, ks, R, counts, bounds, out):
    """kernels.api's epoch order into out (n,): buckets counted and scattered over
    _SHUFFLE_PARTS parts of the rows, then Fisher-Yates inside each bucket; kb, ks and R
    as np.uint64."""
    n_buckets = counts.shape[1]
    for p in prange(_SHUFFLE_PARTS):
        for r in range(n_buckets):
            counts[p, r] = 0
        for i in range(p * n // _SHUFFLE_PARTS, (p + 1) * n // _SHUFFLE_PARTS):
            counts[p, _shuffle_bucket(kb, i, R)] += 1
    pos = 0
    for r in range(n_buckets):
        bounds[r] = pos
        for p in range(_SHUFFLE_PARTS):
            c = counts[p, r]
            counts[p, r] = pos
            pos += c
    bounds[n_buckets] = pos
    for p in prange(_SHUFFLE_PARTS):
        for i in range(p * n // _SHUFFLE_PARTS, (p + 1) * n // _SHUFFLE_PARTS):
            r = _shuffle_bucket(kb, i, R)
            out[counts[p, r]] = i
            counts[p, r] += 1
    for r in prange(n_buckets):
        o = bounds[r]
        for pos in range(bounds[r + 1] - o - 1, 0, -1):
            h = mix64(ks + np.uint64(o + pos) * _GOLDEN) >> _S32
            j = np.int64((h * np.uint64(pos + 1)) >> _S32)
            tmp = out[o + pos]
            out[o + pos] = out[o + j]
            out[o + j] = tmp


def shuffled_rows(n_rows, seed, epoch, n_threads, out=None):
    """The epoch order of afmfast.kernels.api (a permutation of range(n_rows), int64, from
    (seed, epoch); the same for any n_threads and in every backend), computed on
    n_threads threads, into ``out`` when given (kernels.api.order_buffer).

    Example: order = shuffled_rows(len(y), 2016, epoch, 2)
    """
    n = int(n_rows)
    if n < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if isinstance(n_threads, bool) or int(n_threads) < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    out = order_buffer(out, n)
    if n == 0:
        return out
    R = shuffle_buckets(n)
    kb, ks = shuffle_keys(seed, epoch)
    counts = np.empty((_SHUFFLE_PARTS, R), dtype=np.int64)
    bounds = np.empty(R + 1, dtype=np.int64)
    with numba_threads(n_threads):
        _shuffle_kernel(n, np.uint64(kb), np.uint64(ks), np.uint64(R), counts, bounds, out)
    return out


# ------------------------------------------------------------------ Python-side helpers

def steps_from(step):
    """The backend's ``*_steps`` (see afmfast.kernels.api) from its ``*_step``: a Python
    loop over the batches, which the Numba kernels' own time dwarfs.

    Example: ``fm_steps = steps_from(fm_step)``.
    """
    def steps(X, y, rows, batch_size, params, state, cfg, ws, losses):
        n_rows = len(rows)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if n_rows < 1:
            raise ValueError("rows must hold at least one row")
        n_batches = -(-n_rows // batch_size)
        if len(losses) != n_batches:
            raise ValueError(f"losses has {len(losses)} entries, but rows holds "
                             f"{n_batches} batches of batch_size = {batch_size}")
        for i in range(n_batches):
            losses[i] = step(X, y, rows[i * batch_size:(i + 1) * batch_size], params,
                             state, cfg._replace(step=cfg.step + i), ws)
            if not math.isfinite(losses[i]):
                return i + 1
        return n_batches

    name = step.__name__ + "s"
    steps.__name__ = steps.__qualname__ = name
    steps.__doc__ = (f"{step.__name__} on the batches rows[i batch_size:(i + 1) batch_size] "
                     f"at steps cfg.step + i, losses[i] their losses, stopping after the "
                     f"first that is not finite; returns the number of batches run (see "
                     f"afmfast.kernels.api's {name}).")
    return steps


_MASK64 = (1 << 64) - 1


def run_step_kernel(fn, kernel, args, cfg, ws):
    """(loss, status) of a step kernel, ``kernel(*args, seed, step, step_int, loss_code,
    ws, nb)`` (args starting with X's indptr and indices, whose last entry it checks):
    seed and step as np.uint64 (mod 2^64) and the step as an int from ``cfg``,
    its loss code checked (``fn`` names the caller in errors), nb the thread count. It
    runs with Numba's thread count set to cfg.n_threads and FTZ and DAZ set on the
    calling thread (``ftz_enter``; the kernel's prange bodies set them on their own
    threads), the pool threads started first (``start_threads``).

    Example: ``loss, status = run_step_kernel("fm_step", _fm_step_kernel, args, cfg, ws)``.
    """
    loss_code = check_loss(fn, getattr(cfg, "loss", 0))
    indptr, indices = args[0], args[1]
    # batch_offsets checks each batch row's span against indptr[-1]
    if indptr.shape[0] < 1 or indptr[-1] > indices.shape[0]:
        raise ValueError(f"{fn}: X is not a valid CSR triple (indptr, indices, values)")
    seed = np.uint64(int(cfg.seed) & _MASK64)
    step = np.uint64(int(cfg.step) & _MASK64)
    with numba_threads(cfg.n_threads):
        nb = numba.get_num_threads()
        start_threads(nb)
        csr = ftz_enter()
        try:
            return kernel(*args, seed, step, int(cfg.step), loss_code, ws, nb)
        finally:
            ftz_leave(csr)


@njit(**_JIT)
def _first_bad_indptr(indptr):
    """The first i at which indptr falls (or 0 when indptr[0] < 0), else -1."""
    if indptr[0] < 0:
        return 0
    for i in range(1, indptr.shape[0]):
        if indptr[i] < indptr[i - 1]:
            return i
    return -1


def check_indptr(fn, indptr, n_indices):
    """ValueError unless indptr starts at 0 or more, never falls and ends at most at
    n_indices: the scoring kernels, which read every row of X, then stay inside X.

    Example: ``check_indptr("fm_predict", indptr, indices.shape[0])``.
    """
    if indptr.shape[0] < 1:
        raise ValueError(f"{fn}: X is not a valid CSR triple: indptr is empty")
    bad = int(_first_bad_indptr(indptr))
    if bad == 0:
        raise ValueError(f"{fn}: X is not a valid CSR triple: indptr[0] = {indptr[0]} < 0")
    if bad > 0:
        raise ValueError(f"{fn}: X is not a valid CSR triple: indptr[{bad}] = "
                         f"{indptr[bad]} < indptr[{bad - 1}] = {indptr[bad - 1]}")
    if indptr[-1] > n_indices:
        raise ValueError(f"{fn}: X is not a valid CSR triple: indptr[-1] = {indptr[-1]} > "
                         f"len(indices) = {n_indices}")


def read_only_args(*arrays):
    """``arrays`` (the X and y a kernel only reads) through ``kernels.api.read_only``: a
    Dataset's arrays are read-only, so passing plain arrays read-only too lets both
    share one compiled version of a kernel.

    Example: ``indptr, indices, values, y = read_only_args(*X, y)``.
    """
    return [read_only(a) for a in arrays]


@contextmanager
def numba_threads(n_threads):
    """Run the block with Numba's thread count set to ``n_threads`` (clamped to
    [1, NUMBA_NUM_THREADS]) and restore the previous count afterwards, also on error.

    Example: ``with numba_threads(cfg.n_threads): loss = _kernel(...)``.
    """
    # Numba's fallback "workqueue" threading layer (no OpenMP or TBB on the machine)
    # must not be entered from two Python threads at once: serialise kernel calls then.
    lock = _WORKQUEUE_LOCK if _threading_layer_unsafe() else _NO_LOCK
    with lock:
        prev = numba.get_num_threads()
        numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            numba.set_num_threads(prev)


_WORKQUEUE_LOCK = threading.Lock()
_NO_LOCK = contextlib.nullcontext()


def _threading_layer_unsafe():
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return True


def check_keep(fn, name, keep):
    """ValueError unless 0 < keep <= 1; returns keep as float."""
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{fn}: cfg.{name} must be in (0, 1], got {keep}")
    return keep


def check_optimizer(fn, code):
    """ValueError unless ``code`` is an optimiser code of ``kernels.api``; returns it."""
    if int(code) not in OPTIMIZER_CODES.values():
        raise ValueError(f"{fn}: cfg.optimizer must be one of {OPTIMIZER_CODES}, "
                         f"got {code!r}")
    return int(code)


def raise_batch_error(fn, status, n_rows, n_features, max_nnz, max_pairs=None):
    """Turn a step kernel's negative status into a ValueError naming what is wrong."""
    if status == BAD_ROW:
        raise ValueError(f"{fn}: rows holds an id outside [0, {n_rows}) (the rows of X)")
    if status == BAD_FEATURE:
        raise ValueError(f"{fn}: the batch holds a feature id outside [0, {n_features}) "
                         "(n_features); raise n_features or fix the data")
    if status == BAD_INDPTR:
        raise ValueError(f"{fn}: X is not a valid CSR triple: a batch row's "
                         "indptr[r]:indptr[r + 1] is not a range of X.indices (indptr must "
                         "rise from 0 to at most len(indices))")
    if status == BAD_NNZ:
        raise ValueError(
            f"{fn}: the batch has more nonzeros than the workspace holds "
            f"(max_batch_nnz={max_nnz}); size the workspace with the largest "
            "sum of row lengths of any batch."
        )
    if status == BAD_PAIRS:
        raise ValueError(
            f"{fn}: the batch has more pairs than the workspace holds "
            f"(max_batch_pairs={max_pairs}); size the workspace with the largest sum "
            "of n (n - 1) / 2 over the rows of any batch."
        )
    raise RuntimeError(f"{fn}: unknown kernel status {status}")
