"""Settings and ports of the Ray clusters this process starts (a light module: no Ray import)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Iterator, Mapping

# Ray Train's controller polls its workers every 2 s by default, and a run's start
# and its end each wait on polls: polled four times a second, a short run ends about
# 5 s sooner (README, "Training, sweeping and evaluating"). The polls are cheap
# actor calls; a missed one is tolerated for minutes as before.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}

# How Serve takes requests in. HAProxy (bundled with Ray Serve) listens on the
# HTTP port and forwards each request straight to a router replica, which serves
# HTTP itself: no Python proxy process decoding and re-sending every request.
# The throughput-optimised settings run the replicas' request handling on their
# own event loop (no extra thread hop) and call between deployments over gRPC.
# On a 2-core machine this answered 2.3 times the inspections (the bench,
# docs/benchmarks.md). Set RAY_SERVE_ENABLE_HA_PROXY=0 and
# RAY_SERVE_THROUGHPUT_OPTIMIZED=0 for Serve's own proxy.
SERVE_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def set_train_poll_env() -> None:
    """Before this process starts a Ray cluster: its training runs poll 4x a second.

    The Ray processes inherit this process's environment; a cluster started
    elsewhere (``RAY_ADDRESS``, KubeRay) keeps its own setting, and a value the
    user set wins.
    """
    for name, value in TRAIN_POLL_ENV.items():
        os.environ.setdefault(name, value)


def state_api_env(dashboard_port: int) -> dict[str, str]:
    """Where the processes of a Ray cluster this process starts find its state API.

    Ray Train's placement-group cleaner frees a run's CPUs when the run's
    controller dies without doing so itself, as when Tune stops a trial early.
    It asks the state API whether the controller lives, and without an address
    it looks for the one Ray instance on the machine: beside a second one (a
    service on one cluster, a training on another) it fails, stops watching,
    and the stopped trial's CPUs stay held, so the next run waits for them for
    ever. With the dashboard on ``dashboard_port`` (it serves the state API) the
    cluster's processes ask their own. A value the user set wins.
    """
    name = "RAY_API_SERVER_ADDRESS"
    return {} if name in os.environ else {name: f"http://127.0.0.1:{dashboard_port}"}


def serve_ingress_env() -> dict[str, str]:
    """The HAProxy ingress settings for a Ray cluster this process starts to serve on.

    As for :func:`set_train_poll_env`, a value the user set wins (it is left
    out), and a cluster started elsewhere keeps its own (the KubeRay manifests
    set the same values).
    """
    return {name: value for name, value in SERVE_INGRESS_ENV.items() if name not in os.environ}


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block, then as they were.

    A Ray cluster started in the block keeps them: its processes inherit the
    environment they start with.
    """
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Ports handed out here are drawn below the kernel's ephemeral range (32768 and up on
# Linux, where outgoing connections and "any free port" binds land) and above Ray's
# worker ports (10002-19999), so nothing else takes one between our check and its use.
_PORT_RANGE = (20_000, 32_000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago and that nothing else picks.

    Each port is handed out once per process. Falls back to one the OS picks when the
    whole range is taken.
    """
    draw = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = draw.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
