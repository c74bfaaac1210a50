# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# AFMWorkspace (the scratch of one fit) and the step arguments, AFMArgs.

cdef class AFMWorkspace:
    """Scratch of afm_step for one fit (see the module docstring); opaque to callers."""
    cdef readonly Py_ssize_t batch_size, max_batch_nnz, max_batch_pairs, n_features
    cdef readonly Py_ssize_t n_factors, attention_size, u_cap
    cdef readonly object dtype
    # seconds from the start of the last step to the end of each of its PHASES; per
    # workspace, so that concurrent fits do not write each other's
    cdef double phase_t[11]
    cdef readonly bint forward_only  # for predict: E and U hold a block per thread
    cdef Py_ssize_t itemsize
    # integers
    cdef int64_t* off        # (B + 1,) batch-local nonzero offsets
    cdef int64_t* poff       # (B + 1,) batch-local pair offsets
    cdef int64_t* chunk      # (B + 1,) first row of each chunk
    cdef int32_t* slot       # (M,) feature -> group, -1 when untouched (so between steps)
    cdef int32_t* occ        # (nnz,) feature id of each nonzero in batch order
    cdef int32_t* grp        # (nnz,) group of each nonzero in batch order
    cdef int32_t* uniq       # (u_cap,) feature id of each group
    cdef int64_t* ustart     # (u_cap + 1,) group g's occurrences: ustart[g]:ustart[g+1]
    cdef int64_t* cursor     # (u_cap,)
    cdef int32_t* grp_occ    # (nnz,) batch-order index of each occurrence, grouped
    cdef int32_t* grp_row    # (nnz,) batch row of each occurrence, grouped
    # distinct pairs (attention): a class is a (feature, value) of the batch; pairs with
    # the same two classes share e, W e + b, act and the logit
    cdef int32_t* cls        # (nnz,) class of each occurrence (its group, or u_cap + q
                             # when its value differs from the group's first)
    cdef double* gx0         # (u_cap,) value of each group's first occurrence
    cdef int32_t* lp         # (nnz + 1,) first pair of each occurrence with the later
                             # occurrences of its row; lp[q + 1] - lp[q] of them
    cdef int32_t* row_bad    # (B,) position of a row's first invalid id, or -1
    # A distinct pair has two numbers. Its slot (dbase of its bucket + its number there)
    # is what the buckets and the ds sums work in. Its id d is the order of first
    # appearance in the batch: the distinct pairs whose representative pair (the first
    # of its pairs in batch order) is in row b are d = rbase[b], ... in pair order, so
    # the passes over distinct pairs read v x, and de reads C', in batch order.
    cdef int32_t* pd         # (pairs,) slot of each pair's distinct pair
    cdef int32_t* reps       # (pairs,) at poff[b] + r: the slot of distinct pair
                             # rbase[b] + r
    cdef int64_t* rbase      # (B + 1,) first distinct pair id of row b (rbase[b + 1] -
                             # rbase[b] have their representative pair in row b)
    cdef int32_t* brow       # (blocks,) row of the first distinct pair of each DBLOCK block
    cdef int64_t* bgrp       # (groups + 1,) first row of each backward group
                             # (_backward_groups)
    cdef int32_t* dq         # (2 pairs,) at 2 (poff[b] + r): the occurrences of distinct
                             # pair rbase[b] + r's representative pair
    cdef int32_t* stamp      # (threads, u_cap + nnz) dedup marks, one table per thread
    cdef int32_t* sid        # (threads, u_cap + nnz)
    cdef Py_ssize_t stamp_threads
    cdef void* rowbuf        # (threads, row_cap, k) a row's gradients of v x, per thread
    cdef void* cbuf          # (threads, DBLOCK, k) per thread, C' = W^T du of the distinct
                             # pairs its backward group is at
    cdef Py_ssize_t row_cap  # most nonzeros a row of a valid batch can have
    cdef int64_t* dbase      # (u_cap + nnz + 1,) first distinct pair of each class's bucket
                             # (set up to the last class in use)
    cdef double* DSD         # (pairs,) by slot: sum of ds over each distinct pair's pairs
    cdef double* SD          # (pairs,) by slot: logit of each distinct pair
    cdef double* ED          # (pairs,) by slot: exp(logit - the batch's largest logit)
    cdef double* BMAX        # (blocks,) largest logit of each block of distinct pairs
    cdef double* BDB         # (groups, t) per backward group: sum du over its pairs
    cdef double* BDH         # (groups, t) per backward group: sum ds act
    # doubles
    cdef double* r           # (B,) residual y_hat - y
    cdef double* row_loss    # (B,)
    cdef double* lin         # (B,) linear term
    cdef double* grp_sq      # (u_cap,) ||V_row||^2 before the update
    cdef double* pa          # (pairs,) softmax weight a
    cdef double* pau         # (pairs,) a' = a * attention mask / keep (1 without attention)
    cdef double* pds         # (pairs,) attention scale, then da, then ds
    cdef double* dsum        # (1 + k + 2t,) dense gradient sums
    # DTYPE
    cdef void* occ_x         # (nnz,) value of each nonzero in batch order
    cdef void* VX            # (nnz, k) v x per occurrence, then (step 2) the gradient of
                             # its V row from each occurrence
    cdef void* RT            # (B, k) dg of each row (DTYPE), from the row loop to de
    cdef void* E             # (pairs, k) by id: e of each distinct pair; forward_only:
                             # (threads, DBLOCK, k), a block's, the logits being all it keeps
    cdef void* U             # (pairs, t) by id: W e + b, then act, then du; forward_only:
                             # (threads, DBLOCK, t)
    cdef void* WT            # (k, t)
    cdef void* GW            # (t, k) gradient of W
    cdef double* CPS         # (B, k) at row c: sum over chunk c's rows of r g' (gradient
                             # of p), in row order
    cdef long long* cursors  # (threads, CURSOR_STRIDE) next_item_near's cursors
    cdef double* rowscr      # (threads, 3k) per thread, a row's: pooled g' (k), dg in
                             # double (k), da scratch (k DTYPE)
    cdef void* gdense        # (1 + k + 2t,)

    def __cinit__(self, Py_ssize_t batch_size, Py_ssize_t max_batch_nnz,
                  Py_ssize_t max_batch_pairs, Py_ssize_t n_features, Py_ssize_t n_factors,
                  Py_ssize_t attention_size, dtype, bint forward_only=False):
        cdef Py_ssize_t i, B, N, PP, M, k, t, U, isz, D, C, nblk, n
        dt = np.dtype(dtype)
        check_workspace_sizes(dt, (("batch_size", batch_size),
                                   ("max_batch_nnz", max_batch_nnz),
                                   ("n_features", n_features), ("n_factors", n_factors),
                                   ("attention_size", attention_size)),
                              n_features, max_batch_nnz)
        if max_batch_pairs < 0 or max_batch_pairs > 2147483647:
            raise ValueError(f"max_batch_pairs must be in [0, 2**31 - 1] (pairs are "
                             f"numbered in int32), got {max_batch_pairs}")
        B, N, M, k, t = batch_size, max_batch_nnz, n_features, n_factors, attention_size
        PP = max(max_batch_pairs, 1)
        U = min(M, N)
        D = 1 + k + 2 * t
        self.batch_size, self.max_batch_nnz, self.max_batch_pairs = B, N, max_batch_pairs
        self.n_features, self.n_factors, self.attention_size, self.u_cap = M, k, t, U
        self.dtype = dt
        self.forward_only = forward_only
        isz = dt.itemsize
        self.itemsize = isz
        self.off = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.poff = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.chunk = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.slot = <int32_t*>_alloc(M * sizeof(int32_t))
        for i in range(M):
            self.slot[i] = -1
        self.occ = <int32_t*>_alloc(N * sizeof(int32_t))
        self.grp = <int32_t*>_alloc(N * sizeof(int32_t))
        self.uniq = <int32_t*>_alloc(U * sizeof(int32_t))
        self.ustart = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.cursor = <int64_t*>_alloc(U * sizeof(int64_t))
        self.grp_occ = <int32_t*>_alloc(N * sizeof(int32_t))
        self.grp_row = <int32_t*>_alloc(N * sizeof(int32_t))
        self.r = <double*>_alloc(B * sizeof(double))
        self.row_loss = <double*>_alloc(B * sizeof(double))
        self.lin = <double*>_alloc(B * sizeof(double))
        self.grp_sq = <double*>_alloc(U * sizeof(double))
        self.pa = <double*>_alloc(PP * sizeof(double))
        self.pau = <double*>_alloc(PP * sizeof(double))
        self.pds = <double*>_alloc(PP * sizeof(double))
        self.dsum = <double*>_alloc(D * sizeof(double))
        self.occ_x = _alloc(N * isz)
        self.VX = _alloc(N * k * isz)
        self.RT = _alloc(B * k * isz)
        # the pair buffers (rows written before they are read) are left uninitialised:
        # only the rows of the distinct pairs are touched, so the RSS follows those
        if not forward_only:
            self.E = aligned_empty(PP * k * isz)
            self.U = aligned_empty(PP * t * isz)
        self.WT = _alloc(k * t * isz)
        self.GW = _alloc(t * k * isz)
        # only the rows of the chunks in use are touched (a chunk has at least one row)
        self.CPS = <double*>aligned_empty(B * k * sizeof(double))
        C = U + N
        self.cls = <int32_t*>_alloc(N * sizeof(int32_t))
        self.gx0 = <double*>_alloc(U * sizeof(double))
        self.lp = <int32_t*>_alloc((N + 1) * sizeof(int32_t))
        self.row_bad = <int32_t*>_alloc(B * sizeof(int32_t))
        self.pd = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.reps = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.rbase = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.brow = <int32_t*>_alloc(((PP + DBLOCK - 1) // DBLOCK) * sizeof(int32_t))
        self.bgrp = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.dq = <int32_t*>_alloc(2 * PP * sizeof(int32_t))
        self.stamp_threads = 0
        self.stamp = NULL
        self.sid = NULL
        self.rowbuf = NULL
        self.cbuf = NULL
        # a row of n nonzeros has n(n-1)/2 pairs, at most max_batch_pairs
        n = <Py_ssize_t>((1 + sqrt(1 + 8 * <double>PP)) / 2)
        while n > 1 and n * (n - 1) // 2 > PP:
            n -= 1
        while (n + 1) * n // 2 <= PP:
            n += 1
        self.row_cap = min(n, N)
        self.dbase = <int64_t*>_alloc((C + 1) * sizeof(int64_t))
        self.DSD = <double*>_alloc(PP * sizeof(double))
        self.SD = <double*>_alloc(PP * sizeof(double))
        self.ED = <double*>_alloc(PP * sizeof(double))
        nblk = (PP + DBLOCK - 1) // DBLOCK
        self.BMAX = <double*>_alloc(nblk * sizeof(double))
        # a group has a row: at most B of them (only those in use are touched)
        self.BDB = <double*>aligned_empty(B * t * sizeof(double))
        self.BDH = <double*>aligned_empty(B * t * sizeof(double))
        self.gdense = _alloc(D * isz)

    def __dealloc__(self):
        free(self.off); free(self.poff); free(self.chunk); free(self.slot); free(self.occ)
        free(self.grp); free(self.uniq); free(self.ustart); free(self.cursor)
        free(self.grp_occ); free(self.grp_row)
        free(self.r); free(self.row_loss); free(self.lin); free(self.grp_sq); free(self.pa)
        free(self.pau); free(self.pds); free(self.dsum)
        free(self.occ_x); free(self.VX); free(self.RT); free(self.E); free(self.U)
        free(self.WT); free(self.GW); free(self.CPS)
        free(self.gdense)
        free(self.cls); free(self.gx0); free(self.lp); free(self.row_bad); free(self.pd)
        free(self.reps)
        free(self.rbase); free(self.brow); free(self.bgrp); free(self.dq); free(self.stamp)
        free(self.sid); free(self.rowbuf); free(self.cbuf)
        free(self.rowscr); free(self.cursors)
        free(self.dbase); free(self.DSD); free(self.SD); free(self.ED); free(self.BMAX)
        free(self.BDB); free(self.BDH)

    cdef void _ensure_threads(self, Py_ssize_t n_threads) except *:
        """Per-thread dedup tables and row scratch for n_threads (grown once, kept for
        the fit)."""
        cdef Py_ssize_t C = self.u_cap + self.max_batch_nnz
        if n_threads <= self.stamp_threads:
            return
        free(self.stamp)
        free(self.sid)
        free(self.rowbuf)
        free(self.cbuf)
        free(self.rowscr)
        free(self.cursors)
        if self.forward_only:
            free(self.E)
            free(self.U)
            self.E = aligned_empty(n_threads * DBLOCK * self.n_factors * self.itemsize)
            self.U = aligned_empty(n_threads * DBLOCK * self.attention_size * self.itemsize)
        self.cursors = NULL
        self.stamp = NULL
        self.sid = NULL
        self.rowbuf = NULL
        self.cbuf = NULL
        self.rowscr = NULL
        self.stamp_threads = 0
        self.stamp = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.sid = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.rowbuf = aligned_empty(n_threads * self.row_cap * self.n_factors * self.itemsize)
        self.cbuf = aligned_empty(n_threads * DBLOCK * self.n_factors * self.itemsize)
        self.rowscr = <double*>aligned_empty(n_threads * 3 * self.n_factors * sizeof(double))
        self.cursors = <long long*>_alloc(n_threads * CURSOR_STRIDE * sizeof(long long))
        self.stamp_threads = n_threads

    def __repr__(self):
        return (f"AFMWorkspace(batch_size={self.batch_size}, max_batch_nnz="
                f"{self.max_batch_nnz}, max_batch_pairs={self.max_batch_pairs}, "
                f"n_features={self.n_features}, n_factors={self.n_factors}, "
                f"attention_size={self.attention_size}, dtype={self.dtype})")


def afm_workspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                  attention_size, dtype):
    """Scratch for the afm_step calls of one fit.

    batch_size, max_batch_nnz and max_batch_pairs bound len(rows), a batch's nonzero
    count and its pair count (sum over its rows of n(n-1)/2); n_features (M), n_factors
    (k), attention_size (t) and dtype must match the parameters.

    Example: ws = afm_workspace(4096, 40960, 184320, 5382, 64, 64, np.float32)
    """
    return AFMWorkspace(batch_size, max_batch_nnz, max_batch_pairs, n_features, n_factors,
                        attention_size, dtype)


# Scalars and raw pointers of one step.
ctypedef struct AFMArgs:
    Py_ssize_t B, k, t, M, n_rows, nnz_cap, pair_cap, n_chunks, U, n_classes, n_distinct
    Py_ssize_t n_groups
    Py_ssize_t n_own
    int n_threads, attention, activation, freeze_fm, drop_att, drop_pool, loss, prefetch_v
    int prefetch_features
    double l2, l2a, inv_keep_att, inv_keep_pool
    uint64_t seed, step
    uint32_t thr_att, thr_pool
    const int64_t* indptr
    const int32_t* indices
    const int64_t* rows
    OptCfg opt
    BatchErr err
