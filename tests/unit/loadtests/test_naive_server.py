"""The naive baseline: every stage for every request, and the DAG's answers."""

from __future__ import annotations

from fastapi.testclient import TestClient

from deployments.imaging import encode_png
from loadtests.naive_server import create_app
from models.inspection import LocalInspector
from tests.tiny_models import add_classifier, add_localizer, add_reranker


def test_every_stage_runs_for_every_request_and_the_answer_is_the_dags(registry, images):
    for category in ("sure", "unsure"):
        add_classifier(registry, category)
    add_reranker(registry, "sure", fusion_weight=0.5)
    add_localizer(registry)
    dag = LocalInspector(registry)
    with TestClient(create_app(registry.uri)) as client:
        assert client.get("/healthz").json() == {"ready": True}
        for category, everything in (
            ("sure", ["detector", "verifier", "classifier", "localizer", "reranker"]),
            ("unsure", ["detector", "verifier", "classifier", "localizer"]),
        ):
            for image in images:
                answer = client.post(
                    "/v1/inspect",
                    files={"image": ("part.png", encode_png(image), "image/png")},
                    data={"category": category},
                )
                assert answer.status_code == 200, answer.text
                naive = answer.json()
                served = dag.inspect_images([image], [category])[0]
                # the DAG skips what the verdict does not need; the naive server never does
                assert naive["stages"] == everything
                assert len(served.trace) < len(everything)
                assert naive["verdict"] == served.verdict
                assert naive["decided_by"] == served.decided_by
                assert abs(naive["anomaly_score"] - served.anomaly_score) < 1e-6
                assert [t["name"] for t in naive["defect_types"]] == [
                    t.name for t in served.defect_types
                ]
                if served.verdict == "ok":
                    assert naive["defect_types"] == [] and naive["boxes"] == []


def test_bad_requests_get_clear_errors(registry, images):
    with TestClient(create_app(registry.uri)) as client:
        png = encode_png(images[0])
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
