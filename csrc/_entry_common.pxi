# Textually included by both kernel modules (_fm_cython.pyx and _afm_cython.pyx): the
# parts of their Python entry points that do not depend on the model. Each module
# defines, before the include, its own `_steps_typed` (the fused-type batch loop over
# its workspace type); an include, unlike a cimport, compiles this code into each
# module's own translation unit, so nothing here adds a call across modules.


def _check_keep(name, keep):
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {keep}")


def _steps(X, y, rows, batch_size, params, state, cfg, ws, losses, single):
    """The module's batch loop for params.V's dtype (float32 or float64)."""
    dt = params.V.dtype
    if dt == np.float32:
        return _steps_typed[float](params.V, X, y, rows, batch_size, losses, params,
                                   state, cfg, ws, single)
    if dt == np.float64:
        return _steps_typed[double](params.V, X, y, rows, batch_size, losses, params,
                                    state, cfg, ws, single)
    raise ValueError(f"params.V must be float32 or float64, got {dt}")


def _one_step(X, y, rows, params, state, cfg, ws):
    """The loss of one batch of all of ``rows`` (the module's *_step entry point)."""
    loss = np.empty(1)
    _steps(X, y, rows, len(rows), params, state, cfg, ws, loss, True)
    return float(loss[0])


cdef dict _phase_seconds(const double* phase_end):
    """{phase: seconds} from a workspace's phase end times (seconds since the start of
    its last step), phases named by the module's PHASES."""
    return {name: phase_end[i] - (phase_end[i - 1] if i else 0.0)
            for i, name in enumerate(PHASES)}


def track_touched(ws, marks):
    """kernels.api's ``track_touched``: from now on every batch that ``ws`` trains sets
    ``marks[j] = 1`` for each feature j it touches (None stops); returns the workspace
    to train with (``ws`` itself)."""
    ws.track_touched(marks)
    return ws


def shuffled_rows(n_rows, seed, epoch, n_threads, out=None):
    """The epoch order of afmfast.kernels.api (a permutation of range(n_rows), int64, from
    (seed, epoch); the same for any n_threads), computed on n_threads threads, into
    ``out`` when given (kernels.api.order_buffer checks it).

    Example: order = shuffled_rows(len(y), 2016, epoch, 2)
    """
    return shuffled_rows_array(n_rows, seed, epoch, team_size(n_threads), _api, out)


def _dropout_mask_for_test(seed, stream, step, rows, n_units, keep):
    """The kernels' dropout mask, bool (len(rows), n_units), to compare with
    kernels.api.dropout_mask bit for bit."""
    r = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.ones((r.shape[0], n_units), dtype=np.uint8)
    fill_dropout_mask(r, out, seed, stream, step, keep)
    return out.astype(bool)
