"""A model stage's replica logic, run as a plain object on the pipeline tests' registry."""

import asyncio
import json
from pathlib import Path

import pytest

from deployments.stages import AnomalyDetector, AutoencoderVerifier


def _replica(deployment, registry):
    return deployment.func_or_class(registry.uri, "cpu")


def test_a_replica_loads_every_production_model_and_is_healthy(registry):
    replica = _replica(AnomalyDetector, registry)
    replica.check_health()
    loaded = asyncio.run(replica.loaded())
    assert loaded["models"] == ["sure@v1", "unsure@v1"] and loaded["failed"] == {}
    assert asyncio.run(_replica(AutoencoderVerifier, registry).loaded())["device"] == "cpu"


def test_a_model_that_cannot_be_loaded_makes_the_replica_unhealthy(registry):
    manifest = Path(registry.uri) / "unsure" / "detector" / "v1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["weights"]["sha256"] = "0" * 64  # the weights no longer match: refused
    manifest.write_text(json.dumps(data))
    replica = _replica(AnomalyDetector, registry)
    with pytest.raises(RuntimeError, match="unsure@v1"):
        replica.check_health()
    assert asyncio.run(replica.loaded())["models"] == ["sure@v1"]


def test_reconfigure_sets_batching_and_threads(registry):
    import torch

    replica = _replica(AnomalyDetector, registry)
    threads = torch.get_num_threads()
    try:
        replica.reconfigure({"torch_threads": 1, "max_batch_size": 3, "batch_wait_timeout_s": 0.02})
        assert torch.get_num_threads() == 1
        assert replica._batch._get_max_batch_size() == 3
        assert replica._batch._get_batch_wait_timeout_s() == 0.02
    finally:
        torch.set_num_threads(threads)
