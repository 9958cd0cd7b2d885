"""The metrics evaluation computes from the pipeline's records."""

import pytest

from models.evaluation.records import ImageRecord
from models.evaluation.run import defect_type_metrics


def _record(
    label, anomalous, defect_type=None, predicted_class=None, by_classifier=None, grade=None
):
    return ImageRecord(
        sample_id=label,
        image_path="x.png",
        category="c",
        label=label,
        is_anomalous=anomalous,
        anomaly_score=0.9 if anomalous else 0.1,
        verdict="defective" if anomalous else "ok",
        decided_by="detector",
        detector_probability=0.5,
        defect_type=defect_type,
        predicted_class=predicted_class,
        classifier_defect_type=by_classifier,
        grade=grade,
    )


def test_defect_typing_counts_true_defects_only():
    records = [
        _record("crack", True, "crack", "crack"),
        _record("crack", True, "scratch", "scratch"),
        _record("scratch", True, "scratch", "scratch"),
        _record("good", False, "crack", "good"),  # typed, but not a defect
        _record("crack", True),  # no classifier for it
    ]
    metrics = defect_type_metrics(records, "synthetic")
    assert metrics["n_typed"] == 3
    assert metrics["defect_type_top1"] == pytest.approx(2 / 3)
    assert "four_class_accuracy" not in metrics


def test_four_class_accuracy_scores_the_served_grade_beside_the_classifier():
    records = [
        _record("good", False, "defect_p100", "good", grade="good"),
        _record("defect_p33", False, "defect_p67", "good", grade="defect_p33"),
        _record("defect_p67", True, "defect_p67", "defect_p67", grade="defect_p100"),
        _record("defect_p100", True, "defect_p67", "defect_p100", grade="defect_p100"),
    ]
    metrics = defect_type_metrics(records, "elpv")
    assert metrics["four_class_accuracy"] == pytest.approx(3 / 4)
    assert metrics["four_class_accuracy_classifier"] == pytest.approx(3 / 4)
    assert metrics["defect_type_top1"] == pytest.approx(1 / 2)
    # Without a classifier the grade is still scored; without either, nothing is.
    no_classifier = [_record("defect_p33", True, grade="defect_p33")]
    assert defect_type_metrics(no_classifier, "elpv") == {"n_typed": 0, "four_class_accuracy": 1}
    assert defect_type_metrics([_record("good", False)], "elpv") == {"n_typed": 0}


def test_reranking_is_scored_beside_the_classifier_alone_and_new_types_apart():
    records = [
        _record("crack", True, "crack", by_classifier="scratch"),  # fixed by reranking
        _record("scratch", True, "scratch", by_classifier="scratch"),
        _record("hole", True, "hole", by_classifier="crack"),  # known only by words
        _record("hole", True, "crack", by_classifier="crack"),
    ]
    metrics = defect_type_metrics(records, "synthetic", {"c": {"hole"}})
    assert metrics["defect_type_top1"] == pytest.approx(3 / 4)
    assert metrics["defect_type_top1_classifier_only"] == pytest.approx(1 / 4)
    assert metrics["defect_type_confusions"] == {"hole->crack": 1}
    assert metrics["defect_type_confusions_classifier_only"] == {
        "hole->crack": 2,
        "crack->scratch": 1,
    }
    assert metrics["n_open_vocabulary"] == 2
    assert metrics["open_vocabulary_top1"] == pytest.approx(1 / 2)
    assert "n_open_vocabulary" not in defect_type_metrics(records, "synthetic")
