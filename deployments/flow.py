"""The serving DAG's routing logic, in plain Python.

The Router runs :func:`inspect_image` with stage calls that go through
``DeploymentHandle``s; tests and single-process servers run it with calls that
compute in place (:class:`LocalStageCalls`). The rule is InspectionPipeline's
(:class:`~models.decision.DecisionRule`):

    category given, or named by the category router
    → detector probability p
    → verifier, only when p is in the category's ambiguous band
    → verdict
    → for defective parts: classifier ∥ localizer (boxes asked for), then reranker

Which model versions serve (a :class:`ServingPlan`) is read from the registry's
production aliases, with optional pins; it is part of the result cache's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from PIL import Image

from deployments import compute
from models.artifacts import ArtifactError, ArtifactRegistry
from models.decision import DecisionRule
from models.stages import (
    CLASSIFIER,
    DECISION,
    DETECTOR,
    LOCALIZER,
    RERANKER,
    ROUTER,
    ROUTER_CATEGORY,
    VERIFIER,
    LoadedStage,
    load_decision,
    load_stage,
)

OK, DEFECTIVE = "ok", "defective"
CATEGORY_STAGES = (DETECTOR, VERIFIER, CLASSIFIER, RERANKER)


class InspectionRefused(ValueError):
    """A request the models cannot answer as asked (HTTP 422): says why."""


@dataclass(frozen=True)
class CategoryModels:
    """The models and rule serving one category.

    Attributes:
        category: the product category.
        versions: stage → version of each model it has (``decision`` included).
        rule: its decision rule (band, thresholds).
        descriptions: the reranker's trained types, name → description.
    """

    category: str
    versions: Mapping[str, str]
    rule: DecisionRule
    descriptions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def model_id(self, stage: str) -> str:
        """The multiplexed model id of one of its stages: ``category@version``."""
        return f"{self.category}@{self.versions[stage]}"

    def has(self, stage: str) -> bool:
        """Whether the category has this stage."""
        return stage in self.versions


@dataclass(frozen=True)
class ServingPlan:
    """Every category's models, plus the shared router and localizer."""

    categories: Mapping[str, CategoryModels]
    router_version: str | None = None
    localizer_version: str | None = None

    @property
    def router_id(self) -> str | None:
        """Multiplexed id of the category router, if there is one."""
        return f"{ROUTER_CATEGORY}@{self.router_version}" if self.router_version else None

    @property
    def localizer_id(self) -> str | None:
        """Multiplexed id of the localizer, if there is one."""
        return f"{ROUTER_CATEGORY}@{self.localizer_version}" if self.localizer_version else None

    def versions(self, category: str | None) -> dict[str, str]:
        """The versions that can answer for a category (every category's when None)."""
        shared = {
            ROUTER: self.router_version or "",
            LOCALIZER: self.localizer_version or "",
        }
        if category is None:
            return shared | {
                f"{name}/{stage}": version
                for name, models in sorted(self.categories.items())
                for stage, version in sorted(models.versions.items())
            }
        return shared | dict(self.categories[category].versions)

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever any serving model or rule changes (computed once per plan)."""
        text = json.dumps(
            {
                "versions": self.versions(None),
                "rules": {n: m.rule.to_dict() for n, m in sorted(self.categories.items())},
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_plan(
    registry: ArtifactRegistry,
    pins: Mapping[str, Mapping[str, str]] | None = None,
    rules: Mapping[str, Mapping[str, float]] | None = None,
) -> ServingPlan:
    """Read which versions serve from the registry.

    Args:
        registry: the artifact registry.
        pins: category → stage → version to serve instead of production
            (``all-categories`` pins the router and localizer).
        rules: category → decision-rule fields overriding the stored rule (e.g.
            a stricter threshold set by the operator without retraining).

    Raises:
        ArtifactError: no category has a detector, or a pinned version is missing.
    """
    pins = pins or {}
    categories = {}
    for category in registry.categories():
        if category == ROUTER_CATEGORY:
            continue
        available = registry.stages(category)
        if DETECTOR not in available:
            continue
        wanted = pins.get(category, {})
        versions = {
            stage: wanted.get(stage) or registry.manifest(category, stage).version
            for stage in (*CATEGORY_STAGES, DECISION)
            if stage in available
        }
        for stage, version in wanted.items():
            registry.manifest(category, stage, version)  # raises when missing
        rule = DecisionRule()
        if DECISION in versions:
            rule, _ = load_decision(registry, category, versions[DECISION])
        if rules and category in rules:
            rule = DecisionRule.from_dict(rule.to_dict() | dict(rules[category]))
        if VERIFIER not in versions:  # no verifier: no band
            rule = DecisionRule(threshold=rule.threshold, lo=rule.threshold, hi=rule.threshold)
        descriptions = {}
        if RERANKER in versions:
            config = registry.manifest(category, RERANKER, versions[RERANKER]).config
            descriptions = {d["name"]: d for d in config.get("descriptions", [])}
        categories[category] = CategoryModels(category, versions, rule, descriptions)
    if not categories:
        raise ArtifactError(f"no category in {registry.uri} has a trained detector")
    shared = registry.stages(ROUTER_CATEGORY) if ROUTER_CATEGORY in registry.categories() else []
    shared_pins = pins.get(ROUTER_CATEGORY, {})
    router, localizer = (
        (shared_pins.get(stage) or registry.manifest(ROUTER_CATEGORY, stage).version)
        if stage in shared
        else None
        for stage in (ROUTER, LOCALIZER)
    )
    return ServingPlan(categories, router, localizer)


class StageCalls(Protocol):
    """How the flow reaches each stage (handles in Serve, direct calls elsewhere)."""

    async def route(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """``{"category", "confidence", "latency_ms"}``."""

    async def detect(self, model_id: str, image: Image.Image, explain: bool) -> dict[str, Any]:
        """``{"probability", "heatmap_png", "latency_ms"}``."""

    async def verify(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """``{"score", "latency_ms"}``."""

    async def classify(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """``{"defect_scores", "ranked", "class_scores", "latency_ms"}``."""

    async def localize(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """``{"boxes": [{"defect_type", "score", "box"}], "latency_ms"}``."""

    async def rerank(
        self,
        model_id: str,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """``{"ranked": [[type, score], ...], "latency_ms"}``."""


def _trace(stage: str, version: str, answer: Mapping[str, Any], output: dict) -> dict[str, Any]:
    return {
        "stage": stage,
        "model_version": version,
        "latency_ms": float(answer.get("latency_ms", 0.0)),
        "output": output,
    }


async def inspect_image(
    image: Image.Image,
    category: str | None,
    *,
    plan: ServingPlan,
    calls: StageCalls,
    explain: bool = False,
    boxes: bool = False,
    registered: Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Inspect one decoded image through the stages.

    Args:
        image: the decoded image.
        category: its product category, or None to let the router name it.
        plan: the models that serve.
        calls: how to reach the stages.
        explain: ask the detector for its Grad-CAM heatmap.
        boxes: ask the localizer for boxes (defective parts only).
        registered: the category's run-time registered descriptions (awaited only
            for defective parts with a reranker).

    Returns:
        The :class:`~deployments.schemas.InspectionResult` fields the models decide
        (category, verdict, scores, types, boxes, heatmap, trace, versions).

    Raises:
        InspectionRefused: an unknown category, no router for an image without
            one, or boxes asked for without a localizer.
    """
    if boxes and plan.localizer_id is None:
        raise InspectionRefused("boxes were asked for, but no defect localizer is trained")
    trace: list[dict[str, Any]] = []
    routed = category is None
    if routed:
        if plan.router_id is None:
            raise InspectionRefused(
                "the image came without a category and no category router is trained; "
                f"send one of {sorted(plan.categories)}"
            )
        answer = await calls.route(plan.router_id, image)
        category = answer["category"]
        trace.append(
            _trace(
                ROUTER,
                plan.router_version,
                answer,
                {"category": category, "confidence": answer["confidence"]},
            )
        )
    if category not in plan.categories:
        raise InspectionRefused(f"unknown category {category!r}; known: {sorted(plan.categories)}")
    models = plan.categories[category]
    rule = models.rule

    detected = await calls.detect(models.model_id(DETECTOR), image, explain)
    probability = detected["probability"]
    in_band = models.has(VERIFIER) and rule.needs_verifier(probability)
    trace.append(
        _trace(
            DETECTOR,
            models.versions[DETECTOR],
            detected,
            {"probability": probability, "in_band": in_band},
        )
    )
    verifier_score = None
    if in_band:
        verified = await calls.verify(models.model_id(VERIFIER), image)
        verifier_score = verified["score"]
        trace.append(
            _trace(VERIFIER, models.versions[VERIFIER], verified, {"score": verifier_score})
        )
    decision = rule.decide(probability, verifier_score)
    result: dict[str, Any] = {
        "category": category,
        "category_routed": routed,
        "verdict": DEFECTIVE if decision.defective else OK,
        "anomaly_score": float(decision.anomaly_score),
        "decided_by": decision.decided_by,
        "heatmap_png": detected.get("heatmap_png"),
        "defect_types": [],
        "boxes": [],
        "model_versions": plan.versions(category),
    }
    if decision.defective:
        await _type_and_locate(image, models, plan, calls, boxes, registered, result, trace)
    result["trace"] = trace
    return result


async def _type_and_locate(
    image: Image.Image,
    models: CategoryModels,
    plan: ServingPlan,
    calls: StageCalls,
    boxes: bool,
    registered: Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]] | None,
    result: dict[str, Any],
    trace: list[dict[str, Any]],
) -> None:
    """Classifier ∥ localizer, then the reranker, for a defective part."""
    jobs: dict[str, Awaitable[dict[str, Any]]] = {}
    if models.has(CLASSIFIER):
        jobs[CLASSIFIER] = calls.classify(models.model_id(CLASSIFIER), image)
    if boxes:
        jobs[LOCALIZER] = calls.localize(plan.localizer_id, image)
    extra: Awaitable[Sequence[Mapping[str, Any]]] | None = None
    if models.has(RERANKER) and registered is not None:
        extra = registered(models.category)
    answers = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    described = dict(models.descriptions)
    classified = answers.get(CLASSIFIER)
    if classified is not None:
        top, score = classified["ranked"][0]
        trace.append(
            _trace(
                CLASSIFIER,
                models.versions[CLASSIFIER],
                classified,
                {"defect_type": top, "score": score},
            )
        )
        result["defect_types"] = [{"name": n, "score": s} for n, s in classified["ranked"]]
    if LOCALIZER in answers:
        located = answers[LOCALIZER]
        result["boxes"] = located["boxes"]
        trace.append(
            _trace(LOCALIZER, plan.localizer_version, located, {"n_boxes": len(located["boxes"])})
        )
    if models.has(RERANKER):
        registered_now = list(await extra) if extra is not None else []
        described |= {d["name"]: d for d in registered_now}
        reranked = await calls.rerank(
            models.model_id(RERANKER),
            image,
            classified["defect_scores"] if classified else None,
            registered_now,
        )
        top, score = reranked["ranked"][0]
        trace.append(
            _trace(
                RERANKER,
                models.versions[RERANKER],
                reranked,
                {
                    "defect_type": top,
                    "score": score,
                    "classifier_defect_type": classified["ranked"][0][0] if classified else None,
                },
            )
        )
        result["defect_types"] = [{"name": n, "score": s} for n, s in reranked["ranked"]]
    for item in result["defect_types"]:
        item["description"] = described.get(item["name"], {}).get("description")


class LocalStageCalls:
    """Stage calls computed in this process, from models loaded on first use.

    For tests and single-process servers; Serve replicas use the same compute
    functions (:mod:`deployments.compute`).
    """

    def __init__(self, registry: ArtifactRegistry, device: str = "cpu") -> None:
        self.registry = registry
        self.device = device
        self._models: dict[tuple[str, str], LoadedStage] = {}
        self._texts = compute.TypeTexts()

    def model(self, stage: str, model_id: str) -> LoadedStage:
        """Load (once) the stage model a multiplexed id names."""
        if (stage, model_id) not in self._models:
            category, version = model_id.rsplit("@", 1)
            self._models[stage, model_id] = load_stage(
                self.registry, category, stage, version, self.device
            )
        return self._models[stage, model_id]

    async def route(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        return compute.route(self.model(ROUTER, model_id), [image])[0]

    async def detect(self, model_id: str, image: Image.Image, explain: bool) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        return compute.detect(self.model(DETECTOR, model_id), [image], [explain])[0]

    async def verify(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        return compute.verify(self.model(VERIFIER, model_id), [image])[0]

    async def classify(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        return compute.classify(self.model(CLASSIFIER, model_id), [image])[0]

    async def localize(self, model_id: str, image: Image.Image) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        return compute.localize(self.model(LOCALIZER, model_id), [image])[0]

    async def rerank(
        self,
        model_id: str,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """See :class:`StageCalls`."""
        stage = self.model(RERANKER, model_id)
        return compute.rerank(
            stage, model_id, [image], [classifier_scores], [registered], self._texts
        )[0]
