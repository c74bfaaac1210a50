"""scikit-learn interoperability: clone, cross-validation, grid search and pipelines on a
scipy CSR matrix; and the same protocol without scikit-learn installed."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import afmfast
from afmfast.kernels.backends import backend_name
from afmfast.demo import make_demo_data

sklearn = pytest.importorskip("sklearn")
sp = pytest.importorskip("scipy.sparse")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import MaxAbsScaler  # noqa: E402

FAST = dict(n_factors=4, n_epochs=3, batch_size=256, verbose=0)


@pytest.fixture(scope="module")
def csr():
    ds = make_demo_data(n_rows=3000, seed=9).train
    X = sp.csr_matrix((ds.values, ds.indices, ds.indptr), shape=(ds.n_rows, ds.n_features))
    return X, ds.y


@pytest.mark.parametrize("cls,extra", [(afmfast.FM, {}),
                                       (afmfast.AFM, {"attention_size": 4})])
def test_clone_and_params(cls, extra):
    model = cls(**FAST, **extra)
    copy = clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert isinstance(model, sklearn.base.BaseEstimator)


@pytest.mark.parametrize("cls,extra", [(afmfast.FM, {}),
                                       (afmfast.AFM, {"attention_size": 4})])
def test_cross_val_score_on_csr(csr, cls, extra):
    X, y = csr
    scores = cross_val_score(cls(**FAST, **extra), X, y, cv=KFold(3))
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    assert scores.mean() > 0.0  # R^2: better than predicting the mean


def test_grid_search_and_pipeline(csr):
    X, y = csr
    grid = GridSearchCV(afmfast.FM(**FAST), {"n_factors": [2, 4], "learning_rate": [0.01, 0.05]},
                        cv=KFold(2))
    grid.fit(X, y)
    assert set(grid.best_params_) == {"n_factors", "learning_rate"}
    pipe = Pipeline([("scale", MaxAbsScaler()), ("fm", afmfast.FM(**FAST))]).fit(X, y)
    assert pipe.predict(X[:10]).shape == (10,)


def test_protocol_without_scikit_learn(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # make 'import sklearn' fail
        import numpy as np
        import afmfast
        from afmfast.demo import make_demo_data
        data = make_demo_data(n_rows=1000, seed=1)
        model = afmfast.FM(n_factors=4, n_epochs=1, verbose=0)
        assert type(model).__mro__[1:] == (afmfast.models.base.FactorizationModel, object)
        model.set_params(n_factors=3)
        assert model.get_params()["n_factors"] == 3
        try:
            model.predict(data.valid)
        except afmfast.NotFittedError as exc:
            assert isinstance(exc, ValueError) and isinstance(exc, AttributeError)
        assert model.fit(data.train).predict(data.valid).shape == (len(data.valid),)
        import pickle
        copy = pickle.loads(pickle.dumps(model))
        assert "_backend" not in copy.__dict__
        assert (copy.predict(data.valid) == model.predict(data.valid)).all()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# ----- pickling, copies, joblib, parallel grid search ------------------------------------
import copy  # noqa: E402
import pickle  # noqa: E402
import warnings  # noqa: E402

import joblib  # noqa: E402
from sklearn.exceptions import DataConversionWarning  # noqa: E402
from sklearn.exceptions import NotFittedError as SkNotFittedError  # noqa: E402
from sklearn.utils import get_tags  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

ESTIMATORS = [(afmfast.FM, {}), (afmfast.AFM, {"attention_size": 4}),
              (afmfast.FMClassifier, {}), (afmfast.AFMClassifier, {"attention_size": 4})]
IDS = [cls.__name__ for cls, _ in ESTIMATORS]


@pytest.mark.parametrize("cls,extra", ESTIMATORS, ids=IDS)
def test_pickle_deepcopy_and_joblib_predict_identically(csr, cls, extra, tmp_path):
    X, y = csr
    if issubclass(cls, afmfast.models.base.BinaryClassifier):
        y = np.where(y > np.median(y), "yes", "no")
    model = cls(**FAST, **extra).fit(X[:1000], y[:1000])
    X = X[1000:1500]
    want = model.predict(X)
    raw = model.decision_function(X) if hasattr(model, "decision_function") else want
    joblib.dump(model, tmp_path / "model.joblib")
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
              joblib.load(tmp_path / "model.joblib")]
    for other in copies:
        assert "_backend" not in other.__dict__ and "_ws" not in other.__dict__
        assert other.V_ is other._params.V and other.V_.ctypes.data % 64 == 0
        np.testing.assert_array_equal(other.predict(X), want)
        if hasattr(model, "decision_function"):
            np.testing.assert_array_equal(other.decision_function(X), raw)
    assert "_backend" in model.__dict__  # the original keeps its per-fit state
    refit = copies[0].fit(X, y[1000:1500])  # and a copy trains again
    assert refit.predict(X).shape == want.shape


def test_grid_search_in_two_processes(csr):
    X, y = csr
    grid = GridSearchCV(afmfast.FM(n_factors=2, n_epochs=2, batch_size=256, verbose=0,
                                   n_threads=1),
                        {"learning_rate": [0.01, 0.05]}, cv=KFold(2), n_jobs=2)
    grid.fit(X[:600], y[:600])
    assert grid.best_params_["learning_rate"] in (0.01, 0.05)
    serial = afmfast.FM(**{**grid.best_estimator_.get_params()}).fit(X[:600], y[:600])
    np.testing.assert_array_equal(grid.predict(X[600:700]), serial.predict(X[600:700]))


# ----- errors scikit-learn expects ------------------------------------------------------
@pytest.mark.parametrize("cls,extra", ESTIMATORS, ids=IDS)
def test_predict_before_fit_raises_not_fitted(cls, extra):
    with pytest.raises(afmfast.NotFittedError, match="not fitted") as info:
        cls(**extra).predict(np.ones((2, 3)))
    assert isinstance(info.value, (SkNotFittedError, ValueError, AttributeError))
    assert all(isinstance(info.value, t) for t in (SkNotFittedError, ValueError,
                                                   AttributeError))


@pytest.mark.parametrize("sparse", [False, True])
def test_complex_data_refused(sparse):
    X = np.array([[1 + 1j, 0], [0, 2 - 1j], [1, 1]])
    X = sp.csr_matrix(X) if sparse else X
    with pytest.raises(ValueError, match="X: Complex data not supported"):
        afmfast.FM(verbose=0).fit(X, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="y: Complex data not supported"):
        afmfast.FM(verbose=0).fit(np.eye(3), np.array([1, 2, 3j]))
    with pytest.raises(ValueError, match="y: Complex data not supported"):
        afmfast.FMClassifier(verbose=0).fit(np.eye(3), np.array([1, 1j, 1]))


def test_column_y_and_object_X_are_accepted():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = X @ [1.0, -1.0, 0.5, 0.0]
    params = dict(n_factors=2, n_epochs=2, batch_size=16, verbose=0)
    want = afmfast.FM(**params).fit(X, y).predict(X)
    with pytest.warns(DataConversionWarning, match="column-vector y"):
        column = afmfast.FM(**params).fit(X, y[:, None])
    np.testing.assert_array_equal(column.predict(X), want)
    objects = afmfast.FM(**params).fit(X.astype(object), y)
    np.testing.assert_array_equal(objects.predict(X.astype(object)), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1-D y warns nothing
        afmfast.FM(**params).fit(X, y)
    with pytest.raises(ValueError, match="y must be a 1-D array"):
        afmfast.FM(**params).fit(X, np.c_[y, y])


def test_non_numeric_objects_refused():
    X = np.ones((4, 2), dtype=object)
    X[1, 1] = "abc"
    with pytest.raises(ValueError, match="X must hold numbers.*could not convert"):
        afmfast.FM(verbose=0).fit(X, np.arange(4.0))
    X[1, 1] = {"a": 1}
    with pytest.raises(TypeError, match="X must hold numbers"):
        afmfast.FM(verbose=0).fit(X, np.arange(4.0))
    with pytest.raises(ValueError, match="y must hold numbers"):
        afmfast.FM(verbose=0).fit(np.eye(4), np.array(["a", "b", "c", "d"], dtype=object))


@pytest.mark.parametrize("cls,extra", ESTIMATORS, ids=IDS)
def test_zero_columns_and_missing_y(cls, extra):
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(5, 0\)\) while a "
                                         r"minimum of 1 is required"):
        cls(verbose=0, **extra).fit(np.empty((5, 0)), [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="requires y to be passed"):
        cls(verbose=0, **extra).fit(np.eye(3), None)


def test_array_columns_must_match_but_datasets_may_hold_unseen_ids():
    X = np.eye(4)
    model = afmfast.FM(n_factors=2, n_epochs=1, verbose=0).fit(X, [1.0, 2.0, 3.0, 4.0])
    for wrong in (np.eye(5), sp.csr_matrix(np.ones((2, 3)))):
        with pytest.raises(ValueError, match="X has .* features, but FM is expecting 4"):
            model.predict(wrong)
    with pytest.raises(ValueError, match="expecting 4"):
        model.evaluate(np.eye(5), np.ones(5))
    unseen = afmfast.Dataset([0, 2], [1, 9], [1.0, 1.0], [0.0])
    assert model.predict(unseen)[0] == model.predict(X[1:2])[0]


def test_tags():
    reg, clf = get_tags(afmfast.AFM()), get_tags(afmfast.FMClassifier())
    assert reg.estimator_type == "regressor" and reg.input_tags.sparse
    assert reg.target_tags.required and reg.classifier_tags is None
    assert clf.estimator_type == "classifier" and clf.regressor_tags is None
    assert clf.classifier_tags.multi_class is False and clf.input_tags.sparse
    assert afmfast.FMClassifier()._more_tags() == {"binary_only": True}


# ----- scikit-learn's own estimator checks ----------------------------------------------
# Small, fast settings; learning_rate and n_epochs high enough for the checks' accuracy
# and R^2 thresholds on their small dense data.
CHECK_PARAMS = dict(n_factors=4, n_epochs=30, batch_size=32, learning_rate=0.1,
                    n_threads=1, verbose=0)


@parametrize_with_checks([afmfast.FM(**CHECK_PARAMS),
                          afmfast.AFM(attention_size=4, **CHECK_PARAMS),
                          afmfast.FMClassifier(**CHECK_PARAMS),
                          afmfast.AFMClassifier(attention_size=4, **CHECK_PARAMS)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


# ----- both kernel backends on degenerate data ------------------------------------------
MODELS = [(afmfast.FM, {}), (afmfast.AFM, {"attention_size": 4})]


@pytest.mark.parametrize("cls,extra", MODELS, ids=["FM", "AFM"])
def test_data_without_nonzeros_fits_the_bias(backend, cls, extra):
    """No nonzeros at all: the Cython workspace once refused a bound of 0 nonzeros while
    Numba trained; both now fit w0 alone, to the same value (w0 starts at the labels'
    mean, the answer, and stays near it)."""
    y = np.linspace(1.0, 3.0, 20)
    params = dict(n_factors=2, n_epochs=5, batch_size=8, learning_rate=0.1, n_threads=1,
                  verbose=0, **extra)
    X = np.zeros((20, 3))
    model = cls(backend=backend_name(backend), **params).fit(X, y)
    other = cls(backend="numba", **params).fit(X, y)
    assert all(np.isfinite(h["train_loss"]) for h in model.history_)
    assert model.w0_ == pytest.approx(other.w0_, rel=1e-5)
    pred = model.predict(X)
    assert np.all(pred == pred[0])  # every row is the empty row
    assert pred[0] == pytest.approx(y.mean(), abs=0.1)
    np.testing.assert_allclose(pred, other.predict(X), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd", "adam"])
@pytest.mark.parametrize("cls,extra", MODELS, ids=["FM", "AFM"])
def test_labels_near_the_float32_limit_diverge(backend, cls, extra, optimizer):
    """Labels of 3e38 are finite float32 numbers, but their gradients are not: Cython's
    parameters went NaN while Numba's optimiser state went infinite and the model stopped
    learning silently. Both backends now stop with TrainingDivergedError."""
    X = np.random.default_rng(0).normal(size=(40, 4))
    model = cls(n_factors=2, n_epochs=3, batch_size=8, n_threads=1, verbose=0,
                optimizer=optimizer, backend=backend_name(backend), **extra)
    with pytest.raises(afmfast.TrainingDivergedError, match="epoch 1"):
        # of both signs: w0 starts at the labels' mean, which would fit a constant
        model.fit(X, np.where(np.arange(40) % 2 == 0, 3e38, -3e38))
    assert all(np.isfinite(a).all() for a in model._params)  # the last good ones
    with pytest.raises(ValueError, match="within the float32 range"):
        model.fit(X, np.full(40, 1e39))
