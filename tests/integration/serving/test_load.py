"""Load tests against the served app: Locust over HTTP and callers by DeploymentHandle."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from cluster.local import LocalCluster
from loadtests.runs import run_locust
from loadtests.traffic import TrafficImage, build_traffic, served_categories, write_traffic
from tests.integration.serving.conftest import MODULE, SURFACE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def traffic_file(serving: LocalCluster, tmp_path_factory) -> Path:
    """Both categories, images the models did not train on, half of them defective."""
    out = tmp_path_factory.mktemp("traffic")
    categories = served_categories(serving.registry_uri)
    assert set(categories) == {SURFACE, MODULE}
    images = build_traffic(categories, out, images_per_class=4, image_size=128)
    return write_traffic(images, out / "traffic.json", defective_share=0.5)


def _aggregated(prefix: Path) -> dict[str, str]:
    with open(f"{prefix}_stats.csv") as handle:
        return next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")


def test_locust_over_http_passes_with_csv_and_html_reports(serving, traffic_file, tmp_path):
    prefix = tmp_path / "dag"
    result = run_locust(serving.url, traffic_file, 3, 6.0, 1.0, prefix, defective_share=0.5)
    assert result.locust_exit == 0
    assert result.failed == 0 and result.requests > 10 and result.rps > 0
    assert result.statuses == {"200": result.requests}
    aggregated = _aggregated(prefix)
    assert int(aggregated["Request Count"]) > 0 and aggregated["Failure Count"] == "0"
    assert "<html" in prefix.with_suffix(".html").read_text().lower()
    records = [json.loads(line) for line in prefix.with_suffix(".requests.jsonl").open()]
    assert {r["category"] for r in records} == {SURFACE, MODULE}
    assert {r["defective"] for r in records} == {True, False}
    assert {r["verdict"] for r in records} <= {"ok", "defective"}


def test_a_run_with_any_failed_request_fails(serving, traffic_file, tmp_path):
    served = json.loads(traffic_file.read_text())["images"]
    good = next(TrafficImage(**i) for i in served if not i["defective"])
    # a line the service does not know: every request gets 422
    stray = write_traffic(
        [TrafficImage(good.path, "no_such_line", False)], tmp_path / "stray.json", 0.0
    )
    result = run_locust(serving.url, stray, 1, 2.0, 0.0, tmp_path / "stray", defective_share=0.0)
    assert result.locust_exit == 1
    assert result.failed == result.requests > 0
    assert set(result.statuses) == {"422"}
    assert int(_aggregated(tmp_path / "stray")["Failure Count"]) > 0


def test_callers_by_deployment_handle(serving, traffic_file, tmp_path):
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.handle_load",
            "--traffic",
            str(traffic_file),
            "--users",
            "3",
            "--duration",
            "5",
            "--out",
            str(tmp_path / "handle"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0 and summary["requests"] > 5
    with open(tmp_path / "handle_stats.csv") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"good", "defective", "Aggregated"}
    assert int(rows["good"]["requests"]) + int(rows["defective"]["requests"]) == int(
        rows["Aggregated"]["requests"]
    )
    lines = (tmp_path / "handle_requests.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(r["ok"] and r["verdict"] in ("ok", "defective") for r in records)
