"""``inspectray dashboards``: TensorBoard and the MLflow UI over the training runs.

TensorBoard reads the runs' and sweeps' event files; the MLflow UI the tracking
store they log to (:mod:`tune.tracking`). Both run as child processes on this
machine (127.0.0.1 by default) until Ctrl-C; the command prints their URLs once
each page answers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from tune.ray_env import free_port
from tune.tracking import tracking_uri


class DashboardError(RuntimeError):
    """A dashboard did not start; the message says which and why."""


@dataclass
class Dashboard:
    """One dashboard process: its name, command, URL and the page that says it is up."""

    name: str
    command: list[str]
    url: str
    ready_path: str = "/"
    log: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start the process (its output goes to ``log``)."""
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float) -> None:
        """Until the page answers 200, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DashboardError(
                    f"{self.name} exited with {self.process.returncode}: {self._tail()}"
                )
            try:
                answer = httpx.get(self.url.rstrip("/") + self.ready_path, timeout=5)
                if answer.status_code == 200:
                    return
                last = f"HTTP {answer.status_code}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}"
            time.sleep(0.5)
        raise DashboardError(f"{self.name} did not answer in {timeout_s:.0f} s ({last})")

    def stop(self) -> None:
        """Stop the process and its children."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def _tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-1500:]


def dashboards(
    runs: Path,
    mlflow_uri: str | None = None,
    host: str = "127.0.0.1",
    tensorboard_port: int | None = None,
    mlflow_port: int | None = None,
) -> list[Dashboard]:
    """TensorBoard over ``runs`` and the MLflow UI over its tracking store (not started)."""
    runs = runs.expanduser().resolve()
    if not runs.is_dir():
        raise DashboardError(
            f"no runs folder at {runs}: train or sweep first (`inspectray train ...`), "
            "or name the folder with --runs"
        )
    logs = runs / "dashboard-logs"
    logs.mkdir(exist_ok=True)
    uri = tracking_uri(str(runs), mlflow_uri)
    if uri is None:
        raise DashboardError("no MLflow tracking store: give --mlflow-uri")
    tb_port, ml_port = tensorboard_port or free_port(), mlflow_port or free_port()
    python = sys.executable
    return [
        Dashboard(
            "TensorBoard",
            [
                python,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(runs),
                "--host",
                host,
                "--port",
                str(tb_port),
            ],
            f"http://{host}:{tb_port}",
            log=logs / "tensorboard.log",
        ),
        Dashboard(
            "MLflow",
            [
                python,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                uri,
                "--host",
                host,
                "--port",
                str(ml_port),
                "--workers",
                "1",
            ],
            f"http://{host}:{ml_port}",
            ready_path="/health",
            log=logs / "mlflow.log",
        ),
    ]


def cmd_dashboards(args: argparse.Namespace) -> int:
    """Start TensorBoard and the MLflow UI over the training runs; print their URLs."""
    started = dashboards(
        Path(args.runs), args.mlflow_uri, args.host, args.tensorboard_port, args.mlflow_port
    )
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for dashboard in started:
            dashboard.start()
        for dashboard in started:
            dashboard.wait_ready(args.timeout)
        width = max(len(d.name) for d in started)
        lines = [f"  {d.name:<{width}}  {d.url}" for d in started]
        print("\n".join(["dashboards:", *lines, "Ctrl-C stops them."]), file=sys.stderr, flush=True)
        while not stop and not args.exit_when_ready:
            if any(d.process is not None and d.process.poll() is not None for d in started):
                raise DashboardError("a dashboard exited; its log is in the runs folder")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for dashboard in started:
            dashboard.stop()
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``dashboards`` on the main parser."""
    from cluster.arguments import add_command

    command = add_command(commands, "dashboards", cmd_dashboards)
    command.add_argument("--runs", default="runs", help="the training runs' folder (--storage)")
    command.add_argument(
        "--mlflow-uri", help="MLflow tracking store (default: sqlite:///RUNS/mlflow.db)"
    )
    command.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    command.add_argument("--tensorboard-port", type=int, help="default: a free port")
    command.add_argument("--mlflow-port", type=int, help="default: a free port")
    command.add_argument("--timeout", type=float, default=120, help="seconds to wait for each")
    command.add_argument(
        "--exit-when-ready", action="store_true", help="stop once both answer (checks)"
    )
