"""Flush-to-zero and denormals-are-zero in the kernels (kernels.api's "Denormals"), every
backend: denormal inputs and parameters count as zero and no result is denormal; the
caller's MXCSR and every pool thread's are as they were after a call; the same bits for
1 and 2 threads; and the mechanism behind the slow-down of AFM's reference settings
(l2_attention=100 drives attention_W_ into denormals: none are left).

Where the machine has no MXCSR (not x86) the kernels compute denormals as the hardware
does and these tests are skipped.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers.backends import BACKENDS
from helpers.paths import TESTS
from helpers.problems import copy_tuple, make_afm_problem, make_cfg, make_problem

import afmfast
from afmfast.kernels.numba import common as nbc
from afmfast.kernels import api
from afmfast.kernels import reference as ref
from afmfast.kernels.backends import get_backend
from afmfast.demo import make_demo_data

pytestmark = pytest.mark.skipif(not nbc.HAVE_MXCSR, reason="no MXCSR on this machine")

CONTROL = 0xFFC0  # MXCSR without its six sticky status flags
TINY = {np.float32: np.finfo(np.float32).tiny, np.float64: np.finfo(np.float64).tiny}
DENORMAL = {np.float32: np.float32(1e-39), np.float64: 1e-310}


@pytest.fixture(params=BACKENDS)
def name(request):
    """Each available backend's name (its FM and AFM modules come from get_backend)."""
    return request.param


def read_mxcsr():
    return int(nbc.current_mxcsr())


def n_denormal(a):
    a = np.asarray(a)
    return int(((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)).sum())


def flushed(a):
    """a with its denormals replaced by zeros of their sign (what DAZ reads)."""
    a = np.asarray(a)
    return np.where(np.abs(a) < np.finfo(a.dtype).tiny, a * 0, a)


def test_constants_agree():
    assert nbc.FTZ_DAZ_BITS == 0x8040
    if "cython" in BACKENDS:
        from afmfast import _fm_cython
        c = _fm_cython._constants()
        assert c["HAVE_MXCSR"] and c["FTZ_DAZ_BITS"] == 0x8040


def test_enter_leave_round_trip():
    before = read_mxcsr()
    assert before & 0x8040 == 0, "the test process should start without FTZ/DAZ"
    old = nbc.ftz_enter()
    assert read_mxcsr() & 0x8040 == 0x8040
    assert np.float32(1e-39) * np.float32(1) == 0  # NumPy on this thread flushes too
    nbc.ftz_leave(old)
    assert read_mxcsr() & CONTROL == before & CONTROL


# ------------------------------------------------- (a) which values flush, exactly

def _fm_tiny_problem(dtype):
    """FM whose prediction is sum w x with every w denormal, y = 0: with DAZ the
    prediction, residual, loss and gradient are 0 and the touched w become 0."""
    rng = np.random.default_rng(3)
    X, y, params = make_problem(rng, 12, 9, 3, [2, 3], dtype=dtype)
    X = (X[0], np.minimum(X[1], 6).astype(np.int32), np.abs(X[2]))  # features 7, 8 untouched
    y[:] = 0
    params.V[:] = 0
    params.dense[:] = 0
    params.w[:] = DENORMAL[dtype] * np.arange(1, 10)
    return X, y, params


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fm_step_flushes_denormal_weights(name, dtype):
    backend = get_backend(name, "fm")
    X, y, params = _fm_tiny_problem(dtype)
    rows = np.arange(12, dtype=np.int64)
    cfg = make_cfg(lr=0.5, l2=0.0, keep=1.0, optimizer=api.SGD, batch_norm=0)
    # without FTZ (the NumPy reference) the predictions are tiny but not zero
    assert np.all(ref.fm_predict(X, params, 0) != 0)
    for threads in (1, 2):
        p = copy_tuple(params)
        state = api.new_opt_state(p, api.SGD)
        ws = backend.fm_workspace(12, 40, 9, 3, dtype)
        loss = backend.fm_step(X, y, rows, p, state, cfg._replace(n_threads=threads), ws)
        assert loss == 0.0
        assert np.all(p.w[:7] == 0), "touched weights: 0 - lr * 0 with DAZ"
        assert np.array_equal(p.w[7:], params.w[7:]), "untouched weights are not read"
        out = np.empty(12, dtype=dtype)
        backend.fm_predict(X, params, 0, threads, out)
        assert np.all(out == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_afm_step_flushes_denormal_weights(name, dtype):
    backend = get_backend(name, "afm")
    rng = np.random.default_rng(5)
    X, y, params = make_afm_problem(rng, 12, 9, 3, 4, [2, 3], dtype=dtype)
    X = (X[0], np.minimum(X[1], 6).astype(np.int32), np.abs(X[2]))
    y[:] = 0
    params.V[:] = 0
    params.dense[0] = 0
    params.w[:] = DENORMAL[dtype] * np.arange(1, 10)
    rows = np.arange(12, dtype=np.int64)
    cfg = api.AFMStepConfig(lr=0.5, l2=0.0, l2_attention=0.0, keep_attention=1.0,
                            keep_pooled=1.0, optimizer=api.SGD, attention=1,
                            activation=api.RELU, freeze_fm=0, seed=1, step=0, n_threads=1,
                            loss=api.SQUARED)
    for threads in (1, 2):
        p = copy_tuple(params)
        state = api.new_opt_state(p, api.SGD)
        ws = backend.afm_workspace(12, 40, 40, 9, 3, 4, dtype)
        loss = backend.afm_step(X, y, rows, p, state, cfg._replace(n_threads=threads), ws)
        assert loss == 0.0
        assert np.all(p.w[:7] == 0)
        assert np.array_equal(p.w[7:], params.w[7:])
        out = np.empty(12, dtype=dtype)
        backend.afm_predict(X, params, 1, api.RELU, threads, out)
        assert np.all(out == 0)


# --------------------------- (a) + (c) denormal parameters count as zero, any threads

def _with_denormals(params, rng, dtype):
    """params with a fifth of every array's entries set to denormals of both signs, and
    the same params with zeros there."""
    den, zero = copy_tuple(params), copy_tuple(params)
    for a, z in zip(den, zero):
        where = rng.random(a.shape) < 0.2
        a[where] = DENORMAL[dtype] * rng.choice([-3, -1, 1, 2], size=int(where.sum()))
        z[where] = 0
    return den, zero


def assert_runs_equal_to_the_first(runs):
    """Every (losses, params, predictions) run has the first one's losses and predictions
    bit for bit, and its parameters once denormals are read as zeros."""
    for losses, p, out in runs[1:]:
        assert losses == runs[0][0]
        for name in p._fields:
            assert np.array_equal(flushed(getattr(p, name)),
                                  flushed(getattr(runs[0][1], name))), name
        assert np.array_equal(out, runs[0][2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_afm_denormal_parameters_count_as_zero(name, dtype):
    backend = get_backend(name, "afm")
    rng = np.random.default_rng(8)
    X, y, params = make_afm_problem(rng, 40, 15, 4, 5, [3, 5, 2], dtype=dtype)
    den, zero = _with_denormals(params, rng, dtype)
    rows = np.arange(40, dtype=np.int64)
    cfg = api.AFMStepConfig(lr=0.1, l2=0.1, l2_attention=5.0, keep_attention=0.8,
                            keep_pooled=0.7, optimizer=api.ADAGRAD, attention=1,
                            activation=api.RELU, freeze_fm=0, seed=4, step=2, n_threads=1,
                            loss=api.SQUARED)
    runs = []
    for start, threads in ((den, 1), (den, 2), (zero, 2)):
        p = copy_tuple(start)
        state = api.new_opt_state(p, api.ADAGRAD)
        ws = backend.afm_workspace(40, 200, 400, 15, 4, 5, dtype)
        losses = [backend.afm_step(X, y, rows, p, state, cfg._replace(
            n_threads=threads, step=s), ws) for s in range(3)]
        out = np.empty(40, dtype=dtype)
        backend.afm_predict(X, p, 1, api.RELU, threads, out)
        runs.append((losses, p, out))
    assert_runs_equal_to_the_first(runs)
    for name in ("V", "W"):  # every entry of these was updated: none is denormal
        assert n_denormal(getattr(runs[0][1], name)) == 0, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fm_denormal_parameters_count_as_zero(name, dtype):
    backend = get_backend(name, "fm")
    rng = np.random.default_rng(9)
    X, y, params = make_problem(rng, 40, 15, 4, [3, 5, 2], dtype=dtype)
    params.bn_stats[1] = np.abs(params.bn_stats[1])  # no denormal variance below
    den, zero = _with_denormals(params._replace(bn_stats=params.bn_stats[:0]), rng, dtype)
    den = den._replace(bn_stats=params.bn_stats.copy())
    zero = zero._replace(bn_stats=params.bn_stats.copy())
    rows = np.arange(40, dtype=np.int64)
    runs = []
    for start, threads in ((den, 1), (den, 2), (zero, 2)):
        p = copy_tuple(start)
        state = api.new_opt_state(p, api.ADAGRAD)
        ws = backend.fm_workspace(40, 200, 15, 4, dtype)
        cfg = make_cfg(lr=0.1, l2=0.1, keep=0.8, batch_norm=1, n_threads=threads)
        losses = [backend.fm_step(X, y, rows, p, state, cfg._replace(step=s), ws)
                  for s in range(3)]
        out = np.empty(40, dtype=dtype)
        backend.fm_predict(X, p, 1, threads, out)
        runs.append((losses, p, out))
    assert_runs_equal_to_the_first(runs)


# ------------------------------------------- (b) every thread's MXCSR is put back

def _every_kernel(name, threads):
    """Call each kernel of backend ``name`` once on ``threads`` threads."""
    backend = get_backend(name, "afm")
    rng = np.random.default_rng(1)
    X, y, params = make_afm_problem(rng, 30, 12, 4, 4, [3, 4], dtype=np.float32)
    rows = np.arange(30, dtype=np.int64)
    state = api.new_opt_state(params, api.ADAGRAD)
    cfg = api.AFMStepConfig(lr=0.1, l2=0.0, l2_attention=1.0, keep_attention=1.0,
                            keep_pooled=0.5, optimizer=api.ADAGRAD, attention=1,
                            activation=api.RELU, freeze_fm=0, seed=1, step=0,
                            n_threads=threads, loss=api.SQUARED)
    ws = backend.afm_workspace(15, 100, 100, 12, 4, 4, np.float32)
    backend.afm_step(X, y, rows[:15], params, state, cfg, ws)
    backend.afm_steps(X, y, rows, 15, params, state, cfg, ws, np.zeros(2))
    out = np.empty(30, np.float32)
    backend.afm_predict(X, params, 1, api.RELU, threads, out)
    n = np.diff(X[0])
    pind = np.r_[0, np.cumsum(n * (n - 1) // 2)].astype(np.int64)
    bufs = [np.empty(pind[-1], np.int64), np.empty(pind[-1], np.int64),
            np.empty(pind[-1], np.float32), np.empty(pind[-1], np.float32)]
    backend.afm_explain(X, params, 1, api.RELU, threads, pind, *bufs)
    backend = get_backend(name, "fm")
    fX, fy, fp = make_problem(rng, 30, 12, 4, [3, 4], dtype=np.float32)
    fs = api.new_opt_state(fp, api.ADAGRAD)
    fws = backend.fm_workspace(15, 100, 12, 4, np.float32)
    fcfg = make_cfg(n_threads=threads)
    backend.fm_step(fX, fy, rows[:15], fp, fs, fcfg, fws)
    backend.fm_steps(fX, fy, rows, 15, fp, fs, fcfg, fws, np.zeros(2))
    backend.fm_predict(fX, fp, 1, threads, out)


@pytest.mark.parametrize("threads", [1, 2])
def test_caller_mxcsr_unchanged(name, threads):
    before = read_mxcsr()
    _every_kernel(name, threads)
    assert read_mxcsr() & CONTROL == before & CONTROL


_POOL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import numba
    sys.path[:0] = {path!r}
    from test_denormals import _every_kernel
    from afmfast.kernels.numba import common as nbc

    @numba.njit(parallel=True)
    def numba_threads_mxcsr(out, seen):
        for i in numba.prange(64):
            t = numba.get_thread_id()
            out[t] = nbc.mxcsr_read()
            seen[t] = 1

    # the kernels are the first parallel code of the process: their pools are created
    # during the calls (a created thread copies its creator's MXCSR)
    _every_kernel({name!r}, 2)
    seen = []
    if {name!r} == "cython":
        from afmfast import _fm_cython
        seen += list(_fm_cython._thread_mxcsrs_for_test(2).values())
    out = np.zeros(numba.config.NUMBA_NUM_THREADS, np.uint32)
    ran = np.zeros_like(out)
    numba_threads_mxcsr(out, ran)
    seen += [int(v) for v, r in zip(out, ran) if r]
    print(" ".join(hex(v) for v in seen))
""")


def test_pool_threads_mxcsr_unchanged(name, tmp_path):
    """In a new process (so that the thread pools start inside a kernel call), no pool
    thread keeps FTZ or DAZ after the kernels ran on 2 threads. It runs in an empty
    folder: from the checkout, ``python -c`` would import its uncompiled afmfast."""
    # its path: this folder (test_denormals) and tests/ (the helpers test_denormals imports)
    script = _POOL_SCRIPT.format(path=[str(Path(__file__).resolve().parent), str(TESTS)],
                                 name=name)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    values = [int(v, 16) for v in done.stdout.split()]
    assert len(values) >= 2
    assert all(v & 0x8040 == 0 for v in values), done.stdout


# ------------------ (d) the reference settings no longer leave denormals in attention_W_

def test_reference_settings_leave_no_denormals(name):
    """AFM's defaults (l2_attention=100, learning_rate=0.1) shrink attention_W_ towards 0:
    without FTZ, 14 of these 64 entries were denormal after 30 epochs (and on Frappe 7%
    of them after 20, which made every later epoch several times slower on CPUs that
    take a microcode assist per denormal). With FTZ they are flushed to 0 instead."""
    data = make_demo_data(n_rows=4000, seed=0)
    model = afmfast.AFM(n_factors=8, attention_size=8, n_epochs=30, batch_size=256,
                        n_threads=1, backend=name, early_stopping=False, verbose=0)
    model.fit(data.train)
    assert model.l2_attention == 100.0 and model.learning_rate == 0.1
    assert n_denormal(model.attention_W_) == 0
    assert n_denormal(model._params.V) == 0
