"""Parity: ``inspectray eval``'s path and the live Serve app give the same answers.

The models are the quick set the package's cluster trained (real, small). The
same test images go through the inspector ``inspectray eval`` builds (batched
in this process, every part typed) and through the app over HTTP; verdicts,
``decided_by``, ranked types, box counts, trace order and scores must agree.
Then the same with a serving YAML that pins an older detector and overrides a
decision rule, given to both.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.quickstart import quick_datasets
from cluster.training_commands import evaluation_inspector
from models.data import read_image
from models.descriptions import DefectDescription
from models.inspection import InspectionRequest
from models.stages import DETECTOR
from tests.integration.serving.conftest import MODULE, QUICK, SURFACE

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
PER_CATEGORY = 10


def _served(serving, path: Path, category: str | None, boxes: bool) -> dict:
    data = {"boxes": str(boxes).lower()} | ({"category": category} if category else {})
    answer = httpx.post(
        f"{serving.url}/v1/inspect",
        files={"image": (path.name, path.read_bytes(), "image/png")},
        data=data,
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _cases(serving) -> list[tuple[Path, str | None, bool]]:
    """Good and defective test images of both datasets; a few sent without a category."""
    synthetic, elpv = quick_datasets(serving.workdir, QUICK)
    cases = []
    for dataset, category, boxes in ((synthetic, SURFACE, True), (elpv, MODULE, False)):
        test = dataset.select(category, "test")
        good = [s for s in test if not s.is_anomalous][: PER_CATEGORY // 2]
        bad = [s for s in test if s.is_anomalous][: PER_CATEGORY // 2]
        for i, sample in enumerate(good + bad):
            cases.append((sample.image_path, None if i % 4 == 3 else category, boxes))
    return cases


def _compare(serving, inspector, cases) -> list[dict]:
    """Each case through eval's inspector (all at once, batched) and over HTTP; the rows."""
    for category in inspector.plan.categories:  # the service's run-time registered types
        for item in _registered(serving, category):
            inspector.register_description(category, DefectDescription.from_dict(item))
    requests = [InspectionRequest(read_image(p), c, boxes=b) for p, c, b in cases]
    local = asyncio.run(inspector.inspect_all(requests))
    rows = []
    for (path, category, boxes), mine in zip(cases, local, strict=True):
        served = _served(serving, path, category, boxes)
        row = {
            "image": path.name,
            "category": mine.category,
            "verdict": (mine.verdict, served["verdict"]),
            "decided_by": (mine.decided_by, served["decided_by"]),
            "anomaly_score_diff": abs(mine.anomaly_score - served["anomaly_score"]),
            "types": (
                [t.name for t in mine.defect_types],
                [t["name"] for t in served["defect_types"]],
            ),
            "type_score_diff": max(
                (
                    abs(t.score - s["score"])
                    for t, s in zip(mine.defect_types, served["defect_types"], strict=False)
                ),
                default=0.0,
            ),
            "boxes": (len(mine.boxes), len(served["boxes"])),
            "trace": ([r.stage for r in mine.trace], [t["stage"] for t in served["trace"]]),
            "routed": (mine.routed is not None, served["category_routed"]),
        }
        rows.append(row)
        for key in ("verdict", "decided_by", "types", "boxes", "trace", "routed"):
            assert row[key][0] == row[key][1], row
        assert served["category"] == mine.category, row
        assert row["anomaly_score_diff"] <= TOLERANCE and row["type_score_diff"] <= TOLERANCE, row
    return rows


def _registered(serving, category: str) -> list[dict]:
    listing = httpx.get(f"{serving.url}/v1/categories", timeout=30).json()["categories"]
    info = next(c for c in listing if c["category"] == category)
    return [
        {k: t[k] for k in ("name", "description", "keywords", "contrast")}
        for t in info["defect_types"]
        if t["source"] == "registered"
    ]


def _report(name: str, rows: list[dict]) -> None:
    agree = sum(r["verdict"][0] == r["verdict"][1] for r in rows)
    summary = {
        "run": name,
        "images": len(rows),
        "verdicts_equal": agree,
        "defective": sum(r["verdict"][0] == "defective" for r in rows),
        "decided_by_verifier": sum(r["decided_by"][0] == "verifier" for r in rows),
        "routed": sum(r["routed"][0] for r in rows),
        "boxes": sum(r["boxes"][0] for r in rows),
        "max_anomaly_score_diff": max(r["anomaly_score_diff"] for r in rows),
        "max_type_score_diff": max(r["type_score_diff"] for r in rows),
        "trace_orders": sorted({" > ".join(r["trace"][0]) for r in rows}),
    }
    print("parity:", json.dumps(summary))


def test_eval_and_the_live_app_answer_alike(serving, registry):
    cases = _cases(serving)
    rows = _compare(serving, evaluation_inspector(registry), cases)
    _report("production", rows)
    assert {r["verdict"][0] for r in rows} == {"ok", "defective"}
    assert any(r["routed"][0] for r in rows) and any(r["boxes"][0] for r in rows)
    assert any(len(r["trace"][0]) >= 4 for r in rows)  # typed, reranked (and located)


def test_a_pinned_version_and_a_rule_override_in_serving_yaml_apply_to_both(
    serving, registry, tmp_path
):
    # A second detector for the surface, promoted: production moves on, the YAML pins v1.
    production = registry.manifest(SURFACE, DETECTOR)
    artifact = registry.load(SURFACE, DETECTOR)
    weights = dict(artifact.state_dict)
    weights["head.1.bias"] = weights["head.1.bias"] + 2.0  # calls far more parts defective
    newer = registry.save(
        SURFACE,
        DETECTOR,
        weights,
        config=production.config,
        preprocessing=production.preprocessing,
        data=production.data,
        promote=True,
    )
    config = {
        "service": {
            "versions": {SURFACE: {DETECTOR: production.version}},
            # Every ELPV cell goes to the verifier: the band covers every probability.
            "rules": {MODULE: {"lo": 0.0, "hi": 1.0}},
        }
    }
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        serving.deploy(service=config["service"])
        cases = _cases(serving)
        rows = _compare(serving, evaluation_inspector(registry, path), cases)
        _report("pinned-and-overridden", rows)
        elpv = [r for r in rows if r["category"] == MODULE]
        assert elpv and all(r["decided_by"][0] == "verifier" for r in elpv)
        health = httpx.get(f"{serving.url}/healthz", timeout=30).json()
        assert health["models"][f"{SURFACE}/{DETECTOR}"] == production.version
        # Unpinned, evaluation would judge with the newer detector and disagree: the
        # pin is what makes the two agree.
        unpinned = evaluation_inspector(registry)
        assert unpinned.plan.categories[SURFACE].versions[DETECTOR] == newer.version
        surface = [(p, SURFACE, b) for p, c, b in cases if c == SURFACE]
        newer_scores = [
            found.anomaly_score
            for found in unpinned.inspect_images(
                [read_image(p) for p, _, _ in surface], [SURFACE] * len(surface)
            )
        ]
        served = [_served(serving, p, SURFACE, b)["anomaly_score"] for p, _, b in surface]
        assert max(abs(a - b) for a, b in zip(newer_scores, served, strict=True)) > 1e-3
    finally:
        registry.promote(SURFACE, DETECTOR, production.version)
        serving.deploy(service={"versions": {}, "rules": {}})


def test_the_split_topology_answers_as_the_fused_one_and_eval(serving, registry):
    # The package's app serves the default, fused topology (every stage in each
    # router replica); the split one calls a deployment per stage.
    fused = _compare(serving, evaluation_inspector(registry), _cases(serving))
    try:
        serving.deploy(topology="split")
        ready = httpx.get(f"{serving.url}/readyz", timeout=60).json()
        assert set(ready["stages"]) == {
            "detector",
            "memory-bank",
            "verifier",
            "classifier",
            "localizer",
            "reranker",
        }
        split = _compare(serving, evaluation_inspector(registry), _cases(serving))
        _report("split topology", split)
    finally:
        serving.deploy(topology="fused")
    assert [r["verdict"] for r in split] == [r["verdict"] for r in fused]
    assert [r["types"] for r in split] == [r["types"] for r in fused]
