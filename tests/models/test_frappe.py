"""Accuracy on real data: the frappe-mini protocol (../shared/data/README.md).

The Frappe file lives in ../shared/data beside the repository (its terms forbid copying it
here); these tests skip when it is absent. Bounds, from the reference figures measured on
this machine kind:
- FM, reference settings, 20 epochs: the TensorFlow code reached 0.541, 0.552 and 0.543,
  so <= 0.555 is "matches or beats the reference".
- AFM warm-started from that FM, reference settings (--hidden_factor [16,16] --keep
  [1.0,0.5] --lamda_attention 100 --lr 0.1 --pretrain 1), 20 epochs: the reference with
  the softmax fixed reached 0.590-0.600; bound 0.605.
- Convergence recipe: FM to early stopping, then AFM warm-started to early stopping; a
  faithful implementation reaches about 0.533 (FM) and 0.471 (AFM), so AFM must be at
  least 8% below FM and below 0.50.
"""
import numpy as np
import pytest
from helpers.paths import FRAPPE, README

import afmfast


@pytest.fixture(scope="module")
def frappe_mini():
    if not FRAPPE.exists():
        pytest.skip(f"{FRAPPE} is not present")
    data = afmfast.load_libfm(FRAPPE)
    is_valid = (np.arange(1, len(data) + 1) % 5) == 0
    return data[~is_valid], data[is_valid]


@pytest.fixture(scope="module")
def fm_20_epochs(frappe_mini):
    train, valid = frappe_mini
    model = afmfast.FM(n_factors=16, learning_rate=0.01, batch_size=4096, n_epochs=20,
                       keep=0.7, batch_norm=True, verbose=0)
    return model.fit(train, validation=valid)


def test_frappe_mini_split(frappe_mini):
    train, valid = frappe_mini
    assert (len(train), len(valid)) == (46178, 11544)


def test_fm_reference_settings_match_the_reference(frappe_mini, fm_20_epochs):
    assert fm_20_epochs.evaluate(frappe_mini[1])["rmse"] <= 0.555


def test_afm_reference_settings_match_the_fixed_reference(frappe_mini, fm_20_epochs):
    train, valid = frappe_mini
    afm = afmfast.AFM(n_factors=16, attention_size=16, keep=(1.0, 0.5), l2_attention=100.0,
                      learning_rate=0.1, n_epochs=20, verbose=0)
    afm.fit(train, validation=valid, init_from=fm_20_epochs)
    assert afm.evaluate(valid)["rmse"] <= 0.605


def test_readme_example_runs_as_written_and_afm_beats_fm_by_eight_percent(
        tmp_path, monkeypatch, capsys):
    """The README's Python example is the convergence recipe: run it verbatim on the
    frappe-mini split written as data/frappe/frappe.{train,validation}.libfm."""
    if not FRAPPE.exists():
        pytest.skip(f"{FRAPPE} is not present")
    lines = FRAPPE.read_bytes().splitlines(keepends=True)
    (tmp_path / "data" / "frappe").mkdir(parents=True)
    (tmp_path / "data" / "frappe" / "frappe.train.libfm").write_bytes(
        b"".join(line for i, line in enumerate(lines, 1) if i % 5))
    (tmp_path / "data" / "frappe" / "frappe.validation.libfm").write_bytes(
        b"".join(line for i, line in enumerate(lines, 1) if i % 5 == 0))
    readme = README.read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    fm, afm, valid = namespace["fm"], namespace["afm"], namespace["valid"]
    fm_rmse, afm_rmse = fm.evaluate(valid)["rmse"], afm.evaluate(valid)["rmse"]
    assert afm_rmse <= 0.92 * fm_rmse
    assert afm_rmse < 0.50
    assert len(namespace["pairs"].indptr) == len(valid) + 1
    assert "Epoch 1 [" in capsys.readouterr().out


def test_bayesian_fm_is_as_accurate_as_the_reference_samplers(frappe_mini):
    """FM(solver="mcmc"), k=16, 100 iterations, init_stdev 0.1, all samples averaged,
    at the default seed: issue #24's target is a validation RMSE of at most 0.5125. The
    seed-to-seed spread, and libFM and myFM at the same settings: bench/mcmc_frappe.py
    --seeds N --libfm PATH."""
    train, valid = frappe_mini
    model = afmfast.FM(solver="mcmc", n_factors=16, n_iter=100, init_stdev=0.1,
                       verbose=0).fit(train)
    assert model.evaluate(valid)["rmse"] <= 0.5125
