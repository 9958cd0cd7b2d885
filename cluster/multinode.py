"""A multi-node Ray cluster on one host: a head and worker nodes, each its own raylet.

What a KubeRay cluster is (a head pod and worker pods), on one machine: tests
deploy the app on it, check that replicas spread across nodes, and kill a worker
node under traffic to see the app recover. Each node gets a custom resource
``node:<name>`` so a test can tell where things run.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import ray
from ray.cluster_utils import Cluster


class MultiNodeCluster:
    """A head (no CPUs: it runs the controllers, like a KubeRay head) and worker nodes.

    Args:
        workers: worker nodes to start.
        cpus_per_worker: logical CPUs of each worker node.
    """

    def __init__(self, workers: int = 2, cpus_per_worker: float = 2) -> None:
        from tune.ray_env import free_port

        # The dashboard serves the state API that tells where each replica runs.
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_port": free_port(),
            },
        )
        self.workers: list[Any] = []
        self.cpus_per_worker = cpus_per_worker
        for _ in range(workers):
            self.add_worker()
        ray.init(address=self.cluster.address)
        self.cluster.wait_for_nodes()

    def add_worker(self) -> Any:
        """Start one more worker node; returns it."""
        node = self.cluster.add_node(num_cpus=self.cpus_per_worker)
        self.workers.append(node)
        return node

    def kill_worker(self, node: Any) -> None:
        """Kill a worker node at once, as a lost machine (no graceful drain)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def alive_nodes(self) -> list[str]:
        """Ids of the nodes Ray sees alive."""
        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    def shutdown(self) -> None:
        """Disconnect and stop every node."""
        ray.shutdown()
        self.cluster.shutdown()


def replica_nodes(app_name: str) -> dict[str, Counter]:
    """Deployment → how many of its running replicas are on each node."""
    from ray.util.state import list_actors

    placed: dict[str, Counter] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        name = actor.class_name or ""
        prefix = f"ServeReplica:{app_name}:"
        if name.startswith(prefix):
            placed.setdefault(name[len(prefix) :], Counter())[actor.node_id] += 1
    return placed


def wait_until(predicate: Any, timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until ``predicate()`` was true; raises TimeoutError after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(every_s)
    raise TimeoutError(f"not true after {timeout_s:.0f} s")
