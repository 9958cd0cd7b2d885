"""The serving application: the DAG wired with ``.bind()``, and its typed builder.

``serve run deployments.app:app`` serves the default configuration;
``serve run deployments.app:build_app registry=DIR redis_url=URL config=FILE``
takes arguments (validated by :class:`AppArgs`), and ``serve build
deployments.app:app`` writes the config KubeRay's RayService embeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.config import INGRESS, DeploymentSpec, ServingConfig, load_serving_config
from deployments.router import Router
from deployments.stages import STAGE_DEPLOYMENTS
from models.config import load_config
from models.stages import DEPLOYED_STAGES, STAGES

APP_NAME = "inspectray"


class AppArgs(BaseModel):
    """Arguments of :func:`build_app`; every one has a default from the configuration."""

    model_config = ConfigDict(extra="forbid")

    registry: str | None = Field(
        default=None, description="Registry folder or URL (default: INSPECTRAY_REGISTRY / config)."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for cache, stream, catalog and keys (default: REDIS_URL / config); "
        "an empty string serves without Redis.",
    )
    config: str | None = Field(default=None, description="Serving YAML (default: packaged).")
    device: str = Field(default="auto", description="auto, cpu or cuda.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys merged over the serving YAML."
    )


def _absolute(uri: str) -> str:
    """Local registry folders as absolute paths: replicas run in other folders."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def deployment_options(spec: DeploymentSpec, user_config: dict[str, Any]) -> dict[str, Any]:
    """Serve's options for one deployment from its spec."""
    autoscaling = spec.autoscaling.model_dump(exclude_none=True)
    return {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "user_config": user_config,
        "logging_config": {"enable_access_log": spec.access_log},
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_wait_loop_s": 1,
        "graceful_shutdown_timeout_s": 20,
    }


# Each deployment's key in the serving YAML and its name in Serve: the ingress, then
# every stage that declares a deployment of its own (models.stages.STAGES), which
# the split topology runs.
DEPLOYMENT_NAMES = {INGRESS: "Router"} | {name: STAGES[name].deployment for name in DEPLOYED_STAGES}


def user_config(serving: ServingConfig, key: str) -> dict[str, Any]:
    """The ``user_config`` of deployment ``key`` (``router``, ``detector``, ...)."""
    if key == INGRESS:
        return router_user_config(serving)
    return serving.deployments[key].user_config()


def router_user_config(serving: ServingConfig) -> dict[str, Any]:
    """The router's ``user_config``: the service settings, the spool as an absolute path.

    With them, from the router's deployment spec: torch's threads and, for the
    stages a fused router computes itself, their batch size and a fault drill's
    injected delay.
    """
    service = serving.service.model_dump()
    service["spool_dir"] = str(Path(service["spool_dir"]).expanduser().resolve())
    spec = serving.deployments[INGRESS]
    own = {"torch_threads": spec.torch_threads, "max_batch_size": spec.batch.max_batch_size}
    if spec.fault_delay_s:  # a fault drill's injected slowness; absent in production
        own["fault_delay_s"] = spec.fault_delay_s
    return service | own


def serve_config(
    args: AppArgs, user_configs: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The app as a Serve config (what ``serve deploy`` and KubeRay's RayService apply).

    Args:
        args: the builder's arguments; changing them rebuilds and restarts the app.
        user_configs: new ``user_config`` per deployment class name (``Router``,
            ``AnomalyDetector``, ...); Serve applies them in place
            (``reconfigure``), without restarting a replica.
    """
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "deployments.app:build_app",
        "args": args.model_dump(exclude_none=True),
    }
    if user_configs:
        application["deployments"] = [
            {"name": name, "user_config": config} for name, config in user_configs.items()
        ]
    return {"applications": [application]}


def build_app(args: AppArgs) -> Application:
    """The router and, in the split topology, one deployment per model stage.

    ``fused``: the router alone, every stage in each of its replicas; ``split``:
    the router and the stage deployments it calls. Each takes its options from
    the serving YAML.

    Raises:
        ConfigError: an invalid serving or inspectray configuration.
    """
    if isinstance(args, dict):  # serve passes plain dicts when called by hand
        args = AppArgs.model_validate(args)
    base = load_config()
    serving: ServingConfig = load_serving_config(args.config, args.overrides)
    registry = _absolute(args.registry or base.registry.uri)
    redis_url = base.redis.url if args.redis_url is None else args.redis_url
    stages = {
        name: STAGE_DEPLOYMENTS[name]
        .options(
            **deployment_options(
                serving.deployments[name],
                serving.deployments[name].user_config(),
            )
        )
        .bind(registry, args.device, dict(serving.runtimes))
        for name in serving.deployed()
        if name != INGRESS
    }
    # Fused, the router computes every stage: on the GPU it was given, if any. Split,
    # it computes only the category router, on its CPU.
    fused = serving.topology == "fused"
    router_device = args.device if fused or args.device != "auto" else "cpu"
    return Router.options(
        **deployment_options(serving.deployments[INGRESS], router_user_config(serving))
    ).bind(stages, registry, redis_url or None, router_device, dict(serving.runtimes))


app = build_app(AppArgs())
