# Part of _afm_cython.pyx (textually included: one extension module, one C
# translation unit, so inlining and vectorisation are as in one file).
# The Python entry points of training: afm_step and afm_steps, and their checks.

def _check_activation(activation):
    if activation not in (ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_IDENTITY):
        raise ValueError(f"activation must be one of {sorted(_api.ACTIVATION_CODES.values())}"
                         f" (kernels.api codes), got {activation}")


cdef Py_ssize_t _steps_typed(floating[:, ::1] V, X, y_arr, rows_arr, batch_size,
                              double[::1] losses, params, state, cfg, AFMWorkspace ws,
                              bint single) except -1:
    """Batches rows[i batch_size:(i + 1) batch_size] at steps cfg.step + i, losses[i] =
    their losses; stops after the first non-finite loss. Returns the batches run.
    single: called by afm_step (see check_batches)."""
    cdef unsigned int csr
    cdef const int64_t[::1] indptr = X[0]
    cdef const int32_t[::1] indices = X[1]
    cdef const floating[::1] values = X[2]
    cdef const floating[::1] y = y_arr
    cdef const int64_t[::1] rows = rows_arr
    cdef floating[::1] w = params.w
    cdef floating[:, ::1] W = params.W
    cdef floating[::1] dense = params.dense
    cdef floating[:, :, ::1] sV = state.V
    cdef floating[:, ::1] sw = state.w
    cdef floating[:, :, ::1] sW = state.W
    cdef floating[:, ::1] sd = state.dense
    cdef AFMArgs a
    cdef Py_ssize_t M = V.shape[0], k = V.shape[1], t = W.shape[0], D
    cdef Py_ssize_t i, n_batches = losses.shape[0], n_done = 0, first, bs
    cdef uint64_t step0
    cdef double loss = 0
    cdef int err = 0
    cdef double keep0 = cfg.keep_attention, keep1 = cfg.keep_pooled
    cdef int n_threads = team_size(cfg.n_threads)
    D = 1 + k + 2 * t

    if (ws.itemsize != sizeof(floating) or ws.n_factors != k or ws.n_features != M
            or ws.attention_size != t):
        raise ValueError(
            f"workspace {ws!r} does not fit parameters V {(M, k)}, W {(t, W.shape[1])} "
            f"{params.V.dtype}: build it with afm_workspace(..., n_features={M}, "
            f"n_factors={k}, attention_size={t}, dtype={params.V.dtype})")
    check_batches(rows.shape[0], batch_size, n_batches, ws.batch_size, single)
    bs = batch_size
    check_step_arrays(min(bs, rows.shape[0]), ws.batch_size, indptr.shape[0],
                      y.shape[0], indices.shape[0], values.shape[0],
                      indptr[indptr.shape[0] - 1] if indptr.shape[0] > 0 else 0, n_threads)
    if (w.shape[0] != M or W.shape[1] != k or dense.shape[0] != D
            or sV.shape[0] != 2 or sV.shape[1] != M or sV.shape[2] != k
            or sw.shape[0] != 2 or sw.shape[1] != M or sW.shape[0] != 2
            or sW.shape[1] != t or sW.shape[2] != k or sd.shape[0] != 2
            or sd.shape[1] != D):
        raise ValueError(f"params/state shapes are inconsistent with V {(M, k)} and W "
                         f"{(t, k)}: see afmfast.kernels.api")
    _check_keep("cfg.keep_attention", keep0)
    _check_keep("cfg.keep_pooled", keep1)
    _check_activation(cfg.activation)

    a.k = k
    a.t = t
    a.M = M
    a.prefetch_v = prefetch_table_rows(M * k * <Py_ssize_t>sizeof(floating), n_threads)
    a.prefetch_features = feature_prefetch_distance(k * <Py_ssize_t>sizeof(floating))
    a.n_rows = indptr.shape[0] - 1
    a.nnz_cap = ws.max_batch_nnz
    a.pair_cap = ws.max_batch_pairs
    a.n_threads = n_threads
    a.attention = 1 if cfg.attention else 0
    a.loss = loss_code_from(cfg)
    a.activation = cfg.activation
    a.freeze_fm = 1 if cfg.freeze_fm else 0
    a.drop_att = 1 if (a.attention and keep0 < 1.0) else 0
    a.drop_pool = 1 if keep1 < 1.0 else 0
    a.l2 = cfg.l2
    a.l2_attention = cfg.l2_attention
    a.inv_keep_att = 1.0 / keep0
    a.inv_keep_pool = 1.0 / keep1
    a.seed = as_u64(cfg.seed)
    step0 = as_u64(cfg.step)
    a.thr_att = dropout_threshold(keep0)
    a.thr_pool = dropout_threshold(keep1)
    a.indptr = &indptr[0]
    a.row_width = checked_row_width(X, indptr)
    a.indices = &indices[0] if indices.shape[0] > 0 else NULL
    a.opt = opt_cfg_from(cfg, _api)
    a.err.pos = 0
    a.err.value = 0
    ws._ensure_threads(n_threads)

    with nogil:
        csr = ftz_enter_caller(a.n_threads)
        for i in range(n_batches):
            first = i * bs
            a.B = min(bs, rows.shape[0] - first)
            a.rows = &rows[first]
            a.step = step0 + <uint64_t>i
            err = _step_nogil(&a, ws, &values[0] if values.shape[0] > 0 else NULL, &y[0],
                              &V[0, 0], &w[0], &W[0, 0], &dense[0], &sV[0, 0, 0],
                              &sw[0, 0], &sW[0, 0, 0], &sd[0, 0], &loss)
            if not batch_recorded(err, &a.err, first, loss, &losses[0], &n_done):
                break
        ftz_leave(csr)
    raise_batch_error(err, &a.err, a.n_rows, M, ws.max_batch_nnz, ws.max_batch_pairs)
    return n_done


def afm_step(X, y, rows, params, state, cfg, AFMWorkspace ws):
    """One AFM training step on the batch ``rows`` of (X, y); see the module docstring.

    Returns the batch loss 1/2 sum (y - y_hat)^2 + l2_attention/2 ||W||^2 (attention on)
    + l2/2 sum_touched ||V_row||^2 at the parameters before the update; mutates params,
    state and ws.

    Example: loss = afm_step(X, y, perm[:4096], params, state, cfg, ws)
    """
    return _one_step(X, y, rows, params, state, cfg, ws)


def afm_steps(X, y, rows, batch_size, params, state, cfg, AFMWorkspace ws, losses):
    """Training steps on the batches rows[i batch_size:(i + 1) batch_size] at steps
    cfg.step + i, losses[i] their losses, in one loop without the GIL (kernels.api's
    afm_steps). Returns the batches run.

    Example: n_done = afm_steps(X, y, perm[:40960], 4096, params, state, cfg, ws, np.empty(10))
    """
    return _steps(X, y, rows, batch_size, params, state, cfg, ws, losses, False)
