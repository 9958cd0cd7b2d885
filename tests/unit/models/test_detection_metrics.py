import numpy as np
import pytest

from models.metrics.detection import ImageBoxes, detection_metrics, match_counts

CLASSES = ("crack", "scratch")
# COCO interpolates precision at 101 recall points; reaching recall 1/2 at precision 1
# fills 51 of them.
HALF_RECALL_AP = 51 / 101


def truth(*boxes):
    return ImageBoxes(np.array([b[1:] for b in boxes]).reshape(-1, 4), [b[0] for b in boxes])


def found(*boxes):
    return ImageBoxes(
        np.array([b[1:5] for b in boxes]).reshape(-1, 4),
        [b[0] for b in boxes],
        np.array([b[5] for b in boxes]),
    )


def test_perfect_detections_score_one_everywhere():
    gt = [
        truth(("crack", 10, 10, 60, 40)),
        truth(("scratch", 0, 0, 120, 110), ("crack", 5, 5, 20, 20)),
    ]
    pred = [
        found(("crack", 10, 10, 60, 40, 0.9)),
        found(("scratch", 0, 0, 120, 110, 0.8), ("crack", 5, 5, 20, 20, 0.7)),
    ]
    m = detection_metrics(gt, pred, CLASSES)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx(1.0)
    assert m["ap50_per_class"] == {"crack": pytest.approx(1.0), "scratch": pytest.approx(1.0)}
    assert (m["precision"], m["recall"]) == (1.0, 1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    assert m["n_ground_truth_by_size"] == {"small": 1, "medium": 1, "large": 1}


def test_a_missed_box_halves_recall_and_ap():
    gt = [truth(("crack", 0, 0, 50, 50)), truth(("crack", 100, 100, 150, 150))]
    pred = [found(("crack", 0, 0, 50, 50, 0.9)), ImageBoxes(np.zeros((0, 4)), [], np.zeros(0))]
    m = detection_metrics(gt, pred, CLASSES)
    assert m["map50"] == pytest.approx(HALF_RECALL_AP)
    assert m["recall"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1.0)
    # scratch has no ground truth: it has no AP and does not enter the mean.
    assert m["ap50_per_class"]["scratch"] is None


def test_a_wrong_class_is_a_false_positive_and_a_miss():
    m = detection_metrics(
        [truth(("crack", 0, 0, 50, 50))], [found(("scratch", 0, 0, 50, 50, 0.9))], CLASSES
    )
    assert m["map50"] == 0.0
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    assert m["precision_recall_per_class"]["scratch"]["fp"] == 1


def test_loose_box_counts_at_iou_half_but_not_at_three_quarters():
    # IoU 0.625: a match at the thresholds 0.50, 0.55 and 0.60 only.
    m = detection_metrics(
        [truth(("crack", 0, 0, 100, 100))], [found(("crack", 0, 0, 100, 62.5, 0.9))], CLASSES
    )
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map50_95"] == pytest.approx(0.3)


def test_higher_scoring_false_positive_halves_precision_and_ap():
    gt = [truth(("crack", 0, 0, 50, 50)), ImageBoxes(np.zeros((0, 4)), [])]
    pred = [found(("crack", 0, 0, 50, 50, 0.8)), found(("crack", 10, 10, 40, 40, 0.9))]
    m = detection_metrics(gt, pred, CLASSES)
    assert m["map50"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    # Above the true positive's score only the false positive is left.
    strict = detection_metrics(gt, pred, CLASSES, score_threshold=0.85)
    assert (strict["precision"], strict["recall"]) == (0.0, 0.0)


def test_ap_by_size_separates_small_and_large_boxes():
    gt = [truth(("crack", 0, 0, 20, 20), ("crack", 0, 100, 200, 300))]
    pred = [found(("crack", 0, 0, 20, 20, 0.9))]
    m = detection_metrics(gt, pred, CLASSES)
    assert m["ap_by_size"]["small"] == pytest.approx(1.0)
    assert m["ap_by_size"]["large"] == pytest.approx(0.0)
    assert m["ap_by_size"]["medium"] is None


def test_no_detection_at_all_is_zero_ap():
    m = detection_metrics(
        [truth(("crack", 0, 0, 50, 50))], [ImageBoxes(np.zeros((0, 4)), [], np.zeros(0))], CLASSES
    )
    assert m["map50"] == 0.0
    assert m["ap50_per_class"]["crack"] == 0.0
    assert m["recall"] == 0.0


def test_match_counts_take_each_ground_truth_once():
    gt = truth(("crack", 0, 0, 50, 50))
    pred = found(("crack", 0, 0, 50, 50, 0.9), ("crack", 1, 1, 50, 50, 0.8))
    assert match_counts(gt, pred, 0.5, 0.0) == {"crack": (1, 1, 0)}


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="ground-truth images"):
        detection_metrics([truth(("crack", 0, 0, 5, 5))], [], CLASSES)
    with pytest.raises(ValueError, match="not among the classes"):
        detection_metrics(
            [truth(("dent", 0, 0, 5, 5))], [found(("crack", 0, 0, 5, 5, 1.0))], CLASSES
        )
    with pytest.raises(ValueError, match="scores"):
        detection_metrics([truth(("crack", 0, 0, 5, 5))], [truth(("crack", 0, 0, 5, 5))], CLASSES)


def test_the_fitted_threshold_keeps_the_matches_and_drops_the_confident_misses():
    from models.metrics.detection import best_f1_threshold, f1_at

    gt = [truth(("crack", 0, 0, 50, 50)), truth(("crack", 0, 0, 50, 50)), truth()]
    pred = [
        found(("crack", 0, 0, 50, 50, 0.8), ("crack", 100, 100, 150, 150, 0.3)),
        found(("crack", 1, 1, 50, 50, 0.7)),
        found(("crack", 10, 10, 40, 40, 0.4), ("crack", 60, 60, 90, 90, 0.2)),  # a good image
    ]
    best = best_f1_threshold(gt, pred)
    assert 0.4 < best["threshold"] <= 0.7
    assert best["f1"] == 1.0 and best["boxes_per_image"] == pytest.approx(2 / 3)
    low = f1_at(gt, pred, 0.2)
    assert low["boxes_per_image"] == pytest.approx(5 / 3) and low["f1"] == pytest.approx(4 / 7)
    nothing = [ImageBoxes(np.zeros((0, 4)), [], np.zeros(0))] * 3
    assert best_f1_threshold(gt, nothing)["threshold"] == 1.0
