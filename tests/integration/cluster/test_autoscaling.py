"""Serve autoscaling, locally: under load the model deployment every inspection
meets (the default topology's) scales above its minimum, then back down when the
load stops (short delays in the test's config)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from PIL import Image

from cluster.redis_server import free_port
from deployments.app import APP_NAME, DEPLOYMENT_NAMES, AppArgs, build_app
from deployments.config import DEPLOYMENTS, load_serving_config
from deployments.imaging import encode_png

pytestmark = pytest.mark.slow
FRONT = load_serving_config().front()


def _running(name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None or name not in app.deployments:
        return 0
    return app.deployments[name].replica_states.get("RUNNING", 0)


def test_the_front_deployment_scales_up_under_load_and_down_after(tiny_registry):
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        small = {name: {"num_cpus": 0.1} for name in DEPLOYMENTS}
        small[FRONT] |= {
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 1,
                "downscale_delay_s": 4,
            },
            "batch": {"max_batch_size": 1, "batch_wait_timeout_s": 0},
        }
        overrides = {"deployments": small, "service": {"cache_ttl_s": 0}}
        args = AppArgs(registry=tiny_registry.uri, redis_url="", overrides=overrides)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/inspect"
        image = encode_png(Image.new("RGB", (256, 256), (120, 90, 60)))
        stop = threading.Event()
        failed = []

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    answer = http.post(
                        url,
                        files={"image": ("a.png", image, "image/png")},
                        data={"category": "sure", "explain": "true"},
                    )
                    if answer.status_code != 200:
                        failed.append(answer.status_code)

        timeline = []
        started = time.monotonic()

        def sample(phase: str) -> int:
            count = _running(DEPLOYMENT_NAMES[FRONT])
            timeline.append((round(time.monotonic() - started, 1), phase, count))
            return count

        assert sample("idle") == 1
        clients = [threading.Thread(target=client) for _ in range(12)]
        for thread in clients:
            thread.start()
        peak = 1
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and peak < 3:
            peak = max(peak, sample("load"))
            time.sleep(0.5)
        for _ in range(6):  # a little more load after the peak
            sample("load")
            time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sample("after") > 1:
            time.sleep(1)
        print(f"\n{DEPLOYMENT_NAMES[FRONT]} replicas over time (s, phase, running):", timeline)
        assert failed == []
        assert peak > 1, timeline
        assert timeline[-1][2] == 1, timeline
    finally:
        serve.shutdown()
        ray.shutdown()
