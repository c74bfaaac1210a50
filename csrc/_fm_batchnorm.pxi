# Batch-norm sums of the FM training step (csrc/_fm_cython.pyx includes this file): the
# batch's per-column sums of f, of (f - mean)^2 and of dz and dz f-hat, in blocks of
# rows summed in parallel and then in block order.

cdef enum:
    # rows per block of the batch-norm sums: blocks are summed in parallel, then their
    # partial sums in block order (fixed by the data, so any thread count gives the
    # same bits)
    BN_BLOCK = 64
    BN_MEAN = 0
    BN_VAR = 1
    BN_DZ = 2


cdef void _bn_block(const StepArgs* a, Py_ssize_t blk, int what, const floating* F,
                    const floating* SC, const double* r, const double* mu,
                    double* part) noexcept nogil:
    """Partial sums over the rows of block blk into part[blk] (2k): BN_MEAN sum f (first
    half), BN_VAR sum (f - mu)^2 (second half), BN_DZ sum dz and sum dz fh (both)."""
    cdef Py_ssize_t k = a.k, b, f, b1 = (blk + 1) * BN_BLOCK
    cdef double* p = part + blk * 2 * k
    cdef const floating* fr
    cdef double d
    if b1 > a.B:
        b1 = a.B
    if what == BN_VAR:
        p = p + k
    for f in range(2 * k if what == BN_DZ else k):
        p[f] = 0
    for b in range(blk * BN_BLOCK, b1):
        fr = F + b * k
        if what == BN_MEAN:
            for f in range(k):
                p[f] += fr[f]
        elif what == BN_VAR:
            for f in range(k):
                d = fr[f] - mu[f]
                p[f] += d * d
        elif a.use_dropout:
            for f in range(k):
                d = r[b] * <double>SC[b * k + f]
                p[f] += d
                p[k + f] += d * <double>fr[f]
        else:
            for f in range(k):
                p[f] += r[b]
                p[k + f] += r[b] * <double>fr[f]


cdef void _bn_sums(const StepArgs* a, int what, const floating* F, const floating* SC,
                   const double* r, const double* mu, double* part, double* out0,
                   double* out1) noexcept nogil:
    """out0 (and out1 for BN_DZ) = the batch's sums (see _bn_block), blocks in parallel."""
    cdef Py_ssize_t k = a.k, blk, f, nrb = (a.B + BN_BLOCK - 1) // BN_BLOCK
    cdef Py_ssize_t off = k if what == BN_VAR else 0
    cdef unsigned int csr
    with parallel(num_threads=a.n_threads):
        csr = ftz_enter()
        for blk in prange(nrb, schedule="static"):
            _bn_block(a, blk, what, F, SC, r, mu, part)
        ftz_leave(csr)
    for f in range(k):
        out0[f] = 0
        if out1 != NULL:
            out1[f] = 0
    for blk in range(nrb):
        for f in range(k):
            out0[f] += part[blk * 2 * k + off + f]
            if out1 != NULL:
                out1[f] += part[blk * 2 * k + k + f]
