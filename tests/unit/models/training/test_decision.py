"""Fitting a category's decision rule on its validation split, with real small models."""

import numpy as np
from PIL import Image

from models.data.sample import Sample
from models.decision import DecisionRule
from models.stages import load_decision
from models.training.decision import fit_decision


def _val_samples(tmp_path, category, labels):
    rng = np.random.default_rng(1)
    samples = []
    for i, label in enumerate(labels):
        path = tmp_path / f"{category}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, category, label, "val", sample_id=f"{category}-{i}"))
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
