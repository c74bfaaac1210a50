"""Benchmarks of the AFM kernels of every available AFM backend (pytest-benchmark).

Groups
    afm_step:    one training step (Adagrad, keep (1.0, 0.5), relu: the reference AFM's
                 defaults), batch 4096, k = t in 16, 64, 256, n_threads 1 and 2.
    afm_predict: scores of 8,192 rows, same grid; ``distinct_pairs`` in extra_info is the
                 number of pairs whose attention it evaluated (once per distinct pair
                 of a chunk) and ``attention_gflop`` their 2 k t flops.
                 bench/predict_ratio.py sets predict against a training epoch.
    afm_matmul:  NumPy float32 (P x 256) @ (256 x 256) with P = 4096 * 45 (the pairs of one
                 batch), the yardstick for the attention products (docs/design.md).
Each afm_step case records ``attention_gflop`` (6 P k t / 1e9: forward W e, backward dW
and W^T du) in extra_info: attention_gflop / median is the rate of the attention product
if it were all the step did (a lower bound on the GEMM's own rate). Data:
``bench/synthetic.py`` (one-hot rows shaped like Frappe: 10 fields, 5,382 features).

Run: pytest bench/test_bench_afm_step.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from afmfast.kernels import api
from afmfast.kernels.backends import available_backends, get_backend

from synthetic import BATCH, N_FEATURES, N_ROWS, NNZ, PAIRS, batch_rows, frappe_like

N_PREDICT = 8192
BACKENDS = available_backends("afm")
SIZES = [16, 64, 256]


@pytest.fixture(scope="module")
def data():
    return frappe_like(N_ROWS)


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_afm_step(benchmark, data, backend, n_threads, k):
    mod = get_backend(backend, "afm")
    X, y = data
    t = k
    params = api.new_afm_params(N_FEATURES, k, t, np.random.default_rng(1), np.float32)
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = mod.afm_workspace(BATCH, BATCH * NNZ, BATCH * PAIRS, N_FEATURES, k, t, np.float32)
    perm = np.random.default_rng(2).permutation(N_ROWS).astype(np.int64)
    counter = [0]

    def step():
        s = counter[0]
        counter[0] += 1
        rows = batch_rows(perm, s)
        cfg = api.AFMStepConfig(lr=0.1, l2=0.0, l2_attention=100.0, keep_attention=1.0,
                                keep_pooled=0.5, optimizer=api.ADAGRAD, attention=1,
                                activation=api.RELU, freeze_fm=0, seed=0, step=s,
                                n_threads=n_threads)
        return mod.afm_step(X, y, rows, params, state, cfg, ws)

    step()  # compile (Numba) and fault the pages in outside the timing
    benchmark.group = "afm_step"
    benchmark.extra_info.update(backend=backend, k=k, t=t, n_threads=n_threads,
                                batch=BATCH, attention_gflop=6 * BATCH * PAIRS * k * t / 1e9)
    loss = benchmark.pedantic(step, rounds=5 if k >= 256 else 15, warmup_rounds=1)
    assert np.isfinite(loss)


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_afm_predict(benchmark, data, backend, n_threads, k):
    mod = get_backend(backend, "afm")
    X, _ = data
    n = N_PREDICT
    Xp = (X[0][:n + 1], X[1][:n * NNZ], X[2][:n * NNZ])
    params = api.new_afm_params(N_FEATURES, k, k, np.random.default_rng(1), np.float32)
    out = np.empty(n, dtype=np.float32)
    distinct = mod.afm_predict(Xp, params, 1, api.RELU, n_threads, out)
    benchmark.group = "afm_predict"
    benchmark.extra_info.update(backend=backend, k=k, t=k, n_threads=n_threads, rows=n,
                                distinct_pairs=distinct,
                                attention_gflop=2 * distinct * k * k / 1e9)
    benchmark.pedantic(mod.afm_predict, args=(Xp, params, 1, api.RELU, n_threads, out),
                       rounds=5, warmup_rounds=1)
    assert np.isfinite(out).all()


def test_numpy_matmul(benchmark):
    """The yardstick: NumPy's float32 matmul of one batch's pairs by a 256 x 256 matrix
    (BLAS threads as configured for the process)."""
    rng = np.random.default_rng(0)
    P = BATCH * PAIRS
    A = rng.normal(size=(P, 256)).astype(np.float32)
    B = rng.normal(size=(256, 256)).astype(np.float32)
    out = np.empty((P, 256), dtype=np.float32)
    benchmark.group = "afm_matmul"
    benchmark.extra_info.update(shape=(P, 256, 256), gflop=2 * P * 256 * 256 / 1e9)
    benchmark.pedantic(np.matmul, args=(A, B), kwargs=dict(out=out), rounds=10,
                       warmup_rounds=1)
