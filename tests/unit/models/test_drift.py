"""Score drift: the KS statistic, the stored reference and the monitor's verdicts."""

import numpy as np
import pytest

from models.drift import DriftLimits, DriftMonitor, ks_statistic, score_reference


def test_the_ks_statistic_is_the_largest_gap_between_the_cdfs():
    assert ks_statistic([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.0
    assert ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
    # Half of a lies below all of b, half above: the gap peaks at one half.
    assert ks_statistic([0.1, 0.9], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-empty"):
        ks_statistic([], [0.5])


def test_the_reference_keeps_quantiles_and_the_count():
    scores = np.random.default_rng(0).uniform(0, 0.4, size=1000)
    reference = score_reference(scores)
    assert reference["n_good"] == 1000 and len(reference["good_scores"]) == 201
    assert reference["good_scores"][0] == pytest.approx(scores.min(), abs=1e-6)
    assert reference["good_scores"][-1] == pytest.approx(scores.max(), abs=1e-6)
    assert score_reference([0.3, 0.1], defective_share=0.25) == {
        "good_scores": [0.1, 0.3],
        "n_good": 2,
        "defective_share": 0.25,
    }


def _monitor(reference, share=0.0, **limits):
    return DriftMonitor({"tile": score_reference(reference, share)}, DriftLimits(**limits))


def test_the_same_parts_do_not_drift_whatever_the_defect_rate():
    rng = np.random.default_rng(1)
    monitor = _monitor(rng.beta(2, 8, 200) * 0.5, window=300, min_parts=50)
    for _ in range(270):  # good parts like validation's
        monitor.observe("tile", rng.beta(2, 8) * 0.5)
    for _ in range(30):  # and a tenth judged defective
        monitor.observe("tile", 0.5 + rng.uniform(0, 0.5))
    status = monitor.status("tile")
    assert status["parts"] == 300 and status["defective_share"] == pytest.approx(0.1)
    assert status["ks"] < 0.15 and not status["drifting"], status


def test_scores_moving_on_the_ok_side_drift():
    rng = np.random.default_rng(2)
    monitor = _monitor(rng.beta(2, 8, 200) * 0.5, window=100, min_parts=50)
    for _ in range(100):  # darker images: still judged ok, but nearer the threshold
        monitor.observe("tile", 0.3 + rng.uniform(0, 0.19))
    status = monitor.status("tile")
    assert status["drifting"] and status["ks"] > 0.6 and "KS" in status["reason"], status


def test_most_parts_judged_defective_drift():
    monitor = _monitor(np.linspace(0.0, 0.4, 50), window=60, min_parts=50)
    for i in range(60):
        monitor.observe("tile", 0.9 if i % 4 else 0.2)
    status = monitor.status("tile")
    assert status["drifting"] and status["defective_share"] == pytest.approx(0.75)
    assert "judged defective" in status["reason"]


def test_the_share_judged_defective_is_weighed_against_validations():
    # A line whose validation parts were 40 % defective: 60 % is no drift, 75 % is.
    for share, drifting in ((0.6, False), (0.75, True)):
        monitor = _monitor(np.linspace(0.0, 0.4, 50), share=0.4, window=100, min_parts=50)
        defective = round(share * 100)
        for score in [0.9] * defective + list(np.linspace(0.0, 0.4, 100 - defective)):
            monitor.observe("tile", score)
        status = monitor.status("tile")
        assert status["defective_share"] == pytest.approx(share)
        assert status["drifting"] is drifting, status


def test_too_few_parts_or_references_are_never_drifting():
    monitor = _monitor(np.linspace(0.0, 0.4, 50), window=100, min_parts=50)
    for _ in range(49):
        monitor.observe("tile", 0.99)
    assert not monitor.status("tile")["drifting"]
    assert monitor.status("tile")["reason"].startswith("collecting: 49 of 50")
    # Three good validation parts: their scores' shape is not judged, the share is.
    few = _monitor([0.1, 0.2, 0.3], min_reference=20, window=60, min_parts=50)
    for _ in range(60):
        few.observe("tile", 0.45)
    assert few.status("tile")["ks"] is None and not few.status("tile")["drifting"]
    for _ in range(60):
        few.observe("tile", 0.99)
    assert few.status("tile")["drifting"]
    assert DriftMonitor({}).status("unknown")["reason"].startswith("not checked")


def test_limits_are_checked():
    with pytest.raises(ValueError, match="min_parts"):
        DriftLimits(window=10, min_parts=20)
    with pytest.raises(ValueError, match="max_ks"):
        DriftLimits(max_ks=0.0)
