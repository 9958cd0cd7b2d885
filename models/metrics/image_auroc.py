"""Image-level AUROC: how well the anomaly score ranks defective above good parts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def image_auroc(is_anomalous: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for the binary truth ``is_anomalous``.

    Computed by the Mann-Whitney U statistic with ties counted as one half.

    Returns:
        The AUROC in [0, 1], or NaN when only one class is present (undefined).
    """
    truth = np.asarray(is_anomalous, dtype=bool)
    values = np.asarray(scores, dtype=np.float64)
    if truth.shape != values.shape:
        raise ValueError(f"{truth.shape[0]} labels but {values.shape[0]} scores")
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # Average ranks over ties (1-based).
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    u = ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
