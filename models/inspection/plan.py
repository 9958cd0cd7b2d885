"""Which models and rules inspect each category: the plan serving and evaluation share.

:func:`load_plan` reads the registry's production aliases, applies the
operator's pinned versions and decision-rule overrides (the serving YAML's
``service.versions`` and ``service.rules``) and says which stages each
category has. The Serve router, ``inspectray eval`` and the baseline all
inspect through a plan built by it, so evaluation scores the rule that serves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

from models.artifacts import ArtifactError, ArtifactRegistry
from models.decision import DecisionRule
from models.grading import Grading
from models.stages import (
    CATEGORY_STAGES,
    CLASSIFIER,
    DECISION,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    SHARED_CATEGORY,
    SHARED_STAGES,
    VERIFIER,
    load_decision,
)

Pins = Mapping[str, Mapping[str, str]]
SCORING = (DETECTOR, MEMORY_BANK)  # a category is inspected when it has one of these
RuleOverrides = Mapping[str, Mapping[str, float]]


def model_id(category: str, version: str) -> str:
    """The multiplexed model id of a stage model: ``category@version``."""
    return f"{category}@{version}"


def split_model_id(name: str) -> tuple[str, str]:
    """``(category, version)`` of a multiplexed model id."""
    category, _, version = name.rpartition("@")
    if not category or not version:
        raise ArtifactError(f"a model id is CATEGORY@VERSION, got {name!r}")
    return category, version


@dataclass(frozen=True)
class CategoryModels:
    """The models and rule that inspect one category.

    Attributes:
        category: the product category.
        versions: stage → version of each model it has (``decision`` included).
        rule: its decision rule (band, thresholds), overrides applied.
        descriptions: the reranker's trained types, name → description record.
        classifier_types: the defect types its classifier was trained on.
        drift_reference: the good validation parts' final scores its drift is
            measured against (:mod:`models.drift`; empty without a fitted rule).
        grading: how it grades its parts, where its labels are graded levels
            (:mod:`models.grading`; None elsewhere).
    """

    category: str
    versions: Mapping[str, str]
    rule: DecisionRule
    descriptions: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    classifier_types: tuple[str, ...] = ()
    drift_reference: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    grading: Grading | None = None

    def model_id(self, stage: str) -> str:
        """The multiplexed model id of one of its stages."""
        return model_id(self.category, self.versions[stage])

    def has(self, stage: str) -> bool:
        """Whether the category has this stage."""
        return stage in self.versions

    @property
    def trained_types(self) -> frozenset[str]:
        """Every type a model of the category learnt from images."""
        return frozenset(self.descriptions) | frozenset(self.classifier_types)


@dataclass(frozen=True)
class InspectionPlan:
    """Every category's models, plus the shared router and localizer."""

    categories: Mapping[str, CategoryModels]
    shared: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def shared_id(self, stage: str) -> str | None:
        """Multiplexed id of a shared stage (router, localizer), if there is one."""
        version = self.shared.get(stage)
        return model_id(SHARED_CATEGORY, version) if version else None

    @property
    def router_id(self) -> str | None:
        """Multiplexed id of the category router, if there is one."""
        return self.shared_id(ROUTER)

    @property
    def localizer_id(self) -> str | None:
        """Multiplexed id of the localizer, if there is one."""
        return self.shared_id(LOCALIZER)

    def versions(self, category: str | None) -> dict[str, str]:
        """The versions that can answer for a category (every category's when None)."""
        shared = {stage: self.shared.get(stage, "") for stage in SHARED_STAGES}
        if category is None:
            return shared | {
                f"{name}/{stage}": version
                for name, models in sorted(self.categories.items())
                for stage, version in sorted(models.versions.items())
            }
        return shared | dict(self.categories[category].versions)

    def model_ids(self) -> list[tuple[str, str]]:
        """``(stage, model id)`` of every model the plan serves."""
        ids = [(stage, self.shared_id(stage)) for stage in SHARED_STAGES if stage in self.shared]
        for models in self.categories.values():
            ids += [(s, models.model_id(s)) for s in CATEGORY_STAGES if models.has(s)]
        return ids  # type: ignore[return-value]

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
    pins: Pins | None = None,
    rules: RuleOverrides | None = None,
) -> InspectionPlan:
    """Read which versions inspect each category from the registry.

    A category needs a detector; without a verifier its rule has no band,
    without a decision artifact the detector decides at 0.5.

    Args:
        registry: the artifact registry.
        pins: category → stage → version to use instead of production
            (``all-categories`` pins the router and localizer).
        rules: category → decision-rule fields overriding the stored rule (e.g.
            a stricter threshold set by the operator without retraining).

    Raises:
        ArtifactError: no category has a detector or a memory bank, a pinned
            version is missing, pins or overrides name a category without
            either, or a rule needs a model its category lacks.
    """
    pins, rules = pins or {}, rules or {}
    categories = {}
    for category in registry.categories():
        if category == SHARED_CATEGORY or not set(SCORING) & set(registry.stages(category)):
            continue
        categories[category] = _category_models(
            registry, category, pins.get(category, {}), rules.get(category)
        )
    if not categories:
        raise ArtifactError(f"no category in {registry.uri} has a detector or a memory bank")
    unknown = sorted((set(pins) | set(rules)) - set(categories) - {SHARED_CATEGORY})
    if unknown:
        raise ArtifactError(
            f"pinned versions or rule overrides for {unknown}, which have no detector or "
            f"memory bank in "
            f"{registry.uri}; categories: {sorted(categories)}"
        )
    present = registry.stages(SHARED_CATEGORY) if SHARED_CATEGORY in registry.categories() else []
    shared = _versions(registry, SHARED_CATEGORY, present, SHARED_STAGES, pins.get(SHARED_CATEGORY))
    return InspectionPlan(categories, shared)


def _versions(
    registry: ArtifactRegistry,
    category: str,
    present: list[str],
    stages: tuple[str, ...],
    pinned: Mapping[str, str] | None,
) -> dict[str, str]:
    """Stage → version for the stages present: the pin, else production."""
    pinned = pinned or {}
    for stage, version in pinned.items():
        registry.manifest(category, stage, version)  # raises when missing
    return {
        stage: pinned.get(stage) or registry.manifest(category, stage).version
        for stage in stages
        if stage in present
    }


def _category_models(
    registry: ArtifactRegistry,
    category: str,
    pinned: Mapping[str, str],
    overrides: Mapping[str, float] | None,
) -> CategoryModels:
    present = registry.stages(category)
    versions = _versions(registry, category, present, (*CATEGORY_STAGES, DECISION), pinned)
    # Without a fitted rule: the detector's probability, else the memory bank's score.
    rule = DecisionRule()
    reference: Mapping[str, Any] = {}
    grading = None
    if DETECTOR not in versions:
        rule = DecisionRule(detector_weight=0.0, bank_weight=1.0)
    if DECISION in versions:
        rule, decision = load_decision(registry, category, versions[DECISION])
        reference = decision.metrics.get("drift_reference") or {}
        if "grading" in decision.config:
            grading = Grading.from_dict(decision.config["grading"])
    if overrides:
        rule = DecisionRule.from_dict(rule.to_dict() | dict(overrides))
    if VERIFIER not in versions:  # no verifier: no band
        rule = replace(rule, lo=rule.threshold, hi=rule.threshold)
    for stage, needed in ((DETECTOR, rule.uses_detector), (MEMORY_BANK, rule.uses_bank)):
        if needed and stage not in versions:
            raise ArtifactError(
                f"{category}: its decision rule (version {versions.get(DECISION)}) uses the "
                f"{stage}, which the category has not; refit it with `inspectray train`"
            )
    descriptions: dict[str, Mapping[str, Any]] = {}
    if RERANKER in versions:
        config = registry.manifest(category, RERANKER, versions[RERANKER]).config
        descriptions = {d["name"]: d for d in config.get("descriptions", [])}
    classifier_types: tuple[str, ...] = ()
    if CLASSIFIER in versions:
        config = registry.manifest(category, CLASSIFIER, versions[CLASSIFIER]).config
        classifier_types = tuple(config.get("defect_types", ()))
    return CategoryModels(
        category, versions, rule, descriptions, classifier_types, reference, grading
    )
