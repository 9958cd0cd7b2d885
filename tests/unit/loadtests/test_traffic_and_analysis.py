"""The traffic mix, the multipart body, the window analysis and the time-window table."""

from __future__ import annotations

import json
import random

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from loadtests.profile import read_samples
from loadtests.report import time_windows, topology_sections
from loadtests.runs import analyse, latency_breakdown, verdict_parity
from loadtests.traffic import Traffic, TrafficError, TrafficImage, multipart, write_traffic


def _pool(tmp_path, categories=("a", "b"), n=3):
    images = []
    for category in categories:
        for defective in (False, True):
            for i in range(n):
                path = tmp_path / f"{category}-{defective}-{i}.png"
                path.write_bytes(f"{category}{defective}{i}".encode())
                images.append(TrafficImage(str(path), category, defective))
    return images


def test_the_mix_draws_the_set_share_of_defective_parts_and_every_category(tmp_path):
    traffic = Traffic(_pool(tmp_path), defective_share=0.1)
    rng = random.Random(1)
    draws = [traffic.draw(rng) for _ in range(5000)]
    share = sum(d.image.defective for d in draws) / len(draws)
    assert 0.08 < share < 0.12
    per_category = {c: sum(d.image.category == c for d in draws) for c in ("a", "b")}
    assert min(per_category.values()) > 2300
    # every body is the file plus four fresh bytes: no two requests share a hash
    first = draws[0]
    assert first.body[:-4] == traffic.data(first.image)
    assert len({d.body for d in draws[:200]}) == 200


def test_a_mix_that_cannot_be_drawn_is_refused(tmp_path):
    good_only = [i for i in _pool(tmp_path) if not i.defective]
    with pytest.raises(TrafficError, match="no defective image of a"):
        Traffic(good_only, defective_share=0.1)
    assert Traffic(good_only, defective_share=0.0).categories == ["a", "b"]
    with pytest.raises(TrafficError, match=r"in \[0, 1\]"):
        Traffic(_pool(tmp_path), defective_share=1.5)
    with pytest.raises(TrafficError, match="no images"):
        Traffic([], defective_share=0.1)
    with pytest.raises(TrafficError, match="cannot read"):
        Traffic.from_file(tmp_path / "missing.json")


def test_a_traffic_file_round_trips_with_its_share(tmp_path):
    path = write_traffic(_pool(tmp_path), tmp_path / "t" / "traffic.json", defective_share=0.25)
    traffic = Traffic.from_file(path)
    assert traffic.defective_share == 0.25
    assert Traffic.from_file(path, defective_share=0.5).defective_share == 0.5
    assert len(json.loads(path.read_text())["images"]) == 12


def test_the_multipart_body_is_what_the_api_parses():
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        form = await request.form()
        upload = form["image"]
        return {
            "category": form["category"],
            "image": (await upload.read()).hex(),
            "type": upload.content_type,
        }

    image = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n"
    body, content_type = multipart({"category": "brushed_metal"}, image)
    answer = TestClient(app).post("/echo", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 200
    assert answer.json() == {
        "category": "brushed_metal",
        "image": image.hex(),
        "type": "image/png",
    }


def _record(end, ms, ok=True, defective=False, verdict="ok"):
    return {
        "end": end,
        "ms": ms,
        "ok": ok,
        "status": 200 if ok else 503,
        "category": "a",
        "defective": defective,
        "verdict": verdict if ok else None,
    }


def test_the_analysis_counts_only_the_window_and_every_failure():
    # answers every 0.1 s for 20 s; 10 ms each, but 1000 ms during the warm-up
    records = [_record(100.0 + i / 10, 1000.0 if i < 50 else 10.0) for i in range(200)]
    records.append(_record(101.0, 5.0, ok=False))  # a failure in the warm-up still counts
    records.append(_record(110.0, 20.0, defective=True, verdict="ok"))  # a missed defect
    result = analyse(records, users=4, warmup_s=5.0, seconds=10.0, exit_code=1)
    # window [105, 115): 100 answers from the regular stream plus the missed defect
    assert result.rps == pytest.approx(10.1)
    assert result.p50_ms == 10.0
    assert result.p99_ms == pytest.approx(10.0, abs=10.0)
    assert result.failed == 1
    assert result.requests == 202
    assert result.error_rate == pytest.approx(1 / 202)
    assert result.accuracy == pytest.approx(200 / 201)
    assert result.statuses == {"200": 201, "503": 1}
    assert result.by_verdict == {"ok": {"share": 1.0, "p50_ms": 10.0, "p99_ms": 10.0}}
    assert result.breakdown == {}  # the answers carried no server timings


def test_the_breakdown_splits_each_request_by_the_servers_own_timings():
    fast = _record(1.0, 12.0) | {
        "server_ms": 8.0,
        "timings": {"decode": 1.0, "inspect": 6.0},
        "stages": {"detector": [2.0, 5.0]},
    }
    slow = _record(2.0, 30.0) | {
        "server_ms": 20.0,
        "timings": {"decode": 1.0, "inspect": 18.0},
        "stages": {"detector": [2.0, 4.0], "classifier": [3.0, 12.0]},
    }
    found = latency_breakdown([fast, slow, _record(3.0, 5.0, ok=False)])
    assert found["requests"] == 2 and found["client_ms"] == 21.0
    assert found["outside_router_ms"] == 7.0 and found["router_ms"] == 14.0
    assert found["router_phases_ms"] == {"decode": 1.0, "inspect": 12.0}
    assert found["model_ms"] == 3.5  # (2 + (2 + 3)) / 2
    assert found["stage_wait_ms"] == 7.0  # (3 + (2 + 9)) / 2
    assert found["stages"]["classifier"] == {
        "share": 0.5,
        "model_ms": 3.0,
        "call_ms": 12.0,
        "wait_ms": 9.0,
    }


def test_a_line_cameras_time_windows():
    rows = {row["camera"][:4]: row for row in time_windows(80.0)}
    assert rows["2 MP"]["window_ms"] == pytest.approx(85.3, abs=0.05)
    assert rows["5 MP"]["window_ms"] == pytest.approx(115.2, abs=0.05)
    assert rows["8 MP"]["window_ms"] == pytest.approx(170.7, abs=0.05)
    assert all(row["fits"] for row in rows.values())
    assert time_windows(100.0)[0]["fits"] is False


def test_verdict_parity_finds_an_image_judged_two_ways_by_two_servers():
    def run(verdicts):
        records = [
            _record(float(i), 10.0, verdict=v) | {"image": image}
            for i, (image, v) in enumerate(verdicts)
        ]
        return analyse(records, users=1, warmup_s=0, seconds=100, exit_code=0)

    fused = run([("a.png", "ok"), ("b.png", "defective"), ("a.png", "ok"), ("c.png", "ok")])
    split = run([("a.png", "ok"), ("b.png", "ok"), ("b.png", "defective")])
    assert fused.verdicts == {"a.png": {"ok": 2}, "b.png": {"defective": 1}, "c.png": {"ok": 1}}
    parity = verdict_parity({"fused": [fused], "split": [split]})
    assert parity["servers"] == ["fused", "split"]
    assert parity["images"] == 2  # c.png was not answered by split
    assert parity["differing"] == 1
    assert parity["examples"] == {
        "b.png": {"fused": {"defective": 1}, "split": {"ok": 1, "defective": 1}}
    }
    assert verdict_parity({"fused": [fused], "again": [fused]})["differing"] == 0


def test_the_report_sets_the_topologies_side_by_side_with_their_time(tmp_path):
    breakdown = {
        "requests": 10,
        "client_ms": 30.0,
        "outside_router_ms": 8.0,
        "router_ms": 22.0,
        "router_phases_ms": {"decode": 2.0, "inspect": 19.0},
        "model_ms": 5.0,
        "stage_wait_ms": 14.0,
        "stages": {"detector": {"share": 1.0, "model_ms": 5.0, "call_ms": 19.0, "wait_ms": 14.0}},
    }
    result = {
        "fused_rps": 90.0,
        "fused_breakdown": breakdown,
        "fused_cpu_profile": {
            "rps": 88.0,
            "roles": {
                "serve replica: Router": {
                    "processes": 2,
                    "cpu_ms_per_request": 7.5,
                    "by_activity_ms": {"model": 5.0, "event loop": 2.5},
                }
            },
        },
        "split_rps": 30.0,
        "split_breakdown": breakdown,
        "dag_breakdown": breakdown,  # the first topology again, as the report's DAG
        "runs": [{"server": "fused", "users": 1, "p50_ms": 21.5}],
        "fused_grpc": [{"users": 1, "rps": 40.0, "p50_ms": 20.1, "p99_ms": 30.0, "failed": 0}],
        "verdict_parity": {"servers": ["fused", "split"], "images": 40, "differing": 0},
    }
    text = "\n".join(topology_sections(result))
    assert "| fused | 90.0 |" in text and "| split | 30.0 |" in text
    assert "| 21.5 |" in text  # one user's p50
    assert "**fused** (10 requests): client 30.0 ms = outside the router 8.0 ms" in text
    assert "| detector | 1.0 | 5.0 | 19.0 | 14.0 |" in text
    assert "| serve replica: Router | 2 | 7.5 | model 5.0, event loop 2.5 |" in text
    assert "40 images answered by fused, split; **0** got more than one verdict" in text
    assert "The gRPC API (fused, camera clients with a channel open): 1 user(s): 40.0" in text
    assert topology_sections({"dag_breakdown": breakdown}) == []


def test_sampled_stacks_count_by_activity_and_waiting_threads_are_left_out():
    lines = [
        "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 40",
        "main (ray/serve/_private/replica.py:10);_run_user_code_event_loop "
        "(ray/serve/_private/replica.py:3746) 30",
        "detect (models/inspection/compute.py:70);forward (torch/nn/modules/conv.py:554) 12",
        "__call__ (models/runtime.py:80) 3",
        "inspect_decoded (deployments/router.py:400);decode_image (deployments/imaging.py:9) 5",
        "_append_once (deployments/store.py:318);execute_command (redis/client.py:600) 4",
        "send (ray/serve/_private/router.py:12) 6",
        "odd line without a count",
    ]
    assert read_samples(lines) == {
        "model": 15,
        "image decode and checks": 5,
        "Redis client": 4,
        "Ray request routing": 6,
    }
