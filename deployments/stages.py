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

import abc
import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from ray import serve

from models.artifacts import ArtifactRegistry
from models.inspection import compute
from models.inspection.answers import Reranked
from models.inspection.plan import model_id as make_model_id
from models.inspection.plan import split_model_id
from models.stages import (
    CLASSIFIER,
    DEPLOYED_STAGES,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    STAGES,
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


class ModelStage(abc.ABC):
    """What every model-stage replica does: load, multiplex, reconfigure, report health.

    A subclass names its ``stage`` and its ``@serve.batch`` method
    (:meth:`batched_method`), and is registered with :func:`stage_deployment`.
    """

    stage: ClassVar[str]

    def __init__(
        self, registry_uri: str, device: str = "auto", runtimes: Mapping[str, str] | None = None
    ) -> None:
        self.registry = ArtifactRegistry(registry_uri)
        self.device = resolve_device(device)
        self.runtime = dict(runtimes or {}).get(self.stage, "torch")
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
                model_id = make_model_id(category, version)
                self._warm[model_id] = load_stage(
                    self.registry, category, self.stage, version, self.device, self.runtime
                )
            except Exception as error:  # any failure makes the replica unhealthy
                self._failed[model_id] = f"{type(error).__name__}: {error}"
                log.error("%s: could not load %s: %s", self.stage, model_id, error)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply the deployment's ``user_config`` (batching, threads) without a restart."""
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        self.fault_delay_s = float(config.get("fault_delay_s", 0))
        batched = self.batched_method()
        if "max_batch_size" in config:
            batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    @abc.abstractmethod
    def batched_method(self) -> Any:
        """The ``@serve.batch`` method whose batching ``reconfigure`` sets."""

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
        category, version = split_model_id(model_id)
        return await asyncio.to_thread(
            load_stage, self.registry, category, self.stage, version, self.device, self.runtime
        )

    async def _model(self) -> LoadedStage:
        """The request's model, after the injected delay of a fault drill (if any)."""
        if self.fault_delay_s:
            await asyncio.sleep(self.fault_delay_s)
        return await self.get_model(serve.get_multiplexed_model_id())


STAGE_DEPLOYMENTS: dict[str, Any] = {}
"""Each served stage's Serve deployment, by stage name (see :data:`models.stages.STAGES`)."""


def stage_deployment(cls: type[ModelStage]) -> type[ModelStage]:
    """Make ``cls`` the Serve deployment of its stage, named as the stage declares."""
    declared = STAGES[cls.stage]
    if declared.deployment is None:
        raise ValueError(f"stage {cls.stage!r} declares no deployment")
    STAGE_DEPLOYMENTS[cls.stage] = serve.deployment(name=declared.deployment)(cls)
    return STAGE_DEPLOYMENTS[cls.stage]


class _ImageStage(ModelStage):
    """A stage answering one image at a time, batched: ``answer(model, images)``.

    A ``flagged`` stage draws a map where its flag asks: ``answer(model, images, flags)``.
    """

    answer: ClassVar[Callable[..., list[Any]]]
    flagged: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

        # One @serve.batch queue per stage class: the decorator keeps its queue
        # per decorated function, so each subclass gets a function of its own.
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def _batch(
            self: _ImageStage, images: list[Image.Image], flags: list[bool]
        ) -> list[Any]:
            stage = await self._model()
            extra = (flags,) if type(self).flagged else ()
            return await asyncio.to_thread(type(self).answer, stage, images, *extra)

        cls._batch = _batch  # type: ignore[attr-defined]

    def batched_method(self) -> Any:
        """See :class:`ModelStage`."""
        return self._batch  # type: ignore[attr-defined]

    async def predict(self, image: Image.Image, flag: bool = False) -> Any:
        """The stage's answer for one image (batched with others)."""
        return await self._batch(image, flag)  # type: ignore[attr-defined]


@stage_deployment
class AnomalyDetector(_ImageStage):
    """p(anomalous) per image, batched; Grad-CAM heatmaps where the flag asks."""

    stage = DETECTOR
    answer = compute.detect
    flagged = True


@stage_deployment
class MemoryBank(_ImageStage):
    """The memory bank's calibrated score per image, batched; its anomaly map where asked."""

    stage = MEMORY_BANK
    answer = compute.score_patches
    flagged = True


@stage_deployment
class AutoencoderVerifier(_ImageStage):
    """The calibrated reconstruction score and error map, for images in the band."""

    stage = VERIFIER
    answer = compute.verify


@stage_deployment
class DefectClassifier(_ImageStage):
    """Ranked defect types from the SupCon embedding's prototypes."""

    stage = CLASSIFIER
    answer = compute.classify


@stage_deployment
class DefectLocalizer(_ImageStage):
    """DEIMv2 boxes of the defects, in the image's pixels."""

    stage = LOCALIZER
    answer = compute.localize


@stage_deployment
class Reranker(ModelStage):
    """The classifier's types reordered with CLIP image-description similarity."""

    stage = RERANKER

    def __init__(
        self, registry_uri: str, device: str = "auto", runtimes: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(registry_uri, device, runtimes)
        self.texts = compute.TypeTexts()
        for model_id, stage in self._warm.items():
            # The trained descriptions' embeddings now, not in the first defect's answer.
            try:
                self.texts.get(model_id, stage, ())
            except Exception as error:  # as a model that cannot load: the replica is unhealthy
                self._failed[model_id] = f"{type(error).__name__}: {error}"
                log.error("%s: could not embed %s's descriptions: %s", self.stage, model_id, error)

    def batched_method(self) -> Any:
        """See :class:`ModelStage`."""
        return self._batch

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(
        self,
        images: list[Image.Image],
        classifier_scores: list[Mapping[str, float] | None],
        registered: list[Sequence[Mapping[str, Any]]],
    ) -> list[Reranked]:
        model_id = serve.get_multiplexed_model_id()
        stage = await self._model()
        return await asyncio.to_thread(
            compute.rerank, stage, model_id, images, classifier_scores, registered, self.texts
        )

    async def predict(
        self,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> Reranked:
        """See :func:`models.inspection.compute.rerank`."""
        return await self._batch(image, classifier_scores, registered)


missing = sorted(set(DEPLOYED_STAGES) - set(STAGE_DEPLOYMENTS))
if missing:  # every stage that declares a deployment has one
    raise ImportError(f"stages without a Serve deployment: {missing}")
