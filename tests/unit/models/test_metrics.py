import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics import (
    balanced_accuracy,
    binary_accuracy,
    binary_counts,
    binary_f1,
    image_auroc,
)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + truth * 0.4, 1)  # rounding makes ties
    assert image_auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))


def test_image_auroc_perfect_inverse_and_single_class():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert math.isnan(image_auroc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.5])


def test_binary_metrics_from_counts():
    truth = [True, True, True, False, False, False, False, False]
    predicted = [True, True, False, True, False, False, False, False]
    counts = binary_counts(truth, predicted)
    assert (counts.tp, counts.fn, counts.fp, counts.tn) == (2, 1, 1, 4)
    assert binary_accuracy(counts) == pytest.approx(6 / 8)
    assert binary_f1(counts) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert balanced_accuracy(counts) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_f1_without_positives_is_zero_and_length_mismatch_raises():
    counts = binary_counts([False, False], [False, False])
    assert binary_f1(counts) == 0.0
    assert balanced_accuracy(counts) == 1.0
    with pytest.raises(ValueError):
        binary_counts([True], [True, False])
