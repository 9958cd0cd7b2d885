"""Pixel AUROC and AUPRO against independent computations and known cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics.pixel import aupro, pixel_auroc


def _masks_and_maps(seed=0):
    rng = np.random.default_rng(seed)
    masks = [np.zeros((32, 32), bool) for _ in range(4)]
    masks[1][4:10, 4:10] = True
    masks[2][20:22, 5:30] = True
    masks[2][1:3, 1:3] = True  # a second, tiny region
    maps = [rng.random((32, 32)) + 0.8 * m for m in masks]
    return masks, maps


def test_pixel_auroc_matches_sklearn_with_ties():
    masks, maps = _masks_and_maps()
    maps = [np.round(m, 1) for m in maps]  # many ties
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_aupro_perfect_random_and_region_weighting():
    masks, _ = _masks_and_maps()
    assert aupro(masks, [m.astype(float) for m in masks]) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(1)
    large = [np.zeros((64, 64), bool) for _ in range(3)]
    large[0][10:40, 10:40], large[2][40:60, 5:60] = True, True
    chance = aupro(large, [rng.random(m.shape) for m in large])
    assert chance == pytest.approx(0.15, abs=0.03)  # random maps: mean overlap = FPR
    # Finding one region of three and missing two (scored below every normal pixel):
    # each region counts once, so the overlap is 1/3 at every FPR (by pixels, 0.4).
    found_one = [0.1 + 0.1 * rng.random(m.shape) + m for m in masks]
    found_one[2] = np.where(masks[2], 0.0, found_one[2] - masks[2])
    assert aupro(masks, found_one) == pytest.approx(1 / 3, abs=2e-3)


def test_undefined_and_mismatched_inputs():
    empty = [np.zeros((8, 8), bool)]
    assert math.isnan(pixel_auroc(empty, [np.ones((8, 8))]))
    assert math.isnan(aupro(empty, [np.ones((8, 8))]))
    with pytest.raises(ValueError, match="differ"):
        pixel_auroc([np.zeros((8, 8), bool)], [np.zeros((4, 4))])
