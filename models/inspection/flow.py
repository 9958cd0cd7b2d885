"""The inspection flow: the stage order and the decision rule, written once.

    category given, or named by the category router
    → AnomalyDetector probability ∥ MemoryBank score (those the category's rule uses)
    → the first-line score p: either one, or the two fused
    → AutoencoderVerifier, only when p falls in the category's ambiguous band
    → verdict and final anomaly score (:class:`~models.decision.DecisionRule`)
    → for a part judged defective: DefectClassifier ∥ DefectLocalizer (boxes asked for)
    → Reranker: the classifier's types fused with CLIP image-description similarity
    → a graded category's grade (:mod:`models.grading`): from the final score, or the classifier

Plain async Python with no Ray in it. How a stage is reached is a
:class:`StageCalls`: Serve's router calls the stage deployments through their
``DeploymentHandle``s; evaluation and the baseline call the models in this
process (:class:`~models.inspection.local.LocalStageCalls`), batched across
concurrent inspections. So what ``inspectray eval`` measures is what the
service answers.

A :class:`Coverage` says how much runs beyond what the answer needs: the
service runs only that; evaluation also types the parts judged ok (to grade
every ELPV cell and to score the typing of missed defects); the baseline runs
every stage for every image. The served fields of the answer do not change
with the coverage.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from PIL import Image

from models.inspection.answers import (
    DEFECTIVE,
    OK,
    Banked,
    Classified,
    Detected,
    Inspection,
    Located,
    Reranked,
    Routed,
    StageRun,
    Verified,
    in_trace_order,
    ranking,
)
from models.inspection.plan import CategoryModels, InspectionPlan
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    VERIFIER,
)

# A category's descriptions registered at run time (Redis in serving, memory elsewhere).
Registered = Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]]


class InspectionRefused(ValueError):
    """A request the models cannot answer as asked (HTTP 422): says why."""


class Coverage(StrEnum):
    """How much of the flow runs for an image."""

    SERVED = "served"  # what the answer needs: the service
    TYPE_ALL = "type-all"  # also type parts judged ok: evaluation
    EVERY_STAGE = "every-stage"  # every stage for every image: the naive baseline


class StageCalls(abc.ABC):
    """How the flow reaches each stage: one image per call, a typed answer back.

    Implementations batch concurrent calls as they can (``@serve.batch`` in a
    replica, an asyncio batcher in this process).
    """

    @abc.abstractmethod
    async def route(self, model_id: str, image: Image.Image, allowed: Collection[str]) -> Routed:
        """The category among ``allowed`` (the categories with models)."""

    @abc.abstractmethod
    async def detect(self, model_id: str, image: Image.Image, explain: bool) -> Detected:
        """p(anomalous), with the Grad-CAM heatmap when ``explain``."""

    @abc.abstractmethod
    async def score_patches(self, model_id: str, image: Image.Image, with_map: bool) -> Banked:
        """The memory bank's calibrated score, with its anomaly map when ``with_map``."""

    @abc.abstractmethod
    async def verify(self, model_id: str, image: Image.Image) -> Verified:
        """The verifier's calibrated score."""

    @abc.abstractmethod
    async def classify(self, model_id: str, image: Image.Image) -> Classified:
        """The ranked defect types."""

    @abc.abstractmethod
    async def localize(self, model_id: str, image: Image.Image) -> Located:
        """The defects' boxes in the image's pixels."""

    @abc.abstractmethod
    async def rerank(
        self,
        model_id: str,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> Reranked:
        """The types reordered with CLIP; registered types ranked too."""


@dataclass(frozen=True)
class InspectionRequest:
    """One image to inspect and what to add to the answer.

    Attributes:
        image: the decoded image.
        category: its product category, or None to let the router name it.
        explain: add the heatmap: the memory bank's anomaly map where the
            category has one, else the detector's Grad-CAM.
        boxes: locate the defects of a part judged defective.
    """

    image: Image.Image
    category: str | None = None
    explain: bool = False
    boxes: bool = False


async def inspect(
    request: InspectionRequest,
    plan: InspectionPlan,
    calls: StageCalls,
    registered: Registered | None = None,
    coverage: Coverage = Coverage.SERVED,
) -> Inspection:
    """Inspect one image through the stages.

    Args:
        request: the image and options.
        plan: the models and rules that inspect.
        calls: how to reach the stages.
        registered: a category's run-time registered descriptions (awaited only
            when the reranker runs).
        coverage: how much runs beyond what the answer needs.

    Raises:
        InspectionRefused: an unknown category, no router for an image without
            one, or boxes asked for without a localizer.
    """
    image = request.image
    if request.boxes and plan.localizer_id is None:
        raise InspectionRefused("boxes were asked for, but no defect localizer is trained")
    runs: list[tuple[StageRun, bool]] = []  # (run, served)
    category, routed = request.category, None
    if category is None:
        if plan.router_id is None:
            raise InspectionRefused(
                "the image came without a category and no category router is trained; "
                f"send one of {sorted(plan.categories)}"
            )
        routed, ms = await _timed(calls.route(plan.router_id, image, sorted(plan.categories)))
        category = routed.category
        runs.append((_run(ROUTER, plan.shared[ROUTER], routed, ms, routed.summary()), True))
    if category not in plan.categories:
        raise InspectionRefused(f"unknown category {category!r}; known: {sorted(plan.categories)}")
    models = plan.categories[category]
    rule = models.rule

    scored = await _score(request, models, calls, coverage)
    detected, banked = scored.detected, scored.banked
    first = rule.first_score(
        detected.probability if detected else None, banked.score if banked else None
    )
    in_band = models.has(VERIFIER) and rule.needs_verifier(first)
    for stage, answer, ms, output, served in scored.runs:
        runs.append(
            (_run(stage, models.versions[stage], answer, ms, output | {"in_band": in_band}), served)
        )
    verified = None
    if in_band or (coverage is Coverage.EVERY_STAGE and models.has(VERIFIER)):
        verified, ms = await _timed(calls.verify(models.model_id(VERIFIER), image))
        runs.append(
            (_run(VERIFIER, models.versions[VERIFIER], verified, ms, verified.summary()), in_band)
        )
    decision = rule.decide(first, verified.score if in_band else None)
    defective = decision.defective
    heatmap, heatmap_source = None, None
    if request.explain and banked is not None:
        heatmap, heatmap_source = banked.anomaly_map, MEMORY_BANK
    elif request.explain and detected is not None:
        heatmap, heatmap_source = detected.heatmap, "grad-cam"

    typed = await _type_and_locate(
        request, models, plan, calls, registered, coverage, defective, runs
    )
    served = ranking(typed.classified, typed.reranked) if defective else ()
    grade = None
    if models.grading is not None:
        scores = typed.classified.class_scores if typed.classified is not None else None
        grade = models.grading.grade(decision.anomaly_score, scores)
    return Inspection(
        category=category,
        verdict=DEFECTIVE if defective else OK,
        anomaly_score=float(decision.anomaly_score),
        decided_by=decision.decided_by,
        grade=grade,
        first_score=first,
        detected=detected,
        banked=banked,
        heatmap=heatmap,
        heatmap_source=heatmap_source,
        routed=routed,
        verified=verified,
        classified=typed.classified,
        located=typed.located,
        reranked=typed.reranked,
        defect_types=served,
        descriptions={t.name: typed.described[t.name] for t in served if t.name in typed.described},
        boxes=typed.located.boxes if defective and request.boxes and typed.located else (),
        trace=in_trace_order(run for run, shown in runs if shown),
        also_ran=in_trace_order(run for run, shown in runs if not shown),
        model_versions=plan.versions(category),
    )


class _Scored(NamedTuple):
    detected: Detected | None
    banked: Banked | None
    runs: list[tuple[str, Any, float, dict[str, Any], bool]]  # stage, answer, ms, output, served


async def _score(
    request: InspectionRequest, models: CategoryModels, calls: StageCalls, coverage: Coverage
) -> _Scored:
    """Detector ∥ memory bank: those the rule needs (beyond the service, all there are).

    The memory bank also runs to draw the heatmap asked for; the detector's
    Grad-CAM is computed only for a category without a memory bank.
    """
    rule, image = models.rule, request.image
    widened = coverage is not Coverage.SERVED
    has_bank = models.has(MEMORY_BANK)
    jobs: dict[str, Awaitable[Any]] = {}
    if models.has(DETECTOR) and (rule.uses_detector or widened):
        explain = request.explain and not has_bank
        jobs[DETECTOR] = _timed(calls.detect(models.model_id(DETECTOR), image, explain))
    if has_bank and (rule.uses_bank or request.explain or widened):
        model = models.model_id(MEMORY_BANK)
        jobs[MEMORY_BANK] = _timed(calls.score_patches(model, image, request.explain))
    answers = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    detected: Detected | None = answers[DETECTOR][0] if DETECTOR in answers else None
    banked: Banked | None = answers[MEMORY_BANK][0] if MEMORY_BANK in answers else None
    runs = []
    if detected is not None:
        output = {"probability": detected.probability}
        runs.append((DETECTOR, detected, answers[DETECTOR][1], output, rule.uses_detector))
    if banked is not None:
        served = rule.uses_bank or request.explain
        runs.append((MEMORY_BANK, banked, answers[MEMORY_BANK][1], banked.summary(), served))
    return _Scored(detected, banked, runs)


class _Typing(NamedTuple):
    classified: Classified | None
    located: Located | None
    reranked: Reranked | None
    described: dict[str, str]  # type → description: trained, then registered


async def _type_and_locate(
    request: InspectionRequest,
    models: CategoryModels,
    plan: InspectionPlan,
    calls: StageCalls,
    registered: Registered | None,
    coverage: Coverage,
    defective: bool,
    runs: list[tuple[StageRun, bool]],
) -> _Typing:
    """Classifier ∥ localizer, then the reranker: whatever the coverage asks for."""
    image = request.image
    type_it = defective or coverage is not Coverage.SERVED
    locate = plan.localizer_id is not None and (
        (defective and request.boxes) or coverage is Coverage.EVERY_STAGE
    )
    jobs: dict[str, Awaitable[Any]] = {}
    if type_it and models.has(CLASSIFIER):
        jobs[CLASSIFIER] = _timed(calls.classify(models.model_id(CLASSIFIER), image))
    if locate:
        jobs[LOCALIZER] = _timed(calls.localize(plan.localizer_id, image))  # type: ignore[arg-type]
    rerank = type_it and models.has(RERANKER)
    if rerank and registered is not None:
        jobs["registered"] = _timed(registered(models.category))
    answers = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    classified: Classified | None = answers[CLASSIFIER][0] if CLASSIFIER in answers else None
    located: Located | None = answers[LOCALIZER][0] if LOCALIZER in answers else None
    if classified is not None:
        runs.append(
            (
                _run(
                    CLASSIFIER,
                    models.versions[CLASSIFIER],
                    classified,
                    answers[CLASSIFIER][1],
                    classified.summary(),
                ),
                defective,
            )
        )
    if located is not None:
        runs.append(
            (
                _run(
                    LOCALIZER,
                    plan.shared[LOCALIZER],
                    located,
                    answers[LOCALIZER][1],
                    located.summary(),
                ),
                defective and request.boxes,
            )
        )
    described = {name: d["description"] for name, d in models.descriptions.items()}
    reranked = None
    if rerank:
        now = list(answers["registered"][0]) if "registered" in answers else []
        described |= {d["name"]: d["description"] for d in now}
        reranked, ms = await _timed(
            calls.rerank(
                models.model_id(RERANKER),
                image,
                classified.defect_scores if classified is not None else None,
                now,
            )
        )
        top = reranked.ranked[0]
        output = {
            "defect_type": top.name,
            "score": top.score,
            "classifier_defect_type": classified.ranked[0].name if classified else None,
        }
        runs.append((_run(RERANKER, models.versions[RERANKER], reranked, ms, output), defective))
    return _Typing(classified, located, reranked, described)


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    """The call's answer and the milliseconds the flow waited for it."""
    started = time.perf_counter()
    answer = await call
    return answer, (time.perf_counter() - started) * 1000.0


def _run(stage: str, version: str, answer: Any, call_ms: float, output: dict[str, Any]) -> StageRun:
    return StageRun(stage, version, float(answer.latency_ms), output, call_ms)
