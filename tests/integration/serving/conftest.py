"""The served app for end-to-end tests: the one-command local cluster, once per package.

``LocalCluster`` is what ``inspectray serve`` runs: a local Ray head, a real
redis-server, the quick set trained into an empty registry (smaller here: one
synthetic surface and one ELPV module type), and the DAG deployed over HTTP.
The package scope tears it down before the training tests need the CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from cluster.quickstart import QuickSet, quick_datasets
from deployments.config import DEPLOYMENTS
from models.artifacts import ArtifactRegistry
from models.data import read_image
from models.inspection import LocalInspector
from tests.integration.conftest import local_cluster

SURFACE, MODULE = "brushed_metal", "solar_cell_mono"
# The trained quick set: every stage of the flow has a model to serve.
QUICK = QuickSet(surfaces=(SURFACE,), elpv_categories=(MODULE,), elpv_train=64, fitted=False)
# Small replicas: every deployment fits on the 2-core machine beside the test process.
SMALL = {
    "deployments": {
        name: {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        for name in DEPLOYMENTS
    },
    "service": {"request_timeout_s": 60, "refresh_s": 1},
}


@pytest.fixture(scope="package")
def serving(tmp_path_factory) -> Iterator[LocalCluster]:
    """The app, deployed and ready, with its own Redis; stopped after the package.

    The dashboard is on: settings change through Serve's REST API, in place.
    """
    work = tmp_path_factory.mktemp("serving")
    registry = str(work / "registry")
    with local_cluster(registry, work, quick_set=QUICK, serving_overrides=SMALL) as cluster:
        yield cluster


@pytest.fixture(scope="package")
def registry(serving: LocalCluster) -> ArtifactRegistry:
    return ArtifactRegistry(serving.registry_uri)


@pytest.fixture(scope="package")
def inspection_images(serving: LocalCluster, registry: ArtifactRegistry) -> dict[str, Path]:
    """A good and a defective test image of each dataset that the models judge correctly.

    Picked with the models in this process, so the served answers can be checked
    against labels; failing to find one means the quick models are broken.
    """
    synthetic, elpv = quick_datasets(serving.workdir, QUICK)
    picked: dict[str, Path] = {}
    inspector = LocalInspector(registry)
    for prefix, dataset, category in (("synthetic", synthetic, SURFACE), ("elpv", elpv, MODULE)):
        test = dataset.select(category, "test")
        for name, anomalous, wanted in (("good", False, "ok"), ("defective", True, "defective")):
            candidates = [s for s in test if s.is_anomalous == anomalous]
            # The clearest defects first (ELPV grades them; synthetic ones have no grade).
            candidates.sort(key=lambda s: -(s.severity or 0.0))
            for sample in candidates[:16]:
                found = inspector.inspect_images([read_image(sample.image_path)], [category])
                if found[0].verdict == wanted:
                    picked[f"{prefix}_{name}"] = sample.image_path
                    break
            else:
                pytest.fail(f"no {prefix} {name} test image among 16 was judged {wanted}")
    return picked


@pytest.fixture(scope="package")
def inspection_categories() -> dict[str, str]:
    return {
        "synthetic_good": SURFACE,
        "synthetic_defective": SURFACE,
        "elpv_good": MODULE,
        "elpv_defective": MODULE,
    }
