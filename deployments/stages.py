"""The model stages as Ray Serve deployments: one deployment per stage, every category.

Each replica serves any category's model through Serve model multiplexing: the
multiplexed model id is ``category@version``, so requests go to replicas that
already hold that model, and a new product line is a new artifact in the
registry, not a new deployment. Requests are batched per model
(``@serve.batch`` splits batches by model id). At start a replica loads the
production model of every category its stage has; ``check_health`` fails while
any of them could not be loaded, so Serve replaces the replica.

``reconfigure`` (the deployment's ``user_config``) sets the batch size, the
batch wait and torch's threads without a restart, and ``fault_delay_s``: a
fault drill's injected slowness before each batch (never set in production).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from ray import serve

from deployments import compute
from models.artifacts import ArtifactRegistry
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    RERANKER,
    VERIFIER,
    LoadedStage,
    load_stage,
)

log = logging.getLogger("ray.serve")
# Models one replica keeps loaded (least recently used ones are dropped).
MAX_MODELS_PER_REPLICA = 16


def resolve_device(device: str) -> str:
    """``auto``: the GPU when the replica was given one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _ModelStage:
    """What every model-stage replica does: load, multiplex, reconfigure, report health."""

    stage: ClassVar[str]

    def __init__(self, registry_uri: str, device: str = "auto") -> None:
        self.registry = ArtifactRegistry(registry_uri)
        self.device = resolve_device(device)
        self._warm: dict[str, LoadedStage] = {}
        self._failed: dict[str, str] = {}
        self._served: set[str] = set()
        self.fault_delay_s = 0.0
        for category in self.registry.categories():
            if self.stage not in self.registry.stages(category):
                continue
            model_id = category
            try:
                version = self.registry.manifest(category, self.stage).version
                model_id = f"{category}@{version}"
                self._warm[model_id] = load_stage(
                    self.registry, category, self.stage, version, self.device
                )
            except Exception as error:  # any failure makes the replica unhealthy
                self._failed[model_id] = f"{type(error).__name__}: {error}"
                log.error("%s: could not load %s: %s", self.stage, model_id, error)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply the deployment's ``user_config`` (batching, threads) without a restart."""
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        self.fault_delay_s = float(config.get("fault_delay_s", 0))
        batched = self._batched_method()
        if "max_batch_size" in config:
            batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def _batched_method(self) -> Any:
        raise NotImplementedError

    def check_health(self) -> None:
        """Fail while a production model of this stage could not be loaded."""
        if self._failed:
            raise RuntimeError(f"{self.stage}: models not loaded: {self._failed}")

    async def loaded(self) -> dict[str, Any]:
        """The models this replica holds, for readiness checks."""
        return {
            "stage": self.stage,
            "device": self.device,
            "models": sorted(set(self._warm) | self._served),
            "failed": dict(self._failed),
        }

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedStage:
        """The model a multiplexed id (``category@version``) names."""
        self._served.add(model_id)
        if model_id in self._warm:
            return self._warm.pop(model_id)
        category, _, version = model_id.rpartition("@")
        return await asyncio.to_thread(
            load_stage, self.registry, category, self.stage, version, self.device
        )

    async def _model(self) -> LoadedStage:
        """The request's model, after the injected delay of a fault drill (if any)."""
        if self.fault_delay_s:
            await asyncio.sleep(self.fault_delay_s)
        return await self.get_model(serve.get_multiplexed_model_id())


@serve.deployment
class AnomalyDetector(_ModelStage):
    """p(anomalous) per image, batched; Grad-CAM heatmaps on request."""

    stage = DETECTOR

    def _batched_method(self) -> Any:
        return self._batch

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, images: list[Image.Image], explain: list[bool]) -> list[dict[str, Any]]:
        stage = await self._model()
        return await asyncio.to_thread(compute.detect, stage, images, explain)

    async def predict(self, image: Image.Image, explain: bool = False) -> dict[str, Any]:
        """See :func:`deployments.compute.detect`."""
        return await self._batch(image, explain)


@serve.deployment
class AutoencoderVerifier(_ModelStage):
    """The calibrated reconstruction score, for images in the ambiguous band."""

    stage = VERIFIER

    def _batched_method(self) -> Any:
        return self._batch

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        stage = await self._model()
        return await asyncio.to_thread(compute.verify, stage, images)

    async def predict(self, image: Image.Image) -> dict[str, Any]:
        """See :func:`deployments.compute.verify`."""
        return await self._batch(image)


@serve.deployment
class DefectClassifier(_ModelStage):
    """Ranked defect types from the SupCon embedding's prototypes."""

    stage = CLASSIFIER

    def _batched_method(self) -> Any:
        return self._batch

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        stage = await self._model()
        return await asyncio.to_thread(compute.classify, stage, images)

    async def predict(self, image: Image.Image) -> dict[str, Any]:
        """See :func:`deployments.compute.classify`."""
        return await self._batch(image)


@serve.deployment
class DefectLocalizer(_ModelStage):
    """DEIMv2 boxes of the defects, in the image's pixels."""

    stage = LOCALIZER

    def _batched_method(self) -> Any:
        return self._batch

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _batch(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        stage = await self._model()
        return await asyncio.to_thread(compute.localize, stage, images)

    async def predict(self, image: Image.Image) -> dict[str, Any]:
        """See :func:`deployments.compute.localize`."""
        return await self._batch(image)


@serve.deployment
class Reranker(_ModelStage):
    """The classifier's types reordered with CLIP image-description similarity."""

    stage = RERANKER

    def __init__(self, registry_uri: str, device: str = "auto") -> None:
        super().__init__(registry_uri, device)
        self._texts = compute.TypeTexts()

    def _batched_method(self) -> Any:
        return self._batch

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(
        self,
        images: list[Image.Image],
        classifier_scores: list[Mapping[str, float] | None],
        registered: list[Sequence[Mapping[str, Any]]],
    ) -> list[dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()
        stage = await self._model()
        return await asyncio.to_thread(
            compute.rerank, stage, model_id, images, classifier_scores, registered, self._texts
        )

    async def predict(
        self,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """See :func:`deployments.compute.rerank`."""
        return await self._batch(image, classifier_scores, registered)


STAGE_DEPLOYMENTS = {
    DETECTOR: AnomalyDetector,
    VERIFIER: AutoencoderVerifier,
    CLASSIFIER: DefectClassifier,
    LOCALIZER: DefectLocalizer,
    RERANKER: Reranker,
}
