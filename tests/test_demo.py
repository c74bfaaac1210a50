"""The built-in demo: data generator and the ``afmfast demo`` run."""
import numpy as np

from afmfast.demo import FIELD_SIZES, make_demo_data, run_demo


def test_demo_data_is_seeded_and_shaped():
    a = make_demo_data(n_rows=500, seed=2)
    b = make_demo_data(n_rows=500, seed=2)
    np.testing.assert_array_equal(a.train.indices, b.train.indices)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert len(a.train) == 400 and len(a.valid) == 100
    assert a.train.n_features == sum(FIELD_SIZES) == len(a.fields)
    assert np.all(np.diff(a.train.indptr) == len(FIELD_SIZES))
    # one feature per field in every row
    fields = a.fields[a.train.indices].reshape(-1, len(FIELD_SIZES))
    assert np.all(fields == np.arange(len(FIELD_SIZES)))


def test_demo_fm_beats_linear(capsys):
    fm_rmse, linear = run_demo(verbose=0)
    out = capsys.readouterr().out
    assert "validation RMSE" in out
    assert fm_rmse < 0.7 * linear
