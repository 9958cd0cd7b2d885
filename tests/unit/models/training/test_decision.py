"""Fitting a category's decision rule on its validation split, with real small models."""

import numpy as np
from PIL import Image

from models.data.sample import Sample
from models.decision import DecisionRule
from models.grading import CLASSIFIER, SCORE, Grading
from models.inspection import LocalInspector
from models.stages import load_decision, save_decision
from models.training.decision import fit_decision
from tests.tiny_models import add_classifier, random_images

LEVELS = {"good": 0.0, "crack": 0.5, "scratch": 1.0}


def _val_samples(tmp_path, category, labels, severity=None):
    rng = np.random.default_rng(1)
    samples = []
    for i, label in enumerate(labels):
        path = tmp_path / f"{category}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(path)
        level = severity[label] if severity else None
        samples.append(
            Sample(path, category, label, "val", sample_id=f"{category}-{i}", severity=level)
        )
    return samples


def test_a_category_validated_on_synthetic_defects_gets_the_ensemble_rule(registry, tmp_path):
    # Only good validation parts: synthetic anomalies complete the split, and since
    # they are what a normal-only detector trained on, the rule verifies every part.
    samples = _val_samples(tmp_path, "sure", ["good"] * 6)
    fitted = fit_decision(registry, samples, "sure")
    rule = DecisionRule.from_dict(fitted["rule"])
    assert (rule.lo, rule.hi, rule.fusion_weight) == (0.0, 1.0, 0.5)
    assert fitted["val_call_rate"] == 1.0
    assert all(rule.needs_verifier(p) for p in (0.0, 0.3, 0.95, 1.0))
    # Drift is measured against the real good parts' final scores.
    _, manifest = load_decision(registry, "sure")
    reference = manifest.metrics["drift_reference"]
    assert reference["n_good"] == 6 and len(reference["good_scores"]) == 6
    # Every real part is good: the share judged defective is theirs, not the synthetic ones'.
    judged = np.mean(np.asarray(reference["good_scores"]) >= 0.5)
    assert reference["defective_share"] == round(float(judged), 6)


def test_a_category_with_real_validation_defects_gets_a_fitted_band(registry, tmp_path):
    samples = _val_samples(tmp_path, "sure", ["good", "scratch"] * 3)
    fitted = fit_decision(registry, samples, "sure")
    # Every image gets p = 0.95, so any band would hold every image, far over the
    # 30 % call budget: with real defects to fit on, the detector decides alone.
    rule = DecisionRule.from_dict(fitted["rule"])
    assert rule.lo == rule.hi == rule.threshold
    assert fitted["val_call_rate"] == 0.0
    # The three good parts' final scores, and the share of all six judged defective.
    _, manifest = load_decision(registry, "sure")
    reference = manifest.metrics["drift_reference"]
    final = rule.decide(0.95).anomaly_score
    assert reference["good_scores"] == [round(final, 6)] * 3 and reference["n_good"] == 3
    assert reference["defective_share"] == float(final >= 0.5)


def test_a_graded_category_gets_a_grading_the_service_answers(registry, tmp_path):
    # Labels with a severity each (as ELPV's levels): the rule comes with a grading,
    # weighed against the classifier's levels, and the flow answers a grade.
    add_classifier(registry, "sure")  # classes good, crack, scratch
    samples = _val_samples(tmp_path, "sure", list(LEVELS) * 3, LEVELS)
    fitted = fit_decision(registry, samples, "sure")
    grading = Grading.from_dict(fitted["grading"])
    assert grading.levels == ("good", "crack", "scratch")
    _, manifest = load_decision(registry, "sure")
    assert manifest.config["grading"] == grading.to_dict()
    assert "classifier_version" in manifest.config
    measured = manifest.metrics["grading_fit"]
    assert measured == fitted["grading_fit"]
    assert measured["chosen"] == grading.source and measured["n_val"] == 9
    assert 0.0 <= measured["val_accuracy_classifier"] <= 1.0
    # Every part scores 0.95 ("sure"): the cuts grade all nine the same, right on three.
    assert measured["val_accuracy_score"] == 3 / 9
    inspector = LocalInspector(registry)
    assert inspector.plan.categories["sure"].grading == grading
    found = inspector.inspect_images(random_images(2), ["sure", "unsure"])
    assert found[0].verdict == "defective" and found[0].grade in ("crack", "scratch")
    assert found[1].grade is None  # "unsure" is not graded


def test_an_ungraded_category_gets_no_grading(registry, tmp_path):
    fitted = fit_decision(registry, _val_samples(tmp_path, "sure", ["good", "crack"] * 2), "sure")
    assert "grading" not in fitted
    assert "grading" not in load_decision(registry, "sure")[1].config
    assert LocalInspector(registry).plan.categories["sure"].grading is None


def test_the_flow_grades_by_the_source_the_grading_names(registry, tmp_path):
    # "sure" scores 0.95 (defective). Cuts chosen to name the other defective level
    # than the classifier's: the answer shows which source graded it.
    add_classifier(registry, "sure")
    fit_decision(registry, _val_samples(tmp_path, "sure", list(LEVELS) * 3, LEVELS), "sure")
    rule, _ = load_decision(registry, "sure")
    image = random_images(1)
    scores = LocalInspector(registry).inspect_images(image, ["sure"])[0].classified.class_scores
    by_classifier = max(("crack", "scratch"), key=scores.__getitem__)
    cuts = (0.5, 0.5) if by_classifier == "crack" else (0.5, 1.0)  # the cuts: the other one
    for source in (SCORE, CLASSIFIER):
        grading = Grading(("good", "crack", "scratch"), 1, cuts, source)
        save_decision(registry, "sure", rule, fitted_on={}, metrics={}, grading=grading)
        found = LocalInspector(registry).inspect_images(image, ["sure"])[0]
        assert found.verdict == "defective" and found.classified is not None
        expected = (
            by_classifier
            if source == CLASSIFIER
            else ({"crack", "scratch"} - {by_classifier}).pop()
        )
        assert found.grade == expected, (source, found.grade, scores)
