"""Fitting a category's decision rule on its validation split, with real small models."""

import numpy as np
from PIL import Image

from models.data.sample import Sample
from models.decision import DecisionRule
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


def test_a_category_with_real_validation_defects_gets_a_fitted_band(registry, tmp_path):
    samples = _val_samples(tmp_path, "sure", ["good", "scratch"] * 3)
    fitted = fit_decision(registry, samples, "sure")
    # Every image gets p = 0.95, so any band would hold every image, far over the
    # 30 % call budget: with real defects to fit on, the detector decides alone.
    rule = DecisionRule.from_dict(fitted["rule"])
    assert rule.lo == rule.hi == rule.threshold
    assert fitted["val_call_rate"] == 0.0
