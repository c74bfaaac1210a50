"""AFM estimator: arguments, training, warm start from FM, freeze_fm, explanations,
field attention, persistence."""
import numpy as np
import pytest

import afmfast
from afmfast.kernels.backends import available_backends
from afmfast.demo import make_demo_data

FAST = dict(n_factors=8, attention_size=8, n_epochs=3, batch_size=256, verbose=0)


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(n_rows=4000, seed=7)


@pytest.fixture(scope="module")
def fm(demo):
    return afmfast.FM(n_factors=8, n_epochs=3, batch_size=256, verbose=0).fit(demo.train)


def test_defaults_match_the_reference_afm():
    p = afmfast.AFM().get_params()
    assert (p["n_factors"], p["attention_size"], p["keep"], p["l2_attention"],
            p["learning_rate"], p["batch_size"], p["attention"], p["activation"],
            p["batch_norm"], p["freeze_fm"], p["optimizer"]) == \
        (16, 16, (1.0, 0.5), 100.0, 0.1, 4096, True, "relu", False, False, "adagrad")


@pytest.mark.parametrize("name,value,needle", [
    ("attention_size", 0, "attention_size"), ("keep", 0.5, "keep"),
    ("keep", (1.0, 0.0), r"keep\[1\]"), ("keep", (2.0, 0.5), r"keep\[0\]"),
    ("activation", "elu", "activation"), ("batch_norm", True, "batch_norm"),
    ("l2_attention", -1.0, "l2_attention"), ("freeze_fm", "no", "freeze_fm"),
])
def test_bad_arguments_name_the_argument(demo, name, value, needle):
    with pytest.raises(ValueError, match=needle):
        afmfast.AFM(**{**FAST, name: value}).fit(demo.train)


def test_fit_predict_and_fitted_attributes(demo):
    model = afmfast.AFM(**FAST).fit(demo.train, validation=demo.valid)
    assert model.attention_W_.shape == (8, 8)
    assert model.p_.shape == (8,) and model.attention_h_.shape == (8,)
    pred = model.predict(demo.valid)
    assert pred.dtype == np.float32 and pred.shape == (len(demo.valid),)
    assert np.all(np.isfinite(pred))
    assert len(model.history_) == 3


@pytest.mark.parametrize("backend", available_backends("afm"))
def test_same_seed_same_model_for_any_thread_count(demo, backend):
    a = afmfast.AFM(**FAST, backend=backend, n_threads=1).fit(demo.train)
    b = afmfast.AFM(**FAST, backend=backend, n_threads=2).fit(demo.train)
    np.testing.assert_array_equal(a.V_, b.V_)
    np.testing.assert_array_equal(a.attention_W_, b.attention_W_)


def test_backends_train_the_same_model(demo):
    if len(available_backends("afm")) < 2:
        pytest.skip("needs both backends")
    a = afmfast.AFM(**FAST, backend="cython").fit(demo.train)
    b = afmfast.AFM(**FAST, backend="numba").fit(demo.train)
    np.testing.assert_allclose(a.predict(demo.valid), b.predict(demo.valid), atol=2e-3)


def test_warm_start_from_fm_starts_where_the_fm_ends(demo, fm, tmp_path):
    """V and w are the FM's; its batch norm folds into p and w0 with h = 0 (uniform
    attention), so on rows of the median pair count the AFM predicts as the FM."""
    lengths = np.diff(demo.valid.indptr)
    median = int(np.median(np.diff(demo.train.indptr)))
    typical = demo.valid[lengths == median]
    assert fm.batch_norm and typical.n_rows > 100
    for attention in (True, False):
        afm = afmfast.AFM(**{**FAST, "n_epochs": 0, "attention": attention,
                             "fold_fm": True}).fit(demo.train, init_from=fm)
        np.testing.assert_array_equal(afm.V_, fm.V_)
        np.testing.assert_array_equal(afm.w_, fm.w_)
        np.testing.assert_allclose(afm.predict(typical), fm.predict(typical), rtol=1e-4,
                                   atol=1e-4)
        assert not np.allclose(afm.p_, 1.0)  # the reference's p = 1 would not
        assert np.all(afm.attention_h_ == 0) == attention
    # the reference's warm start: V, w and w0, the rest as initialised
    plain = afmfast.AFM(**{**FAST, "n_epochs": 0}).fit(demo.train, init_from=fm)
    fresh = afmfast.AFM(**{**FAST, "n_epochs": 0}).fit(demo.train)
    assert plain.w0_ == fm.w0_
    np.testing.assert_array_equal(plain.V_, fm.V_)
    np.testing.assert_array_equal(plain.p_, fresh.p_)
    np.testing.assert_array_equal(plain.attention_h_, fresh.attention_h_)
    path = tmp_path / "fm.npz"
    fm.save(path)
    from_file = afmfast.AFM(**{**FAST, "n_epochs": 0}).fit(demo.train, init_from=path)
    np.testing.assert_array_equal(from_file.V_, fm.V_)
    with pytest.raises(ValueError, match="n_factors"):
        afmfast.AFM(**{**FAST, "n_factors": 4}).fit(demo.train, init_from=fm)
    with pytest.raises(ValueError, match="n_features"):
        afmfast.AFM(**FAST).fit(demo.train.with_n_features(demo.train.n_features + 3),
                                init_from=fm)


def test_freeze_fm_keeps_the_pretrained_parameters(demo, fm):
    afm = afmfast.AFM(**FAST, freeze_fm=True).fit(demo.train, init_from=fm)
    np.testing.assert_array_equal(afm.V_, fm.V_)
    np.testing.assert_array_equal(afm.w_, fm.w_)
    fresh = afmfast.AFM(**{**FAST, "n_epochs": 0}).fit(demo.train, init_from=fm)
    assert afm.w0_ == fresh.w0_ == fm.w0_
    assert not np.array_equal(afm.attention_W_, fresh.attention_W_)
    assert not np.array_equal(afm.p_, fresh.p_)


def test_explain_adds_up_to_predict(demo):
    model = afmfast.AFM(**FAST).fit(demo.train)
    rec = model.explain(demo.valid)
    n = len(demo.valid)
    assert rec.indptr.shape == (n + 1,) and rec.indptr.dtype == np.int64
    n_pairs = np.diff(rec.indptr)
    assert np.all(n_pairs == 8 * 7 // 2)
    np.testing.assert_allclose(np.add.reduceat(rec.weight, rec.indptr[:-1]), 1.0, rtol=1e-5)
    assert np.all(rec.i != rec.j)
    lin = np.add.reduceat(model.w_[demo.valid.indices] * demo.valid.values,
                          demo.valid.indptr[:-1])
    total = model.w0_ + lin + np.add.reduceat(rec.contribution, rec.indptr[:-1])
    np.testing.assert_allclose(total, model.predict(demo.valid), rtol=1e-4, atol=1e-4)


def test_explain_without_attention_weighs_every_pair_one(demo):
    model = afmfast.AFM(**FAST, attention=False).fit(demo.train)
    rec = model.explain(demo.valid[np.arange(10)])
    np.testing.assert_array_equal(rec.weight, 1.0)


def test_explain_rows_of_any_length_and_unseen_ids(demo):
    model = afmfast.AFM(**FAST).fit(demo.train)
    M = model.n_features_in_
    indptr = np.array([0, 0, 1, 3, 6], dtype=np.int64)
    indices = np.array([4, 5, M + 2, 7, 9, 30], dtype=np.int32)
    ds = afmfast.Dataset(indptr, indices, np.ones(6, np.float32), np.zeros(4, np.float32),
                         M + 3)
    rec = model.explain(ds)
    np.testing.assert_array_equal(np.diff(rec.indptr), [0, 0, 0, 3])
    np.testing.assert_array_equal(rec.i, [7, 7, 9])
    np.testing.assert_array_equal(rec.j, [9, 30, 30])


def test_field_attention_matrix(demo):
    model = afmfast.AFM(**FAST).fit(demo.train)
    fa = model.field_attention(demo.valid, demo.fields)
    F = demo.fields.max() + 1
    assert fa.shape == (F, F)
    np.testing.assert_array_equal(fa, fa.T)
    assert np.all(np.isnan(np.diag(fa)))  # one feature per field: no same-field pairs
    off = fa[~np.eye(F, dtype=bool)]
    assert np.all((off > 0) & (off < 1))
    with pytest.raises(ValueError, match="fields"):
        model.field_attention(demo.valid, demo.fields[:-1])


def test_save_load_round_trip(demo, tmp_path):
    model = afmfast.AFM(**FAST, activation="tanh").fit(demo.train)
    path = tmp_path / "afm.npz"
    model.save(path)
    loaded = afmfast.load(path)
    assert type(loaded) is afmfast.AFM and loaded.keep == model.keep
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict(demo.valid), model.predict(demo.valid))
    rec_a, rec_b = loaded.explain(demo.valid), model.explain(demo.valid)
    np.testing.assert_array_equal(rec_a.weight, rec_b.weight)
