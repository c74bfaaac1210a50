"""Benchmarks of the FM kernels of every available backend (pytest-benchmark).

Groups
    fm_step:    one training step (Adagrad, batch norm on, keep 0.7: the production
                configuration), batch 4096, k 16 and 64, n_threads 1 and 2.
    fm_predict: scores of 32,768 rows, same grid.
Data: ``bench/synthetic.py`` (one-hot rows shaped like Frappe: 10 fields, one nonzero
each, 5,382 features, skewed popularity inside a field), so the benchmark runs without
the licensed data set.

Run: pytest bench/test_bench_fm_step.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from afmfast.kernels import api
from afmfast.kernels.backends import available_backends, get_backend

from synthetic import BATCH, N_FEATURES, N_ROWS, NNZ, batch_rows, frappe_like

BACKENDS = available_backends()


@pytest.fixture(scope="module")
def data():
    return frappe_like(N_ROWS)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fm_step(benchmark, data, backend, k, n_threads):
    mod = get_backend(backend)
    X, y = data
    params = api.new_fm_params(N_FEATURES, k, np.random.default_rng(1), np.float32)
    state = api.new_opt_state(params, api.ADAGRAD)
    ws = mod.fm_workspace(BATCH, BATCH * NNZ, N_FEATURES, k, np.float32)
    perm = np.random.default_rng(2).permutation(N_ROWS).astype(np.int64)
    counter = [0]

    def step():
        t = counter[0]
        counter[0] += 1
        rows = batch_rows(perm, t)
        cfg = api.StepConfig(lr=0.05, l2=1e-4, keep=0.7, optimizer=api.ADAGRAD,
                             batch_norm=1, seed=0, step=t, n_threads=n_threads)
        return mod.fm_step(X, y, rows, params, state, cfg, ws)

    step()  # compile (Numba) and fault the pages in outside the timing
    benchmark.group = "fm_step"
    benchmark.extra_info.update(backend=backend, k=k, n_threads=n_threads, batch=BATCH)
    loss = benchmark(step)
    assert np.isfinite(loss)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fm_predict(benchmark, data, backend, k, n_threads):
    mod = get_backend(backend)
    X, _ = data
    params = api.new_fm_params(N_FEATURES, k, np.random.default_rng(1), np.float32)
    out = np.empty(N_ROWS, dtype=np.float32)
    mod.fm_predict(X, params, 1, n_threads, out)
    benchmark.group = "fm_predict"
    benchmark.extra_info.update(backend=backend, k=k, n_threads=n_threads, rows=N_ROWS)
    benchmark(mod.fm_predict, X, params, 1, n_threads, out)
    assert np.isfinite(out).all()
