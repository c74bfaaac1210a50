# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# Training step, second half: the backward phases, the feature and dense updates,
# and _step_nogil, which runs every phase of one step.

cdef void _backward_groups(AFMArgs* a, AFMWorkspace ws) noexcept nogil:
    """The split of the batch's rows into backward groups (backward_group_start,
    a.n_backward_groups; training only): a row joins the group before it unless that
    would take the group past DBLOCK distinct pairs or GROUP_ROWS rows."""
    cdef Py_ssize_t b, g = 0
    ws.backward_group_start[0] = 0
    for b in range(1, a.B):
        if (ws.row_first_distinct[b + 1]
                - ws.row_first_distinct[ws.backward_group_start[g]] > DBLOCK
                or b - ws.backward_group_start[g] >= GROUP_ROWS):
            g += 1
            ws.backward_group_start[g] = b
    a.n_backward_groups = g + 1 if a.B > 0 else 0
    ws.backward_group_start[a.n_backward_groups] = a.B


cdef void _du_block(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t d0, Py_ssize_t d1,
                    Py_ssize_t b, const floating* dense, const floating* W, double* bdb,
                    double* bdh, floating* C) noexcept nogil:
    """Step 2 for distinct pairs [d0, d1) (at most DBLOCK; b the row of d0 or an earlier
    one): h act'(u) (HD_SPAN columns at a time, on the stack), du = DS h act'(u) (over U),
    its sums added to bdb (gradient of b) and those of DS act to bdh (gradient of h);
    unless C is NULL, C (d1 - d0, k) = W^T du."""
    cdef Py_ssize_t k = a.k, t = a.t, d, jj, j0, nj
    cdef floating* Uu = <floating*>ws.distinct_u
    cdef floating hd[HD_SPAN]
    cdef const floating* h = dense + 1 + k + t
    cdef floating* u
    cdef double ds, du
    for d in range(d0, d1):
        ds = ws.distinct_ds[ws.rep_slot[_rep_position(ws, d, &b)]]
        j0 = 0
        while j0 < t:
            u = Uu + d * t + j0
            nj = t - j0 if t - j0 < HD_SPAN else HD_SPAN
            _act_grad_h(h + j0, u, hd, nj, a.activation)
            for jj in range(nj):
                bdh[j0 + jj] = bdh[j0 + jj] + ds * <double>u[jj]
                du = ds * <double>hd[jj]
                bdb[j0 + jj] = bdb[j0 + jj] + du
                u[jj] = <floating>du
            j0 += nj
    if C == NULL:
        return
    for jj in range((d1 - d0) * k):
        C[jj] = 0
    _gemm(d1 - d0, k, t, Uu + d0 * t, t, 1, W, k, <floating*>ws.W_packed, C, k)


cdef void _backward_group(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t g,
                          const floating* dense, const floating* W,
                          floating* occ_vx) noexcept nogil:
    """Step 2 for backward group g: du (_du_block) of the group's distinct pairs,
    its sums into backward_grad_b and backward_grad_h row g; unless freeze_fm, per row
    de (_row_de) with C'_d added
    for the row's representative pairs, C' formed DBLOCK distinct pairs at a time into
    this thread's cprime_block just before the rows that read it."""
    cdef Py_ssize_t k = a.k, t = a.t, b, jj, r, r_end, n, q0
    cdef Py_ssize_t b0 = ws.backward_group_start[g], b1 = ws.backward_group_start[g + 1]
    cdef Py_ssize_t d1 = ws.row_first_distinct[b1], s0 = ws.row_first_distinct[b0], s1 = s0
    cdef int th = omp_get_thread_num()
    cdef floating* C = <floating*>ws.cprime_block + th * DBLOCK * k
    cdef floating* dvx = <floating*>ws.row_dvx + th * ws.row_cap * k
    cdef double* bdb = ws.backward_grad_b + g * t
    cdef double* bdh = ws.backward_grad_h + g * t
    for jj in range(t):
        bdb[jj] = 0
        bdh[jj] = 0
    if a.freeze_fm:
        while s1 < d1:
            s0 = s1
            s1 = s0 + DBLOCK if s0 + DBLOCK < d1 else d1
            _du_block(a, ws, s0, s1, b0, dense, W, bdb, bdh, NULL)
        return
    for b in range(b0, b1):
        q0 = ws.row_start[b]
        _row_de(a, ws, b, occ_vx, dvx)
        r = ws.row_first_distinct[b]
        r_end = ws.row_first_distinct[b + 1]
        while r < r_end:
            if r == s1:
                s0 = s1
                s1 = s0 + DBLOCK if s0 + DBLOCK < d1 else d1
                _du_block(a, ws, s0, s1, b, dense, W, bdb, bdh, C)
            n = (r_end if r_end < s1 else s1) - r
            _rep_grad(occ_vx + q0 * k, n,
                      ws.rep_occ + 2 * (ws.row_pair_start[b] + r - ws.row_first_distinct[b]), q0,
                      C + (r - s0) * k, k, dvx)
            r += n
        _store_row_grad(a, ws, b, dvx, occ_vx)


cdef inline Py_ssize_t _dw_chunk_count(Py_ssize_t n_pairs) noexcept nogil:
    """Chunks of the W gradient for n_pairs distinct pairs: DW_CHUNKS, or one a block of
    DBLOCK pairs when there are fewer blocks."""
    cdef Py_ssize_t nblk = (n_pairs + DBLOCK - 1) // DBLOCK
    return nblk if nblk < DW_CHUNKS else DW_CHUNKS


cdef void _dw_block(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t th, Py_ssize_t nth,
                    floating* partial) noexcept nogil:
    """Step 4, thread th of nth: the W gradient of each of its chunks of distinct pairs,
    partial[c, j, f] = sum_d du[d, j] e[d, f] over the chunk's pairs in order
    (ws.dw_partial).

    Chunk c is the blocks of DBLOCK pairs [c nblk / nch, (c + 1) nblk / nch) (nch from
    _dw_chunk_count), which depends on the batch only; _dw_sum adds the chunks up.
    Thread th takes the chunks [nch th / nth, nch (th + 1) / nth): the pairs of its home
    range in the passes that wrote E and DU (next_item_near), so that it reads them
    from its own caches. With more threads than chunks, each chunk's columns are split
    too, by whole vectors; every output is the same FMA chain whichever thread or tile
    computes it. Blocks of _dw_pairs pairs keep E's and DU's rows in cache across a
    chunk's share of W."""
    cdef Py_ssize_t k = a.k, t = a.t, n_pairs = a.n_distinct
    cdef Py_ssize_t nch = _dw_chunk_count(n_pairs), nblk = (n_pairs + DBLOCK - 1) // DBLOCK
    cdef Py_ssize_t width = _gemm_vector(sizeof(floating)), nvec = k // width
    cdef Py_ssize_t ncol = 1, items, item, c, g, n0, n1, d0, d1, P0, PB, P, j, f
    cdef const floating* E = <floating*>ws.distinct_e
    cdef const floating* DU = <floating*>ws.distinct_u
    cdef floating* part
    cdef floating* Ep = NULL
    if nch == 0:
        return
    if nth > nch and nvec > 1:
        ncol = (nth + nch - 1) // nch
        if ncol > nvec:
            ncol = nvec
    items = nch * ncol
    PB = _dw_pairs(k, t, sizeof(floating))
    if ws.dw_pack != NULL:     # E's rows are packed (AFMWorkspace._ensure_threads)
        Ep = <floating*>ws.dw_pack + th * PB * k
    for item in range(items * th // nth, items * (th + 1) // nth):
        c = item // ncol
        g = item % ncol
        n0 = (nvec * g // ncol) * width if ncol > 1 else 0
        n1 = (nvec * (g + 1) // ncol) * width if g + 1 < ncol else k
        d0 = (nblk * c // nch) * DBLOCK
        d1 = (nblk * (c + 1) // nch) * DBLOCK
        if d1 > n_pairs:
            d1 = n_pairs
        part = partial + c * t * k
        for j in range(t):
            for f in range(n0, n1):
                part[j * k + f] = 0
        P0 = d0
        while P0 < d1:
            P = d1 - P0 if d1 - P0 < PB else PB
            if Ep != NULL:
                _pack_b(n1 - n0, P, E + P0 * k + n0, k, Ep)
            _gemm(t, n1 - n0, P, DU + P0 * t, 1, t, E + P0 * k + n0, k, Ep,
                  part + n0, k)
            P0 += P


cdef void _dw_sum(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t th, Py_ssize_t nth,
                  floating* grad_W) noexcept nogil:
    """Thread th of nth: its share of grad_W = the chunks' W gradients (_dw_block) added
    up in double, in chunk order (0 without distinct pairs)."""
    cdef Py_ssize_t n = a.t * a.k, nch = _dw_chunk_count(a.n_distinct)
    cdef Py_ssize_t e0 = n * th // nth, e1 = n * (th + 1) // nth, s0, ns, c, i
    cdef double acc[DW_SUM_SPAN]
    cdef const floating* part
    s0 = e0
    while s0 < e1:
        ns = e1 - s0 if e1 - s0 < DW_SUM_SPAN else DW_SUM_SPAN
        for i in range(ns):
            acc[i] = 0
        for c in range(nch):
            part = <floating*>ws.dw_partial + c * n + s0
            for i in range(ns):
                acc[i] = acc[i] + <double>part[i]
        for i in range(ns):
            grad_W[s0 + i] = <floating>acc[i]
        s0 += ns


cdef inline void _row_de(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                         const floating* occ_vx, floating* dvx) noexcept nogil:
    """Step 2 for row b, without the C' terms: dvx (n, k) = sum over the row's pairs of
    de v_other, de = a' dg."""
    cdef Py_ssize_t k = a.k, q0 = ws.row_start[b]
    _pair_grad_row(occ_vx + q0 * k, <floating*>ws.row_dg + b * k,
                   ws.pair_weight_kept + ws.row_pair_start[b],
                   ws.row_start[b + 1] - q0, k, dvx)


cdef inline void _store_row_grad(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t b,
                                 const floating* dvx, floating* occ_vx) noexcept nogil:
    """Row b's d(v x) scaled by x (each occurrence's contribution to its V row's
    gradient), over the row's v x in occ_vx, which no later pass reads: the gradients stay in
    the cache lines just read."""
    cdef Py_ssize_t k = a.k, q0 = ws.row_start[b], i, f
    cdef floating x
    cdef floating* d1
    for i in range(ws.row_start[b + 1] - q0):
        x = (<floating*>ws.occ_x)[q0 + i]
        d1 = occ_vx + (q0 + i) * k
        for f in range(k):
            d1[f] = dvx[i * k + f] * x


cdef void _backward_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                          floating* occ_vx) noexcept nogil:
    """Step 2 without attention (de only), for the rows of chunk c."""
    cdef floating* dvx = <floating*>ws.row_dvx + omp_get_thread_num() * ws.row_cap * a.k
    cdef Py_ssize_t b
    for b in range(ws.chunk_start[c], ws.chunk_start[c + 1]):
        _row_de(a, ws, b, occ_vx, dvx)
        _store_row_grad(a, ws, b, dvx, occ_vx)


cdef void _feature_update(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t u, floating* V,
                          floating* w, floating* sV0, floating* sV1, floating* sw0,
                          floating* sw1) noexcept nogil:
    """Step 3 for touched feature u: gradient summed over its occurrences in batch order,
    + l2 v, then the optimiser (unless freeze_fm), GRAD_SPAN columns at a time;
    ||v||^2 before the update (0 when l2 = 0)."""
    cdef Py_ssize_t k = a.k, f, f0, nf, pos, q
    cdef Py_ssize_t j = ws.group_feature[u]
    cdef floating* v = V + j * k
    cdef floating g[GRAD_SPAN]
    cdef double gd[GRAD_SPAN]
    cdef const floating* DVX = <floating*>ws.occ_vx   # the occurrences' gradients since step 2
    cdef const floating* occ_x = <floating*>ws.occ_x
    cdef const floating* d
    cdef double gw = 0
    cdef double l2 = a.l2
    cdef Py_ssize_t nnz = ws.row_start[a.B], j_next
    if u + a.prefetch_features < a.n_touched:
        # a later feature's rows (V and optimiser state are tables larger than cache)
        j_next = ws.group_feature[u + a.prefetch_features]
        prefetch_row(V + j_next * k, k * sizeof(floating))
        if not a.freeze_fm:
            prefetch_row(sV0 + j_next * k, k * sizeof(floating))
            if a.opt.code == OPT_ADAM or a.opt.code == OPT_MOMENTUM:
                prefetch_row(sV1 + j_next * k, k * sizeof(floating))
            if a.prefetch_v:
                __builtin_prefetch(w + j_next)
                __builtin_prefetch(sw0 + j_next)
    # the l2 terms only when l2 > 0: at l2 = 0 they cost a k = 256 step for nothing
    ws.group_sqnorm[u] = dot_d(v, v, k) if l2 != 0 else 0.0
    if a.freeze_fm:
        return
    if l2 == 0 and ws.group_start[u + 1] - ws.group_start[u] == 1:
        # One occurrence (most features of a sparse batch): its gradient row is the V
        # row's as it stands (a double sum of one term rounds back to it exactly).
        pos = ws.group_start[u]
        if pos + AFM_PREFETCH < nnz:
            prefetch_row(DVX + ws.grp_occ[pos + AFM_PREFETCH] * k, k * sizeof(floating))
        opt_vec(&a.opt, v, sV0 + j * k, sV1 + j * k, DVX + ws.grp_occ[pos] * k, k, False)
    else:
        f0 = 0
        while f0 < k:
            nf = k - f0 if k - f0 < GRAD_SPAN else GRAD_SPAN
            for f in range(nf):
                gd[f] = 0
            for pos in range(ws.group_start[u], ws.group_start[u + 1]):
                if f0 == 0 and pos + AFM_PREFETCH < nnz:
                    prefetch_row(DVX + ws.grp_occ[pos + AFM_PREFETCH] * k,
                                  k * sizeof(floating))
                d = DVX + ws.grp_occ[pos] * k + f0
                for f in range(nf):
                    gd[f] = gd[f] + d[f]
            if l2 != 0:
                for f in range(nf):
                    g[f] = <floating>(gd[f] + l2 * <double>v[f0 + f])
            else:
                for f in range(nf):
                    g[f] = <floating>gd[f]
            opt_vec(&a.opt, v + f0, sV0 + j * k + f0, sV1 + j * k + f0, g, nf, False)
            f0 += nf
    for pos in range(ws.group_start[u], ws.group_start[u + 1]):
        q = ws.grp_occ[pos]
        gw = gw + ws.residual[ws.grp_row[pos]] * <double>occ_x[q]
    opt_elem(&a.opt, w + j, sw0 + j, sw1 + j, <floating>gw)


cdef int _step_nogil(AFMArgs* a, AFMWorkspace ws, const floating* values,
                     const floating* y, floating* V, floating* w, floating* W,
                     floating* dense, floating* sV, floating* sw, floating* sW,
                     floating* sd, double* loss_out) noexcept nogil:
    cdef Py_ssize_t B = a.B, k = a.k, t = a.t, M = a.M, D = 1 + a.k + 2 * a.t
    cdef Py_ssize_t b, f, j, c, u, lo, hi, th, it, tail, n_items
    cdef int nt = a.n_threads, err, rank
    cdef floating* grad_W = <floating*>ws.grad_W
    cdef floating* gd = <floating*>ws.grad_dense
    cdef const double* row
    cdef double* dense_grad_sum = ws.dense_grad_sum
    cdef double loss = 0, d
    cdef floating l2a = <floating>a.l2_attention
    cdef unsigned int csr

    cdef double t0 = omp_get_wtime()
    err = _prepare(a, ws, values, V, w, W, ws.phase_t)
    if err:
        return err
    ws.phase_t[0] -= t0
    ws.phase_t[1] -= t0
    ws.phase_t[2] = omp_get_wtime() - t0
    _distinct_logits(a, ws, dense)
    ws.phase_t[3] = omp_get_wtime() - t0
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        c = next_item_near(ws.cursors, a.n_chunks, nt, threadid(), &rank)
        while c < a.n_chunks:
            _forward_chunk(a, ws, c, y, dense)
            c = next_item_near(ws.cursors, a.n_chunks, nt, threadid(), &rank)
        ftz_leave(csr)
    ws.phase_t[4] = omp_get_wtime() - t0
    if a.attention:
        # as the numbering (_distinct_pairs): popular classes first, own classes rare
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for it in prange(feature_items(a.n_touched, CLASS_TAIL), schedule="dynamic"):
                for c in range(feature_item_start(it, a.n_touched, CLASS_TAIL),
                               feature_item_start(it + 1, a.n_touched, CLASS_TAIL)):
                    _sum_ds(a, ws, c)
            ftz_leave(csr)
        if a.n_own_classes > 0:
            with parallel(num_threads=nt):
                csr = ftz_enter()
                for c in prange(ws.u_cap, a.n_classes, schedule="dynamic", chunksize=256):
                    _sum_ds(a, ws, c)
                ftz_leave(csr)
    ws.phase_t[5] = omp_get_wtime() - t0
    if a.attention:
        _backward_groups(a, ws)
        reset_cursors(ws.cursors, nt)
        with parallel(num_threads=nt):
            csr = ftz_enter()
            rank = 0
            c = next_item_near(ws.cursors, a.n_backward_groups, nt, threadid(), &rank)
            while c < a.n_backward_groups:
                _backward_group(a, ws, c, dense, W, <floating*>ws.occ_vx)
                c = next_item_near(ws.cursors, a.n_backward_groups, nt, threadid(), &rank)
            ftz_leave(csr)
    elif not a.freeze_fm:
        with parallel(num_threads=nt):
            csr = ftz_enter()
            for c in prange(a.n_chunks, schedule="dynamic", chunksize=2):
                _backward_chunk(a, ws, c, <floating*>ws.occ_vx)
            ftz_leave(csr)
    ws.phase_t[6] = omp_get_wtime() - t0

    # step 2, serial: row-order sums
    for j in range(D):
        dense_grad_sum[j] = 0
    for b in range(B):
        loss += ws.row_loss[b]
        dense_grad_sum[0] += ws.residual[b]
    for c in range(a.n_chunks):
        row = ws.chunk_grad_p + c * k
        for f in range(k):
            dense_grad_sum[1 + f] += row[f]
    if a.attention:
        for c in range(a.n_backward_groups):
            row = ws.backward_grad_b + c * t
            for j in range(t):
                dense_grad_sum[1 + k + j] += row[j]
            row = ws.backward_grad_h + c * t
            for j in range(t):
                dense_grad_sum[1 + k + t + j] += row[j]
    for j in range(D):
        gd[j] = <floating>dense_grad_sum[j]
    ws.phase_t[7] = omp_get_wtime() - t0

    # Popular features have many occurrences: items handed out dynamically balance the
    # threads, and each feature's arithmetic is the same whichever thread runs it. They
    # run straight after de, whose gradient rows they read, and before dW (which does not
    # need them), whose stream of E and DU would evict those rows (docs/performance.md,
    # "AFM phase order").
    tail = feature_tail(k * <Py_ssize_t>sizeof(floating))
    n_items = feature_items(a.n_touched, tail)
    reset_cursors(ws.cursors, nt)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        rank = 0
        it = next_item_near(ws.cursors, n_items, nt, threadid(), &rank)
        while it < n_items:
            for u in range(feature_item_start(it, a.n_touched, tail),
                           feature_item_start(it + 1, a.n_touched, tail)):
                _feature_update(a, ws, u, V, w, sV, sV + M * k, sw, sw + M)
            it = next_item_near(ws.cursors, n_items, nt, threadid(), &rank)
        ftz_leave(csr)
    ws.phase_t[8] = omp_get_wtime() - t0

    if a.attention:
        for th in prange(nt, schedule="static", num_threads=nt):
            csr = ftz_enter()
            _dw_block(a, ws, th, nt, <floating*>ws.dw_partial)
            ftz_leave(csr)
        for th in prange(nt, schedule="static", num_threads=nt):
            csr = ftz_enter()
            _dw_sum(a, ws, th, nt, grad_W)
            ftz_leave(csr)
        for j in range(t * k):
            grad_W[j] = grad_W[j] + l2a * W[j]
        loss += 0.5 * a.l2_attention * dot_d(W, W, t * k)
    d = 0
    for u in range(a.n_touched):
        d += ws.group_sqnorm[u]
    loss += 0.5 * a.l2 * d
    ws.phase_t[9] = omp_get_wtime() - t0

    lo = 1 if a.freeze_fm else 0
    hi = D if a.attention else 1 + k
    opt_vec(&a.opt, dense + lo, sd + lo, sd + D + lo, gd + lo, hi - lo, True)
    if a.attention:
        opt_vec(&a.opt, W, sW, sW + t * k, grad_W, t * k, True)
    loss_out[0] = loss
    ws.phase_t[10] = omp_get_wtime() - t0
    return 0
