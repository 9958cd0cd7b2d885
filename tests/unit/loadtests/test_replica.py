"""The in-process replica measure: the router's own code answers, and every answer is streamed."""

from __future__ import annotations

from deployments.imaging import encode_png
from loadtests.replica import WARMUP_REQUESTS, measure
from loadtests.traffic import Traffic, TrafficImage


def test_the_replica_measure_answers_every_request_through_the_router(
    registry, images, tmp_path, redis_server, redis_client, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the router's spool folder
    pool = []
    for i in range(4):
        image = images[i % len(images)]
        path = tmp_path / f"part-{i}.png"
        path.write_bytes(encode_png(image))
        pool.append(TrafficImage(str(path), ("sure", "unsure")[i % 2], defective=i >= 2))
    run = measure(
        registry.uri, Traffic(pool, 0.5), requests=12, users=3, redis_url=redis_server.url
    )
    assert run.requests == 12 and run.users == 3
    assert run.inspections_per_s > 0 and run.cpu_ms_per_inspection > 0
    # "sure" parts are judged defective by the tiny registry's detector, "unsure" ones good
    assert 0 < run.defective < 12
    assert redis_client.xlen("inspectray:results") == 12 + WARMUP_REQUESTS  # none from cache
