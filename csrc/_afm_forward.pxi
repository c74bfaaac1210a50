# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# Training step, first half: batch gathering, grouping, the distinct pairs and the
# forward phases.

cdef void _copy_row(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                    const floating* values) noexcept nogil:
    """Row b's nonzeros to the batch-order buffers (occ_feature, occ_x,
    occ_pair_start); row_bad[b] = the position of its first invalid id, or -1."""
    cdef int64_t start, q0 = ws.row_start[b], P0 = ws.row_pair_start[b]
    cdef Py_ssize_t i, n = ws.row_start[b + 1] - q0
    if b + ROW_PREFETCH < a.B:
        # the rows of a shuffled batch are scattered over X: start the next misses early
        start = row_first(a.indptr, a.row_width, a.rows[b + ROW_PREFETCH])
        __builtin_prefetch(a.indices + start)
        if values != NULL:
            __builtin_prefetch(values + start)
    start = row_first(a.indptr, a.row_width, a.rows[b])
    ws.row_bad[b] = <int32_t>copy_row(a.indices, values, start, n, a.M, ws.occ_feature + q0,
                                      <floating*>ws.occ_x + q0)
    for i in range(n):
        ws.occ_pair_start[q0 + i] = <int32_t>(P0 + _pair_index(i, i + 1, n))


cdef void _group(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """Stable counting sort of the batch's nonzeros by feature id (feature_group is all
    -1 between steps): a.n_touched, occ_group, group_feature, group_start, grp_row,
    grp_occ."""
    a.n_touched = group_by_feature(ws.row_start[a.B], ws.occ_feature, ws.occ_group,
                                   ws.feature_group, ws.group_feature, ws.group_cursor,
                                   ws.group_start, ws.touched)
    scatter_groups(a.B, ws.row_start, ws.occ_group, ws.group_cursor, ws.grp_row,
                   ws.grp_occ, <float*>NULL, <float*>NULL)


# The phases of a step, in order: AFMWorkspace.phase_t holds the wall-clock seconds from
# the start of the workspace's last step to the end of each (_phase_times names them).
# The first three are
# _prepare's: gather (offsets, batch-order copy, chunks), group_vx (the grouping by
# feature and the classes on one thread while the others compute v x) and numbering
# (the distinct pairs, W^T).
PHASES = ("gather", "group_vx", "numbering", "distinct_forward", "row_forward", "ds_sums",
          "backward_de", "row_sums", "feature_updates", "dW", "dense_updates")


cdef int _prepare(AFMArgs* a, AFMWorkspace ws, const floating* values, const floating* V,
                  const floating* w, const floating* W, double* times) noexcept nogil:
    """Step 0 and 1a: offsets, batch-order copy of the nonzeros, chunks; then the grouping
    by feature on one thread while the others compute v x per occurrence (which does
    not need it), the sorting thread joining them when done; the distinct pairs, W^T.
    times, unless NULL: omp_get_wtime() after the chunks and after v x."""
    cdef Py_ssize_t B = a.B, b, n, c, bad, j, f
    cdef int64_t start, cp
    cdef int64_t* row_start = ws.row_start
    cdef int64_t* row_pair_start = ws.row_pair_start
    cdef Py_ssize_t target, rows_in
    cdef int rank
    cdef unsigned int csr
    cdef int err = batch_offsets(a.rows, B, a.n_rows, a.indptr, a.row_width, row_start,
                                 a.nnz_cap, a.n_threads, &a.err)
    if err:
        return err
    row_pair_start[0] = 0
    for b in range(B):
        n = row_start[b + 1] - row_start[b]
        row_pair_start[b + 1] = row_pair_start[b] + n * (n - 1) // 2
    if row_pair_start[B] > a.pair_cap:
        a.err.value = row_pair_start[B]
        return ERR_PAIRS
    with parallel(num_threads=a.n_threads):
        csr = ftz_enter()
        for b in prange(B, schedule="static"):
            _copy_row(a, ws, b, values)
        ftz_leave(csr)
    ws.occ_pair_start[row_start[B]] = <int32_t>row_pair_start[B]
    for b in range(B):
        if ws.row_bad[b] >= 0:
            a.err.pos = row_first(a.indptr, a.row_width, a.rows[b]) + ws.row_bad[b]
            a.err.value = ws.occ_feature[row_start[b] + ws.row_bad[b]]
            return ERR_FEATURE
    # chunks of consecutive rows with about `target` pairs (<= 64 rows): E and U of a
    # chunk stay in cache between the GEMM and the row loop.
    target = 65536 // (a.k + a.t)
    if target < 48:
        target = 48
    c = 0
    ws.chunk_start[0] = 0
    cp = 0
    rows_in = 0
    for b in range(B):
        cp += row_pair_start[b + 1] - row_pair_start[b]
        rows_in += 1
        if cp >= target or rows_in >= 64:
            c += 1
            ws.chunk_start[c] = b + 1
            cp = 0
            rows_in = 0
    if rows_in > 0:
        c += 1
        ws.chunk_start[c] = B
    a.n_chunks = c
    if times:
        times[0] = omp_get_wtime()
    reset_cursors(ws.cursors, a.n_threads)
    with parallel(num_threads=a.n_threads):
        csr = ftz_enter()
        rank = 0
        if threadid() == 0:
            _group(a, ws)
            if a.attention:
                _classes(a, ws, <floating*>ws.occ_x)
        c = next_item_near(ws.cursors, a.n_chunks, a.n_threads, threadid(), &rank)
        while c < a.n_chunks:
            _vx_chunk(a, ws, c, V, w)
            c = next_item_near(ws.cursors, a.n_chunks, a.n_threads, threadid(), &rank)
        ftz_leave(csr)
    if times:
        times[1] = omp_get_wtime()
    if a.attention:
        _distinct_pairs(a, ws)
        for j in range(a.t):
            for f in range(a.k):
                (<floating*>ws.WT)[f * a.t + j] = W[j * a.k + f]
        _pack_b(a.t, a.k, <floating*>ws.WT, a.t, <floating*>ws.WT_packed)
        _pack_b(a.k, a.t, W, a.k, <floating*>ws.W_packed)
    return 0


cdef void _distinct_logits(AFMArgs* a, AFMWorkspace ws, const floating* dense) noexcept nogil:
    """Step 1b (attention): e, act(W e + b) and the logit of every distinct pair, then
    exp(logit - the batch's largest logit)."""
    cdef Py_ssize_t c, nblk = (a.n_distinct + DBLOCK - 1) // DBLOCK if a.attention else 0
    cdef double smax
    cdef int nt = a.n_threads, rank
    cdef unsigned int csr
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        c = next_item_near(ws.cursors, nblk, nt, threadid(), &rank)
        while c < nblk:
            _distinct_forward(a, ws, c, dense)
            c = next_item_near(ws.cursors, nblk, nt, threadid(), &rank)
        ftz_leave(csr)
    if nblk > 0:
        smax = ws.block_max_logit[0]
        for c in range(1, nblk):
            if ws.block_max_logit[c] > smax:
                smax = ws.block_max_logit[c]
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(nblk, schedule="dynamic"):
                _distinct_exp(a, ws, c, smax)
            ftz_leave(csr)


cdef inline Py_ssize_t _pair_index(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n) noexcept nogil:
    """Index of the pair (lo, hi), lo < hi, among a row's n(n-1)/2 pairs in row-major
    order (i < i2 loops)."""
    return lo * (2 * n - lo - 1) // 2 + (hi - lo - 1)


cdef inline Py_ssize_t _later_pairs(AFMWorkspace ws, Py_ssize_t q,
                                   Py_ssize_t* count) noexcept nogil:
    """The pairs of occurrence q with the later occurrences of its row: the first one's
    index P (batch-wide) and, in count, how many (they are P, P + 1, ...). The pairs of
    an occurrence end where the next occurrence's begin (a row's last occurrence has
    none, and the next row's pairs begin at row_pair_start of that row), so
    occ_pair_start alone gives both."""
    cdef Py_ssize_t P = ws.occ_pair_start[q]
    count[0] = ws.occ_pair_start[q + 1] - P
    return P


cdef inline void _class_range(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                              Py_ssize_t* pos, Py_ssize_t* pos_end) noexcept nogil:
    """Candidate occurrences of class c: grp_occ[pos:pos_end] for a group class, the
    single occurrence c - u_cap for an own class (pos = 0, pos_end = 1), none else;
    an occurrence belongs to c only if occ_class[q] == c."""
    if c < a.n_touched:
        pos[0] = ws.group_start[c]
        pos_end[0] = ws.group_start[c + 1]
    elif c >= ws.u_cap:
        pos[0] = 0
        pos_end[0] = 1
    else:
        pos[0] = 0
        pos_end[0] = 0


cdef Py_ssize_t _bucket(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c, int32_t* dedup_stamp,
                        int32_t* dedup_number) noexcept nogil:
    """Number the distinct pairs of class c's bucket: the pairs i < i2 of a row whose
    class(i) is c, visited in a fixed order (c's occurrences in batch order, each with
    its row's later occurrences). pair_slot[P] = the pair's distinct id local to the bucket
    (-1 - id for the first pair of each, its representative); dedup_stamp/dedup_number are this
    thread's tables. Returns the bucket's distinct count."""
    cdef Py_ssize_t pos, pos_end, q, P, P_end, cnt, nd = 0
    cdef int32_t c2
    cdef const int32_t* occ_class = ws.occ_class
    _class_range(a, ws, c, &pos, &pos_end)
    while pos < pos_end:
        q = ws.grp_occ[pos] if c < ws.u_cap else c - ws.u_cap
        pos += 1
        if occ_class[q] != c:
            continue
        P = _later_pairs(ws, q, &cnt)
        P_end = P + cnt
        while P < P_end:
            c2 = occ_class[q + 1 + (P - (P_end - cnt))]
            if dedup_stamp[c2] != c:
                dedup_stamp[c2] = <int32_t>c
                dedup_number[c2] = <int32_t>nd
                ws.pair_slot[P] = <int32_t>(-1 - nd)
                nd += 1
            else:
                ws.pair_slot[P] = dedup_number[c2]
            P += 1
    return nd


cdef void _sum_ds(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c) noexcept nogil:
    """distinct_ds[s] = sum of ds over the pairs of the distinct pair of each slot s of
    class c's bucket, in the bucket's visiting order (that of _bucket). The pairs of an
    occurrence are contiguous in pair_slot/pair_ds; those of the occurrence AFM_PREFETCH
    places ahead are prefetched."""
    cdef Py_ssize_t pos, pos_end, q, P, P_end, cnt, d
    _class_range(a, ws, c, &pos, &pos_end)
    for d in range(ws.bucket_start[c], ws.bucket_start[c + 1]):
        ws.distinct_ds[d] = 0
    while pos < pos_end:
        if c < a.n_touched and pos + AFM_PREFETCH < pos_end:
            P = _later_pairs(ws, ws.grp_occ[pos + AFM_PREFETCH], &cnt)
            __builtin_prefetch(ws.pair_slot + P)
            __builtin_prefetch(ws.pair_ds + P)
        q = ws.grp_occ[pos] if c < ws.u_cap else c - ws.u_cap
        pos += 1
        if ws.occ_class[q] != c:
            continue
        P = _later_pairs(ws, q, &cnt)
        for P in range(P, P + cnt):
            d = ws.pair_slot[P]
            ws.distinct_ds[d] = ws.distinct_ds[d] + ws.pair_ds[P]


cdef void _globalize_row(AFMWorkspace ws, Py_ssize_t b) noexcept nogil:
    """Row b's pairs: bucket-local distinct numbers to slots (bucket_start of the lower class),
    and the slot and occurrences of each distinct pair whose representative pair is in
    this row, in pair order."""
    cdef Py_ssize_t q0 = ws.row_start[b], n = ws.row_start[b + 1] - ws.row_start[b]
    cdef Py_ssize_t P = ws.row_pair_start[b]
    cdef Py_ssize_t i, i2, d, R = ws.row_pair_start[b]
    cdef int32_t c1, l
    for i in range(n):
        c1 = ws.occ_class[q0 + i]
        for i2 in range(i + 1, n):
            l = ws.pair_slot[P]
            if l < 0:
                d = ws.bucket_start[c1] + (-1 - l)
                ws.rep_occ[2 * R] = <int32_t>(q0 + i)
                ws.rep_occ[2 * R + 1] = <int32_t>(q0 + i2)
                ws.rep_slot[R] = <int32_t>d
                R += 1
            else:
                d = ws.bucket_start[c1] + l
            ws.pair_slot[P] = <int32_t>d
            P += 1
    # a count, prefix-summed once all rows are done
    ws.row_first_distinct[b + 1] = R - ws.row_pair_start[b]


cdef inline Py_ssize_t _rep_position(AFMWorkspace ws, Py_ssize_t d,
                                     Py_ssize_t* b) noexcept nogil:
    """Rep position (in rep_slot, and halved in rep_occ) of distinct pair d, b its row
    or an earlier one on entry (rows are advanced past those with no later id)."""
    while ws.row_first_distinct[b[0] + 1] <= d:
        b[0] += 1
    return ws.row_pair_start[b[0]] + (d - ws.row_first_distinct[b[0]])


cdef void _classes(AFMArgs* a, AFMWorkspace ws, const floating* occ_x) noexcept nogil:
    """Class of each occurrence (attention): its group when its value equals the value
    of the group's first occurrence (and is not 0, whose sign would matter), else a
    class of its own (u_cap + q); a.n_own_classes counts those. One pass in batch order,
    on the thread that sorted (while the others still compute v x): the groups'
    occurrences scattered over the batch would have the threads write occ_class entries
    that share cache lines."""
    cdef Py_ssize_t q, u, n_own = 0, nnz = ws.row_start[a.B]
    cdef double x
    for u in range(a.n_touched):
        ws.group_first_x[u] = occ_x[ws.grp_occ[ws.group_start[u]]]
    for q in range(nnz):
        u = ws.occ_group[q]
        x = occ_x[q]
        if x == ws.group_first_x[u] and x != 0:
            ws.occ_class[q] = <int32_t>u
        else:
            ws.occ_class[q] = <int32_t>(ws.u_cap + q)
            n_own += 1
    a.n_own_classes = n_own


cdef void _distinct_pairs(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """Step 0 (attention, after _classes): the batch's distinct pairs of classes. A
    pair's e, W e + b, act and logit depend only on its two (v x) (docs/design.md), so
    they are computed once per distinct pair. A pair belongs to the bucket of its lower
    class; buckets are numbered in parallel (one dedup table per thread), their counts
    prefix-summed into slots, each row's representative pairs listed (a prange over
    rows), and the ids numbered by first appearance (row_first_distinct, and
    block_first_row per DBLOCK block). The numbering depends on the data only, not on
    the thread count."""
    cdef Py_ssize_t U = a.n_touched, nnz = ws.row_start[a.B], C = ws.u_cap + nnz
    cdef Py_ssize_t c, b, th, hi, it
    cdef Py_ssize_t n_own = a.n_own_classes
    cdef int nt = a.n_threads
    cdef unsigned int csr
    # the classes in use: groups [0, U), and own classes [u_cap, C) only when there are any
    hi = C if n_own > 0 else U
    for th in prange(nt, schedule="static", num_threads=nt):
        csr = ftz_enter()
        for c in range(hi):
            ws.dedup_stamp[th * C + c] = -1
        ftz_leave(csr)
    # Group classes are numbered by first occurrence, so the popular ones (the biggest
    # buckets) come first: feature_items hands them out one by one and the rest
    # CLASS_TAIL at a time, which keeps the threads balanced without a grab of the
    # shared loop counter per few small buckets (a grab of 4 classes at a time left
    # ml-tag k=16's ds sums, the same loop shape, no faster on 2 threads than on 1:
    # bench/profile_phases.py --k 16 --data mltag, phase ds_sums). Own classes
    # (values that differ within a feature) are rare; one-hot data has none.
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for it in prange(feature_items(U, CLASS_TAIL), schedule="dynamic"):
            th = omp_get_thread_num()
            for c in range(feature_item_start(it, U, CLASS_TAIL),
                           feature_item_start(it + 1, U, CLASS_TAIL)):
                ws.bucket_start[c + 1] = _bucket(a, ws, c, ws.dedup_stamp + th * C,
                                                 ws.dedup_number + th * C)
        ftz_leave(csr)
    if n_own > 0:
        for c in range(U, C):
            ws.bucket_start[c + 1] = 0
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(ws.u_cap, C, schedule="dynamic", chunksize=256):
                th = omp_get_thread_num()
                ws.bucket_start[c + 1] = _bucket(a, ws, c, ws.dedup_stamp + th * C,
                                                 ws.dedup_number + th * C)
            ftz_leave(csr)
    ws.bucket_start[0] = 0
    for c in range(hi):
        ws.bucket_start[c + 1] += ws.bucket_start[c]
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for b in prange(a.B, schedule="static"):
            _globalize_row(ws, b)
        ftz_leave(csr)
    # ids in order of first appearance, and the row where each block of them starts
    ws.row_first_distinct[0] = 0
    it = 0
    for b in range(a.B):
        ws.row_first_distinct[b + 1] += ws.row_first_distinct[b]
        while it * DBLOCK < ws.row_first_distinct[b + 1]:
            ws.block_first_row[it] = <int32_t>b
            it += 1
    a.n_classes = C
    a.n_distinct = ws.bucket_start[hi]


cdef void _vx_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c, const floating* V,
                    const floating* w) noexcept nogil:
    """Step 1a for the rows of chunk c: v x per occurrence, the linear term per row."""
    cdef Py_ssize_t k = a.k, b, i, f, n, q0
    cdef const int32_t* occ_feature = ws.occ_feature
    cdef const floating* occ_x = <floating*>ws.occ_x
    cdef floating* vx
    cdef const floating* v
    cdef floating x
    cdef double lin
    cdef Py_ssize_t q, q_end = ws.row_start[ws.chunk_start[c + 1]]
    for b in range(ws.chunk_start[c], ws.chunk_start[c + 1]):
        q0 = ws.row_start[b]
        n = ws.row_start[b + 1] - q0
        lin = 0
        if a.prefetch_v:
            for q in range(q0 + n, min(q0 + n + AFM_PREFETCH, q_end)):
                prefetch_row(V + <Py_ssize_t>occ_feature[q] * k, k * sizeof(floating))
                __builtin_prefetch(w + occ_feature[q])
        for i in range(n):
            x = occ_x[q0 + i]
            v = V + <Py_ssize_t>occ_feature[q0 + i] * k
            vx = <floating*>ws.occ_vx + (q0 + i) * k
            for f in range(k):
                vx[f] = v[f] * x
            lin += <double>w[occ_feature[q0 + i]] * <double>x
        ws.row_linear[b] = lin


cdef void _distinct_forward(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t blk,
                            const floating* dense) noexcept nogil:
    """Step 1b for distinct pairs [blk DBLOCK, ...): e, u = act(W e + b) and the logit
    s = h . u (double)."""
    cdef Py_ssize_t k = a.k, t = a.t, d, d0 = blk * DBLOCK, d1, f, R
    cdef Py_ssize_t b = ws.block_first_row[blk]
    cdef const floating* occ_vx = <floating*>ws.occ_vx
    # a forward-only workspace keeps the logits only: the block's E and U are scratch
    cdef Py_ssize_t row0 = omp_get_thread_num() * DBLOCK if ws.forward_only else d0
    cdef floating* E = <floating*>ws.distinct_e + row0 * k        # the block's rows
    cdef floating* Uu = <floating*>ws.distinct_u + row0 * t
    cdef const floating* bias = dense + 1 + k
    cdef const floating* h = dense + 1 + k + t
    cdef const floating* v1
    cdef const floating* v2
    cdef floating* e
    cdef floating* u
    cdef double smax, s
    cdef int32_t slot[DBLOCK]
    cdef int code = a.activation
    d1 = d0 + DBLOCK if d0 + DBLOCK < a.n_distinct else a.n_distinct
    for d in range(d0, d1):
        R = _rep_position(ws, d, &b)
        slot[d - d0] = ws.rep_slot[R]
        v1 = occ_vx + <Py_ssize_t>ws.rep_occ[2 * R] * k
        v2 = occ_vx + <Py_ssize_t>ws.rep_occ[2 * R + 1] * k
        e = E + (d - d0) * k
        for f in range(k):
            e[f] = v1[f] * v2[f]
    _preactivation(E, d1 - d0, k, t, bias, <floating*>ws.WT, <floating*>ws.WT_packed, Uu)
    smax = -INFINITY
    for d in range(d0, d1):
        u = Uu + (d - d0) * t
        _activate(u, t, code)
        s = dot_d(h, u, t)
        ws.distinct_logit[slot[d - d0]] = s
        if s > smax:
            smax = s
    ws.block_max_logit[blk] = smax


cdef void _distinct_exp(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t blk,
                        double smax) noexcept nogil:
    """distinct_exp = exp(logit - smax) for the slots [blk DBLOCK, ...), smax the
    batch's largest logit: the softmax numerators, once per distinct pair instead of
    once per pair."""
    cdef Py_ssize_t d, d1 = (blk + 1) * DBLOCK
    if d1 > a.n_distinct:
        d1 = a.n_distinct
    for d in range(blk * DBLOCK, d1):
        ws.distinct_exp[d] = exp(ws.distinct_logit[d] - smax)


cdef inline void _row_softmax(AFMWorkspace ws, Py_ssize_t P0, Py_ssize_t P1) noexcept nogil:
    """pair_weight[P0:P1] = softmax of a row's logits, from the numerators exp(s - the batch's
    largest logit) shared by distinct pair; a row whose sum underflows (logits far below
    the batch's largest) takes its own maximum instead."""
    cdef Py_ssize_t P
    cdef double ssum = 0
    cdef double* pair_weight = ws.pair_weight
    for P in range(P0, P1):
        pair_weight[P] = ws.distinct_exp[ws.pair_slot[P]]
        ssum += pair_weight[P]
    if ssum >= SOFTMAX_MIN_SUM:
        for P in range(P0, P1):
            pair_weight[P] = pair_weight[P] / ssum
    else:
        for P in range(P0, P1):
            pair_weight[P] = ws.distinct_logit[ws.pair_slot[P]]
        _softmax_inplace(pair_weight + P0, P1 - P0)


cdef void _forward_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                         const floating* y, const floating* dense) noexcept nogil:
    """Step 1c for the rows of chunk c: softmax of the row's logits (looked up by distinct
    pair), dropout masks, g, y_hat, residual r, dg, da and ds per pair.
    Pair sums are factorised per first occurrence i: g = sum_i v_i (sum_i2 a'_P v_i2)
    and da_P = (v_i dg) . v_i2, in DTYPE, so that each pair costs one vector FMA (g) and
    one dot (da) over k."""
    cdef Py_ssize_t k = a.k, b, i, i2, n, f, P, P0, P1, q0
    cdef const floating* occ_vx = <floating*>ws.occ_vx
    cdef const floating* v1
    cdef const floating* v2
    cdef floating* tv
    cdef double* pair_weight = ws.pair_weight
    cdef double* pair_weight_kept = ws.pair_weight_kept
    cdef double* pair_ds = ws.pair_ds
    cdef const floating* p_vec = dense + 1
    cdef double* gp = ws.row_scratch + omp_get_thread_num() * 3 * k
    cdef double* dgd = gp + k
    cdef floating* dgo
    cdef double* cps = ws.chunk_grad_p + c * k
    cdef double yhat, res, ada, da
    cdef uint64_t key
    cdef double inv_pool = a.inv_keep_pool
    cdef uint32_t thr_att = a.thr_att, thr_pool = a.thr_pool  # locals: stores could alias *a
    for f in range(k):
        cps[f] = 0
    for b in range(ws.chunk_start[c], ws.chunk_start[c + 1]):
        if b + ROW_PREFETCH < a.B:
            __builtin_prefetch(y + a.rows[b + ROW_PREFETCH])
        q0 = ws.row_start[b]
        n = ws.row_start[b + 1] - q0
        P0 = ws.row_pair_start[b]
        P1 = ws.row_pair_start[b + 1]
        tv = <floating*>(gp + 2 * k)
        if a.attention and P1 > P0:
            _row_softmax(ws, P0, P1)
            if a.drop_att:
                key = dropout_row_key(a.seed, 1, a.step, <uint64_t>a.rows[b])
                for P in range(P0, P1):
                    pair_ds[P] = a.inv_keep_att if dropout_kept(key, <uint32_t>(P - P0),
                                                            thr_att) else 0.0
                    pair_weight_kept[P] = pair_weight[P] * pair_ds[P]
            else:
                for P in range(P0, P1):
                    pair_ds[P] = 1.0
                    pair_weight_kept[P] = pair_weight[P]
        else:
            for P in range(P0, P1):
                pair_weight_kept[P] = 1.0
        _pool_row(occ_vx + q0 * k, pair_weight_kept + P0, n, k, gp)
        # pooled dropout scale (into dgd)
        if a.drop_pool:
            key = dropout_row_key(a.seed, 2, a.step, <uint64_t>a.rows[b])
            for f in range(k):
                dgd[f] = inv_pool if dropout_kept(key, <uint32_t>f, thr_pool) else 0
                gp[f] = gp[f] * dgd[f]
        else:
            for f in range(k):
                dgd[f] = 1
        yhat = dot_d(p_vec, gp, k)
        yhat = <double>dense[0] + ws.row_linear[b] + yhat
        ws.row_loss[b] = row_data_loss(a.loss, yhat, <double>y[a.rows[b]], &res)
        ws.residual[b] = res
        dgo = <floating*>ws.row_dg + b * k
        for f in range(k):
            dgd[f] = res * <double>p_vec[f] * dgd[f]
            dgo[f] = <floating>dgd[f]
            cps[f] += res * gp[f]
        if a.attention and P1 > P0:
            # da = (v_i dg) . v_i2 times the attention dropout scale, then ds
            _da_row(occ_vx + q0 * k, dgd, n, k, tv, pair_ds + P0)
            ada = 0
            for P in range(P0, P1):
                ada += pair_weight[P] * pair_ds[P]
            for P in range(P0, P1):
                pair_ds[P] = pair_weight[P] * (pair_ds[P] - ada)
