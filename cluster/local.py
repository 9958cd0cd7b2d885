"""The one-command local cluster: Ray, Redis, models and the serving app on this machine.

``inspectray serve`` runs :class:`LocalCluster` in the foreground:

1. starts a local Ray head (or joins ``RAY_ADDRESS``), with its dashboard;
2. starts a local ``redis-server`` (AOF on, files under the work folder) unless
   ``REDIS_URL`` or ``--redis-url`` names one;
3. trains the quick set of models (:mod:`cluster.quickstart`) when the registry
   has no detector;
4. deploys the app (:mod:`deployments.app`) and waits until ``/readyz`` says
   every stage has its models;
5. prints the URLs, and on Ctrl-C (or SIGTERM) shuts down what it started.

The console stays quiet: one line per step (and progress bars while training).
The Ray processes' own logs (workers, Serve replicas, training runs) go to Ray's
session folder, linked as ``<workdir>/logs/ray``; ``verbose=True`` also streams
them to the console.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import httpx

from cluster.redis_server import RedisServer
from deployments.config import GRPC_PORT, GRPC_SERVICER
from models.artifacts import ArtifactRegistry
from models.stages import DETECTOR, MEMORY_BANK, SHARED_CATEGORY
from tune.ray_env import free_port

# The loggers of Ray's driver side; without --verbose they write to a file.
# (ray.init clears the "ray" logger's handlers: "ray._private" keeps init's own notices.)
RAY_LOGGERS = ("ray", "ray._private", "ray.serve", "ray.train", "ray.tune", "ray.data")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LocalClusterError(RuntimeError):
    """The local cluster could not start; the message says which part failed."""


def has_models(registry: ArtifactRegistry) -> bool:
    """Whether any category has a detector or a memory bank to judge its parts."""
    return any(
        {DETECTOR, MEMORY_BANK} & set(registry.stages(category))
        for category in registry.categories()
        if category != SHARED_CATEGORY
    )


def _metrics_url(node_ip: str | None) -> str | None:
    """The Prometheus scrape URL of this node's Ray metrics (the app's among them)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == node_ip:
            port = node.get("MetricsExportPort")
            return f"http://{node_ip}:{port}/metrics" if port else None
    return None


class LocalCluster:
    """Ray + Redis + the app on this machine.

    Args:
        registry: registry folder or URL.
        port: HTTP port of the API.
        host: interface to listen on (127.0.0.1: this machine only).
        config: serving YAML (default: packaged).
        redis_url: an existing Redis (default: ``REDIS_URL``, else a local one).
        workdir: folder for the local Redis, the quick set's data and the spool.
        progress: show progress bars while training the quick set.
        quick_set: what to train into an empty registry (default: QuickSet()).
        dashboard: start the Ray dashboard.
        serving_overrides: keys merged over the serving YAML (tests make replicas small).
        grpc_port: port of the gRPC API (Serve's gRPC proxy).
        verbose: stream the Ray processes' logs to the console too.
        say: where the one-line step messages go (default: stderr; None: nowhere).
    """

    # The file handler Ray's driver-side loggers write to (one per process).
    _driver_handler: ClassVar[logging.Handler | None] = None

    def __init__(
        self,
        registry: str,
        port: int = 8000,
        host: str = "127.0.0.1",
        config: str | None = None,
        redis_url: str | None = None,
        workdir: Path = Path(".inspectray"),
        progress: bool = True,
        quick_set: Any = None,
        dashboard: bool = True,
        serving_overrides: dict[str, Any] | None = None,
        grpc_port: int = GRPC_PORT,
        verbose: bool = False,
        say: Callable[[str], None] | None = _to_stderr,
    ) -> None:
        self.grpc_port = grpc_port
        self.verbose = verbose
        self._say = say
        self.registry_uri = registry if "://" in registry else str(Path(registry).resolve())
        self.port, self.host, self.config = port, host, config
        self.redis_url = redis_url or os.environ.get("REDIS_URL") or None
        self.workdir = workdir.resolve()
        self.progress = progress
        self.quick_set = quick_set
        self.dashboard = dashboard
        self.serving_overrides = serving_overrides
        self.redis: RedisServer | None = None
        self._started_ray = False
        self.timings: dict[str, float] = {}
        self.trained: dict[str, Any] | None = None
        self.dashboard_url: str | None = None
        self.log_dir: Path | None = None
        self.metrics_url: str | None = None

    @property
    def url(self) -> str:
        """The API's base URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, ready_timeout_s: float = 600.0) -> LocalCluster:
        """Bring everything up; returns when the app is ready.

        Raises:
            LocalClusterError: a part failed to start or the app never got ready.
        """
        import ray
        from ray import serve

        started = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            from tune.ray_env import environment, set_train_poll_env, state_api_env

            set_train_poll_env()  # the quick set and retraining run on this cluster
            address = os.environ.get("RAY_ADDRESS")
            if not self.verbose:
                self._driver_logs_to_file()
            # Joining a cluster (RAY_ADDRESS): its own ports and settings stand.
            dashboard_port = free_port() if address is None else None
            own = self._ingress_env() if address is None else {}
            if dashboard_port is not None and self.dashboard:
                own |= state_api_env(dashboard_port)
            with environment(own):
                context = ray.init(
                    address=address,
                    include_dashboard=self.dashboard if address is None else None,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dashboard_port,
                    _metrics_export_port=free_port() if address is None else None,
                    configure_logging=False,
                    log_to_driver=self.verbose,
                    logging_level=logging.INFO if self.verbose else logging.WARNING,
                )
            self._started_ray = address is None
            url = getattr(context, "dashboard_url", None) or None
            if url and self.dashboard:
                self.dashboard_url = url if "://" in url else f"http://{url}"
            self.log_dir = self._link_ray_logs(context.address_info.get("session_dir"))
            self.metrics_url = _metrics_url(context.address_info.get("node_ip_address"))
            if not self.verbose:
                self._driver_logs_to_file()  # again: ray.init took the "ray" logger's handlers
        self.timings["ray_s"] = time.perf_counter() - started
        self.say(
            f"Ray is up ({self.timings['ray_s']:.1f} s)"
            + (f"; its logs: {self.log_dir}" if self.log_dir and not self.verbose else "")
        )
        if self.redis_url is None:
            self.redis = RedisServer(workdir=self.workdir / "redis", appendonly=True).start()
            self.redis_url = self.redis.url
            self.say(f"Redis is up at {self.redis.host}:{self.redis.port}")
        registry = ArtifactRegistry(self.registry_uri)
        if not has_models(registry):
            from cluster.quickstart import QuickSet, train_quick_set

            self.say(
                f"the registry {self.registry_uri} has no models: training a quick set "
                "(a few minutes; train real ones with `inspectray train all`)"
            )
            began = time.perf_counter()
            self.trained = train_quick_set(
                registry,
                self.workdir,
                self.quick_set or QuickSet(),
                progress=self.progress,
                say=self.say,
            )
            self.timings["training_s"] = time.perf_counter() - began
            self.say(f"the quick set is trained ({self.timings['training_s']:.0f} s)")
        from deployments.config import load_serving_config

        serving = load_serving_config(self.config, self._overrides())
        service = serving.service
        began = time.perf_counter()
        # The HTTP proxy logs each request when the router does.
        access_log = serving.deployments["router"].access_log
        serve.start(
            http_options=self._http_options(service.request_timeout_s),
            grpc_options=self._grpc_options(service.request_timeout_s),
            logging_config={"enable_access_log": access_log},
        )
        self.say(f"deploying the app ({serving.topology} topology)")
        self.deploy()
        self._wait_ready(ready_timeout_s)
        self.timings["deploy_s"] = time.perf_counter() - began
        self.timings["ready_s"] = time.perf_counter() - started
        self.say(
            f"every stage has its models ({self.timings['deploy_s']:.0f} s to deploy, "
            f"{self.timings['ready_s']:.0f} s in all)"
        )
        return self

    def _ingress_env(self) -> dict[str, str]:
        """The environment Ray starts with: HAProxy ingress, on this cluster's own ports.

        HAProxy's stats and metrics ports are fixed by default, so two clusters on
        one machine (``make run`` beside a bench) would fight over them; each
        cluster takes free ones unless the user set them. (Its files are kept
        per Ray node already.) A router replica that stops holds its port open for
        30 s by default, for load balancers elsewhere to forget it; here HAProxy
        is on the same machine and forgets it in a fraction of a second, so 2 s
        is enough, and stopping the cluster does not wait half a minute.
        """
        from tune.ray_env import serve_ingress_env

        env = serve_ingress_env()
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", env.get("RAY_SERVE_ENABLE_HA_PROXY")) != "1":
            return env
        local = {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        }
        return env | {name: value for name, value in local.items() if name not in os.environ}

    def _driver_logs_to_file(self) -> None:
        """Ray's and Serve's notices in this process go to ``<workdir>/logs/driver.log``."""
        import ray.serve  # noqa: F401  (sets up Serve's logger, which this then redirects)

        folder = self.workdir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / "driver.log")  # appends
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            for old in list(logger.handlers):
                to_console = isinstance(old, logging.StreamHandler) and not isinstance(
                    old, logging.FileHandler
                )
                if old is LocalCluster._driver_handler or to_console:
                    logger.removeHandler(old)
            logger.addHandler(handler)
            logger.propagate = False
        if LocalCluster._driver_handler is not None:
            LocalCluster._driver_handler.close()
        LocalCluster._driver_handler = handler

    def say(self, line: str) -> None:
        """One step's line on the console."""
        if self._say is not None:
            self._say(line)

    def _link_ray_logs(self, session_dir: str | None) -> Path | None:
        """``<workdir>/logs/ray``: a link to this Ray session's log folder, when it is local."""
        if not session_dir or not (Path(session_dir) / "logs").is_dir():
            return None
        link = self.workdir / "logs" / "ray"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(session_dir) / "logs", target_is_directory=True)
        return link

    def _overrides(self) -> dict[str, Any]:
        """The serving overrides, with the spool under the work folder."""
        from models.config import merge

        spool = {"service": {"spool_dir": str(self.workdir / "spool")}}
        return merge(spool, self.serving_overrides or {})

    def _http_options(self, request_timeout_s: float) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "request_timeout_s": request_timeout_s + 5}

    def _grpc_options(self, request_timeout_s: float) -> dict[str, Any]:
        return {
            "port": self.grpc_port,
            "grpc_servicer_functions": [GRPC_SERVICER],
            "request_timeout_s": request_timeout_s + 5,
        }

    @property
    def grpc_target(self) -> str:
        """The gRPC API's ``host:port``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.grpc_port}"

    def deploy(
        self,
        service: dict[str, Any] | None = None,
        deployments: dict[str, dict[str, Any]] | None = None,
        timeout_s: float = 300.0,
        topology: str | None = None,
    ) -> None:
        """Deploy the app, or change settings in place.

        With the dashboard up this goes through Serve's REST API, as ``serve
        deploy`` and KubeRay do: a change of ``service`` settings, or of a
        deployment's ``user_config`` keys (batching, threads, ``fault_delay_s``),
        only reaches those replicas' ``reconfigure``, without restarting one.
        Without the dashboard it falls back to ``serve.run`` (which restarts
        replicas).

        Args:
            service: router settings to change (merged over the configuration).
            deployments: per deployment key (``detector``, ...), settings to change.
                Only ``user_config`` keys change in place; the others need a new
                ``LocalCluster`` with ``serving_overrides``.
            timeout_s: how long to wait for the deployment to finish.
            topology: serve this topology (``fused``, ``split``) from now on; the
                app is built again, its replicas start anew.

        Raises:
            LocalClusterError: Serve refused the config or did not finish in time.
        """
        from ray import serve

        from deployments.app import (
            APP_NAME,
            DEPLOYMENT_NAMES,
            AppArgs,
            build_app,
            serve_config,
            user_config,
        )
        from deployments.config import load_serving_config
        from models.config import merge

        if topology is not None:
            self.serving_overrides = merge(self.serving_overrides or {}, {"topology": topology})
        args = AppArgs(
            registry=self.registry_uri,
            redis_url=self.redis_url,
            config=self.config,
            overrides=self._overrides(),
        )
        changes = {"service": service or {}, "deployments": deployments or {}}
        serving = load_serving_config(self.config, merge(args.overrides, changes))
        if self.dashboard_url is None:
            args = args.model_copy(update={"overrides": merge(args.overrides, changes)})
            serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
            return
        before = self._deployed_at(APP_NAME)
        changed = (["router"] if service is not None else []) + list(deployments or {})
        config = serve_config(
            args, {DEPLOYMENT_NAMES[key]: user_config(serving, key) for key in changed}
        )
        config["http_options"] = self._http_options(serving.service.request_timeout_s)
        config["grpc_options"] = self._grpc_options(serving.service.request_timeout_s)
        # The client `serve deploy` uses: Serve's REST API, with the cluster's auth token.
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        try:
            ServeSubmissionClient(self.dashboard_url).deploy_applications(config)
        except RuntimeError as error:
            raise LocalClusterError(f"Serve refused the app's config: {error}") from error
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status and status.last_deployed_time_s != before and status.status == "RUNNING":
                return
            if status and status.status == "DEPLOY_FAILED":
                raise LocalClusterError(f"the app failed to deploy: {status.message}")
            time.sleep(0.25)
        raise LocalClusterError(f"the app was not deployed after {timeout_s:.0f} s")

    @staticmethod
    def _deployed_at(name: str) -> float | None:
        from ray import serve

        status = serve.status().applications.get(name)
        return status.last_deployed_time_s if status else None

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=15)
                if answer.status_code == 200:
                    return
                last = answer.text[:500]
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.5)
        raise LocalClusterError(f"the app was not ready after {timeout_s:.0f} s: {last}")

    def urls(self) -> dict[str, str | None]:
        """Where to reach everything."""
        return {
            "api": f"{self.url}/v1/inspect",
            "ui": f"{self.url}/ui",
            "docs": f"{self.url}/docs",
            "grpc": self.grpc_target,
            "dashboard": self.dashboard_url,
            "metrics": self.metrics_url,
            "redis": self.redis_url.split("@")[-1] if self.redis_url else None,
            "registry": self.registry_uri,
            "logs": str(self.log_dir) if self.log_dir else None,
        }

    def stop(self) -> None:
        """Shut down the app, then what this cluster started (Ray, Redis)."""
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                if self._started_ray:
                    ray.shutdown()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def wait_for_signal(self) -> None:
        """Block until Ctrl-C or SIGTERM."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
