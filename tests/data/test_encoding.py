"""pandas DataFrames: FeatureMap/encode, fitting and predicting on frames, the feature map
saved with the model."""
import numpy as np
import pytest

import afmfast

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    n = 3000
    users = rng.choice([f"u{i}" for i in range(40)], size=n)
    items = rng.choice([f"i{i}" for i in range(30)], size=n)
    hour = rng.uniform(0, 1, size=n)
    effect = {u: rng.normal() for u in np.unique(users)}
    y = np.array([effect[u] for u in users]) + (items == "i3") * 2.0 + hour
    df = pd.DataFrame({"user": users, "item": pd.Categorical(items), "hour": hour,
                       "weekend": rng.random(n) < 0.3, "rating": y})
    df.loc[5, "user"] = None
    return df


def test_feature_map_fields_names_and_missing_values(frame):
    data, fmap = afmfast.encode(frame, y="rating")
    assert fmap.columns == ["user", "item", "hour", "weekend"]
    assert fmap.n_features == data.n_features == 40 + 30 + 1 + 2
    assert fmap.fields.tolist() == [0] * 40 + [1] * 30 + [2] + [3] * 2
    assert fmap.feature_names[40] == "item=i0" and fmap.feature_names[70] == "hour"
    assert np.diff(data.indptr)[5] == 3  # the missing user contributes nothing
    np.testing.assert_array_equal(data.y, frame["rating"].to_numpy(np.float32))
    hour_values = data.values[data.indices == 70]
    np.testing.assert_allclose(hour_values, frame["hour"].to_numpy(np.float32))


def test_unseen_categories_map_to_nothing(frame):
    fmap = afmfast.FeatureMap.fit(frame, ["user", "item"])
    new = pd.DataFrame({"user": ["u1", "zzz"], "item": ["nope", "i2"]})
    data = fmap.transform(new)
    assert np.diff(data.indptr).tolist() == [1, 1]
    assert data.indices.tolist() == [fmap.feature_names.index("user=u1"),
                                     fmap.feature_names.index("item=i2")]
    with pytest.raises(ValueError, match="lacks the columns"):
        fmap.transform(pd.DataFrame({"user": ["u1"]}))


@pytest.mark.parametrize("cls,extra", [(afmfast.FM, {"batch_norm": False, "keep": 1.0}),
                                       (afmfast.AFM, {"attention_size": 4})])
def test_fit_predict_save_load_on_dataframes(frame, cls, extra, tmp_path):
    train, test = frame.iloc[:2500], frame.iloc[2500:]
    model = cls(n_factors=4, n_epochs=5, batch_size=256, learning_rate=0.05, verbose=0,
                **extra)
    model.fit(train, "rating", validation=(test, "rating"))
    pred = model.predict(test)
    assert pred.shape == (len(test),)
    assert model.evaluate(test, "rating")["rmse"] < np.std(test["rating"])
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = afmfast.load(path)
    assert loaded.feature_map_.feature_names == model.feature_map_.feature_names
    np.testing.assert_array_equal(loaded.predict(test), pred)
    with pytest.raises(ValueError, match="DataFrame"):
        afmfast.FM(n_factors=4, n_epochs=1, verbose=0).fit(
            model._dataset(train, "rating")).predict(test)
    if cls is afmfast.AFM:
        fa = model.field_attention(test)
        assert fa.shape == (4, 4)


@pytest.fixture
def id_frame():
    """What pd.read_csv gives for a ratings file: int64 ids, a small int, a float."""
    rng = np.random.default_rng(2)
    n = 600
    return pd.DataFrame({"user_id": rng.integers(1000, 1040, n),
                         "stars": rng.integers(1, 6, n),
                         "hour": rng.uniform(0, 24, n),
                         "rating": rng.normal(size=n)})


def test_integer_id_columns_warn_naming_the_column_and_the_fix(id_frame):
    with pytest.warns(UserWarning) as caught:
        data, fmap = afmfast.encode(id_frame, y="rating")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1  # stars: 5 distinct values, a number
    assert "'user_id'" in messages[0] and "categorical=['user_id']" in messages[0]
    assert "astype(float)" in messages[0]
    assert caught[0].filename == __file__  # points at the caller, not at afmfast
    assert fmap.categories == [None, None, None]


def test_categorical_one_hot_encodes_named_numeric_columns(id_frame, recwarn, tmp_path):
    data, fmap = afmfast.encode(id_frame, y="rating", categorical=["user_id"])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    n_users = id_frame["user_id"].nunique()
    assert fmap.n_features == n_users + 2
    assert fmap.feature_names[0] == f"user_id={sorted(id_frame['user_id'])[0]}"
    assert fmap.fields.tolist() == [0] * n_users + [1, 2]
    # cast to float: numeric on purpose, no warning
    as_float = id_frame.assign(user_id=id_frame["user_id"].astype(float))
    assert afmfast.FeatureMap.fit(as_float, ["user_id"]).categories == [None]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with pytest.raises(ValueError, match="categorical"):
        afmfast.encode(id_frame, y="rating", categorical=["rating"])
    with pytest.raises(ValueError, match="categorical"):
        afmfast.FeatureMap.fit(id_frame, categorical=["nope"])

    model = afmfast.FM(n_factors=4, n_epochs=2, batch_size=128, verbose=0)
    model.fit(id_frame, "rating", categorical=["user_id"])
    assert model.feature_map_.categories[0] == fmap.categories[0]
    model.save(tmp_path / "m.npz")
    loaded = afmfast.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.predict(id_frame), model.predict(id_frame))
    with pytest.raises(ValueError, match="categorical"):
        afmfast.FM(n_epochs=1, verbose=0).fit(data, categorical=["user_id"])
