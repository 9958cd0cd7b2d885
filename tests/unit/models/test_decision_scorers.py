"""The first-line score: detector, memory bank or both fused, and how it is chosen."""

import numpy as np
import pytest

from models.decision import FUSED, MEMORY_BANK, DecisionRule, fit_scorers


def test_first_score_of_each_scorer():
    detector_only = DecisionRule()
    assert detector_only.scorer == "detector" and detector_only.first_score(0.3, None) == 0.3
    bank_only = DecisionRule(detector_weight=0.0, bank_weight=1.0)
    assert bank_only.scorer == MEMORY_BANK and not bank_only.uses_detector
    assert bank_only.first_score(None, 0.8) == pytest.approx(0.8)
    fused = DecisionRule(detector_weight=1.0, bank_weight=1.0, bank_bias=0.0)
    assert fused.scorer == FUSED
    # Equal logits add: two 0.75s make 0.9.
    assert fused.first_score(0.75, 0.75) == pytest.approx(0.9)
    decision = fused.decide(fused.first_score(0.75, 0.75))
    assert decision.defective and decision.decided_by == FUSED
    with pytest.raises(ValueError, match="memory bank"):
        fused.first_score(0.75, None)
    with pytest.raises(ValueError, match="detector"):
        DecisionRule().first_score(None, 0.5)
    with pytest.raises(ValueError, match="needs the detector, the memory bank or both"):
        DecisionRule(detector_weight=0.0, bank_weight=0.0)


def test_a_rule_stored_before_the_memory_bank_reads_as_the_detector_alone():
    old = {"threshold": 0.4, "lo": 0.3, "hi": 0.6, "fusion_weight": 0.5, "fused_threshold": 0.5}
    rule = DecisionRule.from_dict(old)
    assert rule.scorer == "detector" and rule.first_score(0.41) == 0.41
    assert DecisionRule.from_dict(rule.to_dict()) == rule


def _scores(seed, n=120):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    return rng, truth


def test_fit_scorers_picks_the_informative_score():
    rng, truth = _scores(0)
    informative = np.clip(np.where(truth, 0.75, 0.25) + rng.normal(0, 0.12, truth.size), 0.01, 0.99)
    noise = rng.random(truth.size)
    weights, figures = fit_scorers(noise, informative, truth)
    assert figures["chosen"] == MEMORY_BANK
    assert weights == {"detector_weight": 0.0, "bank_weight": 1.0, "bank_bias": 0.0}
    weights, figures = fit_scorers(informative, noise, truth)
    assert figures["chosen"] == "detector" and weights["bank_weight"] == 0.0


def test_fit_scorers_fuses_two_halves_of_the_truth():
    # Each score sees a different half of the defects: only their fusion sees all.
    rng, truth = _scores(1, n=200)
    kind = rng.random(truth.size) < 0.5
    detector = np.where(truth & kind, 0.9, 0.2) + rng.normal(0, 0.05, truth.size)
    bank = np.where(truth & ~kind, 0.9, 0.2) + rng.normal(0, 0.05, truth.size)
    weights, figures = fit_scorers(np.clip(detector, 0.01, 0.99), np.clip(bank, 0.01, 0.99), truth)
    assert figures["chosen"] == FUSED
    assert weights["detector_weight"] > 0 and weights["bank_weight"] > 0
    assert figures[f"cv_accuracy_{FUSED}"] > max(
        figures["cv_accuracy_detector"], figures[f"cv_accuracy_{MEMORY_BANK}"]
    )
