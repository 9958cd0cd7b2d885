"""`make run` on a fresh clone: `inspectray serve` on an empty registry, as a user runs it.

A separate process, its own Ray and Redis: it fits the default quick set, serves
it, answers over HTTP as well as the quick set promises, keeps a quiet console,
and shuts everything down on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.quickstart import QUICK_SURFACES
from cluster.redis_server import free_port
from cluster.served_eval import evaluate_served
from deployments.client import HttpClient
from models.artifacts import ArtifactRegistry
from models.data import load_dataset
from models.stages import SHARED_CATEGORY

pytestmark = pytest.mark.slow

READY = "Ctrl-C stops it."


def _wait_for_line(console: Path, process: subprocess.Popen, line: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if line in console.read_text().splitlines():
            return
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{console.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"serve did not print {line!r} in {timeout_s:.0f} s")


def test_serve_fits_the_quick_set_serves_it_well_and_keeps_the_console_quiet(tmp_path):
    port, work = free_port(), tmp_path / "work"
    console = tmp_path / "console.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    command = [
        sys.executable,
        "-m",
        "cluster.cli",
        "serve",
        "--registry",
        str(tmp_path / "registry"),  # empty: the quick set is fitted first
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--workdir",
        str(work),
    ]
    with console.open("w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        _wait_for_line(console, process, READY, timeout_s=900)
        summary = json.loads((work / "serve.json").read_text())
        synthetic = load_dataset("synthetic", work / "quickstart-synth")
        client = HttpClient(f"http://127.0.0.1:{port}")
        served = evaluate_served(client, synthetic)
        cells = load_dataset("elpv")
        some_cells = cells.select(cells.categories[0], "test")[:6]
        graded = [
            client.inspect(s.image_path.read_bytes(), category=s.category) for s in some_cells
        ]
    finally:
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=180)
    lines = console.read_text().splitlines()
    print("\n".join(lines))
    print(json.dumps({"summary": summary, "served": served}, indent=1))
    assert process.returncode == 0 and stdout == ""  # no --json: nothing on stdout

    # What it fitted: nothing trained by gradient. The surfaces' memory banks and
    # classifiers; the solar cells' detectors, their heads fitted in one pass.
    trained = {(t["stage"], t["category"]) for t in summary["quick_set"]["trained"]}
    assert {("memory-bank", s) for s in QUICK_SURFACES} <= trained
    assert {("classifier", s) for s in QUICK_SURFACES} <= trained
    assert not {stage for stage, _ in trained} & {"verifier", "reranker", "localizer"}
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    router = registry.manifest(SHARED_CATEGORY, "router")
    assert router.config["head"] == "fitted"  # no epochs: its head fitted in one pass
    cells = load_dataset("elpv").categories
    assert {c for stage, c in trained if stage == "detector"} == set(cells)
    for cell in cells:
        detector = registry.manifest(cell, "detector")
        assert detector.config["head"] == "fitted" and detector.metrics["epochs_run"] == 1
        assert detector.metrics["val_auroc"] >= 0.82, (cell, detector.metrics)  # 0.94, 0.86
    assert summary["timings"]["ready_s"] < 600

    # Its answers over HTTP, on the generated held-out test images.
    assert served["failed"] == 0, served["errors"]
    assert served["images"] == len(synthetic.select(QUICK_SURFACES[0], "test")) * 2
    assert served["image_auroc"] >= 0.9, served
    assert served["type_top1"] >= 0.8, served
    # A solar cell's answer grades it at one of the four levels, in step with the verdict
    # (a cell is defective from 2/3 on).
    functional, defective = ("good", "defect_p33"), ("defect_p67", "defect_p100")
    for answer in graded:
        assert answer.grade in (functional if answer.verdict == "ok" else defective), answer
    assert served.get("four_class_accuracy") is None  # the surfaces are not graded

    # A quiet console: a line per step and per model, the URLs last; Ray's logs in a file.
    urls = summary["urls"]
    assert len(lines) <= 25 and not [line for line in lines if "pid=" in line], lines
    last = lines[lines.index("inspectray is serving:") : lines.index(READY) + 2]
    assert last[-1] == "shutting down", lines
    wheres = ("api", "ui", "dashboard", "metrics", "grpc", "logs")
    for where in (urls[name] for name in wheres):
        assert any(line.endswith(where) for line in last), (where, last)
    logs = work / "logs" / "ray"
    assert urls["logs"] == str(logs) and any(logs.glob("*.log"))
    assert "Started Serve" in (work / "logs" / "driver.log").read_text()

    # Its own Redis ran with persistence (the AOF is left behind) and was stopped.
    assert any((work / "redis" / "appendonlydir").glob("*.aof"))
    redis_port = int(urls["redis"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redis_port), timeout=2):
        pass
