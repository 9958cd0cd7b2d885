"""The served app for fault drills and fuzzing: the local cluster on small untrained models.

``LocalCluster`` is what ``inspectray serve`` runs (Ray head, real redis-server
with its append-only file, the DAG over HTTP), here on the tiny registry: the
detector is sure every part is defective (0.95), so each answer is known
without training and costs one detector call. Two replicas of the model
deployment every request meets, so one can be killed while the other answers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from cluster.local import LocalCluster
from deployments.config import DEPLOYMENTS, load_serving_config
from deployments.imaging import encode_png
from deployments.store import RedisStore
from tests.integration.conftest import local_cluster

CATEGORY = "sure"
# The drills run against the default topology; FRONT is the model deployment every
# inspection meets there (the fused router, or the split detector).
FRONT = load_serving_config().front()
SETTINGS = {
    "deployments": {
        name: {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        for name in DEPLOYMENTS
    }
    | {FRONT: {"num_cpus": 0.05, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}},
    "service": {"request_timeout_s": 30, "refresh_s": 1, "max_in_flight": 64},
}


@pytest.fixture(scope="package")
def drill(tiny_registry, tmp_path_factory) -> Iterator[LocalCluster]:
    """The app, deployed and ready, with its own Redis; stopped after the package."""
    work = tmp_path_factory.mktemp("faults")
    with local_cluster(tiny_registry.uri, work, serving_overrides=SETTINGS) as cluster:
        yield cluster


@pytest.fixture(scope="package")
def part() -> bytes:
    """A part's image (PNG); drills append random bytes to make each request new."""
    return encode_png(Image.new("RGB", (96, 96), (120, 90, 60)))


@pytest.fixture()
def store(drill) -> Iterator[RedisStore]:
    store = RedisStore(drill.redis_url, drill.workdir / "test-spool", socket_timeout_s=5)
    yield store
    store.close()
