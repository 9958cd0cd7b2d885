"""Pixel-level metrics of anomaly maps against defect masks: pixel AUROC and AUPRO.

Both follow the MVTec AD protocol (Bergmann et al. 2019, 2021): every pixel of
every test image counts, good images included (their pixels are all normal).
AUPRO weighs each defect region equally, however small: the per-region overlap
averaged over regions, integrated over the false-positive rate up to 0.3 and
divided by 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _stack(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    if len(masks) != len(maps) or not masks:
        raise ValueError(
            f"need one map per mask and at least one, got {len(masks)} and {len(maps)}"
        )
    for mask, found in zip(masks, maps, strict=True):
        if np.shape(mask) != np.shape(found) or np.ndim(mask) != 2:
            raise ValueError(f"a mask {np.shape(mask)} and its map {np.shape(found)} differ")
    return np.stack([np.asarray(m, dtype=bool) for m in masks]), np.stack(
        [np.asarray(m, dtype=np.float64) for m in maps]
    )


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """Area under the ROC curve of every pixel's anomaly value for the masks' truth.

    Returns:
        The AUROC, or NaN when no pixel (or every pixel) is a defect.
    """
    truth, values = _stack(masks, maps)
    truth, values = truth.ravel(), values.ravel()
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(-values, kind="stable")
    values, truth = values[order], truth[order]
    # One ROC point per distinct value (ties move together), from the highest down.
    last = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
    tp = np.cumsum(truth)[last] / n_pos
    fp = np.cumsum(~truth)[last] / n_neg
    return float(np.trapezoid(np.r_[0.0, tp], np.r_[0.0, fp]))


def aupro(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    max_fpr: float = 0.3,
    thresholds: int = 200,
) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised to [0, 1].

    Each connected defect region (8-connectivity) of each mask is a region; at a
    threshold its overlap is the share of its pixels above it. The curve is the
    mean overlap against the false-positive rate over normal pixels.

    Returns:
        The normalised area, or NaN when the masks hold no defect region.
    """
    truth, values = _stack(masks, maps)
    labels = np.zeros(truth.shape, dtype=np.int64)
    regions = 0
    for i, mask in enumerate(truth):
        found, n = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[i] = np.where(found > 0, found + regions, 0)
        regions += n
    if regions == 0 or truth.all():
        return math.nan
    flat_labels, flat_values = labels.ravel(), values.ravel()
    in_region = flat_labels > 0
    region_labels, region_values = flat_labels[in_region], flat_values[in_region]
    normal = np.sort(flat_values[~in_region])
    region_size = np.bincount(region_labels, minlength=regions + 1)[1:]
    # From the highest value down: one curve point per cut, the false-positive
    # rate exact (ties above the cut count), the overlap averaged over regions.
    cuts = np.unique(np.quantile(flat_values, np.linspace(0.0, 1.0, thresholds)))[::-1]
    fpr, pro = [0.0], [0.0]
    for cut in cuts:
        fpr.append(1.0 - np.searchsorted(normal, cut, side="left") / max(1, normal.size))
        hits = np.bincount(region_labels[region_values >= cut], minlength=regions + 1)[1:]
        pro.append(float((hits / region_size).mean()))
        if fpr[-1] > max_fpr:
            break
    fpr_a, pro_a = np.asarray(fpr), np.asarray(pro)
    if fpr_a[-1] > max_fpr:  # the curve's value at max_fpr, between its last two points
        f0, f1, p0, p1 = fpr_a[-2], fpr_a[-1], pro_a[-2], pro_a[-1]
        pro_a[-1] = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
        fpr_a[-1] = max_fpr
    elif fpr_a[-1] < max_fpr:  # every cut stayed below: the last overlap holds on
        fpr_a, pro_a = np.r_[fpr_a, max_fpr], np.r_[pro_a, pro_a[-1]]
    return float(np.trapezoid(pro_a, fpr_a) / max_fpr)
