"""Pictures of what an AFM learned (matplotlib is optional: imported only here)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from numpy.typing import ArrayLike

    from afmfast.models.afm import AFM
    from afmfast.models.inputs import ModelInput


def _pyplot():
    try:
        import matplotlib.pyplot as plt  # picks a non-interactive backend when headless
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    return plt


def plot_field_attention(model: AFM, X: ModelInput, fields: ArrayLike | None = None,
                         ax: Axes | None = None,
                         field_names: Sequence[str] | None = None) -> Axes:
    """Draw ``model.field_attention(X, fields)`` as a labelled heatmap.

    Each cell (f, g) is the mean attention weight of the pairs of features in fields f
    and g over the rows of X (blank where no such pair occurs). ``fields`` defaults as in
    ``AFM.field_attention``: the columns of a model fitted on a DataFrame, whose names
    then label the axes unless ``field_names`` is given. Returns the matplotlib Axes.

    Examples
    --------
    >>> import afmfast
    >>> from afmfast.demo import make_demo_data
    >>> data = make_demo_data(n_rows=1000, seed=0)
    >>> afm = afmfast.AFM(n_factors=4, attention_size=4, n_epochs=1, verbose=0)
    >>> ax = afmfast.plot_field_attention(afm.fit(data.train), data.valid, data.fields)
    >>> ax.get_title()
    'Mean AFM attention per field pair'
    """
    plt = _pyplot()
    matrix = model.field_attention(X, fields)
    n = matrix.shape[0]
    fmap = getattr(model, "feature_map_", None)
    if field_names is not None:
        names = list(field_names)
    elif fields is None and fmap is not None:  # the feature map's fields: its columns
        names = [str(c) for c in fmap.columns]
    elif fields is None and hasattr(model, "field_names_"):  # a hashed store's fields
        names = list(model.field_names_)
    else:
        names = [str(f) for f in range(n)]
    if len(names) != n:
        raise ValueError(f"field_names must have {n} entries (one per field), got "
                         f"{len(names)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.6 + 0.6 * n))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label="mean attention weight")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if matrix[i, j] > middle else "white")
    ax.set_title("Mean AFM attention per field pair")
    return ax
