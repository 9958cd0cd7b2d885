import numpy as np
import pytest

from models.decision import DETECTOR, VERIFIER, DecisionRule, ensemble_rule, fit_decision_rule


def test_outside_the_band_the_detector_decides_alone():
    rule = DecisionRule(threshold=0.5, lo=0.3, hi=0.7, fusion_weight=0.5, fused_threshold=0.5)
    assert not rule.needs_verifier(0.1) and not rule.needs_verifier(0.9)
    assert rule.decide(0.9) == (True, 0.9, DETECTOR)
    assert rule.decide(0.1) == (False, 0.1, DETECTOR)


def test_inside_the_band_the_fused_score_decides_and_stays_in_the_band():
    rule = DecisionRule(threshold=0.5, lo=0.3, hi=0.7, fusion_weight=0.25, fused_threshold=0.5)
    assert rule.needs_verifier(0.55)
    # The detector leans defective (0.55) but the verifier is sure it is good.
    decision = rule.decide(0.55, verifier_score=0.05)
    assert not decision.defective and decision.decided_by == VERIFIER
    assert 0.3 <= decision.anomaly_score <= 0.7
    assert rule.decide(0.45, verifier_score=0.95).defective
    with pytest.raises(ValueError, match="verifier score"):
        rule.decide(0.5)


def test_no_band_means_no_verifier_and_bad_rules_are_refused():
    rule = DecisionRule(threshold=0.4, lo=0.4, hi=0.4)
    assert not rule.needs_verifier(0.4)
    assert rule.decide(0.4).defective
    with pytest.raises(ValueError):
        DecisionRule(threshold=0.8, lo=0.1, hi=0.5)
    with pytest.raises(ValueError):
        DecisionRule(fusion_weight=1.5)
    assert DecisionRule.from_dict(rule.to_dict()) == rule


def _confusing_detector(seed: int = 0):
    """A detector that is right far from 0.5 and guesses near it; a verifier that knows."""
    rng = np.random.default_rng(seed)
    truth = rng.random(300) < 0.4
    p = np.where(truth, rng.uniform(0.6, 1.0, 300), rng.uniform(0.0, 0.4, 300))
    hard = rng.random(300) < 0.15
    p[hard] = rng.uniform(0.42, 0.58, hard.sum())
    verifier = np.where(truth, rng.uniform(0.6, 1.0, 300), rng.uniform(0.0, 0.4, 300))
    return p, verifier, truth


def test_fit_opens_a_band_where_the_verifier_helps():
    p, verifier, truth = _confusing_detector()
    rule, figures = fit_decision_rule(p, verifier, truth)
    assert rule.lo < rule.hi and rule.lo <= 0.42 and rule.hi >= 0.58
    assert figures["val_accuracy_rule"] > figures["val_accuracy_detector"]
    assert 0 < figures["val_call_rate"] <= 0.3
    decided = [
        rule.decide(pi, vi if rule.needs_verifier(pi) else None)
        for pi, vi in zip(p, verifier, strict=True)
    ]
    accuracy = np.mean([d.defective == t for d, t in zip(decided, truth, strict=True)])
    assert accuracy == pytest.approx(figures["val_accuracy_rule"])


def test_fit_keeps_no_band_when_the_verifier_is_noise():
    p, _, truth = _confusing_detector()
    noise = np.random.default_rng(1).random(len(p))
    _, figures = fit_decision_rule(p, noise, truth, call_cost=0.05)
    assert (
        figures["val_accuracy_rule"] - 0.05 * figures["val_call_rate"]
        >= figures["val_accuracy_detector"] - 1e-9
    )
    # Without a verifier there is never a band.
    alone, _ = fit_decision_rule(p, None, truth)
    assert alone.lo == alone.hi == alone.threshold


def test_fit_threshold_maximises_accuracy():
    p = [0.1, 0.2, 0.3, 0.35, 0.8, 0.9]
    truth = [False, False, True, True, True, True]
    rule, figures = fit_decision_rule(p, None, truth)
    assert 0.2 < rule.threshold <= 0.3
    assert figures["val_accuracy_detector"] == 1.0
    with pytest.raises(ValueError):
        fit_decision_rule([0.5], None, [True, False])


@pytest.mark.parametrize(
    "rule",
    [
        DecisionRule(threshold=0.2, lo=0.1, hi=0.6, fusion_weight=0.25, fused_threshold=0.7),
        DecisionRule(threshold=0.8, lo=0.8, hi=0.8),
        DecisionRule(threshold=0.5, lo=0.0, hi=1.0, fusion_weight=0.0, fused_threshold=0.1),
    ],
)
def test_final_score_is_one_scale_where_half_means_defective(rule):
    grid = np.linspace(0.0, 1.0, 41)
    outside = []
    for p in grid:
        for v in grid:
            decision = rule.decide(p, v)
            assert 0.0 <= decision.anomaly_score <= 1.0
            assert (decision.anomaly_score >= 0.5) == decision.defective, (p, v, decision)
        if not rule.needs_verifier(p):
            outside.append(rule.decide(p).anomaly_score)
    # Outside the band the score grows with the detector's probability.
    assert outside == sorted(outside)


def test_ensemble_rule_verifies_every_part_and_averages():
    p, verifier, truth = _confusing_detector()
    rule, figures = ensemble_rule(p, verifier, truth)
    assert (rule.lo, rule.hi, rule.fusion_weight) == (0.0, 1.0, 0.5)
    assert figures["val_call_rate"] == 1.0
    decided = [rule.decide(pi, vi) for pi, vi in zip(p, verifier, strict=True)]
    assert {d.decided_by for d in decided} == {VERIFIER}
    accuracy = np.mean([d.defective == t for d, t in zip(decided, truth, strict=True)])
    assert accuracy == pytest.approx(figures["val_accuracy_rule"])
    # The verifier fixes the detector's unsure parts, so the ensemble beats it here.
    assert figures["val_accuracy_rule"] > figures["val_accuracy_detector"]
    with pytest.raises(ValueError, match="verifier score"):
        ensemble_rule(p, verifier[:-1], truth)
