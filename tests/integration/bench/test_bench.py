"""``inspectray bench`` end to end, short: ceiling, naive server, both topologies (sweep,
CPU profile, half peak; gRPC for the first), verdict parity, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.redis_server import free_port
from models.artifacts import ArtifactRegistry
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.decision import DecisionRule
from models.stages import save_decision
from tests.tiny_models import SIZE, add_exported_detector, save

pytestmark = pytest.mark.slow

SMALL = {  # every deployment fits on the 2-core machine beside the load generator
    "deployments": {
        name: {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
        for name in ("router", "detector", "verifier", "classifier", "localizer", "reranker")
    }
}


def test_bench_prints_every_figure_and_writes_the_report(tmp_path):
    # real architectures, untrained, for a synthetic surface the bench can generate images of
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    add_exported_detector(registry, "brushed_metal")  # the ceiling tries both runtimes
    verifier = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE), pretrained=False)
    save(registry, "brushed_metal", "verifier", verifier)
    rule = DecisionRule(threshold=0.5, lo=0.4, hi=0.6, fusion_weight=0.5, fused_threshold=0.5)
    save_decision(registry, "brushed_metal", rule, fitted_on={}, metrics={})
    config = tmp_path / "serving.yaml"
    config.write_text(json.dumps(SMALL))  # JSON is YAML
    report = tmp_path / "docs" / "benchmarks.md"
    command = [
        sys.executable,
        "-m",
        "cluster.cli",
        "bench",
        "--registry",
        registry.uri,
        "--config",
        str(config),
        "--users",
        "2",
        "--duration",
        "4",
        "--warmup",
        "1",
        "--sweep",
        "1,2",
        "--sweep-duration",
        "2",
        "--port",
        str(free_port()),
        "--workdir",
        str(tmp_path / "work"),
        "--report",
        str(report),
        "--profile-duration",
        "3",
    ]
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)  # stdout is the JSON alone
    for key in (
        "ceiling_rps",
        "dag_rps",
        "naive_rps",
        "dag_p50_ms",
        "dag_p99_ms",
        "naive_p99_ms",
        "dag_error_rate",
        "dag_over_naive",
        "dag_over_ceiling",
        "dag_half_peak_p99_ms",
        "fused_rps",
        "split_rps",
        "fused_over_split",
    ):
        assert isinstance(result[key], float | int), key
    assert result["ceiling_rps"] > 0 and result["dag_rps"] > 0 and result["naive_rps"] > 0
    assert {t["runtime"] for t in result["ceiling"]["tried"]} == {"torch", "onnxruntime"}
    assert result["dag_over_naive"] == pytest.approx(
        result["dag_rps"] / result["naive_rps"], rel=0.01
    )
    assert result["dag_over_ceiling"] == pytest.approx(
        result["dag_rps"] / result["ceiling_rps"], rel=0.01
    )
    assert result["failed_requests"] == 0 and result["dag_error_rate"] == 0
    assert result["categories"] == ["brushed_metal"]
    assert result["dag_topology"] == "fused" and result["dag_rps"] == result["fused_rps"]
    servers = [(run["server"], run["users"]) for run in result["runs"]]
    assert servers == [
        ("fused", 1),
        ("fused", 2),
        ("split", 1),
        ("split", 2),
        ("fused-half-peak", 2),
        ("split-half-peak", 2),
        ("fused-grpc", 1),
        ("fused-grpc", 2),
        ("naive", 1),
        ("naive", 2),
    ]
    # The same images got the same verdicts from both topologies.
    parity = result["verdict_parity"]
    assert parity["servers"] == ["fused", "split"] and parity["images"] > 0
    assert parity["differing"] == 0, parity["examples"]
    # Where the time went: the router's phases, each stage's model time and wait, and
    # CPU per request by process, split by what the serving processes were doing.
    for topology in ("fused", "split"):
        breakdown = result[f"{topology}_breakdown"]
        assert {"decode", "inspect"} <= set(breakdown["router_phases_ms"])
        assert breakdown["stages"]["detector"]["share"] == 1.0
        roles = result[f"{topology}_cpu_profile"]["roles"]
        assert roles["serve replica: Router"]["cpu_ms_per_request"] > 0
    assert "serve replica: AnomalyDetector" in result["split_cpu_profile"]["roles"]
    assert "serve replica: AnomalyDetector" not in result["fused_cpu_profile"]["roles"]
    assert all(run["failed"] == 0 for run in result["fused_grpc"])
    text = report.read_text()
    assert "85.3 ms" in text and "DAG over naive" in text
    assert "## Topologies side by side" in text and "## Where the time goes" in text
    for plot in ("latency-cdf.svg", "throughput-users.svg"):
        svg = (report.parent / "benchmarks" / plot).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
        assert f"benchmarks/{plot}" in text
    # Locust's own reports sit beside the request logs
    work = tmp_path / "work" / "bench"
    assert (work / "fused-u2_stats.csv").is_file() and (work / "split-u2.html").is_file()
