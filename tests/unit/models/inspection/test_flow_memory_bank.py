"""The memory bank in the flow: as the first-line score alone or fused, and as the heatmap."""

import numpy as np
import pytest
from PIL import Image

from models.artifacts import ArtifactError
from models.decision import DecisionRule
from models.inspection import Coverage, LocalInspector
from models.stages import save_decision
from tests.tiny_models import SIZE, add_memory_bank


def _stages(inspection):
    return [run.stage for run in inspection.trace]


def test_a_category_with_a_memory_bank_only_is_judged_by_it(registry, images):
    add_memory_bank(registry, "banked")
    inspector = LocalInspector(registry)
    assert "banked" in inspector.categories  # no detector needed
    remembered = inspector.inspect_images(images, ["banked"] * 3, explain=True)
    for result in remembered:
        assert result.decided_by == "memory-bank" and result.detected is None
        assert result.verdict == "ok" and result.anomaly_score < 0.5
        assert _stages(result) == ["memory-bank"]
        assert result.heatmap_source == "memory-bank" and result.heatmap.shape == (SIZE, SIZE)
        assert result.first_score == pytest.approx(result.banked.score)
    flat = Image.fromarray(np.full((80, 70, 3), 255, dtype=np.uint8))
    (unseen,) = inspector.inspect_images([flat], ["banked"])
    assert unseen.banked.score > max(r.banked.score for r in remembered)
    assert unseen.heatmap is None  # not asked for


def test_the_memory_bank_draws_the_heatmap_where_the_detector_decides(registry, images):
    add_memory_bank(registry, "sure")  # its stored rule predates the bank: the detector decides
    (result,) = LocalInspector(registry).inspect_images(images[:1], ["sure"], explain=True)
    assert result.decided_by == "detector" and result.detected.heatmap is None  # no Grad-CAM
    assert result.heatmap_source == "memory-bank"
    assert _stages(result) == ["detector", "memory-bank"]
    (plain,) = LocalInspector(registry).inspect_images(images[:1], ["sure"])
    assert _stages(plain) == ["detector"]  # served: the bank runs only to explain
    (evaluated,) = LocalInspector(registry, coverage=Coverage.TYPE_ALL).inspect_images(
        images[:1], ["sure"]
    )
    assert evaluated.banked is not None and evaluated.memory_bank_score is not None


def test_a_fused_rule_uses_both_scores(registry, images):
    add_memory_bank(registry, "sure")
    fused = DecisionRule(threshold=0.5, detector_weight=1.0, bank_weight=1.0, bank_bias=0.0)
    save_decision(registry, "sure", fused, fitted_on={}, metrics={})
    (result,) = LocalInspector(registry).inspect_images(images[:1], ["sure"])
    assert result.decided_by == "detector+memory-bank"
    assert _stages(result) == ["detector", "memory-bank"]
    assert result.first_score == pytest.approx(
        fused.first_score(result.detector_probability, result.memory_bank_score)
    )


def test_a_rule_that_needs_a_missing_model_is_refused(registry):
    bank_only = DecisionRule(detector_weight=0.0, bank_weight=1.0)
    save_decision(registry, "sure", bank_only, fitted_on={}, metrics={})
    with pytest.raises(ArtifactError, match="memory-bank"):
        LocalInspector(registry)
