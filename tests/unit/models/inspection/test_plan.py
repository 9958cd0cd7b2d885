"""The plan serving and evaluation share: production versions, pins and rule overrides."""

import pytest

from models.artifacts import ArtifactError
from models.inspection import LocalInspector, load_plan
from tests.tiny_models import add_classifier, add_reranker, detector, save


def test_the_plan_follows_production_pins_and_rule_overrides(registry):
    plan = load_plan(registry)
    assert plan.categories["sure"].versions["detector"] == "v1"
    assert plan.router_id == "all-categories@v1" and plan.localizer_id is None
    save(registry, "sure", "detector", detector(0.9))  # v2, promoted
    newer = load_plan(registry)
    assert newer.categories["sure"].versions["detector"] == "v2"
    assert newer.fingerprint != plan.fingerprint
    pinned = load_plan(registry, pins={"sure": {"detector": "v1"}})
    assert pinned.categories["sure"].model_id("detector") == "sure@v1"
    with pytest.raises(ArtifactError):
        load_plan(registry, pins={"sure": {"detector": "v9"}})
    with pytest.raises(ArtifactError, match="no detector"):
        load_plan(registry, pins={"paint": {"detector": "v1"}})
    stricter = load_plan(registry, rules={"sure": {"threshold": 0.55}})
    assert stricter.categories["sure"].rule.threshold == 0.55
    assert stricter.fingerprint != newer.fingerprint
    with pytest.raises(ValueError):  # threshold outside the band
        load_plan(registry, rules={"sure": {"threshold": 0.9}})


def test_an_inspector_scores_the_pinned_version_and_the_overridden_rule(registry, images):
    save(registry, "sure", "detector", detector(0.3))  # v2: now "ok"
    assert LocalInspector(registry).inspect_images(images[:1], ["sure"])[0].verdict == "ok"
    pinned = LocalInspector(registry, pins={"sure": {"detector": "v1"}})
    assert pinned.inspect_images(images[:1], ["sure"])[0].verdict == "defective"
    # The band of "unsure" moved away: the detector decides alone, at the new threshold.
    rules = {"unsure": {"lo": 0.2, "hi": 0.3, "threshold": 0.25}}
    overridden = LocalInspector(registry, rules=rules).inspect_images(images[:1], ["unsure"])[0]
    assert overridden.decided_by == "detector" and overridden.verdict == "defective"


def test_the_plan_lists_every_model_and_the_trained_types(registry):
    add_classifier(registry, "sure")
    add_reranker(registry, "sure", fusion_weight=0.5)
    plan = load_plan(registry)
    assert sorted(plan.model_ids()) == sorted(
        [
            ("router", "all-categories@v1"),
            ("detector", "sure@v1"),
            ("verifier", "sure@v1"),
            ("classifier", "sure@v1"),
            ("reranker", "sure@v1"),
            ("detector", "unsure@v1"),
            ("verifier", "unsure@v1"),
        ]
    )
    assert plan.categories["sure"].trained_types == {"crack", "scratch"}
    assert plan.versions("sure")["localizer"] == "" and plan.versions("sure")["reranker"] == "v1"
