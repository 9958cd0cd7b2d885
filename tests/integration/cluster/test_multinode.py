"""The app on a multi-node cluster (a head and two worker nodes on this host).

Replicas spread across the worker nodes; a worker node killed under traffic
(no drain: a lost machine) and the app recovers on the node that is left.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from PIL import Image

from cluster.multinode import MultiNodeCluster, replica_nodes, wait_until
from cluster.redis_server import free_port
from deployments.app import APP_NAME, AppArgs, build_app
from deployments.imaging import encode_png

pytestmark = pytest.mark.slow
STAGES = ("router", "detector", "verifier", "classifier", "localizer", "reranker")


@pytest.fixture(scope="module")
def cluster():
    cluster = MultiNodeCluster(workers=2, cpus_per_worker=1)
    yield cluster
    cluster.shutdown()


def test_replicas_spread_and_a_lost_node_is_survived(cluster, tiny_registry):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {
        name: {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        for name in STAGES
    }
    small["detector"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    small["router"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    args = AppArgs(registry=tiny_registry.uri, redis_url="", overrides={"deployments": small})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/inspect"
    image = encode_png(Image.new("RGB", (80, 80), (120, 90, 60)))

    def inspect() -> int:
        try:
            answer = httpx.post(
                url,
                files={"image": ("a.png", image, "image/png")},
                data={"category": "sure"},
                timeout=30,
            )
            return answer.status_code
        except httpx.HTTPError:
            return 0

    assert inspect() == 200
    placed = replica_nodes(APP_NAME)
    worker_ids = {n.node_id for n in cluster.workers}
    assert set(placed["AnomalyDetector"]) == worker_ids, placed  # one on each worker
    assert sum(placed["AnomalyDetector"].values()) == 2

    sent, failed, stop = [], [], threading.Event()
    first_ok_after_kill: list[float] = []
    killed_at: list[float] = []

    def traffic() -> None:
        while not stop.is_set():
            status = inspect()
            now = time.monotonic()
            sent.append(now)
            if status != 200:
                failed.append((now, status))
            elif killed_at and not first_ok_after_kill and now > killed_at[0]:
                first_ok_after_kill.append(now)

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(3)
    victim = cluster.workers[0]
    killed_at.append(time.monotonic())
    cluster.kill_worker(victim)

    def recovered() -> bool:
        counts = replica_nodes(APP_NAME)
        return sum(counts.get("AnomalyDetector", {}).values()) == 2 and all(
            victim.node_id not in c for c in counts.values()
        )

    try:
        recovery_s = wait_until(recovered, timeout_s=180)
        time.sleep(3)
    finally:
        stop.set()
        thread.join()
    after = [t for t in sent if t > killed_at[0]]
    print(
        f"\nnode kill: sent {len(sent)} requests ({len(after)} after the kill), "
        f"failed {len(failed)} {[s for _, s in failed][:10]}, "
        f"replicas back on the surviving node after {recovery_s:.1f} s, "
        f"first success after the kill {first_ok_after_kill[0] - killed_at[0]:.2f} s later"
    )
    assert first_ok_after_kill, "no request succeeded after the node was killed"
    assert inspect() == 200
    assert len(failed) <= len(sent) * 0.5
    serve.shutdown()
