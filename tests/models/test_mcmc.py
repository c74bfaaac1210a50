"""``FM(solver="mcmc")``: the Bayesian FM estimator. It recovers a known FM from its
noisy data, predicts with the average of its kept samples, saves and loads, gives the
same model for any thread count, and refuses what it does not support."""
import numpy as np
import pytest

import afmfast
from afmfast.data.dataset import Dataset
from afmfast.demo import make_demo_data
from afmfast.kernels import mcmc_reference as ref
from afmfast.models.mcmc import sampler_backend

from helpers.backends import compiled_module

MCMC = dict(solver="mcmc", n_factors=4, n_iter=20, backend="numba", verbose=0)


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=3000, seed=4)


def known_fm(seed, field_sizes=(8, 6, 5), k=2, n_rows=4000, noise=0.1):
    """Rows with one feature per field drawn from an FM of known parameters; returns
    (train Dataset, every combination of the fields as a Dataset with its noiseless
    targets, noise)."""
    rng = np.random.default_rng(seed)
    M = sum(field_sizes)
    offsets = np.concatenate([[0], np.cumsum(field_sizes)])
    w0, w, V = 0.5, rng.normal(0, 0.5, M), rng.normal(0, 0.7, (M, k))

    def dataset(ids, y=None):
        n, F = ids.shape
        X = (np.arange(0, n * F + 1, F, dtype=np.int64), ids.reshape(-1).astype(np.int32),
             np.zeros(0, np.float32))
        truth = ref.predict(ref.dense_rows(X, M), w0, w, V)
        return Dataset(X[0], X[1], None, truth if y is None else y(truth), M), truth

    ids = np.stack([rng.integers(offsets[f], offsets[f + 1], n_rows)
                    for f in range(len(field_sizes))], axis=1)
    train, _ = dataset(ids, lambda t: t + rng.normal(0, noise, len(t)))
    grid = np.stack(np.meshgrid(*[np.arange(offsets[f], offsets[f + 1])
                                  for f in range(len(field_sizes))], indexing="ij"),
                    axis=-1).reshape(-1, len(field_sizes))
    return train, dataset(grid), noise


def test_posterior_mean_recovers_a_known_fm():
    """Everything identifiable of the FM (its prediction at every combination of the
    fields) comes back to well within the noise, and so does the noise precision."""
    train, (grid, truth), noise = known_fm(0)
    model = afmfast.FM(solver="mcmc", n_factors=2, n_iter=150, n_burn_in=50,
                       n_threads=2, backend="numba", verbose=0).fit(train)
    err = model.predict(grid) - truth
    assert np.sqrt(np.mean(err ** 2)) < 0.3 * noise
    alphas = [r["alpha"] for r in model.history_[50:]]
    assert np.mean(alphas) == pytest.approx(1 / noise ** 2, rel=0.1)


def test_prediction_is_the_average_of_the_kept_samples(demo):
    samples = []

    def keep_sample(model, record):
        t = model._trainer
        samples.append((t.w0, t.w.copy(), t.V.copy()))

    model = afmfast.FM(**dict(MCMC, n_iter=6, n_burn_in=2)).fit(
        demo.train, callbacks=[keep_sample])
    assert model.n_samples_ == 4 and model.V_.shape == (demo.train.n_features, 16)
    Xd = ref.dense_rows(demo.valid[:50].X, demo.train.n_features)
    want = np.mean([ref.predict(Xd, *s) for s in samples[2:]], axis=0)
    np.testing.assert_allclose(model.predict(demo.valid[:50]), want, rtol=1e-4, atol=1e-4)


def test_history_and_validation_of_the_running_average(demo):
    model = afmfast.FM(**dict(MCMC, n_burn_in=5)).fit(demo.train, validation=demo.valid)
    h = model.history_
    assert [r["epoch"] for r in h] == list(range(1, 21)) and model.best_epoch_ == 20
    assert all(r["valid_rmse"] is None for r in h[:5])
    assert h[-1]["valid_rmse"] == pytest.approx(model.evaluate(demo.valid)["rmse"],
                                                rel=1e-5)
    assert h[-1]["valid_rmse"] < 0.5 * np.std(demo.valid.y)


def test_save_and_load_predict_the_same(demo, tmp_path):
    model = afmfast.FM(**MCMC).fit(demo.train)
    model.save(tmp_path / "m.npz")
    loaded = afmfast.load(tmp_path / "m.npz")
    assert loaded.get_params() == model.get_params() and loaded.n_samples_ == 20
    assert np.array_equal(loaded.predict(demo.valid), model.predict(demo.valid))


def test_same_model_for_any_thread_count_and_backend_for_predictions(demo):
    fits = [afmfast.FM(**dict(MCMC, n_threads=t)).fit(demo.train) for t in (1, 2)]
    assert np.array_equal(fits[0].V_, fits[1].V_) and np.array_equal(fits[0].w_, fits[1].w_)
    other = afmfast.FM(**dict(MCMC, random_state=3)).fit(demo.train)
    assert not np.array_equal(other.V_, fits[0].V_)


@pytest.mark.compiled
@pytest.mark.skipif(compiled_module("afmfast._mcmc_cython") is None,
                    reason="afmfast._mcmc_cython is not built")
def test_cython_sampler_gives_the_numba_samplers_model(demo):
    """The backends' sweeps do the same operations in the same order: the fitted
    parameters are bit-identical, on 2 threads and with given groups too (the
    predictions then differ only by the two backends' float32 prediction kernels);
    "auto" samples on Cython."""
    assert sampler_backend("auto").__name__ == "afmfast._mcmc_cython"
    samplers = []

    def record_sampler(model, record):
        samplers.append(model._trainer.sampler.__name__)

    fits = {name: afmfast.FM(**dict(MCMC, n_iter=6, n_burn_in=2, n_threads=2,
                                    backend=name)).fit(demo.train, groups=demo.fields,
                                                       callbacks=[record_sampler])
            for name in ("numba", "cython")}
    assert samplers == ["afmfast.kernels.numba.mcmc"] * 6 + ["afmfast._mcmc_cython"] * 6
    for got, want in zip(fits["cython"]._params, fits["numba"]._params):
        assert np.array_equal(got, want)
    np.testing.assert_allclose(fits["cython"].predict(demo.valid),
                               fits["numba"].predict(demo.valid), rtol=1e-5, atol=1e-5)


def test_groups_from_fit_and_from_a_dataframe(demo):
    pd = pytest.importorskip("pandas")
    grouped = afmfast.FM(**MCMC).fit(demo.train, groups=demo.fields)
    plain = afmfast.FM(**MCMC).fit(demo.train)
    assert not np.array_equal(grouped.V_, plain.V_)  # other hyperpriors, other chain
    assert grouped.evaluate(demo.valid)["rmse"] < 0.5 * np.std(demo.valid.y)
    df = pd.DataFrame({"a": ["x", "y", "z", "x"] * 30, "b": ["p", "q"] * 60,
                       "y": np.arange(120.0) % 3})
    model = afmfast.FM(**dict(MCMC, n_factors=2, n_iter=3)).fit(df, "y")
    assert model.predict(df).shape == (120,)


def test_groups_default_to_the_fields_of_a_dataset(demo):
    """A Dataset with fields (a hashed store's) groups the hyperpriors by them."""
    grouped = afmfast.FM(**MCMC).fit(demo.train, groups=demo.fields)
    with_fields = afmfast.FM(**MCMC).fit(demo.train.with_fields(demo.fields))
    np.testing.assert_array_equal(with_fields.V_, grouped.V_)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="als"), "solver must be one of"),
    (dict(solver="mcmc", n_iter=0), "n_iter must be an integer >= 1"),
    (dict(solver="mcmc", n_iter=5, n_burn_in=5), "n_burn_in must be below n_iter"),
    (dict(solver="mcmc", init_stdev=-1.0), "init_stdev must be a number"),
])
def test_bad_arguments(demo, kwargs, match):
    with pytest.raises(ValueError, match=match):
        afmfast.FM(**dict(kwargs, verbose=0)).fit(demo.train)


def test_probit_classifier(demo, tmp_path):
    """FMClassifier(solver="mcmc"): the probit model by data augmentation. Its noise
    precision stays 1, it separates a known FM's classes as well as the logistic SGD
    classifier does, its probabilities are Phi of its scores, it gives the same model
    at any thread count, and it saves and loads."""
    from math import erf, sqrt

    train, (grid, truth), _ = known_fm(1, n_rows=6000)
    threshold = float(np.median(train.y))
    labels = train.y > threshold
    model = afmfast.FMClassifier(**{**MCMC, "n_factors": 2, "n_iter": 60,
                                    "n_threads": 1}).fit(train, labels)
    assert all(r["alpha"] == 1.0 for r in model.history_)
    truth_labels = truth > threshold
    accuracy = float(np.mean(model.predict(grid) == truth_labels))
    sgd = afmfast.FMClassifier(n_factors=2, n_epochs=20, learning_rate=0.05,
                               verbose=0).fit(train, labels)
    assert accuracy > 0.85 and accuracy >= float(np.mean(sgd.predict(grid) == truth_labels)) - 0.02
    scores = model.decision_function(grid[:5]).astype(np.float64)
    np.testing.assert_allclose(model.predict_proba(grid[:5])[:, 1],
                               [0.5 * (1 + erf(v / sqrt(2))) for v in scores], rtol=1e-12)
    two = afmfast.FMClassifier(**{**MCMC, "n_factors": 2, "n_iter": 60,
                                  "n_threads": 2}).fit(train, labels)
    np.testing.assert_array_equal(two.V_, model.V_)
    path = tmp_path / "probit.npz"
    model.save(path)
    loaded = afmfast.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(grid), model.predict_proba(grid))
    assert loaded.evaluate(grid, truth_labels) == model.evaluate(grid, truth_labels)


def test_refusals(demo):
    with pytest.raises(ValueError, match="groups: only FM"):
        afmfast.FM(n_epochs=1, verbose=0).fit(demo.train, groups=demo.fields)
    with pytest.raises(ValueError, match="one integer per feature"):
        afmfast.FM(**MCMC).fit(demo.train, groups=demo.fields[:-1])
    sgd = afmfast.FM(n_factors=4, n_epochs=1, verbose=0).fit(demo.train)
    with pytest.raises(ValueError, match="init_from"):
        afmfast.FM(**MCMC).fit(demo.train, init_from=sgd)
