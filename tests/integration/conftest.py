"""A small real registry for cluster and fault tests: the pipeline tests' models, untrained;
and the local cluster as ``inspectray serve`` runs it.

The detector's head is fixed so its probability is 0.95 ("sure"): every answer
is known without training, and the models are the real architectures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.local import LocalCluster
from cluster.redis_server import free_port
from models.artifacts import ArtifactRegistry
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.decision import DecisionRule
from models.stages import save_decision
from tests.tiny_models import SIZE, detector, save


@pytest.fixture(scope="package")
def tiny_registry(tmp_path_factory) -> ArtifactRegistry:
    registry = ArtifactRegistry(str(tmp_path_factory.mktemp("cluster") / "registry"))
    save(registry, "sure", "detector", detector(0.95))
    verifier = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE), pretrained=False)
    save(registry, "sure", "verifier", verifier)
    rule = DecisionRule(threshold=0.5, lo=0.4, hi=0.6, fusion_weight=0.5, fused_threshold=0.5)
    save_decision(registry, "sure", rule, fitted_on={}, metrics={})
    return registry


@contextlib.contextmanager
def local_cluster(registry: str, work: Path, **options: Any) -> Iterator[LocalCluster]:
    """What ``inspectray serve`` runs, on a free port: started, then stopped after use."""
    cluster = LocalCluster(
        registry, port=free_port(), workdir=work, progress=False, grpc_port=free_port(), **options
    )
    try:
        cluster.start(ready_timeout_s=300)
        yield cluster
    finally:
        cluster.stop()
