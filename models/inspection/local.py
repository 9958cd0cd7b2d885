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
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine, Hashable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from PIL import Image

from models.artifacts import ArtifactError, ArtifactRegistry
from models.descriptions import DefectDescription
from models.inspection import compute
from models.inspection.answers import (
    Banked,
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
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    VERIFIER,
    LoadedStage,
    load_stage,
)

Compute = Callable[[list[Any]], Sequence[Any]]
T = TypeVar("T")


def run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` from synchronous code and return its result.

    Where this thread already runs an event loop (a notebook, a test driving a
    browser), the coroutine gets a loop of its own on another thread, since
    ``asyncio.run`` refuses to start inside a running loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspect") as pool:
        return pool.submit(asyncio.run, coroutine).result()


class Batcher:
    """Gathers concurrent calls into batches, one per key, computed one batch at a time.

    A call queues its item and waits. The first item of a key schedules that
    key's flush for the loop's next turn, by when every inspection that was
    ready to run has queued its own. Without an ``executor`` the flush computes
    in the loop's thread (evaluation and the baseline have nothing else to do
    meanwhile). With one, it computes there and the loop stays free: a batch
    takes its key's items when the executor gets to it, so items that arrive
    while other batches compute join it; batches grow with the load and cost no
    timer at low load (one image, no wait).

    Args:
        max_batch_size: the most items one compute call gets.
        executor: where batches compute (None: in the loop's thread).
    """

    def __init__(self, max_batch_size: int = 32, executor: Executor | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.executor = executor
        self._pending: dict[Hashable, tuple[Compute, list[tuple[Any, asyncio.Future]]]] = {}
        self._lock = threading.Lock()  # the executor's thread takes what the loop queues
        self._flushing: set[Hashable] = set()
        self.batch_sizes: list[int] = []  # of every compute call, for tests and figures

    async def submit(self, key: Hashable, run: Compute, item: Any) -> Any:
        """``run([item, ...])[i]`` for this item, computed with the key's other items."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if key not in self._pending:
                self._pending[key] = (run, [])
            self._pending[key][1].append((item, future))
        if key not in self._flushing:
            self._flushing.add(key)
            if self.executor is None:
                loop.call_soon(self._flush_inline, key)
            else:
                loop.call_soon(lambda: loop.create_task(self._flush_off_loop(key)))
        return await future

    def _chunks(self, key: Hashable) -> list[tuple[Compute, list[tuple[Any, asyncio.Future]]]]:
        with self._lock:
            run, queued = self._pending.pop(key, (None, []))
        size = self.max_batch_size
        return [(run, queued[start : start + size]) for start in range(0, len(queued), size)]

    def _flush_inline(self, key: Hashable) -> None:
        self._flushing.discard(key)
        for chunk, results in self._take_and_compute(key):
            self._settle(chunk, results)

    async def _flush_off_loop(self, key: Hashable) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._has_pending(key):
                computed = await loop.run_in_executor(self.executor, self._take_and_compute, key)
                for chunk, results in computed:
                    self._settle(chunk, results)
        finally:
            self._flushing.discard(key)

    def _has_pending(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._pending

    def _take_and_compute(self, key: Hashable) -> list[tuple[list[tuple[Any, Any]], Any]]:
        """The key's items queued by now, computed in batches (where the batches compute).

        Each batch's answers, or the exception its computation raised.
        """
        computed = []
        for run, chunk in self._chunks(key):
            try:
                results: Any = run([item for item, _ in chunk])
            except Exception as error:  # handed to every waiting call
                results = error
            computed.append((chunk, results))
        return computed

    def _settle(self, chunk: list[tuple[Any, asyncio.Future]], results: Any) -> None:
        """Give every waiting call its answer, or the batch's failure."""
        self.batch_sizes.append(len(chunk))
        if not isinstance(results, Exception) and len(results) != len(chunk):
            results = RuntimeError(f"{len(chunk)} items gave {len(results)} answers")
        for i, (_, future) in enumerate(chunk):
            if future.done():
                continue
            if isinstance(results, Exception):
                future.set_exception(results)
            else:
                future.set_result(results[i])


class LocalStageCalls(StageCalls):
    """Stage calls computed in this process, from models loaded on first use.

    Args:
        registry: where the models come from.
        device: where they run.
        max_batch_size: the most images one model call gets.
        executor: where batches compute and models load (None: the loop's thread).
        max_models: models kept loaded; the least recently used beyond it are dropped.
        runtimes: stage → ``torch`` or ``onnxruntime`` (default torch).
    """

    def __init__(
        self,
        registry: ArtifactRegistry,
        device: str = "cpu",
        max_batch_size: int = 32,
        executor: Executor | None = None,
        max_models: int = 64,
        runtimes: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.runtimes = dict(runtimes or {})
        self.device = device
        self.batcher = Batcher(max_batch_size, executor)
        self.max_models = max_models
        self.fault_delay_s = 0.0  # a fault drill's injected slowness before each call
        self._models: OrderedDict[tuple[str, str], LoadedStage] = OrderedDict()
        self.texts = compute.TypeTexts()

    def model(self, stage: str, model_id: str) -> LoadedStage:
        """Load (once) the stage model a multiplexed id names."""
        key = (stage, model_id)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        category, version = split_model_id(model_id)
        runtime = self.runtimes.get(stage, "torch")
        loaded = load_stage(self.registry, category, stage, version, self.device, runtime)
        if stage == RERANKER:
            # Its trained descriptions' embeddings now, not in a line's first defect's answer.
            self.texts.get(model_id, loaded, ())
        self._models[key] = loaded
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return loaded

    def loaded(self) -> list[str]:
        """The models held, as ``stage:category@version``."""
        held = list(self._models)  # one step: the compute thread may reorder them meanwhile
        return sorted(f"{stage}:{model_id}" for stage, model_id in held)

    async def _call(self, stage: str, model_id: str, run: Callable, item: Any, *key: Any) -> Any:
        if self.fault_delay_s:
            await asyncio.sleep(self.fault_delay_s)
        # The model loads where the batch computes: off the loop when there is an executor.
        return await self.batcher.submit(
            (stage, model_id, *key), lambda items: run(self.model(stage, model_id), items), item
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

    async def score_patches(self, model_id: str, image: Image.Image, with_map: bool) -> Banked:
        """See :class:`~models.inspection.flow.StageCalls`."""

        def run(model: LoadedStage, items: list[tuple[Image.Image, bool]]) -> list[Banked]:
            return compute.score_patches(model, [i for i, _ in items], [m for _, m in items])

        return await self._call(MEMORY_BANK, model_id, run, (image, with_map))

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
            return compute.rerank(model, model_id, images, scores, described, self.texts)

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
        runtimes: stage → ``torch`` or ``onnxruntime`` (the serving YAML's ``runtimes``).
    """

    def __init__(
        self,
        registry: ArtifactRegistry,
        pins: Pins | None = None,
        rules: RuleOverrides | None = None,
        coverage: Coverage = Coverage.SERVED,
        device: str = "cpu",
        max_batch_size: int = 32,
        runtimes: Mapping[str, str] | None = None,
    ) -> None:
        self.plan: InspectionPlan = load_plan(registry, pins, rules)
        self.calls = LocalStageCalls(registry, device, max_batch_size, runtimes=runtimes)
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
        return run_to_completion(self.inspect_all(requests))
