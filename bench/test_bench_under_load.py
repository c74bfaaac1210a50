"""pytest-benchmark timings of fit beside a competing process (group "under load"): one
pure-Python busy loop (``bench/load.py``) runs for this module and is killed after it;
``afmfast.FM(n_factors=16)`` and ``afmfast.AFM(n_factors=16, attention_size=16)`` fit 3
epochs of ``afmfast.demo.make_demo_data`` rows at the default thread count
(``n_threads=None``) and at ``n_threads=1``. On an N-CPU machine the loop leaves N - 1
CPUs free, so a default thread count that ignores it should show here.

Run: ``pytest bench/test_bench_under_load.py --benchmark-only --benchmark-group-by=group``
(``python bench/compare.py --load 1`` gives the same comparison on frappe-mini, with
PyTorch and the quiet machine side by side).
"""
import pytest

from afmfast.demo import make_demo_data

from bench_common import make_estimator
from load import Load

N_ROWS = 10_000
EPOCHS = 3


@pytest.fixture(scope="module")
def busy_loop():
    """One busy loop for the whole module, killed by its id afterwards."""
    with Load(1, "busy") as load:
        yield load


@pytest.fixture(scope="module")
def data():
    return make_demo_data(n_rows=N_ROWS, seed=0).train


@pytest.mark.benchmark(group="under load")
@pytest.mark.parametrize("n_threads", [None, 1], ids=["default-threads", "1-thread"])
@pytest.mark.parametrize("model", ["fm", "afm"])
def test_fit_beside_busy_loop(benchmark, busy_loop, data, model, n_threads):
    def fit():
        return make_estimator(model, 16, threads=n_threads, n_epochs=EPOCHS).fit(data)

    fit()  # JIT (Numba) and thread pools outside the timing
    benchmark.extra_info.update(model=model, k=16, n_threads=n_threads, rows=data.n_rows,
                                epochs=EPOCHS, busy_loops=len(busy_loop.pids))
    est = benchmark(fit)
    assert len(est.history_) == EPOCHS
    assert all(p.poll() is None for p in busy_loop.procs)  # the load ran throughout
