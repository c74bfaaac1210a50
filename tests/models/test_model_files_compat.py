"""Model files saved by afmfast 0.1.0 before its packages were split by layer (the flat
``afmfast/`` modules) still load, and predict what they predicted then.

``files/`` beside this file holds an FM and an AFMClassifier saved by that version, and
their predictions on 20 validation rows of ``make_demo_data(n_rows=600, seed=7)``, made
as the comment below says.
"""
from pathlib import Path

import numpy as np
import pytest

import afmfast
from afmfast.demo import make_demo_data

FILES = Path(__file__).resolve().parent / "files"
# How the files were made (afmfast at commit bc00025):
#   d = make_demo_data(n_rows=600, seed=7); rows = d.valid[np.arange(20)]
#   FM(n_factors=4, n_epochs=2, n_threads=1, verbose=0, random_state=0).fit(d.train)
#   AFMClassifier(n_factors=4, attention_size=4, same) .fit(d.train, "yes"/"no" by the
#   median of d.train.y); then .save(...) and predict / predict_proba[:, 1] on rows.


@pytest.mark.parametrize("name,cls", [("fm", afmfast.FM),
                                      ("afm_classifier", afmfast.AFMClassifier)])
def test_files_of_the_flat_layout_load_and_predict_the_same(name, cls):
    model = afmfast.load(FILES / f"{name}.npz")
    assert type(model) is cls
    rows = make_demo_data(n_rows=600, seed=7).valid[np.arange(20)]
    want = np.load(FILES / "predictions.npz")[name]
    got = model.predict(rows) if name == "fm" else model.predict_proba(rows)[:, 1]
    # the files were written by a build for another instruction-set level: equal to
    # rounding, not bit for bit
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if name == "afm_classifier":
        assert model.classes_.tolist() == ["no", "yes"]
