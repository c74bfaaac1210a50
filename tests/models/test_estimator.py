"""FM estimator: parameters protocol, validation, training loop, early stopping,
divergence, prediction semantics, warm start."""
import sys

import numpy as np
import pytest

import afmfast
from afmfast.kernels.backends import available_backends
from afmfast.demo import linear_baseline_rmse, make_demo_data
from afmfast.models.training import Trainer, early_stop_reason

FAST = dict(n_factors=8, n_epochs=3, batch_size=256, verbose=0)


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=4000, seed=3)


def test_constructor_stores_arguments_unchanged():
    kwargs = dict(n_factors=7, learning_rate=0.5, batch_size=3, n_epochs=2, keep=0.9,
                  batch_norm=False, l2=0.1, optimizer="adam", early_stopping=False, patience=3,
                  random_state=5, shuffle_unit=4, n_threads=1, adaptive_threads=False,
                  backend="numba", verbose=0, solver="mcmc", n_iter=7, n_burn_in=2,
                  init_stdev=0.5)
    model = afmfast.FM(**kwargs)
    assert model.get_params() == kwargs


def test_defaults_match_the_reference_settings():
    p = afmfast.FM().get_params()
    assert (p["n_factors"], p["learning_rate"], p["batch_size"], p["n_epochs"], p["keep"],
            p["batch_norm"], p["optimizer"], p["random_state"]) == \
        (16, 0.01, 4096, 20, 0.7, True, "adagrad", 2016)


def test_set_params_and_unknown_parameter():
    model = afmfast.FM().set_params(n_factors=4, keep=1.0)
    assert model.n_factors == 4 and model.keep == 1.0
    with pytest.raises(ValueError, match="invalid parameter 'n_factor'"):
        model.set_params(n_factor=3)


@pytest.mark.parametrize("name,value", [
    ("n_factors", 0), ("n_factors", 2.5), ("learning_rate", 0.0), ("learning_rate", -1),
    ("learning_rate", float("nan")), ("batch_size", 0), ("n_epochs", -1), ("keep", 0.0),
    ("keep", 1.5), ("l2", -0.1), ("optimizer", "rmsprop"), ("n_threads", 0),
    ("backend", "cuda"), ("random_state", -3), ("batch_norm", "yes"), ("verbose", -1),
])
def test_bad_arguments_name_the_argument(demo, name, value):
    model = afmfast.FM(**{**FAST, name: value})
    with pytest.raises(ValueError, match=name):
        model.fit(demo.train)
    assert getattr(model, name) is value


def test_fit_sets_fitted_attributes_and_keeps_arguments(demo):
    model = afmfast.FM(**FAST)
    before = model.get_params()
    assert model.fit(demo.train, validation=demo.valid) is model
    assert model.get_params() == before
    M = demo.train.n_features
    assert model.V_.shape == (M, 8) and model.w_.shape == (M,)
    assert isinstance(model.w0_, float)
    assert model.n_features_in_ == M
    assert [h["epoch"] for h in model.history_] == [1, 2, 3]
    assert set(model.history_[0]) == {"epoch", "train_loss", "valid_rmse", "seconds",
                                      "threads"}
    assert 1 <= model.history_[0]["threads"] <= model.n_threads_
    assert 1 <= model.best_epoch_ <= 3


def test_predict_before_fit_is_an_error(demo):
    with pytest.raises(ValueError, match="not fitted"):
        afmfast.FM().predict(demo.valid)


@pytest.mark.parametrize("backend", available_backends())
def test_same_seed_gives_identical_models_for_any_thread_count(demo, backend):
    a = afmfast.FM(**FAST, backend=backend, n_threads=1).fit(demo.train)
    b = afmfast.FM(**FAST, backend=backend, n_threads=1).fit(demo.train)
    c = afmfast.FM(**FAST, backend=backend, n_threads=2).fit(demo.train)
    np.testing.assert_array_equal(a.V_, b.V_)
    np.testing.assert_array_equal(a.V_, c.V_)
    np.testing.assert_array_equal(a.predict(demo.valid), c.predict(demo.valid))
    d = afmfast.FM(**FAST, backend=backend, random_state=99).fit(demo.train)
    assert not np.array_equal(a.V_, d.V_)


def test_backends_train_the_same_model(demo):
    if len(available_backends()) < 2:
        pytest.skip("needs both backends")
    a = afmfast.FM(**FAST, backend="cython").fit(demo.train)
    b = afmfast.FM(**FAST, backend="numba").fit(demo.train)
    np.testing.assert_allclose(a.predict(demo.valid), b.predict(demo.valid), atol=2e-3)


def test_fm_beats_the_best_linear_model_on_planted_interactions():
    data = make_demo_data(n_rows=12000, seed=4)
    model = afmfast.FM(n_factors=16, learning_rate=0.05, batch_size=512, n_epochs=25,
                       keep=1.0, batch_norm=False, verbose=0)
    model.fit(data.train, validation=data.valid)
    fm_rmse = model.evaluate(data.valid)["rmse"]
    assert fm_rmse < 0.8 * linear_baseline_rmse(data.train, data.valid)


def test_early_stopping_restores_the_best_epoch(demo, monkeypatch):
    scripted = iter([0.9, 0.8, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1])

    model = afmfast.FM(**{**FAST, "n_epochs": 10})
    real_measure = model._measure

    def fake_measure(data):
        scores, metrics = real_measure(data)
        return scores, ({"rmse": next(scripted)} if data is demo.valid else metrics)

    monkeypatch.setattr(model, "_measure", fake_measure)
    model.fit(demo.train, validation=demo.valid)
    # rose in each of epochs 4..7: stop after epoch 7, best was epoch 3
    assert len(model.history_) == 7
    assert model.best_epoch_ == 3
    ref = afmfast.FM(**{**FAST, "n_epochs": 3}).fit(demo.train)
    np.testing.assert_array_equal(model.V_, ref.V_)
    np.testing.assert_array_equal(model.predict(demo.valid), ref.predict(demo.valid))


def test_worse_four_times_rule():
    rmse = lambda v: [-x for x in v]  # noqa: E731  (goodness: higher is better)

    def worse_four_times(goodness):
        return early_stop_reason(goodness, int(np.argmax(goodness)) + 1, None) is not None

    assert not worse_four_times(rmse([1, 2, 3, 4, 5]))  # needs more than 5 epochs
    assert worse_four_times(rmse([1, 1, 2, 3, 4, 5]))
    assert not worse_four_times(rmse([1, 2, 3, 3, 4, 5]))
    assert worse_four_times([0.9, 0.9, 0.8, 0.7, 0.6, 0.5])  # e.g. AUC falling


def test_patience_stops_after_that_many_epochs_without_improvement(demo):
    """A validation set the model cannot learn: labels that are noise. With patience=2
    the fit stops 2 epochs after its best one and restores it; the default rule would
    go on."""
    noise = afmfast.Dataset(demo.valid.indptr, demo.valid.indices, demo.valid.values,
                            np.random.default_rng(0).normal(size=demo.valid.n_rows))
    model = afmfast.FM(**{**FAST, "n_epochs": 30, "patience": 2}).fit(
        demo.train, validation=noise)
    history = [h["valid_rmse"] for h in model.history_]
    assert len(history) == model.best_epoch_ + 2 < 30
    assert min(history) == history[model.best_epoch_ - 1]
    assert all(h >= min(history) for h in history[model.best_epoch_:])
    np.testing.assert_array_equal(model.evaluate(noise)["rmse"], min(history))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="patience"):
            afmfast.FM(patience=bad).fit(demo.train)


def test_evaluate_clips_to_the_training_labels_range(demo, tmp_path):
    model = afmfast.FM(**FAST).fit(demo.train)
    low, high = float(demo.train.y.min()), float(demo.train.y.max())
    assert model.y_range_ == (low, high)
    one = demo.valid[:1]
    score = float(model.predict(one)[0])
    y = float(one.y[0])
    expected = abs(y - min(max(score, low), high))
    assert model.evaluate(one)["rmse"] == pytest.approx(expected)
    assert model.evaluate(one, clip=None)["rmse"] == pytest.approx(abs(y - score))
    assert model.evaluate(one, clip=(score + 1, score + 2))["rmse"] == pytest.approx(
        abs(y - score - 1))
    for bad in ((2, 1), (0, np.inf), "test", 3, (1, 2, 3)):
        with pytest.raises(ValueError, match="clip"):
            model.evaluate(one, clip=bad)
    path = tmp_path / "m.afm"
    model.save(path)
    assert afmfast.load(path).y_range_ == (low, high)


def test_divergence_stops_with_a_message_and_keeps_finite_parameters(demo):
    model = afmfast.FM(**{**FAST, "n_epochs": 5}, learning_rate=1e30, optimizer="sgd",
                       batch_norm=False, keep=1.0)
    with pytest.raises(afmfast.TrainingDivergedError, match="learning_rate"):
        model.fit(demo.train)
    assert np.all(np.isfinite(model.V_)) and np.all(np.isfinite(model.w_))
    assert np.all(np.isfinite(model.predict(demo.valid)))


def test_unseen_feature_ids_contribute_nothing(demo):
    model = afmfast.FM(**FAST).fit(demo.train)
    M = model.n_features_in_
    valid = demo.valid
    # append one never-seen id (M + 5) to every row
    n = valid.n_rows
    lengths = np.diff(valid.indptr)
    indptr = np.concatenate([[0], np.cumsum(lengths + 1)]).astype(np.int64)
    indices = np.empty(indptr[-1], dtype=np.int32)
    values = np.ones(indptr[-1], dtype=np.float32)
    last = indptr[1:] - 1
    mask = np.ones(indptr[-1], bool)
    mask[last] = False
    indices[mask] = valid.indices
    values[mask] = valid.values
    indices[last] = M + 5
    wider = afmfast.Dataset(indptr, indices, values, valid.y, M + 6)
    assert wider.n_rows == n
    np.testing.assert_array_equal(model.predict(wider), model.predict(valid))


def test_evaluate_clips_predictions_like_the_reference(demo):
    model = afmfast.FM(**FAST).fit(demo.train)
    pred = model.predict(demo.valid).astype(np.float64)
    y = demo.valid.y.astype(np.float64)
    expected = np.sqrt(np.mean((y - np.clip(pred, y.min(), y.max())) ** 2))
    assert model.evaluate(demo.valid)["rmse"] == pytest.approx(expected, rel=1e-6)


def test_accepts_csr_and_dense_inputs(demo):
    sp = pytest.importorskip("scipy.sparse")
    tr = demo.train
    X = sp.csr_matrix((tr.values, tr.indices, tr.indptr), shape=(tr.n_rows, tr.n_features))
    a = afmfast.FM(**FAST).fit(X, tr.y)
    b = afmfast.FM(**FAST).fit(tr)
    c = afmfast.FM(**FAST).fit(X.toarray(), tr.y)
    np.testing.assert_array_equal(a.V_, b.V_)
    np.testing.assert_array_equal(a.V_, c.V_)
    np.testing.assert_array_equal(a.predict(X[:50]), b.predict(tr[np.arange(50)]))


def test_warm_start_copies_parameters_and_checks_shapes(demo):
    base = afmfast.FM(**FAST).fit(demo.train)
    warm = afmfast.FM(**{**FAST, "n_epochs": 0}).fit(demo.train, init_from=base)
    np.testing.assert_array_equal(warm.V_, base.V_)
    np.testing.assert_array_equal(warm.predict(demo.valid), base.predict(demo.valid))
    with pytest.raises(ValueError, match="n_factors"):
        afmfast.FM(**{**FAST, "n_factors": 4}).fit(demo.train, init_from=base)
    with pytest.raises(ValueError, match="n_features"):
        afmfast.FM(**FAST).fit(demo.train.with_n_features(demo.train.n_features + 1),
                               init_from=base)


def test_fit_twice_starts_from_scratch(demo):
    model = afmfast.FM(**FAST)
    first = model.fit(demo.train).V_.copy()
    second = model.fit(demo.train).V_
    np.testing.assert_array_equal(first, second)


def test_epoch_lines_like_the_reference(demo, capsys):
    afmfast.FM(**{**FAST, "verbose": 1}).fit(demo.train, validation=demo.valid,
                                             score_train=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Init: \t train=")
    assert out[1].startswith("Epoch 1 [") and "\ttrain loss=" in out[1]
    assert ", train=" in out[1] and ", validation=" in out[1]


def test_epoch_lines_by_default_report_the_running_loss_and_threads(demo, capsys):
    model = afmfast.FM(**{**FAST, "verbose": 1, "n_threads": 2, "adaptive_threads": False})
    model.fit(demo.train, validation=demo.valid)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Init: \t validation=")
    assert out[1].startswith("Epoch 1 [") and ", 2 of 2 threads]\ttrain loss=" in out[1]
    assert ", train=" not in out[1] and ", validation=" in out[1]
    assert "train_rmse" not in model.history_[0]
    assert model.n_threads_ == 2 and [h["threads"] for h in model.history_] == [2, 2, 2]
    # re-scoring changes what is reported, not what is trained
    scored = afmfast.FM(**FAST).fit(demo.train, score_train=True).history_
    assert [h["train_loss"] for h in scored] == [h["train_loss"] for h in model.history_]
    losses = [h["train_loss"] for h in scored]
    assert 0 < losses[-1] < losses[0] and all(h["train_rmse"] > 0 for h in scored)


def test_keyboard_interrupt_keeps_the_best_epoch_so_far(demo, monkeypatch):
    model = afmfast.FM(**{**FAST, "n_epochs": 10})
    real_run = Trainer.train_run
    steps_per_epoch = -(-demo.train.n_rows // FAST["batch_size"])

    def interrupting_run(trainer, X, y, rows, batch_size, step, losses, threads=None):
        if step >= 2 * steps_per_epoch:  # in epoch 3
            raise KeyboardInterrupt
        return real_run(trainer, X, y, rows, batch_size, step, losses, threads)

    monkeypatch.setattr(Trainer, "train_run", interrupting_run)
    with pytest.raises(KeyboardInterrupt) as info:
        model.fit(demo.train, validation=demo.valid)
    assert len(model.history_) == 2 and model.best_epoch_ in (1, 2)
    if sys.version_info >= (3, 11):  # the traceback says what the model kept
        assert info.value.__notes__ == [
            f"afmfast: fit was interrupted; the model keeps epoch {model.best_epoch_}."]
    ref = afmfast.FM(**{**FAST, "n_epochs": model.best_epoch_}).fit(demo.train)
    np.testing.assert_array_equal(model.V_, ref.V_)
    np.testing.assert_array_equal(model.predict(demo.valid), ref.predict(demo.valid))


def test_epoch_snapshots_are_reused_not_allocated_per_epoch(demo, monkeypatch):
    # fit keeps the best and the last good epoch's parameters: one copy while every
    # epoch improves, a second only once an epoch does not
    def count_allocations():
        real_snapshot, allocated = Trainer._snapshot, []

        def snapshot(trainer, into=None):
            allocated.append(into is None)
            return real_snapshot(trainer, into)

        monkeypatch.setattr(Trainer, "_snapshot", snapshot)
        return allocated

    plain = afmfast.FM(**{**FAST, "n_epochs": 4})
    allocated = count_allocations()
    plain.fit(demo.train)
    assert allocated == [True, False, False, False, False]

    scripted = iter([0.9, 0.8, 0.7, 0.75, 0.8, 0.85, 0.9])
    model = afmfast.FM(**{**FAST, "n_epochs": 7})
    real_measure = model._measure
    monkeypatch.setattr(model, "_measure", lambda data: (
        real_measure(data)[0], {"rmse": next(scripted)} if data is demo.valid
        else real_measure(data)[1]))
    allocated = count_allocations()
    model.fit(demo.train, validation=demo.valid)
    assert model.best_epoch_ == 3 and allocated.count(True) == 2
    ref = afmfast.FM(**{**FAST, "n_epochs": 3}).fit(demo.train)
    np.testing.assert_array_equal(model.V_, ref.V_)


def test_interrupt_while_the_best_epoch_is_copied_keeps_that_epoch(demo, monkeypatch):
    # the copy of an improved epoch overwrites the previous best in place; Ctrl-C in the
    # middle of it must keep the (complete) live parameters, not the half-written copy
    model = afmfast.FM(**{**FAST, "n_epochs": 5})
    real_snapshot = Trainer._snapshot

    def snapshot(trainer, into=None):
        if trainer.model is model and into is not None and len(model.history_) == 2:
            into.V[...] = 0.0  # half-written
            raise KeyboardInterrupt
        return real_snapshot(trainer, into)

    monkeypatch.setattr(Trainer, "_snapshot", snapshot)
    with pytest.raises(KeyboardInterrupt):
        model.fit(demo.train)
    assert model.best_epoch_ == 2
    ref = afmfast.FM(**{**FAST, "n_epochs": 2}).fit(demo.train)
    np.testing.assert_array_equal(model.V_, ref.V_)


def test_a_stray_huge_id_does_not_allocate_gigabytes(tmp_path):
    path = tmp_path / "huge.libfm"
    path.write_text("1 0:1 2000000000:1\n0 1:1 5:1\n")
    data = afmfast.load_libfm(path)
    assert data.n_features == 2_000_000_001 and not data.n_features_explicit
    with pytest.raises(ValueError, match=r"largest feature id is 2000000000.*n_features"):
        afmfast.FM(**FAST).fit(data)
    assert afmfast.load_libfm(path, n_features=2_000_000_001).n_features_explicit
    assert data[np.arange(1)].n_features_explicit is False
    assert data.with_n_features(2_000_000_005).n_features_explicit is False


def test_callbacks_receive_records_and_can_stop(demo):
    seen = []

    def stop_after_two(model, record):
        seen.append((model, record["epoch"], record["train_loss"]))
        return record["epoch"] == 2

    model = afmfast.FM(**{**FAST, "n_epochs": 6}).fit(demo.train, callbacks=[stop_after_two])
    assert [epoch for _, epoch, _ in seen] == [1, 2]
    assert seen[0][0] is model and len(model.history_) == 2 and model.best_epoch_ == 2


def test_verbose_2_draws_progress_on_stderr(demo, capsys, monkeypatch):
    from afmfast.models import training

    clock = iter(np.arange(0.0, 1e6, 0.3))  # every batch looks 0.3 s after the last
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    afmfast.FM(**{**FAST, "n_epochs": 1, "verbose": 2}).fit(demo.train)
    err = capsys.readouterr().err
    assert "Epoch 1: " in err and "rows/s" in err and "ETA" in err


def test_scipy_csc_and_coo_inputs_mean_the_same_rows(demo):
    sp = pytest.importorskip("scipy.sparse")
    tr = demo.train
    X = sp.csr_matrix((tr.values, tr.indices, tr.indptr), shape=(tr.n_rows, tr.n_features))
    model = afmfast.FM(**FAST).fit(X, tr.y)
    expected = model.predict(X)
    np.testing.assert_array_equal(model.predict(X.tocsc()), expected)
    np.testing.assert_array_equal(model.predict(X.tocoo()), expected)
    np.testing.assert_array_equal(afmfast.FM(**FAST).fit(X.tocsc(), tr.y).V_, model.V_)


def test_non_finite_inputs_are_refused_before_any_kernel_runs(demo):
    values = demo.train.values.copy()
    values[demo.train.indptr[7] + 1] = np.nan
    bad = afmfast.Dataset(demo.train.indptr, demo.train.indices, values, demo.train.y)
    with pytest.raises(ValueError, match="X: row 7 holds a NaN"):
        afmfast.FM(**FAST).fit(bad)
    y = demo.train.y.copy()
    y[3] = np.inf
    with pytest.raises(ValueError, match="y: labels must be finite"):
        afmfast.FM(**FAST).fit(demo.train, y)
    model = afmfast.FM(**FAST).fit(demo.train)
    with pytest.raises(ValueError, match="row 7"):
        model.predict(bad)
