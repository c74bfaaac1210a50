"""scikit-learn interoperability: clone, cross-validation, grid search and pipelines on a
scipy CSR matrix; and the same protocol without scikit-learn installed."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import afmfast
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


def test_protocol_without_scikit_learn():
    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # make 'import sklearn' fail
        import numpy as np
        import afmfast
        from afmfast.demo import make_demo_data
        data = make_demo_data(n_rows=1000, seed=1)
        model = afmfast.FM(n_factors=4, n_epochs=1, verbose=0)
        assert type(model).__mro__[1:] == (afmfast.estimator.FactorizationModel, object)
        model.set_params(n_factors=3)
        assert model.get_params()["n_factors"] == 3
        assert model.fit(data.train).predict(data.valid).shape == (len(data.valid),)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
