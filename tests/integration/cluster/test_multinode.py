"""The app on a multi-node cluster (a head and two worker nodes on this host).

Replicas spread across the worker nodes; a worker node killed under traffic
(no drain: a lost machine) and the app recovers on the node that is left;
callers with the client's retry policy see no failed request.
"""

from __future__ import annotations

import time

import httpx
import pytest
from PIL import Image

from cluster.multinode import MultiNodeCluster, replica_nodes, wait_until
from cluster.redis_server import free_port
from deployments.app import APP_NAME, DEPLOYMENT_NAMES, AppArgs, build_app
from deployments.config import DEPLOYMENTS, load_serving_config
from deployments.imaging import encode_png
from loadtests.faults import FaultRow, SteadyTraffic

pytestmark = [pytest.mark.slow, pytest.mark.faults]
FRONT = load_serving_config().front()  # the model deployment every inspection meets


@pytest.fixture(scope="module")
def cluster():
    cluster = MultiNodeCluster(workers=2, cpus_per_worker=1)
    yield cluster
    cluster.shutdown()


def test_replicas_spread_and_a_lost_node_is_survived(cluster, tiny_registry, fault_report):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {
        name: {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        for name in DEPLOYMENTS
    }
    small[FRONT]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    small["router"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    args = AppArgs(registry=tiny_registry.uri, redis_url="", overrides={"deployments": small})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    image = encode_png(Image.new("RGB", (80, 80), (120, 90, 60)))
    first = httpx.post(
        f"{url}/v1/inspect",
        files={"image": ("a.png", image, "image/png")},
        data={"category": "sure"},
        timeout=30,
    )
    assert first.status_code == 200, first.text
    placed = replica_nodes(APP_NAME)
    worker_ids = {n.node_id for n in cluster.workers}
    front = DEPLOYMENT_NAMES[FRONT]
    assert set(placed[front]) == worker_ids, placed  # one on each worker
    assert sum(placed[front].values()) == 2

    victim = cluster.workers[0]

    def recovered() -> bool:
        counts = replica_nodes(APP_NAME)
        return sum(counts.get(front, {}).values()) == 2 and all(
            victim.node_id not in c for c in counts.values()
        )

    # Callers with the client's retry policy, as a line's services call.
    with SteadyTraffic(url, image, "sure", callers=2) as traffic:
        traffic.wait_for_answers(10)
        killed = time.monotonic()
        cluster.kill_worker(victim)
        recovery_s = wait_until(recovered, timeout_s=180)
        traffic.wait_for_answers(10)
    row = FaultRow.from_traffic(
        "worker node lost (no drain) under load, multi-node cluster",
        1,
        traffic,
        killed,
        recovery_s,
        first_answer_after_kill_s=round(traffic.first_answer_after(killed) or -1, 2),
    )
    fault_report.append(row)
    assert not traffic.failed(), traffic.failed()[:5]
    assert traffic.first_answer_after(killed) is not None, "nothing answered after the kill"
    serve.shutdown()
