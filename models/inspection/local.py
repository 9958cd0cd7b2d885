"""The flow in this process: stage calls that batch, and an inspector over a registry.

:class:`LocalStageCalls` computes each stage with the same functions the Serve
replicas run (:mod:`models.inspection.compute`). Calls made while other
inspections are in flight are gathered into one batch per model by a
:class:`Batcher`, so ``asyncio.gather`` over a list of images runs every stage
batched, as ``@serve.batch`` does in a replica. :class:`LocalInspector` adds
the plan (the same :func:`~models.inspection.plan.load_plan` serving uses) and
descriptions registered at run time; evaluation and the naive baseline use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any

from PIL import Image

from models.artifacts import ArtifactError, ArtifactRegistry
from models.descriptions import DefectDescription
from models.inspection import compute
from models.inspection.answers import (
    Classified,
    Detected,
    Inspection,
    Located,
    Reranked,
    Routed,
    Verified,
)
from models.inspection.flow import (
    Coverage,
    InspectionRequest,
    StageCalls,
    inspect,
)
from models.inspection.plan import InspectionPlan, Pins, RuleOverrides, load_plan, split_model_id
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    RERANKER,
    ROUTER,
    VERIFIER,
    LoadedStage,
    load_stage,
)

Compute = Callable[[list[Any]], Sequence[Any]]


class Batcher:
    """Gathers the calls made in one turn of the event loop into batches, one per key.

    A call queues its item and waits; the first item of a key schedules that
    key's flush for the loop's next turn, by when every inspection that was
    ready to run has queued its own. The flush computes in the loop's thread
    (evaluation and the baseline have nothing else to do meanwhile).

    Args:
        max_batch_size: the most items one compute call gets.
    """

    def __init__(self, max_batch_size: int = 32) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self._pending: dict[Hashable, tuple[Compute, list[tuple[Any, asyncio.Future]]]] = {}
        self.batch_sizes: list[int] = []  # of every compute call, for tests and figures

    async def submit(self, key: Hashable, run: Compute, item: Any) -> Any:
        """``run([item, ...])[i]`` for this item, computed with the key's other items."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if key not in self._pending:
            self._pending[key] = (run, [])
            loop.call_soon(self._flush, key)
        self._pending[key][1].append((item, future))
        return await future

    def _flush(self, key: Hashable) -> None:
        run, queued = self._pending.pop(key)
        for start in range(0, len(queued), self.max_batch_size):
            chunk = queued[start : start + self.max_batch_size]
            self.batch_sizes.append(len(chunk))
            try:
                results = run([item for item, _ in chunk])
                if len(results) != len(chunk):
                    raise RuntimeError(f"{len(chunk)} items gave {len(results)} answers")
            except Exception as error:  # every waiting call gets the failure
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(chunk, results, strict=True):
                if not future.done():
                    future.set_result(result)


class LocalStageCalls(StageCalls):
    """Stage calls computed in this process, from models loaded on first use.

    Args:
        registry: where the models come from.
        device: where they run.
        max_batch_size: the most images one model call gets.
    """

    def __init__(
        self, registry: ArtifactRegistry, device: str = "cpu", max_batch_size: int = 32
    ) -> None:
        self.registry = registry
        self.device = device
        self.batcher = Batcher(max_batch_size)
        self._models: dict[tuple[str, str], LoadedStage] = {}
        self._texts = compute.TypeTexts()

    def model(self, stage: str, model_id: str) -> LoadedStage:
        """Load (once) the stage model a multiplexed id names."""
        if (stage, model_id) not in self._models:
            category, version = split_model_id(model_id)
            self._models[stage, model_id] = load_stage(
                self.registry, category, stage, version, self.device
            )
        return self._models[stage, model_id]

    async def _call(self, stage: str, model_id: str, run: Callable, item: Any, *key: Any) -> Any:
        loaded = self.model(stage, model_id)
        return await self.batcher.submit(
            (stage, model_id, *key), lambda items: run(loaded, items), item
        )

    async def route(self, model_id: str, image: Image.Image, allowed: Collection[str]) -> Routed:
        """See :class:`~models.inspection.flow.StageCalls`."""
        names = tuple(sorted(allowed))
        return await self._call(
            ROUTER, model_id, lambda m, images: compute.route(m, images, names), image, names
        )

    async def detect(self, model_id: str, image: Image.Image, explain: bool) -> Detected:
        """See :class:`~models.inspection.flow.StageCalls`."""

        def run(model: LoadedStage, items: list[tuple[Image.Image, bool]]) -> list[Detected]:
            return compute.detect(model, [i for i, _ in items], [e for _, e in items])

        return await self._call(DETECTOR, model_id, run, (image, explain))

    async def verify(self, model_id: str, image: Image.Image) -> Verified:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._call(VERIFIER, model_id, compute.verify, image)

    async def classify(self, model_id: str, image: Image.Image) -> Classified:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._call(CLASSIFIER, model_id, compute.classify, image)

    async def localize(self, model_id: str, image: Image.Image) -> Located:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._call(LOCALIZER, model_id, compute.localize, image)

    async def rerank(
        self,
        model_id: str,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> Reranked:
        """See :class:`~models.inspection.flow.StageCalls`."""

        def run(model: LoadedStage, items: list[tuple[Any, Any, Any]]) -> list[Reranked]:
            images, scores, described = zip(*items, strict=True)
            return compute.rerank(model, model_id, images, scores, described, self._texts)

        return await self._call(RERANKER, model_id, run, (image, classifier_scores, registered))


class LocalInspector:
    """The inspection flow over a registry, in this process.

    Args:
        registry: the models.
        pins: category → stage → version instead of production (the serving
            YAML's ``service.versions``).
        rules: category → decision-rule overrides (``service.rules``).
        coverage: how much runs beyond what the answer needs.
        device: where the models run.
        max_batch_size: the most images one model call gets.
    """

    def __init__(
        self,
        registry: ArtifactRegistry,
        pins: Pins | None = None,
        rules: RuleOverrides | None = None,
        coverage: Coverage = Coverage.SERVED,
        device: str = "cpu",
        max_batch_size: int = 32,
    ) -> None:
        self.plan: InspectionPlan = load_plan(registry, pins, rules)
        self.calls = LocalStageCalls(registry, device, max_batch_size)
        self.coverage = coverage
        self._registered: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def categories(self) -> list[str]:
        """The categories it inspects."""
        return sorted(self.plan.categories)

    def load_all(self) -> None:
        """Load every model of the plan now rather than on first use."""
        for stage, model_id in self.plan.model_ids():
            self.calls.model(stage, model_id)

    def register_description(self, category: str, description: DefectDescription) -> None:
        """Add (or replace) a described defect type; the reranker ranks it from now on.

        Raises:
            ArtifactError: an unknown category, or one without a reranker.
        """
        if category not in self.plan.categories:
            raise ArtifactError(f"unknown category {category!r}; known: {self.categories}")
        if not self.plan.categories[category].has(RERANKER):
            raise ArtifactError(
                f"category {category!r} has no reranker: train one to rank described types"
            )
        self._registered.setdefault(category, {})[description.name] = description.to_dict()

    def registered_types(self, category: str) -> list[str]:
        """The names registered for a category at run time."""
        return sorted(self._registered.get(category, {}))

    async def registered(self, category: str) -> list[dict[str, Any]]:
        """A category's registered descriptions, as the flow reads them."""
        return sorted(self._registered.get(category, {}).values(), key=lambda d: d["name"])

    async def inspect(self, request: InspectionRequest) -> Inspection:
        """Inspect one image (batched with the inspections in flight beside it)."""
        return await inspect(request, self.plan, self.calls, self.registered, self.coverage)

    async def inspect_all(self, requests: Sequence[InspectionRequest]) -> list[Inspection]:
        """Inspect several images together: every stage runs batched."""
        return list(await asyncio.gather(*(self.inspect(r) for r in requests)))

    def inspect_images(
        self,
        images: Sequence[Image.Image],
        categories: Sequence[str | None] | None = None,
        **options: bool,
    ) -> list[Inspection]:
        """Inspect images from synchronous code; ``options``: ``explain``, ``boxes``."""
        categories = list(categories) if categories is not None else [None] * len(images)
        if len(categories) != len(images):
            raise ValueError(f"{len(images)} images but {len(categories)} categories")
        requests = [
            InspectionRequest(image, category, **options)
            for image, category in zip(images, categories, strict=True)
        ]
        return asyncio.run(self.inspect_all(requests))
