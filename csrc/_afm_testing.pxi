# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# Hooks for tests and benchmarks: the GEMM, the phase timers and the constants this
# module hard-codes (the dropout mask and the epoch order are in _entry_common.pxi).

def _gemm_for_test(A, B, C, transpose_a=False, packed=False):
    """C += A @ B (or A.T @ B) through the kernels' GEMM routine, for tests and timing;
    packed: B goes through the panel layout first (_pack_b), as the training step's
    GEMMs read it."""
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
    cdef bint pk = bool(packed)
    cdef float[::1] Pf
    cdef double[::1] Pd
    cdef float* pf = NULL
    cdef double* pd = NULL
    Bp = np.empty(max(B.size, 1) if pk else 1, dtype=C.dtype)
    if C.dtype == np.float32:
        Af, Bf, Cf, Pf = A, B, C, Bp
        with nogil:
            if pk:
                pf = &Pf[0]
                _pack_b(N, K, &Bf[0, 0], N, pf)
            if tr:
                _gemm(M, N, K, &Af[0, 0], 1, M, &Bf[0, 0], N, pf, &Cf[0, 0], N)
            else:
                _gemm(M, N, K, &Af[0, 0], K, 1, &Bf[0, 0], N, pf, &Cf[0, 0], N)
    else:
        Ad, Bd, Cd, Pd = A, B, C, Bp
        with nogil:
            if pk:
                pd = &Pd[0]
                _pack_b(N, K, &Bd[0, 0], N, pd)
            if tr:
                _gemm(M, N, K, &Ad[0, 0], 1, M, &Bd[0, 0], N, pd, &Cd[0, 0], N)
            else:
                _gemm(M, N, K, &Ad[0, 0], K, 1, &Bd[0, 0], N, pd, &Cd[0, 0], N)


def _phase_times(AFMWorkspace ws):
    """{phase: seconds} of the last afm_step run with ``ws``, phases named by PHASES (for
    profiling: bench/profile_phases.py)."""
    return _phase_seconds(ws.phase_t)


def _constants():
    """The constants this module hard-codes (to test them against kernels.api)."""
    return dict(ADAGRAD=OPT_ADAGRAD, SGD=OPT_SGD, MOMENTUM=OPT_MOMENTUM, ADAM=OPT_ADAM,
                RELU=ACT_RELU, SIGMOID=ACT_SIGMOID, TANH=ACT_TANH, IDENTITY=ACT_IDENTITY,
                VECTOR_BYTES=AFM_VBYTES, DBLOCK=DBLOCK, DW_PACK_MIN_BYTES=DW_PACK_MIN_BYTES)


def _dw_block_pairs(Py_ssize_t k, Py_ssize_t t, Py_ssize_t itemsize):
    """Distinct pairs per block of the W gradient at this k, t and item size (for
    bench/gemm_rate.py, which times the kernels' GEMM on the step's own shapes)."""
    return _dw_pairs(k, t, itemsize)
