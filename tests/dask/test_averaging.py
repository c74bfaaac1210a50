"""afmfast.dask.averaging without a cluster: the bfloat16 changes a worker sends and the
merge every worker runs, against plain NumPy."""
import numpy as np
import pytest

pytest.importorskip("distributed")

from afmfast.dask.averaging import (  # noqa: E402
    export,
    from_bfloat16,
    merge_into,
    to_bfloat16,
)


def test_bfloat16_rounds_to_nearest_even_and_keeps_the_special_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(
        np.float32)
    back = from_bfloat16(to_bfloat16(x))
    # round to nearest: at most half a unit in the last place, 2^-8 relative
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)
    # bfloat16 values come back exactly, ties go to the even mantissa
    assert np.array_equal(from_bfloat16(to_bfloat16(back)), back)
    one = np.float32(1.0)
    ties = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)  # halfway cases
    assert from_bfloat16(to_bfloat16(ties)).tolist() == [1.0, 1 + 2 * 2.0 ** -7]
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38], np.float32)
    out = from_bfloat16(to_bfloat16(special))
    assert out[:2].tolist() == [np.inf, -np.inf] and np.signbit(out[3])
    assert np.isinf(out[4])  # above bfloat16's largest finite value: rounds to inf
    assert np.isnan(from_bfloat16(to_bfloat16(np.array([np.nan], np.float32))))[0]
    assert one == from_bfloat16(to_bfloat16([one]))[0]


def reference_merge(changes, synced, additive):
    """The merge in float64 NumPy: synchronised value plus the sum (or the mean over
    the workers that touched the row) of the workers' rounded changes."""
    total = np.zeros_like(synced, np.float64)
    touched = np.zeros(len(synced), np.int64)
    for ids, change in changes:
        total[ids] += change
        touched[ids] += 1
    out = synced.astype(np.float64).copy()
    rows = touched > 0
    step = total[rows] if additive else total[rows] / touched[rows, None]
    out[rows] += step
    return out


@pytest.mark.parametrize("additive", [True, False])
def test_three_workers_merge_to_the_reference_on_every_table(additive):
    rng = np.random.default_rng(1)
    n_rows, widths = 50, (4, 1, 4, 1)
    synced = [rng.standard_normal((n_rows, w)).astype(np.float32) for w in widths]
    workers = []
    for seed in range(3):
        ids = np.sort(rng.choice(n_rows, 20 + 5 * seed, replace=False)).astype(np.int32)
        live = [s.copy() for s in synced]
        for table in live:
            table[ids] += rng.standard_normal((len(ids), table.shape[1])).astype(
                np.float32) * 0.1
        workers.append((ids, live))
    payloads = [export(live, synced, [np.full(2, i, np.float32)], ids, 1 + i)
                for i, (ids, live) in enumerate(workers)]
    # what each worker sent is its change, rounded to bfloat16
    for (ids, live), p in zip(workers, payloads):
        for t, table in enumerate(live):
            assert np.array_equal(p.deltas[t], to_bfloat16(table[ids] - synced[t][ids]))
    results = []
    for ids, live in workers:  # every worker merges the same payloads into its copy
        rows = [t.copy() for t in live]
        base = [s.copy() for s in synced]
        dense, dense_base = [np.zeros(2, np.float32)], [np.zeros(2, np.float32)]
        count = np.zeros(n_rows, np.int32)
        merge_into(payloads, rows, base, dense, dense_base,
                   ([additive] * 4, [additive]), count)
        assert not count.any()
        assert all(np.array_equal(r, b) for r, b in zip(rows, base))
        results.append(rows)
    for t in range(len(widths)):
        expected = reference_merge(
            [(p.ids, from_bfloat16(p.deltas[t]).astype(np.float64)) for p in payloads],
            synced[t], additive)
        np.testing.assert_allclose(results[0][t], expected, rtol=1e-6, atol=1e-6)
        # untouched rows keep their value; every worker ends bit-identical
        assert all(np.array_equal(r[t], results[0][t]) for r in results[1:])
    # dense: synced + the sum of the changes, or the mean of the copies
    assert dense[0].tolist() == ([3.0, 3.0] if additive else [1.0, 1.0])


def test_the_training_allocator_settings_are_held_until_the_last_fit_releases_them(
        monkeypatch):
    from afmfast.dask import memory

    calls = []
    monkeypatch.setattr(memory, "_libc", (lambda option, value: calls.append(
        (option, value)) or 1, lambda pad: calls.append(("trim", pad)) or 1))
    monkeypatch.setattr(memory, "_users", 0)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.acquire() and memory.acquire()  # two fits' actors in one process
    assert calls == list(memory.TRAINING.items())  # set once
    memory.release()
    assert len(calls) == 2  # one fit still trains
    memory.release()
    assert calls[2:] == [(memory.M_TRIM_THRESHOLD, 65536),
                         (memory.M_MMAP_THRESHOLD, memory.DEFAULT_THRESHOLD), ("trim", 0)]
    memory.release()  # an extra release changes nothing
    assert len(calls) == 5
