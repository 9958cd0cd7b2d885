"""The serving flow without Ray: real (small, untrained) models computed in this process.

The registry and images are InspectionPipeline's test fixtures: a detector whose
probability is fixed (0.95 "sure", outside the band; 0.55 "unsure", inside it), a
verifier that calls everything good, and a router that always says "unsure".
"""

import asyncio

import pytest

from deployments.flow import (
    InspectionRefused,
    LocalStageCalls,
    inspect_image,
    load_plan,
)
from models.artifacts import ArtifactError, ArtifactRegistry
from models.pipeline import InspectionPipeline
from tests.unit.models.test_pipeline import _detector, _save


def _run(registry, image, category, **options):
    plan = load_plan(registry)
    return asyncio.run(
        inspect_image(image, category, plan=plan, calls=LocalStageCalls(registry), **options)
    )


def test_outside_the_band_the_detector_decides_alone(registry, images):
    result = _run(registry, images[0], "sure", explain=True)
    assert [t["stage"] for t in result["trace"]] == ["detector"]
    assert result["decided_by"] == "detector" and result["verdict"] == "defective"
    assert result["trace"][0]["output"] == {"probability": pytest.approx(0.95), "in_band": False}
    assert result["heatmap_png"]  # asked for
    expected = InspectionPipeline.from_registry(registry).inspect([images[0]], ["sure"])[0]
    assert result["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-6)


def test_inside_the_band_the_verifier_runs_and_decides(registry, images):
    result = _run(registry, images[0], "unsure")
    assert [t["stage"] for t in result["trace"]] == ["detector", "verifier"]
    assert result["decided_by"] == "verifier" and result["verdict"] == "ok"
    assert result["heatmap_png"] is None  # not asked for
    expected = InspectionPipeline.from_registry(registry).inspect([images[0]], ["unsure"])[0]
    assert result["verdict"] == expected.verdict
    assert result["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-6)


def test_without_a_category_the_router_names_it(registry, images):
    result = _run(registry, images[1], None)
    assert result["category"] == "unsure" and result["category_routed"]
    assert [t["stage"] for t in result["trace"]][:2] == ["router", "detector"]


def test_requests_the_models_cannot_answer_are_refused(registry, images, tmp_path):
    with pytest.raises(InspectionRefused, match="unknown category 'other'"):
        _run(registry, images[0], "other")
    with pytest.raises(InspectionRefused, match="no defect localizer"):
        _run(registry, images[0], "sure", boxes=True)
    bare = ArtifactRegistry(str(tmp_path / "bare"))
    _save(bare, "sure", "detector", _detector(0.95))
    with pytest.raises(InspectionRefused, match="no category router"):
        _run(bare, images[0], None)


def test_the_plan_follows_pins_and_rule_overrides(registry):
    plan = load_plan(registry)
    assert plan.categories["sure"].versions["detector"] == "v1"
    assert plan.router_id == "all-categories@v1" and plan.localizer_id is None
    _save(registry, "sure", "detector", _detector(0.9))  # v2, promoted
    newer = load_plan(registry)
    assert newer.categories["sure"].versions["detector"] == "v2"
    assert newer.fingerprint != plan.fingerprint
    pinned = load_plan(registry, pins={"sure": {"detector": "v1"}})
    assert pinned.categories["sure"].model_id("detector") == "sure@v1"
    with pytest.raises(ArtifactError):
        load_plan(registry, pins={"sure": {"detector": "v9"}})
    stricter = load_plan(registry, rules={"sure": {"threshold": 0.55}})
    assert stricter.categories["sure"].rule.threshold == 0.55
    assert stricter.fingerprint != newer.fingerprint
    with pytest.raises(ValueError):  # threshold outside the band
        load_plan(registry, rules={"sure": {"threshold": 0.9}})
