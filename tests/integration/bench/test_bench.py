"""``inspectray bench`` end to end, short: ceiling, naive server, DAG, sweep, half peak, report."""

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
from tests.tiny_models import SIZE, detector, save

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
    save(registry, "brushed_metal", "detector", detector(0.3))
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
        "half_peak_p99_ms",
    ):
        assert isinstance(result[key], float | int), key
    assert result["ceiling_rps"] > 0 and result["dag_rps"] > 0 and result["naive_rps"] > 0
    assert result["dag_over_naive"] == pytest.approx(
        result["dag_rps"] / result["naive_rps"], rel=0.01
    )
    assert result["dag_over_ceiling"] == pytest.approx(
        result["dag_rps"] / result["ceiling_rps"], rel=0.01
    )
    assert result["failed_requests"] == 0 and result["dag_error_rate"] == 0
    assert result["categories"] == ["brushed_metal"]
    servers = [(run["server"], run["users"]) for run in result["runs"]]
    assert servers == [
        ("dag", 1),
        ("dag", 2),
        ("naive", 1),
        ("naive", 2),
        ("dag-half-peak", 2),
    ]
    text = report.read_text()
    assert "85.3 ms" in text and "DAG over naive" in text
    for plot in ("latency-cdf.svg", "throughput-users.svg"):
        svg = (report.parent / "benchmarks" / plot).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
        assert f"benchmarks/{plot}" in text
    # Locust's own reports sit beside the request logs
    work = tmp_path / "work" / "bench"
    assert (work / "dag-u2_stats.csv").is_file() and (work / "dag-u2.html").is_file()
