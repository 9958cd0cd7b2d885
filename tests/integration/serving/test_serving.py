"""End to end over HTTP and by handle: real Ray Serve, real Redis, real (quick) models."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from PIL import Image

from cluster.cli import main
from deployments.client import (
    GrpcClient,
    HandleClient,
    HttpClient,
    InspectionFailed,
    RetryPolicy,
)
from deployments.imaging import encode_png
from deployments.store import RedisStore
from models.data import read_image
from models.inspection import LocalInspector, load_plan
from tests.integration.serving.conftest import MODULE, SURFACE

pytestmark = pytest.mark.slow


def _post(
    serving, path: Path | None = None, data: bytes | None = None, headers=None, **fields
) -> httpx.Response:
    content = data if data is not None else path.read_bytes()
    form = {k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}
    return httpx.post(
        f"{serving.url}/v1/inspect",
        files={"image": ("part.png", content, "image/png")},
        data={k: v for k, v in form.items() if v is not None},
        headers=headers or {},
        timeout=120,
    )


def _redeploy(serving, **service) -> None:
    """Change the router's settings in place (its user_config), as `serve deploy` does."""
    serving.deploy(service=service)


def _replica_pid(serving) -> int:
    return httpx.get(f"{serving.url}/healthz", timeout=30).json()["replica_pid"]


@pytest.fixture()
def store(serving):
    store = RedisStore(serving.redis_url, serving.workdir / "test-spool", socket_timeout_s=5)
    yield store
    store.close()


def test_answers_match_the_labels_and_the_in_process_models(
    serving, registry, inspection_images, inspection_categories
):
    inspector = LocalInspector(registry)
    for name, path in inspection_images.items():
        category = inspection_categories[name]
        boxes = name.startswith("synthetic")
        answer = _post(serving, path, category=category, explain=True, boxes=boxes)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["verdict"] == ("defective" if name.endswith("defective") else "ok"), name
        assert result["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert result["category"] == category and not result["category_routed"]
        # The served DAG and the flow in this process agree on the same models.
        expected = inspector.inspect_images([read_image(path)], [category], boxes=boxes)[0]
        assert result["verdict"] == expected.verdict
        assert result["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-4)
        assert result["decided_by"] == expected.decided_by
        assert [t["stage"] for t in result["trace"]] == [run.stage for run in expected.trace]
        # The subset of fields simple classification APIs return.
        assert result["processing_time"] == pytest.approx(result["latency_ms"] / 1000)
        assert 0.0 <= result["confidence"] <= 1.0
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
        assert heatmap.size == read_image(path).size
        stages = [t["stage"] for t in result["trace"]]
        assert stages[0] == "detector"
        if result["verdict"] == "defective" and category == SURFACE:
            assert {"classifier", "reranker"} <= set(stages)
            assert stages.index("reranker") > stages.index("classifier")
            assert (
                result["defect_types"] and result["prediction"] == result["defect_types"][0]["name"]
            )
            assert sum(t["score"] for t in result["defect_types"]) == pytest.approx(1.0, abs=1e-3)
            assert expected.defect_types[0].name == result["defect_types"][0]["name"]
            assert "localizer" in stages
            for box in result["boxes"]:
                x0, y0, x1, y1 = box["box"]
                assert 0 <= x0 <= x1 and 0 <= y0 <= y1
        if result["verdict"] == "ok":
            assert result["defect_types"] == [] and result["prediction"] == "ok"
            assert not {"classifier", "reranker", "localizer"} & set(stages)
        for trace in result["trace"]:
            assert trace["model_version"].startswith("v") and trace["latency_ms"] >= 0


def test_router_names_the_category_when_none_is_given(serving, inspection_images):
    answer = _post(serving, inspection_images["elpv_good"])
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["category_routed"] and result["category"] == MODULE
    assert result["trace"][0]["stage"] == "router"
    assert result["trace"][0]["output"]["category"] == MODULE


def test_a_repeat_is_a_cache_hit_with_the_same_answer(serving, inspection_images):
    path = inspection_images["synthetic_defective"]
    first = _post(serving, path, category=SURFACE, explain=False).json()
    second = _post(serving, path, category=SURFACE, explain=False).json()
    assert second["cache_hit"] and second["request_id"] != first["request_id"]
    for key in ("verdict", "anomaly_score", "defect_types", "trace", "model_versions"):
        assert second[key] == first[key]
    # Other options are another answer, not a hit.
    third = _post(serving, path, category=SURFACE, explain=True).json()
    assert not third["cache_hit"] and third["heatmap_png"]


def test_the_stream_holds_every_result_and_a_consumer_group_reads_them(
    serving, inspection_images, store
):
    group = "quality-dashboard"
    store.ensure_group(group, start="$")
    ids = []
    for name in ("synthetic_good", "elpv_defective", "synthetic_good"):
        category = SURFACE if name.startswith("synthetic") else MODULE
        ids.append(_post(serving, inspection_images[name], category=category).json()["request_id"])
    entries = store.read_group(group, "dashboard-1", count=100)
    assert [result["request_id"] for _, result in entries] == ids
    assert store.ack(group, [entry_id for entry_id, _ in entries]) == len(ids)
    assert store.read_group(group, "dashboard-1", count=100) == []


def test_handle_clients_and_another_app_calling_by_handle(serving, inspection_images):
    from ray import serve

    path = inspection_images["synthetic_defective"]
    over_http = HttpClient(serving.url).inspect(path.read_bytes(), category=SURFACE)
    by_handle = HandleClient().inspect(path.read_bytes(), category=SURFACE)
    assert by_handle.verdict == over_http.verdict == "defective"
    assert by_handle.anomaly_score == pytest.approx(over_http.anomaly_score)
    assert (
        asyncio.run(HandleClient().inspect_async(path.read_bytes(), category=SURFACE)).verdict
        == "defective"
    )
    with pytest.raises(InspectionFailed) as refused:
        HandleClient(retry=RetryPolicy(attempts=1)).inspect(b"not an image", category=SURFACE)
    assert refused.value.status == 415
    # A camera client over gRPC (Serve's gRPC proxy) gets the same answer and errors.
    camera = GrpcClient(serving.grpc_target, retry=RetryPolicy(attempts=1))
    try:
        over_grpc = camera.inspect(path.read_bytes(), category=SURFACE)
        assert over_grpc.verdict == "defective" and over_grpc.category == SURFACE
        assert over_grpc.anomaly_score == pytest.approx(over_http.anomaly_score)
        with pytest.raises(InspectionFailed) as refused:
            camera.inspect(b"not an image", category=SURFACE)
        assert refused.value.status == 415 and "not recognized" in refused.value.detail
        with pytest.raises(InspectionFailed) as unknown:
            camera.inspect(path.read_bytes(), category="bolts")
        assert unknown.value.status == 422
    finally:
        camera.close()

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class LineController:
        """Stands for another service in the cluster: it rejects parts by calling us."""

        def __init__(self) -> None:
            self.client = HandleClient()

        async def __call__(self, image: bytes) -> dict:
            result = await self.client.inspect_async(image, category=SURFACE)
            return {"reject": result.verdict == "defective", "request_id": result.request_id}

    handle = serve.run(LineController.bind(), name="line-controller", route_prefix="/line")
    try:
        answer = handle.remote(path.read_bytes()).result(timeout_s=120)
        assert answer["reject"] is True and len(answer["request_id"]) == 32
    finally:
        serve.delete("line-controller")


def test_bad_inputs_get_the_right_status_and_say_why(serving, inspection_images):
    png = inspection_images["synthetic_good"].read_bytes()
    cases = {
        "empty": (b"", 422, "empty"),
        "text": (b"hello, this is not an image", 415, "PNG"),
        "truncated": (png[: len(png) // 2], 422, "truncated"),
    }
    gif = io.BytesIO()
    Image.new("RGB", (16, 16)).save(gif, "GIF")
    cases["gif"] = (gif.getvalue(), 415, "GIF")
    bomb = bytearray(encode_png(Image.new("1", (64, 64))))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000 x 100000
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid header
    cases["bomb"] = (bytes(bomb), 413, "pixels")
    for name, (data, status, words) in cases.items():
        answer = _post(serving, data=data, category=SURFACE)
        assert answer.status_code == status, (name, answer.text)
        assert words.lower() in answer.json()["detail"].lower(), (name, answer.text)
    too_big = httpx.post(
        f"{serving.url}/v1/inspect",
        files={"image": ("big.png", png + b"\0" * (21 * 1024 * 1024), "image/png")},
        timeout=120,
    )
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    unknown = _post(serving, inspection_images["synthetic_good"], category="no_such_part")
    assert unknown.status_code == 422 and "no_such_part" in unknown.json()["detail"]
    wrong_type = httpx.post(
        f"{serving.url}/v1/inspect", content=png, headers={"content-type": "image/png"}
    )
    assert wrong_type.status_code == 415
    bad_json = httpx.post(f"{serving.url}/v1/inspect", json={"image_base64": "%%%"}, timeout=60)
    assert bad_json.status_code == 422 and "base64" in bad_json.json()["detail"]
    missing = httpx.post(f"{serving.url}/v1/inspect", json={"category": SURFACE}, timeout=60)
    assert missing.status_code == 422 and "image_base64" in missing.json()["detail"]
    flag = _post(serving, inspection_images["synthetic_good"], category=SURFACE, explain="maybe")
    assert flag.status_code == 422


def test_batch_answers_each_image_in_order(serving, inspection_images):
    items = [
        {
            "image_base64": base64.b64encode(
                inspection_images["synthetic_good"].read_bytes()
            ).decode(),
            "category": SURFACE,
        },
        {"image_base64": base64.b64encode(b"junk").decode(), "category": SURFACE},
        {
            "image_base64": base64.b64encode(
                inspection_images["elpv_defective"].read_bytes()
            ).decode(),
            "category": MODULE,
        },
    ]
    answer = httpx.post(f"{serving.url}/v1/inspect/batch", json={"items": items}, timeout=120)
    assert answer.status_code == 200, answer.text
    got = answer.json()["items"]
    assert [g["index"] for g in got] == [0, 1, 2]
    assert got[0]["result"]["verdict"] == "ok"
    assert got[1]["error"]["status"] == 415 and got[1]["result"] is None
    assert got[2]["result"]["verdict"] == "defective"
    too_many = httpx.post(f"{serving.url}/v1/inspect/batch", json={"items": items * 11}, timeout=60)
    assert too_many.status_code == 422


def test_categories_and_a_registered_defect_type_ranked_at_once(serving, inspection_images):
    listing = httpx.get(f"{serving.url}/v1/categories", timeout=30).json()
    names = {c["category"]: c for c in listing["categories"]}
    assert set(names) == {SURFACE, MODULE} and listing["router"] and listing["localizer"]
    assert {t["name"] for t in names[SURFACE]["defect_types"]} >= {"scratch", "crack"}
    assert names[SURFACE]["model_versions"]["detector"] == "v1"
    rust = {
        "name": "rust",
        "description": "Orange-brown corrosion spots spreading over the metal surface.",
        "keywords": ["rust", "corrosion", "oxidation"],
        "contrast": "Unlike contamination it is orange-brown and eats into the surface.",
    }
    created = httpx.post(
        f"{serving.url}/v1/categories/{SURFACE}/defect-types", json=rust, timeout=60
    )
    assert created.status_code == 201, created.text
    assert created.json()["source"] == "registered"
    listing = httpx.get(f"{serving.url}/v1/categories", timeout=30).json()
    surface = next(c for c in listing["categories"] if c["category"] == SURFACE)
    assert {"name": "rust", "source": "registered"}.items() <= next(
        t for t in surface["defect_types"] if t["name"] == "rust"
    ).items()
    result = _post(serving, inspection_images["synthetic_defective"], category=SURFACE).json()
    ranked = {t["name"]: t for t in result["defect_types"]}
    assert "rust" in ranked and ranked["rust"]["description"] == rust["description"]
    markup = rust | {"name": "bad", "description": "<script>alert(1)</script> spots"}
    refused = httpx.post(
        f"{serving.url}/v1/categories/{SURFACE}/defect-types", json=markup, timeout=60
    )
    assert refused.status_code == 422
    assert (
        httpx.post(f"{serving.url}/v1/categories/nope/defect-types", json=rust).status_code == 404
    )
    no_reranker = httpx.post(f"{serving.url}/v1/categories/{MODULE}/defect-types", json=rust)
    assert no_reranker.status_code == 409


def test_health_readiness_docs_and_page(serving):
    health = httpx.get(f"{serving.url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["redis"] == "up"
    ready = httpx.get(f"{serving.url}/readyz", timeout=30)
    assert ready.status_code == 200
    stages = ready.json()["stages"]  # the default topology: every stage in the router
    assert set(stages) == {"router"}
    held = stages["router"]["models"]
    for stage in ("detector", "verifier", "classifier", "reranker"):
        assert any(m.startswith(f"{stage}:{SURFACE}@") for m in held), held
    assert any(m.startswith("localizer:") for m in held), held
    spec = httpx.get(f"{serving.url}/openapi.json", timeout=30).json()
    for path in ("/v1/inspect", "/v1/inspect/batch", "/v1/categories", "/healthz", "/readyz"):
        assert path in spec["paths"]
    body = spec["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "InspectionResult" in spec["components"]["schemas"]
    assert httpx.get(f"{serving.url}/docs", timeout=30).status_code == 200
    assert "<canvas" in httpx.get(f"{serving.url}/ui", timeout=30).text


def test_requests_come_in_through_haproxy_not_a_python_proxy(serving, inspection_images):
    listening = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == serving.port and c.pid
    }
    assert {psutil.Process(pid).name() for pid in listening} == {"haproxy"}
    # and through it an inspection is answered as ever
    response = _post(serving, inspection_images["synthetic_good"], category=SURFACE)
    assert response.status_code == 200 and response.json()["verdict"] == "ok"


def test_predict_command(serving, inspection_images, capsys, tmp_path):
    path = inspection_images["synthetic_defective"]
    assert main(["predict", str(path), "--url", serving.url, "--category", SURFACE]) == 0
    [printed] = json.loads(capsys.readouterr().out)
    assert printed["result"]["verdict"] == "defective" and "heatmap_png" not in printed["result"]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["predict", str(text), "--url", serving.url, "--category", SURFACE]) == 1
    [failed] = json.loads(capsys.readouterr().out)
    assert failed["error"]["status"] == 415
    assert main(["predict", str(tmp_path / "missing.png"), "--url", serving.url]) == 2


def test_thresholds_change_live_and_the_verifier_runs_only_in_the_band(
    serving, inspection_images, registry
):
    path = inspection_images["synthetic_good"]
    pid = _replica_pid(serving)
    rule = load_plan(registry).categories[SURFACE].rule
    try:
        # Band over everything: every part goes to the verifier.
        _redeploy(serving, rules={SURFACE: {"lo": 0.0, "hi": 1.0}})
        wide = _post(serving, path, category=SURFACE).json()
        assert [t["stage"] for t in wide["trace"]][:2] == ["detector", "verifier"]
        assert wide["decided_by"] == "verifier" and wide["trace"][0]["output"]["in_band"]
        # No band: the detector decides alone.
        t = rule.threshold
        _redeploy(serving, rules={SURFACE: {"lo": t, "hi": t}})
        narrow = _post(serving, path, category=SURFACE).json()
        assert "verifier" not in [s["stage"] for s in narrow["trace"]]
        assert narrow["decided_by"] == "detector"
        # Threshold 0: every part is defective, typed and reranked.
        _redeploy(serving, rules={SURFACE: {"threshold": 0.0, "lo": 0.0, "hi": 0.0}})
        strict = _post(serving, path, category=SURFACE).json()
        assert strict["verdict"] == "defective" and strict["defect_types"]
        assert _replica_pid(serving) == pid  # reconfigured, not restarted
    finally:
        _redeploy(serving)
    assert _post(serving, path, category=SURFACE).json()["verdict"] == "ok"


def test_overload_gets_503_with_retry_after_and_slowness_504(serving, inspection_images):
    path = inspection_images["synthetic_good"]
    try:
        _redeploy(serving, max_in_flight=1, cache_ttl_s=0)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _post(serving, path, category=SURFACE), range(8)))
        statuses = sorted(a.status_code for a in answers)
        assert 200 in statuses and 503 in statuses, statuses
        refused = next(a for a in answers if a.status_code == 503)
        assert int(refused.headers["Retry-After"]) >= 1 and "overloaded" in refused.json()["detail"]
        _redeploy(serving, request_timeout_s=0.001)
        fresh = inspection_images["elpv_good"].read_bytes() + b"not cached"  # no cache hit
        slow = _post(serving, data=fresh, category=MODULE, explain=True)
        assert slow.status_code == 504 and "request_timeout_s" in slow.json()["detail"]
    finally:
        _redeploy(serving)


def test_a_new_product_line_is_a_new_artifact_not_a_new_deployment(
    serving, registry, inspection_images
):
    for stage in registry.stages(SURFACE):
        artifact = registry.load(SURFACE, stage)
        manifest = artifact.manifest
        registry.save(
            "brushed_metal_line2",
            stage,
            artifact.state_dict,
            config=manifest.config,
            preprocessing=manifest.preprocessing,
            data=manifest.data,
            metrics=manifest.metrics,
            promote=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = httpx.get(f"{serving.url}/v1/categories", timeout=30).json()
        if any(c["category"] == "brushed_metal_line2" for c in listing["categories"]):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the new category was not picked up within 30 s")
    path = inspection_images["synthetic_defective"]
    answer = _post(serving, path, category="brushed_metal_line2")
    assert answer.status_code == 200, answer.text
    assert answer.json()["verdict"] == "defective"
    ready = httpx.get(f"{serving.url}/readyz", timeout=30).json()
    held = ready["stages"]["router"]["models"]
    assert any(m.startswith("detector:brushed_metal_line2@") for m in held), held


def test_redis_down_keeps_answering_and_loses_nothing(serving, inspection_images, store):
    path = inspection_images["synthetic_good"]
    store.ensure_group("audit", start="$")
    serving.redis.stop()
    try:
        ids = []
        for _ in range(3):
            answer = _post(serving, path, category=SURFACE)
            assert answer.status_code == 200, answer.text
            assert not answer.json()["cache_hit"]  # no cache while Redis is down
            ids.append(answer.json()["request_id"])
        health = httpx.get(f"{serving.url}/healthz", timeout=30).json()
        assert health["redis"] == "down" and health["spooled_results"] >= 3
    finally:
        serving.redis.start()
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while time.monotonic() < deadline and len(seen) < 3:
        seen += [r["request_id"] for _, r in store.read_group("audit", "auditor", count=100)]
        time.sleep(0.5)
    assert sorted(seen) == sorted(ids)  # every result, exactly once
    assert httpx.get(f"{serving.url}/healthz", timeout=30).json()["spooled_results"] == 0


def test_api_keys_and_rate_limits(serving, inspection_images, store):
    path = inspection_images["synthetic_good"]
    key = store.add_api_key("line-1", rate_per_minute=3)
    other = store.add_api_key("line-2", categories=[MODULE])
    revoked = store.add_api_key("old-line")
    store.revoke_api_key(revoked)
    try:
        time.sleep(5.5)  # the router re-reads whether keys exist every few seconds
        assert _post(serving, path, category=SURFACE).status_code == 401
        assert (
            _post(serving, path, category=SURFACE, headers={"X-API-Key": "nope"}).status_code == 401
        )
        assert (
            _post(serving, path, category=SURFACE, headers={"X-API-Key": revoked}).status_code
            == 403
        )
        assert (
            _post(serving, path, category=SURFACE, headers={"X-API-Key": other}).status_code == 403
        )
        statuses = [
            _post(serving, path, category=SURFACE, headers={"X-API-Key": key}).status_code
            for _ in range(4)
        ]
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        limited = _post(serving, path, category=SURFACE, headers={"X-API-Key": key})
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert httpx.get(f"{serving.url}/v1/categories", timeout=30).status_code == 401
        # gRPC asks for the same key, as metadata.
        for api_key, status in ((None, 401), (other, 403)):
            camera = GrpcClient(serving.grpc_target, api_key, retry=RetryPolicy(attempts=1))
            with pytest.raises(InspectionFailed) as refused:
                camera.inspect(path.read_bytes(), category=SURFACE)
            camera.close()
            assert refused.value.status == status
    finally:
        plain = redis.Redis.from_url(serving.redis_url)
        for name in plain.scan_iter(f"{store.prefix}:apikey*"):
            plain.delete(name)
        plain.close()
