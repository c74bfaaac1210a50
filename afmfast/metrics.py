"""Evaluation metrics, computed as the reference code computes them."""
import numpy as np


def rmse(y_true, y_pred):
    """Root mean squared error after clipping predictions to [min(y_true), max(y_true)],
    as the reference does (an empty set has RMSE NaN)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    if y_true.size == 0:
        return float("nan")
    clipped = np.clip(np.asarray(y_pred, dtype=np.float64), y_true.min(), y_true.max())
    return float(np.sqrt(np.mean((y_true - clipped) ** 2)))
