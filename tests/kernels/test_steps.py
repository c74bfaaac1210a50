"""``fm_steps`` / ``afm_steps`` (runs of batches in one kernel call, as fit uses them):
the same losses and parameters as ``*_step`` batch by batch, a stop after a non-finite
loss, and clear errors, in every backend."""
import numpy as np
import pytest
from helpers.backends import BACKENDS

import afmfast
from afmfast.demo import make_demo_data
from afmfast.models.training import Trainer


CASES = [(name, model) for name in BACKENDS for model in ("fm", "afm")]
BATCH = 256


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=3000, seed=0)  # 2400 training rows: 9 full batches + 96


def fresh_trainer(demo, backend, model, threads=2):
    est = (afmfast.FM(n_factors=8) if model == "fm" else afmfast.AFM(n_factors=8))
    est.set_params(batch_size=BATCH, n_threads=threads, backend=backend, random_state=11,
                   verbose=0)
    est._validate()
    return Trainer(est, demo.train, adaptive=False)


@pytest.mark.parametrize("backend,model", CASES)
def test_steps_are_the_single_steps(demo, backend, model):
    X, y = demo.train.X, demo.train.y
    order = np.random.default_rng(5).permutation(len(y)).astype(np.int64)
    one = fresh_trainer(demo, backend, model)
    singles = [one.train_batch(X, y, order[s:s + BATCH], 40 + i)
               for i, s in enumerate(range(0, len(y), BATCH))]
    run = fresh_trainer(demo, backend, model)
    losses = np.full(len(singles), -1.0)
    assert run.train_run(X, y, order, BATCH, 40, losses) == len(singles)
    np.testing.assert_array_equal(losses, singles)
    for a, b in zip(run.params + run.state, one.params + one.state):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend,model", CASES)
def test_steps_stop_after_a_non_finite_loss(demo, backend, model):
    X, y = demo.train.X, demo.train.y.copy()
    order = np.arange(len(y), dtype=np.int64)
    y[2 * BATCH + 7] = np.inf  # in the third batch
    trainer = fresh_trainer(demo, backend, model)
    losses = np.full(-(-len(y) // BATCH), -1.0)
    assert trainer.train_run(X, y, order, BATCH, 0, losses) == 3
    assert np.all(np.isfinite(losses[:2])) and not np.isfinite(losses[2])
    assert np.all(losses[3:] == -1.0)


@pytest.mark.parametrize("backend,model", CASES)
def test_steps_reject_bad_arguments(demo, backend, model):
    X, y = demo.train.X, demo.train.y
    trainer = fresh_trainer(demo, backend, model)
    steps = getattr(trainer.backend, f"{model}_steps")
    order = np.arange(1000, dtype=np.int64)

    def call(rows, batch_size, n_losses):
        return steps(X, y, rows, batch_size, trainer.params, trainer.state,
                     trainer.config(0), trainer.workspace, np.empty(n_losses))

    before = [a.copy() for a in trainer.params]
    with pytest.raises(ValueError, match="losses"):
        call(order, BATCH, 3)  # 4 batches
    with pytest.raises(ValueError, match="batch_size"):
        call(order, 0, 1)
    with pytest.raises(ValueError, match="at least one row"):
        call(order[:0], BATCH, 0)
    if backend == "cython":
        with pytest.raises(ValueError, match="batch_size"):
            call(order, BATCH + 1, 4)  # larger than the workspace
    bad = order.copy()
    bad[BATCH + 5] = len(y)  # in the second batch
    with pytest.raises(ValueError, match=r"rows\[261\]" if backend == "cython" else "rows"):
        call(bad, BATCH, 4)
    # the first batch ran before the bad one was found; nothing else changed it
    first_only = fresh_trainer(demo, backend, model)
    first_only.train_batch(X, y, order[:BATCH], 0)
    for a, b in zip(trainer.params, first_only.params):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(trainer.params, before))


@pytest.mark.parametrize("backend,model", CASES)
def test_steps_mark_the_touched_features(demo, backend, model):
    """track_touched: the marks are exactly the ids of the trained rows, the training is
    unchanged, and None stops the marking."""
    X, y = demo.train.X, demo.train.y
    order = np.random.default_rng(3).permutation(len(y))[:130].astype(np.int64)
    plain = fresh_trainer(demo, backend, model)
    marked = fresh_trainer(demo, backend, model)
    marks = np.zeros(marked.params.V.shape[0], np.uint8)
    marked.workspace = marked.backend.track_touched(marked.workspace, marks)
    for trainer in (plain, marked):  # batches of 40 rows: few enough to miss features
        assert trainer.train_run(X, y, order, 40, 0, np.empty(4)) == 4
    for a, b in zip(marked.params + marked.state, plain.params + plain.state):
        np.testing.assert_array_equal(a, b)
    indptr, indices = demo.train.indptr, demo.train.indices
    expected = np.unique(np.concatenate([indices[indptr[r]:indptr[r + 1]] for r in order]))
    assert 0 < len(expected) < len(marks)
    np.testing.assert_array_equal(np.flatnonzero(marks), expected)
    assert set(np.unique(marks)) == {0, 1}
    marks[...] = 0
    marked.workspace = marked.backend.track_touched(marked.workspace, None)
    marked.train_run(X, y, order, 40, 4, np.empty(4))
    assert not marks.any()


@pytest.mark.parametrize("backend,model", CASES)
def test_track_touched_rejects_bad_marks(demo, backend, model):
    trainer = fresh_trainer(demo, backend, model)
    M = trainer.params.V.shape[0]
    for bad in (np.zeros(M, np.int32), np.zeros(M + 1, np.uint8), np.zeros((M, 2), np.uint8),
                np.zeros(2 * M, np.uint8)[::2], [0] * M):
        with pytest.raises(ValueError, match="track_touched"):
            trainer.backend.track_touched(trainer.workspace, bad)
    read_only = np.zeros(M, np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="track_touched"):
        trainer.backend.track_touched(trainer.workspace, read_only)
