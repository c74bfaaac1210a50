"""Binary classification: FMClassifier and AFMClassifier (logistic loss in the kernels),
labels, probabilities, metrics, persistence, scikit-learn."""
import numpy as np
import pytest

import afmfast
from afmfast.demo import make_demo_data

FAST = dict(n_factors=8, n_epochs=4, batch_size=256, learning_rate=0.05, verbose=0)


@pytest.fixture(scope="module")
def clicks():
    data = make_demo_data(n_rows=6000, seed=12)
    cut = np.median(data.train.y)
    return data, (data.train.y > cut).astype(int), (data.valid.y > cut).astype(int)


@pytest.mark.parametrize("cls,extra", [(afmfast.FMClassifier, {}),
                                       (afmfast.AFMClassifier, {"attention_size": 8})])
def test_learns_and_reports_probabilities(clicks, cls, extra):
    data, y_train, y_valid = clicks
    model = cls(**FAST, **extra).fit(data.train, y_train, validation=(data.valid, y_valid),
                                     score_train=True)
    assert model.classes_.tolist() == [0, 1]
    metrics = model.evaluate(data.valid, y_valid)
    assert set(metrics) == {"logloss", "auc", "accuracy"}
    assert metrics["auc"] > 0.75 and metrics["logloss"] < np.log(2)  # chance: 0.5, log 2
    proba = model.predict_proba(data.valid)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    scores = model.decision_function(data.valid)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-scores.astype(np.float64))),
                               rtol=1e-6)
    np.testing.assert_array_equal(model.predict(data.valid), (scores > 0).astype(int))
    assert {"train_logloss", "valid_auc", "valid_accuracy"} <= set(model.history_[0])


def test_minus_one_plus_one_labels_and_auc_monitor(clicks):
    data, y_train, y_valid = clicks
    model = afmfast.FMClassifier(**FAST).fit(data.train, 2 * y_train - 1,
                                             validation=(data.valid, 2 * y_valid - 1),
                                             metric="auc")
    assert model.classes_.tolist() == [-1, 1]
    assert set(np.unique(model.predict(data.valid))) <= {-1, 1}
    best = max(h["valid_auc"] for h in model.history_)
    assert model.history_[model.best_epoch_ - 1]["valid_auc"] == best


@pytest.mark.parametrize("labels,message", [
    ([0, 1, 2], "exactly two classes, but y holds 3 classes"),
    ([1, 1], "only one class"),
    (["a", "b", "c"], "3 classes"),
    ([0.5, 1.25, 2.0], "Unknown label type: continuous"),
])
def test_bad_labels(clicks, labels, message):
    data = clicks[0]
    y = np.resize(np.array(labels), data.train.n_rows)
    with pytest.raises(ValueError, match="^y: .*" + message):
        afmfast.FMClassifier(**FAST).fit(data.train, y)


@pytest.mark.parametrize("cls,extra", [(afmfast.FMClassifier, {}),
                                       (afmfast.AFMClassifier, {"attention_size": 4})])
@pytest.mark.parametrize("negative,positive", [(3, 7), ("no", "yes"), (False, True),
                                               (0.5, 1.0), (-2.5, 10.0)])
def test_any_two_labels(clicks, cls, extra, negative, positive, tmp_path):
    """Two labels of any kind train exactly the model that {0, 1} trains (the second
    sorted label is the positive one), predict those labels, and survive a save."""
    data, y01, _ = clicks
    y = np.where(y01 == 1, positive, negative)
    params = {**FAST, "n_epochs": 1}
    want = cls(**params, **extra).fit(data.train, y01)
    model = cls(**params, **extra).fit(data.train, y)
    assert model.classes_.tolist() == [negative, positive]
    assert model.classes_.dtype.kind == np.asarray([negative, positive]).dtype.kind
    np.testing.assert_array_equal(model.decision_function(data.valid),
                                  want.decision_function(data.valid))
    pred = model.predict(data.valid)
    np.testing.assert_array_equal(pred == positive, want.predict(data.valid) == 1)
    assert model.evaluate(data.train, y) == want.evaluate(data.train, y01)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = afmfast.load(path)
    assert loaded.classes_.tolist() == [negative, positive]
    assert loaded.classes_.dtype.kind == model.classes_.dtype.kind
    np.testing.assert_array_equal(loaded.predict(data.valid), pred)


def test_labels_outside_the_classes_refused_by_evaluate(clicks):
    data, y_train, y_valid = clicks
    model = afmfast.FMClassifier(**{**FAST, "n_epochs": 1}).fit(data.train, y_train)
    with pytest.raises(ValueError, match=r"y holds labels \[2\] that are not among"):
        model.evaluate(data.valid, np.where(y_valid == 1, 2, 0))
    with pytest.raises(ValueError, match="validation labels holds labels"):
        afmfast.FMClassifier(**FAST).fit(data.train, y_train,
                                         validation=(data.valid, y_valid + 5))


def test_dataset_labels_give_integer_classes(clicks):
    data, y_train, _ = clicks
    labelled = afmfast.Dataset(data.train.indptr, data.train.indices, data.train.values,
                               2.0 * y_train - 1, data.train.n_features)
    model = afmfast.FMClassifier(**{**FAST, "n_epochs": 1}).fit(labelled)
    assert model.classes_.dtype == np.int64 and model.classes_.tolist() == [-1, 1]


@pytest.mark.parametrize("classes", [[0, 1, 2], [1, 1], ["a", 1], [1, 0], [None, 1],
                                     [True, 1], "01"])
def test_model_files_with_bad_classes_refused(clicks, tmp_path, classes):
    import json

    data, y_train, _ = clicks
    path = tmp_path / "clf.npz"
    afmfast.FMClassifier(**{**FAST, "n_epochs": 1}).fit(data.train, y_train).save(path)
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    header = json.loads(arrays["__header__"].tobytes())
    header["extras"]["classes"] = classes
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="corrupt model header.*classes"):
        afmfast.load(path)


def test_save_load_and_warm_start(clicks, tmp_path):
    data, y_train, _ = clicks
    fm = afmfast.FMClassifier(**FAST).fit(data.train, y_train)
    path = tmp_path / "clf.npz"
    fm.save(path)
    loaded = afmfast.load(path)
    assert type(loaded) is afmfast.FMClassifier and loaded.classes_.tolist() == [0, 1]
    np.testing.assert_array_equal(loaded.predict_proba(data.valid), fm.predict_proba(data.valid))
    afm = afmfast.AFMClassifier(**{**FAST, "n_epochs": 0}, attention_size=8)
    afm.fit(data.train, y_train, init_from=fm)
    np.testing.assert_array_equal(afm.V_, fm.V_)


def test_scikit_learn_sees_a_classifier(clicks):
    pytest.importorskip("sklearn")
    from sklearn.base import is_classifier, is_regressor
    from sklearn.model_selection import cross_val_score

    assert is_classifier(afmfast.FMClassifier()) and not is_regressor(afmfast.FMClassifier())
    assert is_regressor(afmfast.FM())
    data, y_train, _ = clicks
    sp = pytest.importorskip("scipy.sparse")
    tr = data.train
    X = sp.csr_matrix((tr.values, tr.indices, tr.indptr), shape=(tr.n_rows, tr.n_features))
    scores = cross_val_score(afmfast.FMClassifier(**FAST), X, y_train, cv=3, scoring="roc_auc")
    assert np.all(scores > 0.75)


# ----- the logistic loss in every kernel, against the float64 reference ----------------
from afmfast.kernels import api  # noqa: E402
from afmfast.kernels import reference  # noqa: E402
from afmfast.kernels.backends import available_backends, get_backend  # noqa: E402


def _problem(rng, n_rows=40, n_features=25):
    lengths = rng.integers(0, 9, size=n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, n_features, size=indptr[-1]).astype(np.int32)
    values = rng.normal(size=indptr[-1])
    y = rng.choice([-1.0, 1.0], size=n_rows)
    return (indptr, indices, values), y, rng.permutation(n_rows)[:32].astype(np.int64)


def _max_nnz(X, rows):
    return int((X[0][rows + 1] - X[0][rows]).sum())


@pytest.mark.parametrize("backend", available_backends("fm"))
def test_fm_logistic_step_matches_the_reference(backend):
    rng = np.random.default_rng(1)
    X, y, rows = _problem(rng)
    params = api.new_fm_params(25, 4, rng, np.float64)
    params.V[:] = rng.normal(size=params.V.shape) * 0.5
    params.w[:] = rng.normal(size=25)
    ref_p = api.FMParams(*(a.copy() for a in params))
    cfg = api.StepConfig(0.1, 0.2, 0.8, api.ADAGRAD, 1, 3, 5, 2, api.LOGISTIC)
    module = get_backend(backend, "fm")
    ws = module.fm_workspace(len(rows), _max_nnz(X, rows), 25, 4, np.float64)
    state = api.new_opt_state(params, api.ADAGRAD)
    loss = module.fm_step(X, y, rows, params, state, cfg, ws)
    ref_loss = reference.fm_step(X, y, rows, ref_p, api.new_opt_state(ref_p, api.ADAGRAD), cfg)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for got, want in zip(params, ref_p):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", available_backends("afm"))
def test_afm_logistic_step_matches_the_reference(backend):
    rng = np.random.default_rng(2)
    X, y, rows = _problem(rng)
    params = api.new_afm_params(25, 4, 3, rng, np.float64)
    params.V[:] = rng.normal(size=params.V.shape) * 0.5
    ref_p = api.AFMParams(*(a.copy() for a in params))
    cfg = api.AFMStepConfig(0.1, 0.2, 0.3, 0.9, 0.8, api.SGD, 1, api.TANH, 0, 3, 5, 2,
                            api.LOGISTIC)
    module = get_backend(backend, "afm")
    lengths = X[0][rows + 1] - X[0][rows]
    ws = module.afm_workspace(len(rows), _max_nnz(X, rows),
                              int((lengths * (lengths - 1) // 2).sum()), 25, 4, 3, np.float64)
    loss = module.afm_step(X, y, rows, params, api.new_opt_state(params, api.SGD), cfg, ws)
    ref_loss = reference.afm_step(X, y, rows, ref_p, api.new_opt_state(ref_p, api.SGD), cfg)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for got, want in zip(params, ref_p):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_reference_logistic_gradient_is_the_finite_difference():
    rng = np.random.default_rng(3)
    X, y, rows = _problem(rng)
    params = api.new_fm_params(25, 4, rng, np.float64)
    params.V[:] = rng.normal(size=params.V.shape) * 0.5
    cfg = api.StepConfig(0.1, 0.2, 1.0, api.SGD, 0, 3, 5, 1, api.LOGISTIC)
    _, touched, gV, _, _, _, _ = reference.fm_gradients(X, y, rows, params, cfg)
    for u in range(min(5, len(touched))):
        i, eps = touched[u], 1e-6
        old = params.V[i, 1]
        params.V[i, 1] = old + eps
        plus = reference.fm_loss(X, y, rows, params, cfg)
        params.V[i, 1] = old - eps
        minus = reference.fm_loss(X, y, rows, params, cfg)
        params.V[i, 1] = old
        assert (plus - minus) / (2 * eps) == pytest.approx(gV[u, 1], rel=1e-6, abs=1e-8)
