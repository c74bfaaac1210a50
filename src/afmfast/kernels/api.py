"""The contract every kernel backend implements (Cython ``afmfast._fm_cython``, Numba
``afmfast.kernels.numba.fm``), and the float64 NumPy reference in ``afmfast.kernels.reference`` follows.

Data (C-contiguous, validated by the Python layer before any kernel runs)
    X = (indptr int64 (n_rows + 1,), indices int32 (nnz,), values DTYPE (nnz,) or (0,))
        values of length 0 with nnz > 0 means every value is 1 (one-hot rows stored
        without values): the kernels then read no values.
    y  DTYPE (n_rows,)
    rows int64 (batch,): the dataset rows of this batch (a slice of a shuffled permutation).
    X may be a ``KernelX``, whose ``row_width`` w > 0 says that every row has w nonzeros
    (indptr[r] = indptr[0] + r w: one-hot data with one id per field). A kernel may then
    find a row without reading its indptr entry, one cache miss per row of a shuffled
    batch fewer; it checks indptr[0] >= 0 and indptr[-1] - indptr[0] == n_rows w
    (ValueError otherwise) and beyond that trusts the promise (a false one reads other
    rows' ids, never outside X). A plain tuple, or row_width 0, makes no promise.
    ``Dataset.X`` is a KernelX.
The FM and AFM kernels of both backends check what they read all the same: row ids,
feature ids and each batch row's indptr span (scoring: the whole indptr), so a malformed
indptr is a ValueError, never a read outside X or past the workspace.
DTYPE is float32 in production; float64 is accepted too (gradient checks). X, y and rows
may be read-only arrays (a Dataset's are): the kernels never write them.

Parameters: ``FMParams`` of DTYPE arrays, mutated in place by ``fm_step``:
    V (M, k), w (M,), dense (1 + 2k,) = [w0, bn_gamma (k), bn_beta (k)],
    bn_stats (2, k) = [running mean, running variance] (updated by fm_step when
    batch_norm is on, read by fm_predict).
Optimiser state: ``FMOptState`` of DTYPE arrays, mutated in place:
    V (2, M, k), w (2, M), dense (2, 1 + 2k); slot 0 is Adagrad's accumulator, the
    momentum buffer or Adam's first moment, slot 1 is Adam's second moment.
``new_fm_params``, ``new_afm_params`` and ``new_opt_state`` start the tables on 64-byte
cache lines (``aligned_empty``, ``aligned_zeros``); the kernels accept any C-contiguous
arrays, only slower.

Backend functions
    fm_workspace(batch_size, max_batch_nnz, n_features, n_factors, dtype) -> opaque scratch
        allocated once per fit, reused by every fm_step of that fit.
    fm_step(X, y, rows, params, state, cfg, ws) -> float: one batch of forward, backward
        and optimiser update; returns the batch loss evaluated at the parameters before
        the update: 1/2 sum (y - y_hat)^2 + l2/2 sum over touched rows ||V_row||^2.
    fm_steps(X, y, rows, batch_size, params, state, cfg, ws, losses) -> int: fm_step on
        the batches rows[i * batch_size:(i + 1) * batch_size] (the last may be shorter)
        at steps cfg.step + i, for i < len(losses) = ceil(len(rows) / batch_size),
        without returning to Python in between; losses (float64) receives each batch's
        loss. Stops after the first batch whose loss is not finite; returns the number
        of batches run. fit runs its epochs this way.
    fm_predict(X, params, batch_norm, n_threads, out): out (n_rows,) DTYPE receives the raw
        scores (no dropout, batch norm with running statistics). Ids >= M are skipped.
    shuffled_rows(n_rows, seed, epoch, n_threads, out=None) -> int64 (n_rows,): the epoch
        order (below), written into out when given (``order_buffer``'s checks), so that
        an epoch's windows reuse one buffer.
    track_touched(ws, marks) -> workspace: from then on, every batch that the returned
        workspace trains (fm_step/fm_steps, afm_step/afm_steps) sets marks[j] = 1 for
        each feature j it touches; marks is a writable C-contiguous uint8 (M,) array,
        None stops. Data-parallel training (afmfast.dask) sends only those rows; the
        kernels mark them in the grouping by feature that they do anyway, where a pass
        of its own over the rows' ids costs a random access per row.

Semantics of one step (B = len(rows)):
    f_b = 1/2((sum_i v_i x_i)^2 - sum_i (v_i x_i)^2)                      (k,)
    batch norm (train): mu, var = mean and biased variance of f over the batch;
        z = gamma (f - mu) / sqrt(var + BN_EPS) + beta;
        running = BN_DECAY running + (1 - BN_DECAY) batch value.
    dropout: z_bf *= mask_bf / keep, mask from ``dropout_mask`` (stream 0, unit f);
        keep == 1 means no mask at all.
    y_hat_b = w0 + sum_i w_i x_i + sum_f z_bf.
    Gradients of each feature row are summed over the batch (duplicates included), plus
    l2 * v once per touched row; then the optimiser updates touched rows of V and w and
    all of ``dense``.
Optimisers (cfg.optimizer): ADAGRAD acc += g^2, p -= lr g / sqrt(acc) (acc starts at
ADAGRAD_INIT); SGD p -= lr g; MOMENTUM m = MOMENTUM m + g, p -= lr m; ADAM with t =
step + 1: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr sqrt(1-b2^t)/(1-b1^t) m /
(sqrt(v) + ADAM_EPS); lazy (only touched rows) for V and w.

Thread counts: every n_threads argument is an integer >= 1 (ValueError otherwise); the
backends run at most MAX_THREADS_PER_CPU threads per processor whatever they are asked
(an OpenMP runtime that cannot start the threads asked for takes the process down).

Determinism: every sum over the rows of a batch runs in a fixed order that does not
depend on the thread count, so a seed gives bit-identical parameters for any n_threads
within one backend.

Denormals: on x86 every kernel (steps, predict, explain) computes with flush-to-zero and
denormals-are-zero set (MXCSR bits 15 and 6) on every thread that works for it: a
denormal input, parameter or state value (|x| below 1.18e-38 in float32, 2.23e-308 in
float64) reads as a zero of its sign, and a result that would be denormal is stored as
zero. Without it, a strong L2 (AFM's l2_attention=100) leaves parameters decaying through
the denormal range, and CPUs that handle each denormal operation in microcode slowed
every later epoch several times. Each thread's previous MXCSR is put back when its part
of the call ends (the caller's and the thread pool's, which other libraries share), and
a kernel starts its thread pool before it sets FTZ on the caller, since a new thread
copies its creator's MXCSR. The NumPy reference (``afmfast.kernels.reference``) does not flush,
so it differs where denormals occur. Elsewhere (no MXCSR) this is a no-op and denormals
are computed as the hardware does. Integer-only parallel loops (the epoch order, batch
offsets) do not set it: MXCSR affects only floating-point instructions.

Dropout RNG (counter based; identical in every backend):
    mix64(z) = splitmix64 finaliser (mod 2^64)
    mix32(x) = 32-bit integer hash (two multiply-xorshift rounds, mod 2^32)
    key = mix64(mix64(mix64(seed + stream * GOLDEN) + step) + row)     (one per row)
    bits = mix32(lo32(key) + (unit + 1) * GOLDEN32) ^ hi32(key)         (one per unit)
    kept iff bits < dropout_threshold(keep) = min(floor(keep * 2^32), 2^32 - 1)
The per-unit hash is 32-bit because it runs for every unit of every row of every step:
x86 has no vector 64-bit multiply before AVX-512 (compilers emulate one with three 32-bit
multiplies and shifts), while a 32-bit multiply is one vector instruction on every x86-64
level. The row's 64-bit key still separates rows (its high half is folded into every
unit).

Epoch order (``shuffled_rows(n_rows, seed, epoch, n_threads) -> int64 (n_rows,)``, in every
backend module; ``shuffled_rows_reference`` below is its definition). A permutation of
range(n_rows) from a counter-based hash, so that it can be computed in parallel with the
same result for any thread count (Rao-Sandelius: random buckets, then a shuffle inside
each, which is a uniform permutation). With key = mix64(mix64(seed + SHUFFLE_STREAM *
GOLDEN) + epoch), kb = mix64(key + GOLDEN), ks = mix64(key + 2 GOLDEN) and R =
shuffle_buckets(n_rows) (a power of two; buckets of about SHUFFLE_BUCKET_ROWS rows, which
fit a core's cache):
    bucket(i) = ((mix64(kb + i * GOLDEN) >> 32) * R) >> 32, i.e. the hash's top log2(R) bits;
    the rows are laid out bucket by bucket, ascending within a bucket; then each bucket
    [o, o + m) runs Fisher-Yates: for i = m - 1 down to 1, j = ((mix64(ks + (o + i) *
    GOLDEN) >> 32) * (i + 1)) >> 32, swap positions o + i and o + j. (j's bias from the
    32-bit multiply is at most m / 2^32 relative: negligible for shuffling.)
"""
import threading
from collections import namedtuple

import numpy as np

ADAGRAD, SGD, MOMENTUM, ADAM = 0, 1, 2, 3
OPTIMIZER_CODES = {"adagrad": ADAGRAD, "sgd": SGD, "momentum": MOMENTUM, "adam": ADAM}

ADAGRAD_INIT = 1e-8
MOMENTUM_COEF = 0.95
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
BN_EPS, BN_DECAY = 1e-3, 0.9

GOLDEN = 0x9E3779B97F4A7C15
GOLDEN32 = 0x9E3779B9
MIX32_C1 = 0x7FEB352D
MIX32_C2 = 0x846CA68B
MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


class KernelX(tuple):
    """The kernels' X, ``(indptr, indices, values)``, with ``row_width``: the number of
    nonzeros of every row when all rows have the same, else 0 (see the module docstring).
    Unpacks as the plain triple.

    Example: ``indptr, indices, values = KernelX(indptr, indices, values, row_width=3)``.
    """

    def __new__(cls, indptr, indices, values, row_width: int = 0):
        self = super().__new__(cls, (indptr, indices, values))
        self.row_width = int(row_width)
        return self

    def __reduce__(self):
        return (KernelX, (*self, self.row_width))


FMParams = namedtuple("FMParams", "V w dense bn_stats")
FMOptState = namedtuple("FMOptState", "V w dense")
StepConfig = namedtuple(
    "StepConfig", "lr l2 keep optimizer batch_norm seed step n_threads loss",
    defaults=(0,),
)
StepConfig.__doc__ = """Scalars of one fm_step: lr, l2, keep (float); optimizer (code),
batch_norm (0/1), seed, step (global batch counter, from 0), n_threads (int), loss
(SQUARED or LOGISTIC code, default SQUARED)."""

# Data losses (cfg.loss). SQUARED: 1/2 (y_hat - y)^2, residual y_hat - y. LOGISTIC, for
# binary targets t = 1 where y > 0 else 0: softplus(y_hat) - t y_hat, residual
# sigmoid(y_hat) - t (see reference.data_loss_and_residual).
SQUARED, LOGISTIC = 0, 1


MAX_THREADS_PER_CPU = 4

CACHE_LINE = 64  # bytes


def aligned_empty(shape, dtype, offset=0):
    """An uninitialised C-contiguous array whose data starts ``offset`` bytes past the
    start of a 64-byte cache line (0: on one).

    Parameter tables and optimiser state are allocated this way. NumPy starts large
    arrays 16 bytes past a page, so a row of V at k = 16 (64 bytes) would straddle two
    cache lines shared with the neighbouring features' rows: twice the lines to read per
    row, and two threads updating neighbouring features would write the same line.

    Example: ``V = aligned_empty((5382, 16), np.float32)``.
    """
    return _aligned(np.empty, shape, dtype, offset)


def order_buffer(out, n_rows: int) -> np.ndarray:
    """Where ``shuffled_rows`` writes the order of ``n_rows`` rows: a new cache-aligned
    int64 array when ``out`` is None, else ``out`` itself once checked (a writable
    C-contiguous int64 NumPy array of ``n_rows`` entries; anything else is a
    ValueError, so that no backend writes past a caller's buffer).

    Examples
    --------
    >>> order_buffer(None, 3).shape, order_buffer(np.empty(2, np.int64), 2).shape
    ((3,), (2,))
    >>> order_buffer(np.empty(2, np.int32), 2)
    Traceback (most recent call last):
    ...
    ValueError: out must be a writable C-contiguous int64 array of 2 entries, got int32 (2,)
    """
    if out is None:
        return aligned_empty((n_rows,), np.int64)
    if not (isinstance(out, np.ndarray) and out.dtype == np.int64 and out.ndim == 1
            and out.shape[0] == n_rows and out.flags.c_contiguous and out.flags.writeable):
        got = (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray)
               else type(out).__name__)
        raise ValueError(f"out must be a writable C-contiguous int64 array of {n_rows} "
                         f"entries, got {got}")
    return out


def aligned_zeros(shape, dtype):
    """``aligned_empty``, zeroed the way ``np.zeros`` is: a large array's pages are
    mapped (and count in the memory in use) only once written, so optimiser state that
    an optimiser never touches (Adam's second moment under Adagrad) costs nothing."""
    return _aligned(np.zeros, shape, dtype, 0)


def _aligned(allocate, shape, dtype, offset):
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in np.atleast_1d(shape))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = allocate(nbytes + CACHE_LINE + offset, dtype=np.uint8)
    start = (-buf.ctypes.data) % CACHE_LINE + offset
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def read_only(a):
    """``a`` if it is read-only already, else a read-only view of it (the caller's array
    keeps its flags). Datasets hold their arrays this way, and the Numba kernels take X
    and y this way (Numba compiles a kernel once per mix of writeable and read-only
    arguments).

    >>> a = np.zeros(3)
    >>> read_only(a).flags.writeable, a.flags.writeable
    (False, True)
    """
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


def aligned_copy(a, offset=0):
    """A copy of ``a`` placed as ``aligned_empty`` places a new array."""
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype, offset)
    out[...] = a
    return out


def dropout_threshold(keep):
    """Integer threshold that a unit's 32-bit hash is compared with: floor(keep 2^32),
    at most 2^32 - 1 (keep >= 1 never hashes)."""
    return min(int(np.floor(float(keep) * 4294967296.0)), MASK32)


def _mix64(z):
    z = z.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _mix32(x):
    """mix32 of kernels.api's dropout hash, elementwise on a uint32 array."""
    x = x.astype(np.uint32, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(MIX32_C1)
        x ^= x >> np.uint32(15)
        x *= np.uint32(MIX32_C2)
        x ^= x >> np.uint32(16)
    return x


def _stream_key(seed, stream, counter):
    """mix64(mix64(seed + stream * GOLDEN) + counter), as a (1,) uint64 array: the key of
    one (seed, stream) at one step (dropout) or epoch (epoch order)."""
    key = _mix64(np.array([(int(seed) + int(stream) * GOLDEN) & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _mix64(key + np.uint64(int(counter) & _MASK64))


def dropout_mask(seed, stream, step, rows, n_units, keep):
    """Reference dropout mask, bool (len(rows), n_units): True where a unit is kept."""
    rows = np.asarray(rows, dtype=np.uint64)
    if keep >= 1.0:
        return np.ones((rows.shape[0], n_units), dtype=bool)
    key = _stream_key(seed, stream, step)
    with np.errstate(over="ignore"):
        key = _mix64(key + rows)
        low = (key & np.uint64(MASK32)).astype(np.uint32)
        high = (key >> np.uint64(32)).astype(np.uint32)
        units = (np.arange(n_units, dtype=np.uint32) + np.uint32(1)) * np.uint32(GOLDEN32)
        bits = _mix32(low[:, None] + units[None, :]) ^ high[:, None]
    return bits < np.uint32(dropout_threshold(keep))


SHUFFLE_STREAM = 3  # dropout uses streams 0 (FM), 1 and 2 (AFM)
SHUFFLE_BUCKET_ROWS = 8192
SHUFFLE_MAX_BUCKETS = 1 << 16


def shuffle_buckets(n_rows):
    """R of the epoch order: the smallest power of two with n_rows / R <=
    SHUFFLE_BUCKET_ROWS, at most SHUFFLE_MAX_BUCKETS."""
    R = 1
    while R * SHUFFLE_BUCKET_ROWS < n_rows and R < SHUFFLE_MAX_BUCKETS:
        R *= 2
    return R


def shuffle_keys(seed, epoch):
    """(kb, ks) of the epoch order, as Python ints in [0, 2^64)."""
    key = _stream_key(seed, SHUFFLE_STREAM, epoch)
    with np.errstate(over="ignore"):
        kb = _mix64(key + np.uint64(GOLDEN))
        ks = _mix64(key + np.uint64((2 * GOLDEN) & _MASK64))
    return int(kb[0]), int(ks[0])


def shuffled_rows_reference(n_rows, seed, epoch):
    """The epoch order (see the module docstring), in NumPy and a Python loop: the
    definition the backends' ``shuffled_rows`` are tested against (slow; tests only)."""
    kb, ks = shuffle_keys(seed, epoch)
    R = shuffle_buckets(n_rows)
    i = np.arange(n_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        hb = _mix64(np.uint64(kb) + i * np.uint64(GOLDEN))
        hs = _mix64(np.uint64(ks) + i * np.uint64(GOLDEN))
    bucket = ((hb >> np.uint64(32)) * np.uint64(R)) >> np.uint64(32)
    order = np.argsort(bucket, kind="stable").astype(np.int64)
    bounds = np.searchsorted(bucket[order], np.arange(R + 1, dtype=np.uint64))
    draws = (hs >> np.uint64(32)).astype(object)
    for r in range(R):
        o, m = int(bounds[r]), int(bounds[r + 1] - bounds[r])
        for pos in range(m - 1, 0, -1):
            j = (draws[o + pos] * (pos + 1)) >> 32
            order[o + pos], order[o + j] = order[o + j], order[o + pos]
    return order


NORMAL_CHUNK = 1 << 20  # draws per call of _fill_normal (8 MB of float64 scratch)


def _fill_normal(out, scale, rng):
    """out[...] = rng.normal(0, scale, size=out.shape), drawn NORMAL_CHUNK values at a
    time (the same values: the generator's stream does not depend on the call sizes),
    so that a large V (90,000 x 64 is 23 MB in float32) costs no float64 copy of itself."""
    flat = out.reshape(-1)
    for lo in range(0, flat.size, NORMAL_CHUNK):
        part = flat[lo:lo + NORMAL_CHUNK]
        part[...] = rng.normal(0.0, scale, size=part.size)


def new_fm_params(n_features, n_factors, rng, dtype=np.float32):
    """Initial parameters as the reference: V ~ N(0, 0.01), w = 0, w0 = 0, gamma = 1,
    beta = 0, running mean 0 and variance 1."""
    k = n_factors
    V = aligned_empty((n_features, k), dtype)
    _fill_normal(V, 0.01, rng)
    w = aligned_zeros(n_features, dtype)
    dense = np.zeros(1 + 2 * k, dtype=dtype)
    dense[1 : 1 + k] = 1.0
    bn_stats = np.zeros((2, k), dtype=dtype)
    bn_stats[1] = 1.0
    return FMParams(V, w, dense, bn_stats)


def new_opt_state(params, optimizer):
    """Optimiser state for ``params`` (any namedtuple of trainable arrays): zeros, or
    ADAGRAD_INIT for Adagrad's accumulator. Entries of ``params`` not trained (bn_stats)
    get none."""
    init = ADAGRAD_INIT if optimizer == ADAGRAD else 0.0
    fields = AFMOptState if isinstance(params, AFMParams) else FMOptState
    state = []
    for name in fields._fields:
        p = getattr(params, name)
        s = aligned_zeros((2,) + p.shape, p.dtype)
        s[0] = init
        state.append(s)
    return fields(*state)


# ----- AFM ----------------------------------------------------------------------------
# Contract of the AFM backends (``afm_workspace``, ``afm_step``, ``afm_steps`` (as
# fm_steps), ``afm_predict``, ``afm_explain``, ``shuffled_rows``), mirrored by
# ``reference.afm_*``. For each row, the pairs p < q of its nonzeros in row order (pair
# index = position in that order) give
#     e_pq = (v_p x_p) * (v_q x_q)                                           (k,)
#     s_pq = h . act(W e_pq + b),  a = softmax over the row's pairs (max subtracted)
#     a'_pq = a_pq * mask / keep_attention   (stream 1, unit = pair index), or 1 when
#             attention is off (then W, b, h are neither used nor updated)
#     g = sum a'_pq e_pq;  g' = g * mask / keep_pooled  (stream 2, unit = factor)
#     y_hat = w0 + sum w_i x_i + p . g'
# Loss: data loss (cfg.loss, as for FM) + l2_attention/2 ||W||^2 + l2/2 sum_touched
# ||V_row||^2.
# Parameters ``AFMParams``: V (M, k), w (M,), W (t, k), dense (1 + k + 2t,) =
# [w0, p (k), b (t), h (t)]. ``AFMOptState``: the same names with a leading axis of 2.
# freeze_fm keeps V, w and w0 fixed (the reference's --freeze_fm).
RELU, SIGMOID, TANH, IDENTITY = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "sigmoid": SIGMOID, "tanh": TANH, "identity": IDENTITY}

AFMParams = namedtuple("AFMParams", "V w W dense")
AFMOptState = namedtuple("AFMOptState", "V w W dense")
AFMStepConfig = namedtuple(
    "AFMStepConfig",
    "lr l2 l2_attention keep_attention keep_pooled optimizer attention activation "
    "freeze_fm seed step n_threads loss",
    defaults=(0,),
)


def new_afm_params(n_features, n_factors, attention_size, rng, dtype=np.float32):
    """Initial AFM parameters as the reference: V ~ N(0, 0.01), w = w0 = 0,
    W and b ~ N(0, sqrt(2 / (t + k))), h ~ N(0, 1), p = 1."""
    k, t = n_factors, attention_size
    glorot = np.sqrt(2.0 / (t + k))
    V = aligned_empty((n_features, k), dtype)
    _fill_normal(V, 0.01, rng)
    W = aligned_empty((t, k), dtype)
    _fill_normal(W, glorot, rng)
    dense = np.zeros(1 + k + 2 * t, dtype=dtype)
    dense[1 : 1 + k] = 1.0
    dense[1 + k : 1 + k + t] = rng.normal(0.0, glorot, size=t)
    dense[1 + k + t :] = rng.normal(0.0, 1.0, size=t)
    return AFMParams(V, aligned_zeros(n_features, dtype), W, dense)


# ----- AFM prediction plan (both backends) ---------------------------------------------
# ``afm_predict`` runs the rows in chunks of consecutive rows, each through the training
# step's forward pass with the attention MLP once per distinct pair of the chunk, and
# returns how many distinct pairs it evaluated (the attention work, for tests and
# benchmarks). The larger a chunk the more of its pairs recur (one-hot rows share many
# pairs), but its scratch grows with it: about 64 bytes per pair and the k-vector v x per nonzero. Only the logit
# of a distinct pair is kept, so the attention products need no per-pair scratch.
PREDICT_ROWS = 16384
PREDICT_PAIRS = 1 << 19
PREDICT_VX = 1 << 24


def known_ids(X, n_features):
    """X without its nonzeros whose id is outside [0, n_features) (they take no part in
    a prediction); X itself when there are none."""
    indptr, indices, values = X
    n = indptr.shape[0] - 1
    ids = indices[indptr[0]:indptr[n]]
    if not ids.size or (ids.min() >= 0 and ids.max() < n_features):
        return X
    known = (ids >= 0) & (ids < n_features)
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    kept = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of[known], minlength=n), out=kept[1:])
    return (kept, np.ascontiguousarray(ids[known]),
            values if not values.size else  # one-hot rows: no values to keep
            np.ascontiguousarray(values[indptr[0]:indptr[n]][known]))


def predict_chunks(indptr, n_factors):
    """(rows per chunk, the largest nonzero count and pair count of a chunk) for
    ``afm_predict`` over rows with offsets ``indptr`` (at least one row)."""
    lengths = np.diff(indptr)
    pairs = lengths * (lengths - 1) // 2
    rows = min(PREDICT_ROWS, PREDICT_PAIRS // max(1, int(pairs.max())),
               PREDICT_VX // max(1, int(lengths.max()) * n_factors))
    rows = max(1, min(rows, len(lengths)))
    starts = np.arange(0, len(lengths), rows)
    return (rows, int(np.add.reduceat(lengths, starts).max()),
            int(np.add.reduceat(pairs, starts).max()))


class WorkspaceCache:
    """The last prediction workspace of a backend, kept for the next call: allocating
    and zeroing its megabytes each call would cost more than predicting a validation
    set. A call that finds it taken (another thread predicts) or too small builds its
    own. ``shape`` is (rows, nnz, pairs, n_features, k, t, dtype); a cached workspace
    serves any shape with the same last four and bounds at least as large."""

    def __init__(self, build):
        self._build = build
        self._lock = threading.Lock()
        self._kept = None

    def take(self, shape):
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None and kept[0][3:] == shape[3:] and all(
                have >= need for have, need in zip(kept[0][:3], shape[:3])):
            return kept
        return shape, self._build(*shape)

    def give_back(self, kept):
        with self._lock:
            self._kept = kept
