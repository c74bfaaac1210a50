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
    # for predict: distinct_e and distinct_u hold a block per thread
    cdef readonly bint forward_only
    cdef Py_ssize_t itemsize
    # An occurrence is one nonzero of the batch, numbered in batch order (row by row); a
    # group is the occurrences of one touched feature (the stable counting sort).
    # integers
    cdef int64_t* row_start       # (B + 1,) row b's occurrences: row_start[b]:row_start[b+1]
    cdef int64_t* row_pair_start  # (B + 1,) row b's pairs, numbered likewise
    cdef int64_t* chunk_start     # (chunks + 1,) first row of each chunk
    cdef int32_t* feature_group   # (M,) feature -> its group, -1 when untouched (so
                                  # between steps)
    cdef int32_t* occ_feature     # (nnz,) feature id of each occurrence
    cdef int32_t* occ_group       # (nnz,) group of each occurrence
    cdef int32_t* group_feature   # (u_cap,) feature id of each group
    cdef int64_t* group_start     # (u_cap + 1,) group g's occurrences (in grp_occ and
                                  # grp_row): group_start[g]:group_start[g + 1]
    cdef int64_t* group_cursor    # (u_cap,) the counting sort's fill positions
    cdef int32_t* grp_occ         # (nnz,) each group's occurrences, in batch order
    cdef int32_t* grp_row         # (nnz,) the batch row of each of those
    cdef uint8_t* touched         # (M,) marks of the touched features, or NULL
    cdef object touched_owner     # the array behind touched
    # distinct pairs (attention): a class is a (feature, value) of the batch; pairs with
    # the same two classes share e, W e + b, act and the logit
    cdef int32_t* occ_class       # (nnz,) class of each occurrence (its group, or
                                  # u_cap + q when its value differs from the group's first)
    cdef double* group_first_x    # (u_cap,) value of each group's first occurrence
    cdef int32_t* occ_pair_start  # (nnz + 1,) first pair of each occurrence with the later
                                  # occurrences of its row; occ_pair_start[q + 1] -
                                  # occ_pair_start[q] of them
    cdef int32_t* row_bad         # (B,) position of a row's first invalid id, or -1
    # A distinct pair has two numbers. Its slot (bucket_start of its bucket + its number
    # there) is what the buckets and the ds sums work in. Its id d is the order of first
    # appearance in the batch: the distinct pairs whose representative pair (the first
    # of its pairs in batch order) is in row b are d = row_first_distinct[b], ... in pair
    # order, so the passes over distinct pairs read v x, and de reads C', in batch order.
    # Distinct pair d's "rep position" R = row_pair_start[b] + (d - row_first_distinct[b])
    # (_rep_position) indexes rep_slot and rep_occ.
    cdef int32_t* pair_slot       # (pairs,) slot of each pair's distinct pair
    cdef int32_t* rep_slot        # (pairs,) at rep position R: the slot of its distinct pair
    cdef int32_t* rep_occ         # (2 pairs,) at 2R, 2R + 1: the two occurrences of the
                                  # representative pair of R's distinct pair
    cdef int64_t* row_first_distinct  # (B + 1,) first distinct pair id of row b
                                  # (row_first_distinct[b + 1] - row_first_distinct[b]
                                  # have their representative pair in row b)
    cdef int32_t* block_first_row  # (blocks,) row of the first distinct pair of each
                                  # DBLOCK block
    cdef int64_t* backward_group_start  # (backward groups + 1,) first row of each
                                  # backward group (_backward_groups)
    cdef int32_t* dedup_stamp     # (threads, u_cap + nnz) per thread: the class whose
                                  # bucket last saw each upper class (_bucket)
    cdef int32_t* dedup_number    # (threads, u_cap + nnz) per thread: the number it got there
    cdef Py_ssize_t scratch_threads  # threads the per-thread buffers are sized for
    cdef void* row_dvx            # (threads, row_cap, k) per thread, a row's gradients of v x
    cdef void* cprime_block       # (threads, DBLOCK, k) per thread, C' = W^T du of the
                                  # distinct pairs its backward group is at
    cdef Py_ssize_t row_cap       # most nonzeros a row of a valid batch can have
    cdef int64_t* bucket_start    # (u_cap + nnz + 1,) first slot of each class's bucket
                                  # (set up to the last class in use)
    cdef double* distinct_ds      # (pairs,) by slot: sum of ds over each distinct pair's pairs
    cdef double* distinct_logit   # (pairs,) by slot: logit of each distinct pair
    cdef double* distinct_exp     # (pairs,) by slot: exp(logit - the batch's largest logit)
    cdef double* block_max_logit  # (blocks,) largest logit of each block of distinct pairs
    cdef double* backward_grad_b  # (backward groups, t) per group: sum du over its pairs
                                  # (its part of the gradient of b)
    cdef double* backward_grad_h  # (backward groups, t) per group: sum ds act (gradient of h)
    # doubles
    cdef double* residual         # (B,) y_hat - y
    cdef double* row_loss         # (B,)
    cdef double* row_linear       # (B,) linear term
    cdef double* group_sqnorm     # (u_cap,) ||V_row||^2 before the update
    cdef double* pair_weight      # (pairs,) softmax weight a
    cdef double* pair_weight_kept # (pairs,) a' = a * attention mask / keep (1 without
                                  # attention)
    cdef double* pair_ds          # (pairs,) attention scale, then da, then ds
    cdef double* dense_grad_sum   # (1 + k + 2t,) dense gradient sums
    # DTYPE
    cdef void* occ_x              # (nnz,) value of each occurrence
    cdef void* occ_vx             # (nnz, k) v x per occurrence, then (step 2) the gradient
                                  # of its V row from each occurrence
    cdef void* row_dg             # (B, k) dg of each row (DTYPE), from the row loop to de
    cdef void* distinct_e         # (pairs, k) by id: e of each distinct pair; forward_only:
                                  # (threads, DBLOCK, k), a block's, the logits being all
                                  # it keeps
    cdef void* distinct_u         # (pairs, t) by id: W e + b, then act, then du;
                                  # forward_only: (threads, DBLOCK, t)
    cdef void* WT                 # (k, t) W transposed
    cdef void* WT_packed          # WT and W in the GEMM's panel layout (_pack_b), formed
    cdef void* W_packed           # once a step
    cdef void* dw_pack            # (threads, pairs k) per thread, a block of E packed
                                  # (_dw_block; NULL when E's rows are not packed)
    cdef void* grad_W             # (t, k) gradient of W
    cdef void* dw_partial         # (DW_CHUNKS, t, k) the W gradient of each chunk of pairs
    cdef double* chunk_grad_p     # (B, k) at row c: sum over chunk c's rows of r g'
                                  # (gradient of p), in row order
    cdef long long* cursors       # (threads, CURSOR_STRIDE) next_item_near's cursors
    cdef double* row_scratch      # (threads, 3k) per thread, a row's: pooled g' (k), dg in
                                  # double (k), da scratch (k DTYPE)
    cdef void* grad_dense         # (1 + k + 2t,) gradient of dense

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
        self.row_start = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.row_pair_start = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.chunk_start = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.feature_group = <int32_t*>_alloc(M * sizeof(int32_t))
        for i in range(M):
            self.feature_group[i] = -1
        self.occ_feature = <int32_t*>_alloc(N * sizeof(int32_t))
        self.occ_group = <int32_t*>_alloc(N * sizeof(int32_t))
        self.group_feature = <int32_t*>_alloc((U + 1) * sizeof(int32_t))
        self.group_start = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.group_cursor = <int64_t*>_alloc((U + 1) * sizeof(int64_t))
        self.grp_occ = <int32_t*>_alloc(N * sizeof(int32_t))
        self.grp_row = <int32_t*>_alloc(N * sizeof(int32_t))
        self.residual = <double*>_alloc(B * sizeof(double))
        self.row_loss = <double*>_alloc(B * sizeof(double))
        self.row_linear = <double*>_alloc(B * sizeof(double))
        self.group_sqnorm = <double*>_alloc(U * sizeof(double))
        self.pair_weight = <double*>_alloc(PP * sizeof(double))
        self.pair_weight_kept = <double*>_alloc(PP * sizeof(double))
        self.pair_ds = <double*>_alloc(PP * sizeof(double))
        self.dense_grad_sum = <double*>_alloc(D * sizeof(double))
        self.occ_x = _alloc(N * isz)
        self.occ_vx = _alloc(N * k * isz)
        self.row_dg = _alloc(B * k * isz)
        # the pair buffers (rows written before they are read) are left uninitialised:
        # only the rows of the distinct pairs are touched, so the RSS follows those
        if not forward_only:
            self.distinct_e = aligned_empty(PP * k * isz)
            self.distinct_u = aligned_empty(PP * t * isz)
        self.WT = _alloc(k * t * isz)
        self.WT_packed = aligned_empty(k * t * isz)
        self.W_packed = aligned_empty(k * t * isz)
        self.grad_W = _alloc(t * k * isz)
        # only the chunks in use are touched (a batch of fewer than DW_CHUNKS blocks of
        # distinct pairs has fewer)
        self.dw_partial = NULL
        if not forward_only:
            self.dw_partial = aligned_empty(DW_CHUNKS * t * k * isz)
        # only the rows of the chunks in use are touched (a chunk has at least one row)
        self.chunk_grad_p = <double*>aligned_empty(B * k * sizeof(double))
        C = U + N
        self.occ_class = <int32_t*>_alloc(N * sizeof(int32_t))
        self.group_first_x = <double*>_alloc(U * sizeof(double))
        self.occ_pair_start = <int32_t*>_alloc((N + 1) * sizeof(int32_t))
        self.row_bad = <int32_t*>_alloc(B * sizeof(int32_t))
        self.pair_slot = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.rep_slot = <int32_t*>_alloc(PP * sizeof(int32_t))
        self.row_first_distinct = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.block_first_row = <int32_t*>_alloc(((PP + DBLOCK - 1) // DBLOCK)
                                                * sizeof(int32_t))
        self.backward_group_start = <int64_t*>_alloc((B + 1) * sizeof(int64_t))
        self.rep_occ = <int32_t*>_alloc(2 * PP * sizeof(int32_t))
        self.scratch_threads = 0
        self.dedup_stamp = NULL
        self.dedup_number = NULL
        self.row_dvx = NULL
        self.cprime_block = NULL
        self.dw_pack = NULL
        # a row of n nonzeros has n(n-1)/2 pairs, at most max_batch_pairs
        n = <Py_ssize_t>((1 + sqrt(1 + 8 * <double>PP)) / 2)
        while n > 1 and n * (n - 1) // 2 > PP:
            n -= 1
        while (n + 1) * n // 2 <= PP:
            n += 1
        self.row_cap = min(n, N)
        self.bucket_start = <int64_t*>_alloc((C + 1) * sizeof(int64_t))
        self.distinct_ds = <double*>_alloc(PP * sizeof(double))
        self.distinct_logit = <double*>_alloc(PP * sizeof(double))
        self.distinct_exp = <double*>_alloc(PP * sizeof(double))
        nblk = (PP + DBLOCK - 1) // DBLOCK
        self.block_max_logit = <double*>_alloc(nblk * sizeof(double))
        # a group has a row: at most B of them (only those in use are touched)
        self.backward_grad_b = <double*>aligned_empty(B * t * sizeof(double))
        self.backward_grad_h = <double*>aligned_empty(B * t * sizeof(double))
        self.grad_dense = _alloc(D * isz)

    def track_touched(self, marks):
        """See the module's ``track_touched``."""
        self.touched = marks_pointer(marks, self.n_features)
        self.touched_owner = marks

    def __dealloc__(self):
        free(self.row_start); free(self.row_pair_start); free(self.chunk_start)
        free(self.feature_group); free(self.occ_feature); free(self.occ_group)
        free(self.group_feature); free(self.group_start); free(self.group_cursor)
        free(self.grp_occ); free(self.grp_row); free(self.residual); free(self.row_loss)
        free(self.row_linear); free(self.group_sqnorm); free(self.pair_weight)
        free(self.pair_weight_kept); free(self.pair_ds); free(self.dense_grad_sum)
        free(self.occ_x); free(self.occ_vx); free(self.row_dg); free(self.distinct_e)
        free(self.distinct_u); free(self.WT); free(self.WT_packed); free(self.W_packed)
        free(self.dw_pack); free(self.grad_W); free(self.dw_partial); free(self.chunk_grad_p)
        free(self.grad_dense); free(self.occ_class); free(self.group_first_x)
        free(self.occ_pair_start); free(self.row_bad); free(self.pair_slot)
        free(self.rep_slot); free(self.row_first_distinct); free(self.block_first_row)
        free(self.backward_group_start); free(self.rep_occ); free(self.dedup_stamp)
        free(self.dedup_number); free(self.row_dvx); free(self.cprime_block)
        free(self.row_scratch); free(self.cursors); free(self.bucket_start)
        free(self.distinct_ds); free(self.distinct_logit); free(self.distinct_exp)
        free(self.block_max_logit); free(self.backward_grad_b)
        free(self.backward_grad_h)

    cdef void _ensure_threads(self, Py_ssize_t n_threads) except *:
        """Per-thread dedup tables and row scratch for n_threads (grown once, kept for
        the fit)."""
        cdef Py_ssize_t C = self.u_cap + self.max_batch_nnz
        if n_threads <= self.scratch_threads:
            return
        free(self.dedup_stamp)
        free(self.dedup_number)
        free(self.row_dvx)
        free(self.cprime_block)
        free(self.dw_pack)
        free(self.row_scratch)
        free(self.cursors)
        if self.forward_only:
            free(self.distinct_e)
            free(self.distinct_u)
            self.distinct_e = aligned_empty(n_threads * DBLOCK * self.n_factors
                                            * self.itemsize)
            self.distinct_u = aligned_empty(n_threads * DBLOCK * self.attention_size
                                            * self.itemsize)
        self.cursors = NULL
        self.dedup_stamp = NULL
        self.dedup_number = NULL
        self.row_dvx = NULL
        self.cprime_block = NULL
        self.dw_pack = NULL
        self.row_scratch = NULL
        self.scratch_threads = 0
        self.dedup_stamp = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.dedup_number = <int32_t*>_alloc(n_threads * C * sizeof(int32_t))
        self.row_dvx = aligned_empty(n_threads * self.row_cap * self.n_factors * self.itemsize)
        self.cprime_block = aligned_empty(n_threads * DBLOCK * self.n_factors * self.itemsize)
        # E's rows DW_PACK_MIN_BYTES or more apart crowd a few sets of L1 when a GEMM
        # panel walks down them; closer rows cost only the copy (_dw_block packs E's
        # blocks exactly when this scratch exists)
        if not self.forward_only and self.n_factors * self.itemsize >= DW_PACK_MIN_BYTES:
            self.dw_pack = aligned_empty(n_threads * _dw_pairs(self.n_factors,
                                         self.attention_size, self.itemsize)
                                         * self.n_factors * self.itemsize)
        self.row_scratch = <double*>aligned_empty(n_threads * 3 * self.n_factors
                                                  * sizeof(double))
        self.cursors = <long long*>_alloc(n_threads * CURSOR_STRIDE * sizeof(long long))
        self.scratch_threads = n_threads

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
    Py_ssize_t B, k, t, M, n_rows, nnz_cap, pair_cap
    int64_t row_width               # X's (checked_row_width); 0: rows found by indptr
    Py_ssize_t n_chunks             # chunks of rows (the step's split of the batch)
    Py_ssize_t n_touched            # touched features (groups) of the batch
    Py_ssize_t n_classes, n_distinct
    Py_ssize_t n_own_classes        # classes of a single occurrence (u_cap + q)
    Py_ssize_t n_backward_groups
    int n_threads, attention, activation, freeze_fm, drop_att, drop_pool, loss, prefetch_v
    int prefetch_features
    double l2, l2_attention, inv_keep_att, inv_keep_pool
    uint64_t seed, step
    uint32_t thr_att, thr_pool
    const int64_t* indptr
    const int32_t* indices
    const int64_t* rows
    OptCfg opt
    BatchErr err
