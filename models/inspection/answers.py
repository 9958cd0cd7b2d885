"""What each stage answers, and the inspection they add up to: typed, one shape everywhere.

Every stage call returns one of these dataclasses, whether it ran in this
process or in a Ray Serve replica (they pickle), so the flow, evaluation, the
baseline and the HTTP schema (:mod:`deployments.schemas`) read the same fields.
``latency_ms`` is the stage's share of its batch's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    VERIFIER,
)

OK, DEFECTIVE = "ok", "defective"
Verdict = Literal["ok", "defective"]


@dataclass(frozen=True)
class Routed:
    """The category router's answer: which product an image shows."""

    category: str
    confidence: float
    latency_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the trace shows of it."""
        return {"category": self.category, "confidence": self.confidence}


@dataclass(frozen=True)
class Detected:
    """The anomaly detector's answer.

    Attributes:
        probability: p(anomalous).
        heatmap: Grad-CAM map ``(H, W)`` in [0, 1] at the detector's input size,
            when an explanation was asked for.
    """

    probability: float
    heatmap: np.ndarray | None = None
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Banked:
    """The memory bank's answer.

    Attributes:
        score: its calibrated probability that the part is anomalous.
        anomaly_map: the per-pixel probability ``(H, W)`` at its input size,
            when the map was asked for.
    """

    score: float
    anomaly_map: np.ndarray | None = None
    latency_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the trace shows of it."""
        return {"score": self.score}


@dataclass(frozen=True)
class Verified:
    """The autoencoder verifier's answer.

    Attributes:
        score: the calibrated probability that the part is anomalous.
        error_map: the reconstruction error ``(h, w)`` at feature resolution.
    """

    score: float
    error_map: np.ndarray | None = None
    latency_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the trace shows of it."""
        return {"score": self.score}


@dataclass(frozen=True)
class RankedType:
    """A defect type and its score (the scores of a ranking sum to 1)."""

    name: str
    score: float


def _top(ranked: tuple[RankedType, ...]) -> RankedType:
    if not ranked:
        raise ValueError("an empty ranking has no top type")
    return ranked[0]


@dataclass(frozen=True)
class Classified:
    """The defect classifier's answer.

    Attributes:
        ranked: its defect types, best first, scores renormalised over them.
        class_scores: the probability of every class it knows (``good`` and
            graded levels included).
        embedding: the unit-length embedding ``(D,)``.
    """

    ranked: tuple[RankedType, ...]
    class_scores: Mapping[str, float]
    embedding: np.ndarray
    latency_ms: float = 0.0

    @property
    def defect_scores(self) -> dict[str, float]:
        """Type → score, the reranker's input."""
        return {t.name: t.score for t in self.ranked}

    @property
    def predicted_class(self) -> str:
        """Its most probable class (ELPV: the probability level)."""
        return max(self.class_scores, key=self.class_scores.__getitem__)

    def summary(self) -> dict[str, Any]:
        """What the trace shows of it."""
        top = _top(self.ranked)
        return {"defect_type": top.name, "score": top.score}


@dataclass(frozen=True)
class Box:
    """One located defect, in the pixels of the image sent."""

    defect_type: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass(frozen=True)
class Located:
    """The defect localizer's answer: boxes, best first."""

    boxes: tuple[Box, ...]
    latency_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the trace shows of it."""
        return {"n_boxes": len(self.boxes)}


@dataclass(frozen=True)
class Reranked:
    """The reranker's answer: the types reordered by classifier and CLIP scores fused."""

    ranked: tuple[RankedType, ...]
    latency_ms: float = 0.0


def ranking(classified: Classified | None, reranked: Reranked | None) -> tuple[RankedType, ...]:
    """The ranking an inspection gives: the reranker's when it ran, else the classifier's."""
    if reranked is not None:
        return reranked.ranked
    return classified.ranked if classified is not None else ()


@dataclass(frozen=True)
class StageRun:
    """One stage's part in an inspection: what ran, what it said, how long it took.

    Attributes:
        stage: the stage's name.
        model_version: the version of its model.
        latency_ms: the model's computing time: its share of its batch.
        output: what it said (a summary).
        call_ms: how long the flow waited for it: the computing time plus the
            batching wait, the queue and the transfer to and from its replica.
    """

    stage: str
    model_version: str
    latency_ms: float
    output: Mapping[str, Any] = field(default_factory=dict)
    call_ms: float = 0.0


@dataclass(frozen=True)
class Inspection:
    """The flow's answer for one image.

    The served fields (verdict, scores, ``defect_types``, ``boxes``, ``trace``)
    are the same whatever the flow's coverage; evaluation's extra typing of
    parts judged ok and the baseline's every-stage runs only add stage answers
    and ``also_ran`` entries.

    Attributes:
        category: the product category used (given or routed).
        routed: the router's answer when it named the category.
        verdict: ``ok`` or ``defective``.
        anomaly_score: the final score in [0, 1] (see :mod:`models.decision`).
        decided_by: what decided: ``detector``, ``memory-bank``, both
            (``detector+memory-bank``) or ``verifier``.
        grade: the part's level, for a category whose labels are graded
            (:mod:`models.grading`; None elsewhere).
        first_score: the first-line score the category's threshold and band
            apply to (see :meth:`~models.decision.DecisionRule.first_score`).
        detected: the detector's answer, when it ran.
        banked: the memory bank's answer, when it ran.
        heatmap: where the part looks anomalous ``(H, W)`` in [0, 1] at the
            model's input size, when an explanation was asked for: the memory
            bank's map where the category has one, else the detector's Grad-CAM.
        heatmap_source: ``memory-bank`` or ``grad-cam``.
        verified: the verifier's answer, when it ran.
        classified: the classifier's answer, when it ran.
        located: the localizer's answer, when it ran.
        reranked: the reranker's answer, when it ran.
        defect_types: the served ranking, best first: the reranker's when it
            ran, else the classifier's; empty for a part judged ok.
        descriptions: type → its catalog description, for the ranked types.
        boxes: the served boxes (defective parts, when asked for).
        trace: the stages whose answers the result gives, in the flow's order.
        also_ran: the stages run beyond those (evaluation, the baseline).
        model_versions: stage → version of every model that could answer.
    """

    category: str
    verdict: Verdict
    anomaly_score: float
    decided_by: str
    grade: str | None = None
    first_score: float | None = None
    detected: Detected | None = None
    banked: Banked | None = None
    heatmap: np.ndarray | None = None
    heatmap_source: str | None = None
    routed: Routed | None = None
    verified: Verified | None = None
    classified: Classified | None = None
    located: Located | None = None
    reranked: Reranked | None = None
    defect_types: tuple[RankedType, ...] = ()
    descriptions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    boxes: tuple[Box, ...] = ()
    trace: tuple[StageRun, ...] = ()
    also_ran: tuple[StageRun, ...] = ()
    model_versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def detector_probability(self) -> float | None:
        """The detector's probability, when it ran."""
        return self.detected.probability if self.detected else None

    @property
    def memory_bank_score(self) -> float | None:
        """The memory bank's calibrated score, when it ran."""
        return self.banked.score if self.banked else None

    @property
    def verifier_score(self) -> float | None:
        """The verifier's calibrated score, when it ran."""
        return self.verified.score if self.verified else None

    @property
    def ranking(self) -> tuple[RankedType, ...]:
        """The types as ranked whatever the verdict (evaluation types every part)."""
        return ranking(self.classified, self.reranked)

    @property
    def stages_run(self) -> list[str]:
        """Every stage that ran, served or not, in the flow's order."""
        return [run.stage for run in in_trace_order(self.trace + self.also_ran)]


# The one order of a trace: the DAG's (detector ∥ memory bank, classifier ∥ localizer).
TRACE_ORDER = (ROUTER, DETECTOR, MEMORY_BANK, VERIFIER, CLASSIFIER, LOCALIZER, RERANKER)


def in_trace_order(runs: Iterable[StageRun]) -> tuple[StageRun, ...]:
    """The runs sorted into :data:`TRACE_ORDER`."""
    return tuple(sorted(runs, key=lambda run: TRACE_ORDER.index(run.stage)))
