"""The field-attention heatmap and ``afmfast demo --plot``."""
import numpy as np
import pytest

import afmfast
from afmfast.demo import make_demo_data

pytest.importorskip("matplotlib")


def test_plot_field_attention_draws_every_finite_cell(tmp_path):
    data = make_demo_data(n_rows=2000, seed=3)
    afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, verbose=0).fit(data.train)
    names = [f"field {f}" for f in range(data.fields.max() + 1)]
    ax = afmfast.plot_field_attention(afm, data.valid, data.fields, field_names=names)
    matrix = afm.field_attention(data.valid, data.fields)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == np.isfinite(matrix).sum()
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    path = tmp_path / "fa.png"
    ax.figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="field_names"):
        afmfast.plot_field_attention(afm, data.valid, data.fields, field_names=["a"])


def test_plot_field_attention_takes_the_fields_of_a_dataframe_model():
    """As field_attention(df) needs no fields for a model fitted on a DataFrame, neither
    does the plot; the columns label the axes."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    n = 1500
    df = pd.DataFrame({"user": rng.choice(list("abcdefgh"), n),
                       "item": rng.choice(list("pqrstu"), n),
                       "city": rng.choice(list("xyz"), n)})
    y = (df["user"] == "a") * 1.0 + (df["item"] == "p") * (df["city"] == "x") * 2.0
    afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=2, verbose=0).fit(df, y)
    ax = afmfast.plot_field_attention(afm, df)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["user", "item", "city"]
    matrix = afm.field_attention(df)
    assert len(ax.texts) == np.isfinite(matrix).sum() == 6
    ax = afmfast.plot_field_attention(afm, df, field_names=["U", "I", "C"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["U", "I", "C"]
