"""The traffic mix, the multipart body, the window analysis and the time-window table."""

from __future__ import annotations

import json
import random

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from loadtests.report import time_windows
from loadtests.runs import analyse
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


def test_seed_001s_time_windows():
    rows = {row["camera"][:4]: row for row in time_windows(80.0)}
    assert rows["2 MP"]["window_ms"] == pytest.approx(85.3, abs=0.05)
    assert rows["5 MP"]["window_ms"] == pytest.approx(115.2, abs=0.05)
    assert rows["8 MP"]["window_ms"] == pytest.approx(170.7, abs=0.05)
    assert all(row["fits"] for row in rows.values())
    assert time_windows(100.0)[0]["fits"] is False
