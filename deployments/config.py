"""The serving configuration: one YAML file, validated, merged over the packaged defaults.

``deployments/serving.yaml`` holds the defaults and documents every key; a file
of your own (``inspectray serve --config FILE``) needs only the keys it changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.config import ConfigError, format_errors, merge, read_yaml
from models.stages import DEPLOYED_STAGES, DETECTOR, EXPORTABLE_STAGES, RUNTIMES

DEFAULTS = Path(__file__).with_name("serving.yaml")
INGRESS = "router"  # the ingress deployment's key; the others are the stages'
DEPLOYMENTS = (INGRESS, *DEPLOYED_STAGES)
TOPOLOGIES = ("fused", "split")
# Serve's gRPC proxy serves the Inspection service of deployments/protos/inspection.proto;
# Serve imports this function by name.
GRPC_SERVICER = "deployments.protos.inspection_pb2_grpc.add_InspectionServicer_to_server"
GRPC_PORT = 9000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Section):
    """Serve's ``autoscaling_config`` for one deployment."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4, gt=0)
    upscale_delay_s: float = Field(default=5, ge=0)
    downscale_delay_s: float = Field(default=60, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class Batching(_Section):
    """``@serve.batch`` settings of a model stage (changed live by ``reconfigure``)."""

    max_batch_size: int = Field(default=8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, le=1)


class DeploymentSpec(_Section):
    """How one deployment scales, queues and computes."""

    autoscaling: Autoscaling = Autoscaling()
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    batch: Batching = Batching()
    access_log: bool = True
    fault_delay_s: float = Field(default=0, ge=0, le=600)

    def user_config(self) -> dict[str, Any]:
        """What a model stage's ``reconfigure`` receives."""
        config = {"torch_threads": self.torch_threads, **self.batch.model_dump()}
        if self.fault_delay_s:  # a fault drill's injected slowness; absent in production
            config["fault_delay_s"] = self.fault_delay_s
        return config


class DriftSpec(_Section):
    """When a category's recent scores are said to drift from validation's (:mod:`models.drift`)."""

    window: int = Field(default=400, ge=1)
    min_parts: int = Field(default=50, ge=1)
    min_reference: int = Field(default=20, ge=1)
    max_ks: float = Field(default=0.35, gt=0, le=1)
    max_share_rise: float = Field(default=0.3, gt=0, le=1)


class ReviewSpec(_Section):
    """Which answers a person is asked to review (the review queue, in Redis)."""

    sample_share: float = Field(default=0.02, ge=0, le=1)
    min_type_confidence: float = Field(default=0.5, ge=0, le=1)
    max_pending: int = Field(default=10_000, ge=1)


class ServiceSpec(_Section):
    """The router's settings (its ``user_config``: changed live by ``reconfigure``)."""

    request_timeout_s: float = Field(default=30, gt=0)
    max_in_flight: int = Field(default=64, ge=1)
    retry_after_s: float = Field(default=1, gt=0)
    cache_ttl_s: int = Field(default=3600, ge=0)
    stream_maxlen: int = Field(default=100_000, ge=1)
    spool_dir: str = "spool"
    auth: Literal["auto", "required", "off"] = "auto"
    refresh_s: float = Field(default=30, gt=0)
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=64)
    versions: dict[str, dict[str, str]] = Field(default_factory=dict)
    rules: dict[str, dict[str, float]] = Field(default_factory=dict)
    torch_threads: int = Field(default=1, ge=1)
    # The fused topology's in-process stages (from the router's deployment spec).
    max_batch_size: int = Field(default=16, ge=1, le=256)
    fault_delay_s: float = Field(default=0, ge=0, le=600)
    drift: DriftSpec = DriftSpec()
    review: ReviewSpec = ReviewSpec()


class ServingConfig(_Section):
    """The topology, every deployment's spec and the router's service settings.

    ``topology``: ``fused`` runs every stage of an inspection in each replica of
    the router (the ingress); ``split`` gives each model stage a deployment of
    its own (its own replicas, CPUs or GPUs) that the router calls.
    ``runtimes``: per exportable stage, ``torch`` or ``onnxruntime`` (a version
    whose export failed its parity check is served in torch all the same).
    """

    topology: Literal[TOPOLOGIES] = "fused"  # type: ignore[valid-type]
    runtimes: dict[Literal[EXPORTABLE_STAGES], Literal[RUNTIMES]] = Field(  # type: ignore[valid-type]
        default_factory=dict
    )
    deployments: dict[Literal[DEPLOYMENTS], DeploymentSpec]  # type: ignore[valid-type]
    service: ServiceSpec = ServiceSpec()

    def front(self) -> str:
        """The deployment whose models every inspection meets: the router, or the detector."""
        return INGRESS if self.topology == "fused" else DETECTOR

    def deployed(self) -> tuple[str, ...]:
        """The keys of the deployments the topology runs, the ingress first."""
        if self.topology == "fused":
            return (INGRESS,)
        return (INGRESS, *DEPLOYED_STAGES)

    @model_validator(mode="after")
    def _complete(self) -> ServingConfig:
        missing = [name for name in DEPLOYMENTS if name not in self.deployments]
        if missing:
            raise ValueError(f"deployments missing: {missing}")
        return self


def load_serving_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServingConfig:
    """The packaged defaults, then ``path``'s keys, then ``overrides``.

    Raises:
        ConfigError: an unreadable file or invalid keys; the message names each one.
    """
    data = yaml.safe_load(DEFAULTS.read_text())
    origin = str(DEFAULTS)
    if path is not None:
        origin = str(path)
        data = merge(data, read_yaml(path, "serving configuration"))
    if overrides:
        data = merge(data, overrides)
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error, f"serving, {origin}")) from error
