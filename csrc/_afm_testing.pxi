# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# Hooks for tests and benchmarks: the GEMM, the dropout mask, the epoch order, the
# phase timers and the constants this module hard-codes.

def _gemm_for_test(A, B, C, transpose_a=False):
    """C += A @ B (or A.T @ B) through the kernels' GEMM routine, for tests and timing."""
    cdef Py_ssize_t M, N, K
    if transpose_a:
        K, M = A.shape
    else:
        M, K = A.shape
    N = B.shape[1]
    if B.shape[0] != K or C.shape[0] != M or C.shape[1] != N:
        raise ValueError("shapes do not match")
    cdef float[:, ::1] Af, Bf, Cf
    cdef double[:, ::1] Ad, Bd, Cd
    cdef bint tr = bool(transpose_a)
    if C.dtype == np.float32:
        Af, Bf, Cf = A, B, C
        with nogil:
            if tr:
                _gemm(M, N, K, &Af[0, 0], 1, M, &Bf[0, 0], N, &Cf[0, 0], N)
            else:
                _gemm(M, N, K, &Af[0, 0], K, 1, &Bf[0, 0], N, &Cf[0, 0], N)
    else:
        Ad, Bd, Cd = A, B, C
        with nogil:
            if tr:
                _gemm(M, N, K, &Ad[0, 0], 1, M, &Bd[0, 0], N, &Cd[0, 0], N)
            else:
                _gemm(M, N, K, &Ad[0, 0], K, 1, &Bd[0, 0], N, &Cd[0, 0], N)


def _dropout_mask_for_test(seed, stream, step, rows, n_units, keep):
    """The kernels' dropout mask, bool (len(rows), n_units), to compare with
    kernels.api.dropout_mask bit for bit."""
    r = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.ones((r.shape[0], n_units), dtype=np.uint8)
    fill_dropout_mask(r, out, seed, stream, step, keep)
    return out.astype(bool)


def shuffled_rows(n_rows, seed, epoch, n_threads):
    """The epoch order of afmfast.kernels.api (a permutation of range(n_rows), int64, from
    (seed, epoch); the same for any n_threads), computed on n_threads threads.

    Example: order = shuffled_rows(len(y), 2016, epoch, 2)
    """
    return shuffled_rows_array(n_rows, seed, epoch, team_size(n_threads), _api)


def _phase_times(AFMWorkspace ws):
    """{phase: seconds} of the last afm_step run with ``ws``, phases named by PHASES (for
    profiling: bench/profile_phases.py)."""
    return {name: ws.phase_t[i] - (ws.phase_t[i - 1] if i else 0.0)
            for i, name in enumerate(PHASES)}


def _constants():
    """The constants this module hard-codes (to test them against kernels.api)."""
    return dict(ADAGRAD=OPT_ADAGRAD, SGD=OPT_SGD, MOMENTUM=OPT_MOMENTUM, ADAM=OPT_ADAM,
                RELU=ACT_RELU, SIGMOID=ACT_SIGMOID, TANH=ACT_TANH, IDENTITY=ACT_IDENTITY,
                VECTOR_BYTES=AFM_VBYTES, DBLOCK=DBLOCK)
