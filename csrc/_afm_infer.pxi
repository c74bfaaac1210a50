# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# Inference: afm_predict and afm_explain, and their workspace cache.

# ----- inference ------------------------------------------------------------------------
ctypedef struct InferArgs:
    Py_ssize_t k, t, M, max_n, max_pairs
    int attention, activation
    const int64_t* indptr
    const int32_t* indices
    const int64_t* pair_indptr     # NULL for predict


cdef floating _infer_row(const InferArgs* a, Py_ssize_t i, const floating* values,
                         const floating* V, const floating* w, const floating* WT,
                         const floating* dense, floating* vx_buf, int64_t* ids,
                         floating* E, floating* Uu, double* pair_weight, double* g,
                         int64_t* i_out, int64_t* j_out, floating* weight_out,
                         floating* contrib_out) noexcept nogil:
    """Score of row i (no dropout), and its pairs when a.pair_indptr is set."""
    cdef Py_ssize_t k = a.k, t = a.t, n = 0, q, f, P, n_pairs, i1, i2, jj, base
    cdef int32_t j
    cdef double lin = 0
    cdef floating x
    cdef const floating* v
    cdef floating* vx
    cdef floating* e
    cdef floating* u
    cdef const floating* p_vec = dense + 1
    cdef const floating* bias = dense + 1 + k
    cdef const floating* h = dense + 1 + k + t
    cdef double au
    for q in range(a.indptr[i], a.indptr[i + 1]):
        j = a.indices[q]
        if j < 0 or j >= a.M:
            continue
        x = values[q] if values != NULL else 1  # NULL: every value is 1
        v = V + <Py_ssize_t>j * k
        vx = vx_buf + n * k
        for f in range(k):
            vx[f] = v[f] * x
        lin += <double>w[j] * <double>x
        ids[n] = j
        n += 1
    n_pairs = n * (n - 1) // 2
    _pair_products(vx_buf, n, k, E)
    if a.attention and n_pairs > 0:
        _preactivation(E, n_pairs, k, t, bias, WT, NULL, Uu)
        _softmax(Uu, h, n_pairs, t, a.activation, Uu, pair_weight)
    else:
        for P in range(n_pairs):
            pair_weight[P] = 1.0
    _pool(pair_weight, E, n_pairs, k, g)
    if a.pair_indptr != NULL:
        base = a.pair_indptr[i]
        P = 0
        for i1 in range(n):
            for i2 in range(i1 + 1, n):
                i_out[base + P] = ids[i1]
                j_out[base + P] = ids[i2]
                weight_out[base + P] = <floating>pair_weight[P]
                contrib_out[base + P] = <floating>(pair_weight[P] * dot_d(p_vec, E + P * k, k))
                P += 1
    return <floating>(<double>dense[0] + lin + dot_d(p_vec, g, k))


cdef void _infer_typed(floating[:, ::1] V, X, params, attention, activation, n_threads,
                       pair_indptr_arr, i_arr, j_arr, weight_arr, contrib_arr) except *:
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] w = params.w
    cdef const floating[:, ::1] W = params.W
    cdef const floating[::1] dense = params.dense
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], t = W.shape[0]
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, max_n, max_pairs
    cdef int nt = n_threads, tid
    cdef unsigned int csr
    cdef InferArgs a
    cdef floating[::1] out
    cdef const int64_t[::1] pind
    cdef int64_t[::1] i_out, j_out
    cdef floating[::1] weight_out, contrib_out
    cdef int64_t* i_ptr = NULL
    cdef int64_t* j_ptr = NULL
    cdef floating* w_ptr = NULL
    cdef floating* c_ptr = NULL

    if nt < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    _check_activation(activation)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != 1 + k + 2 * t):
        raise ValueError("params shapes are inconsistent: see afmfast.kernels.api")
    check_indptr(indptr, indices.shape[0])
    if indices.shape[0] != values.shape[0] and values.shape[0]:
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    lengths = np.diff(np.asarray(indptr))
    max_n = int(lengths.max()) if n > 0 else 0
    max_pairs = max_n * (max_n - 1) // 2
    pind = pair_indptr_arr
    i_out = i_arr
    j_out = j_arr
    weight_out = weight_arr
    contrib_out = contrib_arr
    if pind.shape[0] != n + 1:
        raise ValueError(f"pair_indptr has {pind.shape[0]} entries, X has {n} rows "
                         f"(it needs n_rows + 1)")
    # pair counts of the rows from their nonzeros with ids in [0, M)
    idx = np.asarray(indices)[:indptr[n]]
    known = (idx >= 0) & (idx < M)
    row_of = np.repeat(np.arange(n), lengths)
    cnt = np.bincount(row_of[known], minlength=n).astype(np.int64)
    expect = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt * (cnt - 1) // 2, out=expect[1:])
    if not np.array_equal(expect, np.asarray(pind)):
        raise ValueError("pair_indptr does not match X: entry r + 1 must be entry r "
                         "plus n(n-1)/2 for row r's count n of ids in [0, n_features)")
    for name, arr in (("i_out", i_out), ("j_out", j_out), ("weight_out", weight_out),
                      ("contribution_out", contrib_out)):
        if arr.shape[0] != expect[n]:
            raise ValueError(f"{name} has {arr.shape[0]} entries, the rows have "
                             f"{expect[n]} pairs (pair_indptr[-1])")
    if expect[n] > 0:
        i_ptr = &i_out[0]
        j_ptr = &j_out[0]
        w_ptr = &weight_out[0]
        c_ptr = &contrib_out[0]
    a.pair_indptr = &pind[0]
    if n == 0:
        return
    dt = params.V.dtype
    WT_arr = np.ascontiguousarray(np.asarray(params.W).T)
    cdef const floating[:, ::1] WT = WT_arr
    # per-thread scratch, indexed by the OpenMP thread number
    cdef floating[:, ::1] vx_s = np.empty((nt, max(max_n * k, 1)), dtype=dt)
    cdef int64_t[:, ::1] id_s = np.empty((nt, max(max_n, 1)), dtype=np.int64)
    cdef floating[:, ::1] e_s = np.empty((nt, max(max_pairs * k, 1)), dtype=dt)
    cdef floating[:, ::1] u_s = np.empty((nt, max(max_pairs * t if attention else 1, 1)),
                                         dtype=dt)
    cdef double[:, ::1] a_s = np.empty((nt, max(max_pairs, 1)), dtype=np.float64)
    cdef double[:, ::1] g_s = np.empty((nt, k), dtype=np.float64)
    a.k = k
    a.t = t
    a.M = M
    a.max_n = max_n
    a.max_pairs = max_pairs
    a.attention = 1 if attention else 0
    a.activation = activation
    a.indptr = &indptr[0]
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    with nogil, parallel(num_threads=nt):
        csr = ftz_enter()
        for i in prange(n, schedule="static"):
            tid = omp_get_thread_num()
            _infer_row(&a, i, &values[0] if values.shape[0] > 0 else NULL,
                       &V[0, 0], &w[0], &WT[0, 0], &dense[0], &vx_s[tid, 0],
                       &id_s[tid, 0], &e_s[tid, 0], &u_s[tid, 0], &a_s[tid, 0],
                       &g_s[tid, 0], i_ptr, j_ptr, w_ptr, c_ptr)
        ftz_leave(csr)


cdef void _infer_chunk(const AFMArgs* a, AFMWorkspace ws, Py_ssize_t c,
                       const floating* dense, floating* out) noexcept nogil:
    """Prediction for the rows of chunk c (no dropout): softmax of the row's logits
    (looked up by distinct pair), pooled g, y_hat = w0 + w x + p . g into out[row]."""
    cdef Py_ssize_t k = a.k, b, n, P, P0, P1
    cdef double* pair_weight = ws.pair_weight
    cdef double* gp = ws.row_scratch + omp_get_thread_num() * 3 * k
    for b in range(ws.chunk_start[c], ws.chunk_start[c + 1]):
        n = ws.row_start[b + 1] - ws.row_start[b]
        P0 = ws.row_pair_start[b]
        P1 = ws.row_pair_start[b + 1]
        if a.attention and P1 > P0:
            _row_softmax(ws, P0, P1)
        else:
            for P in range(P0, P1):
                pair_weight[P] = 1.0
        _pool_row(<floating*>ws.occ_vx + ws.row_start[b] * k, pair_weight + P0, n, k, gp)
        out[a.rows[b]] = <floating>(<double>dense[0] + ws.row_linear[b]
                                    + dot_d(dense + 1, gp, k))


cdef int _predict_nogil(AFMArgs* a, AFMWorkspace ws, const floating* values,
                        const floating* V, const floating* w, const floating* W,
                        const floating* dense, floating* out) noexcept nogil:
    """The forward pass of a step on the rows a.rows (no dropout, no update), with the
    attention MLP once per distinct pair: scores into out[row]."""
    cdef Py_ssize_t c
    cdef int nt = a.n_threads, err
    cdef unsigned int csr
    err = _prepare(a, ws, values, V, w, W, NULL)
    if err:
        return err
    _distinct_logits(a, ws, dense)
    with parallel(num_threads=nt):
        csr = ftz_enter()
        for c in prange(a.n_chunks, schedule="dynamic", chunksize=2):
            _infer_chunk(a, ws, c, dense, out)
        ftz_leave(csr)
    return 0


def _predict_workspace(Py_ssize_t rows, Py_ssize_t nnz, Py_ssize_t pairs, Py_ssize_t M,
                       Py_ssize_t k, Py_ssize_t t, dtype):
    return AFMWorkspace(rows, max(nnz, 1), pairs, M, k, t, dtype, forward_only=True)


_predict_cache = _api.WorkspaceCache(_predict_workspace)


cdef Py_ssize_t _predict_typed(floating[:, ::1] V, X, params, attention, activation,
                               n_threads, floating[::1] out) except -1:
    """afm_predict for one dtype; returns the number of distinct pairs evaluated."""
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], n, r0, chunk_rows, n_eval = 0
    cdef int err = 0
    cdef unsigned int csr
    cdef AFMWorkspace ws
    cdef AFMArgs a
    indptr_a, indices_a, values_a = (np.asarray(X[0]), np.asarray(X[1]),
                                     np.asarray(X[2]))
    cdef const floating[::1] w = params.w
    cdef const floating[:, ::1] W = params.W
    cdef const floating[::1] dense = params.dense
    cdef Py_ssize_t t = W.shape[0]
    if n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads}")
    _check_activation(activation)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != 1 + k + 2 * t):
        raise ValueError("params shapes are inconsistent: see afmfast.kernels.api")
    n = indptr_a.shape[0] - 1
    check_indptr(indptr_a, indices_a.shape[0])
    if indices_a.shape[0] != values_a.shape[0] and values_a.shape[0] != 0:
        raise ValueError("X is not a valid CSR triple (indptr, indices, values)")
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} entries, X has {n} rows")
    if n == 0:
        return 0
    # every id left is valid, so the step's checks cannot fail
    indptr_a, indices_a, values_a = _api.known_ids((indptr_a, indices_a, values_a), M)
    chunk_rows, max_nnz, max_pairs = _api.predict_chunks(indptr_a, k)
    kept = _predict_cache.take((chunk_rows, max_nnz, max_pairs, M, k, t, params.V.dtype))
    ws = kept[1]
    ws._ensure_threads(n_threads)
    rows_a = np.arange(n, dtype=np.int64)
    cdef const int64_t[::1] indptr = indptr_a
    cdef const int32_t[::1] indices = indices_a
    cdef const floating[::1] values = values_a
    cdef const int64_t[::1] rows = rows_a
    a.k = k
    a.t = t
    a.M = M
    # predict writes no table: only a table's size calls for prefetching
    a.prefetch_v = prefetch_table_rows(M * k * <Py_ssize_t>sizeof(floating), 1)
    a.n_rows = n
    a.nnz_cap = ws.max_batch_nnz
    a.pair_cap = ws.max_batch_pairs
    a.n_threads = n_threads
    a.attention = 1 if attention else 0
    a.activation = activation
    a.freeze_fm = 1
    a.drop_att = 0
    a.drop_pool = 0
    a.indptr = &indptr[0]
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    a.err.pos = 0
    a.err.value = 0
    with nogil:
        csr = ftz_enter_caller(a.n_threads)
        r0 = 0
        while r0 < n:
            a.rows = &rows[r0]
            a.B = n - r0 if n - r0 < chunk_rows else chunk_rows
            a.n_distinct = 0
            err = _predict_nogil(&a, ws, &values[0] if values.shape[0] > 0 else NULL,
                                 &V[0, 0], &w[0], &W[0, 0], &dense[0], &out[0])
            if err:
                break
            n_eval += a.n_distinct if a.attention else 0
            r0 += chunk_rows
        ftz_leave(csr)
    _predict_cache.give_back(kept)
    raise_batch_error(err, &a.err, n, M, ws.max_batch_nnz, ws.max_batch_pairs)
    return n_eval


def afm_predict(X, params, attention, activation, n_threads, out):
    """Raw AFM scores of every row of X into ``out`` (n_rows,) of params' dtype: no
    dropout, ids outside [0, M) skipped (they form no pairs). Rows are processed in
    chunks (kernels.api.predict_chunks) with the training step's forward pass, the
    attention MLP once per distinct pair of a chunk. Returns the number of distinct
    pairs evaluated.

    Example: out = np.empty(n_rows, np.float32); afm_predict(X, params, 1, RELU, 2, out)
    """
    dt = params.V.dtype
    if dt == np.float32:
        return _predict_typed[float](params.V, X, params, bool(attention),
                                     int(activation), team_size(n_threads), out)
    elif dt == np.float64:
        return _predict_typed[double](params.V, X, params, bool(attention),
                                      int(activation), team_size(n_threads), out)
    else:
        raise ValueError(f"params.V must be float32 or float64, got {dt}")


def afm_explain(X, params, attention, activation, n_threads, pair_indptr, i_out, j_out,
                weight_out, contribution_out):
    """Per-pair attention of every row of X, as ``reference.afm_explain``: for the pairs
    p < q (row order) of each row's nonzeros with ids in [0, M), written from
    pair_indptr[row]: i_out/j_out (int64) the two feature ids, weight_out the attention
    weight a_pq (1.0 with attention off), contribution_out a_pq * p . e_pq (params'
    dtype). pair_indptr (n_rows + 1,) int64 is computed by the caller.

    Example: afm_explain(X, params, 1, RELU, 2, indptr, i, j, weight, contribution)
    """
    dt = params.V.dtype
    if dt == np.float32:
        _infer_typed[float](params.V, X, params, bool(attention), int(activation),
                            team_size(n_threads), pair_indptr, i_out, j_out, weight_out,
                            contribution_out)
    elif dt == np.float64:
        _infer_typed[double](params.V, X, params, bool(attention), int(activation),
                             team_size(n_threads), pair_indptr, i_out, j_out, weight_out,
                             contribution_out)
    else:
        raise ValueError(f"params.V must be float32 or float64, got {dt}")
