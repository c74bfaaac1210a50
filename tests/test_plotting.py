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
