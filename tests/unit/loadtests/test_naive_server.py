"""The naive baseline: every stage for every request, and the DAG's verdicts."""

from __future__ import annotations

import asyncio
import io

from fastapi.testclient import TestClient

from deployments.flow import LocalStageCalls, inspect_image, load_plan
from loadtests.naive_server import create_app
from tests.unit.models.test_pipeline import _add_classifier, _add_localizer, _add_reranker


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_stage_runs_for_every_request_and_the_verdict_is_the_dags(registry, images):
    for category in ("sure", "unsure"):
        _add_classifier(registry, category)
    _add_reranker(registry, "sure", fusion_weight=0.5)
    _add_localizer(registry)
    plan = load_plan(registry)
    calls = LocalStageCalls(registry)
    with TestClient(create_app(registry.uri)) as client:
        assert client.get("/healthz").json() == {"ready": True}
        for category, everything in (
            ("sure", ["detector", "verifier", "classifier", "localizer", "reranker"]),
            ("unsure", ["detector", "verifier", "classifier", "localizer"]),
        ):
            for image in images:
                answer = client.post(
                    "/v1/inspect",
                    files={"image": ("part.png", _png(image), "image/png")},
                    data={"category": category},
                )
                assert answer.status_code == 200, answer.text
                naive = answer.json()
                dag = asyncio.run(inspect_image(image, category, plan=plan, calls=calls))
                # the DAG skips what the verdict does not need; the naive server never does
                assert naive["stages"] == everything
                assert len(dag["trace"]) < len(everything)
                assert naive["verdict"] == dag["verdict"]
                assert naive["anomaly_score"] == dag["anomaly_score"]
                if dag["verdict"] == "defective":
                    assert [t["name"] for t in naive["defect_types"]] == [
                        t["name"] for t in dag["defect_types"]
                    ]
                else:
                    assert naive["defect_types"] == [] and naive["boxes"] == []


def test_bad_requests_get_clear_errors(registry, images):
    with TestClient(create_app(registry.uri)) as client:
        png = _png(images[0])
        unknown = client.post(
            "/v1/inspect", files={"image": ("p.png", png, "image/png")}, data={"category": "nope"}
        )
        assert unknown.status_code == 422 and "unknown category" in unknown.json()["detail"]
        corrupt = client.post(
            "/v1/inspect", files={"image": ("p.png", png[:40], "image/png")}, data={}
        )
        assert corrupt.status_code == 422
        no_file = client.post("/v1/inspect", data={"category": "sure"})
        assert no_file.status_code == 422 and "image" in no_file.json()["detail"]
