"""pytest-benchmark timings of the epoch order (group "epoch order"): each backend's
``shuffled_rows`` (kernels.api's permutation of the rows, computed in parallel) on 1 and 2
threads, against NumPy's ``Generator.permutation``, which ``fit`` called before, for
2,000,000 rows (the synthetic ml-tag of bench/compare.py). Run:
``pytest bench/test_bench_epoch_order.py --benchmark-only``.
"""
import numpy as np
import pytest

from afmfast.kernels.backends import available_backends, get_backend

N_ROWS = 2_000_000


@pytest.mark.benchmark(group="epoch order")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", available_backends("fm"))
def test_shuffled_rows(benchmark, backend, threads):
    shuffled_rows = get_backend(backend, "fm").shuffled_rows
    shuffled_rows(1000, 1, 0, threads)  # JIT (Numba) and thread pool
    epochs = iter(range(10**6))
    order = benchmark(lambda: shuffled_rows(N_ROWS, 2016, next(epochs), threads))
    assert order.shape == (N_ROWS,)


@pytest.mark.benchmark(group="epoch order")
def test_numpy_permutation(benchmark):
    rng = np.random.default_rng(2016)
    order = benchmark(lambda: rng.permutation(N_ROWS))
    assert order.shape == (N_ROWS,)
