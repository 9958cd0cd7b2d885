"""`inspectray serve`, the README's first command, as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cluster.redis_server import free_port

pytestmark = pytest.mark.slow


def test_serve_starts_everything_prints_the_urls_and_shuts_down(serving, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--registry",
            serving.registry_uri,  # filled: no training
            "--port",
            str(port),
            "--workdir",
            str(tmp_path / "work"),
            "--exit-when-ready",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    urls = summary["urls"]
    assert urls["api"] == f"http://127.0.0.1:{port}/v1/inspect"
    assert urls["ui"].endswith("/ui") and urls["docs"].endswith("/docs")
    assert urls["dashboard"] and urls["redis"].startswith("redis://127.0.0.1:")
    assert summary["quick_set"] is None  # the registry had models
    assert 0 < summary["seconds_to_ready"] < 300
    assert "inspectray is serving" in done.stderr and "shutting down" in done.stderr
    # Its own Redis ran with persistence (the AOF is left behind) and was stopped.
    assert any((tmp_path / "work" / "redis" / "appendonlydir").glob("*.aof"))
    redis_port = int(urls["redis"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redis_port), timeout=2):
        pass
