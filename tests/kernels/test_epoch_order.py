"""The epoch order (``shuffled_rows`` of every backend module, defined by
``kernels.api.shuffled_rows_reference``): the same permutation in every backend and for any
thread count, different per seed and epoch, uniform, and clear errors."""
import numpy as np
import pytest
from helpers.backends import BACKENDS

from afmfast.kernels import api
from afmfast.kernels.backends import get_backend


MODULES = [(name, model) for name in BACKENDS for model in ("fm", "afm")]


@pytest.fixture(params=MODULES, ids=lambda m: f"{m[0]}-{m[1]}")
def module(request):
    return get_backend(*request.param)


# sizes around the bucket boundaries: one bucket, two, several with a short last part
SIZES = (0, 1, 2, 10, api.SHUFFLE_BUCKET_ROWS, api.SHUFFLE_BUCKET_ROWS + 1, 50_003)


@pytest.mark.parametrize("n_rows", SIZES)
def test_order_is_the_reference_for_any_thread_count(module, n_rows):
    expected = api.shuffled_rows_reference(n_rows, 2016, 3)
    assert np.array_equal(np.sort(expected), np.arange(n_rows))
    for threads in (1, 2, 3):
        order = module.shuffled_rows(n_rows, 2016, 3, threads)
        assert order.dtype == np.int64 and order.flags.c_contiguous
        assert np.array_equal(order, expected), threads


def test_a_large_order_is_a_permutation_whatever_the_threads(module):
    n = 1_000_003  # 128 buckets
    one = module.shuffled_rows(n, 7, 1, 1)
    assert np.array_equal(np.sort(one), np.arange(n))
    assert np.array_equal(module.shuffled_rows(n, 7, 1, 2), one)


def test_seed_and_epoch_change_the_order(module):
    base = module.shuffled_rows(1000, 1, 1, 1)
    assert not np.array_equal(module.shuffled_rows(1000, 1, 2, 1), base)
    assert not np.array_equal(module.shuffled_rows(1000, 2, 1, 1), base)
    assert np.array_equal(module.shuffled_rows(1000, 1, 1, 2), base)


def test_orders_are_uniform():
    # one bucket: all 24 orders of 4 rows equally often
    counts = {}
    for epoch in range(4800):
        key = tuple(api.shuffled_rows_reference(4, 5, epoch))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    observed = np.array(list(counts.values()))
    chi2 = ((observed - 200.0) ** 2 / 200.0).sum()
    assert chi2 < 60, chi2  # 23 degrees of freedom: p < 1e-4 above 55
    # several buckets: where the first and the last row land, in 10 bins
    module = get_backend(BACKENDS[0], "fm")
    n = 3 * api.SHUFFLE_BUCKET_ROWS + 5  # 4 buckets
    bins = np.zeros((2, 10))
    for epoch in range(3000):
        order = module.shuffled_rows(n, 11, epoch, 2)
        where = np.argsort(order)
        bins[0, where[0] * 10 // n] += 1
        bins[1, where[n - 1] * 10 // n] += 1
    chi2 = ((bins - 300.0) ** 2 / 300.0).sum(axis=1)
    assert np.all(chi2 < 40), chi2  # 9 degrees of freedom: p < 1e-5 above 37


def test_bad_arguments_name_themselves(module):
    with pytest.raises(ValueError, match="n_rows"):
        module.shuffled_rows(-1, 1, 1, 1)
    with pytest.raises(ValueError, match="n_threads"):
        module.shuffled_rows(10, 1, 1, 0)


@pytest.mark.parametrize("n_rows", (0, 10, 50_003))
def test_the_order_goes_into_a_callers_buffer(module, n_rows):
    out = np.full(n_rows + 3, -1, np.int64)[:n_rows]  # a view: the buffer's start
    order = module.shuffled_rows(n_rows, 2016, 3, 2, out=out)
    assert order is out
    assert np.array_equal(out, api.shuffled_rows_reference(n_rows, 2016, 3))
    bad = [np.empty(n_rows, np.int32), np.empty(n_rows + 1, np.int64),
           np.empty(2 * n_rows + 2, np.int64)[::2][:n_rows + 1], [0] * n_rows]
    readonly = np.empty(n_rows, np.int64)
    readonly.flags.writeable = False
    for buffer in bad + [readonly] * (n_rows > 0):
        with pytest.raises(ValueError, match="out must be a writable C-contiguous int64"):
            module.shuffled_rows(n_rows, 2016, 3, 1, out=buffer)
