"""InspectionPipeline: the stages composed by the decision rule, in plain Python.

Evaluation runs it over a test split; serving follows the same rule stage by stage
(:class:`~models.decision.DecisionRule` is the one routing logic):

    category given, or predicted by the CategoryRouter
    → AnomalyDetector probability p
    → AutoencoderVerifier, only when p falls in the category's ambiguous band
    → verdict and final anomaly score
    → DefectClassifier, for parts judged defective: ranked defect types
      ∥ DefectLocalizer, when boxes are asked for: where each defect is
    → Reranker: the types reordered by fusing the classifier's scores with
      CLIP image-description similarity (types registered by description only
      are ranked too)
    → the stage trace
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.artifacts import ArtifactError, ArtifactRegistry
from models.data.sample import Sample
from models.data.tensors import predict_all, validation_dataset
from models.decision import DecisionRule, ensemble_rule, fit_decision_rule
from models.descriptions import DefectDescription, DescriptionCatalog
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
    save_decision,
)

OK, DEFECTIVE = "ok", "defective"
# Which images the defect classifier sees: those judged defective (serving), or
# every image (evaluation: grading every ELPV cell, typing missed defects).
CLASSIFY_DEFECTIVE, CLASSIFY_ALL = "defective", "all"


@dataclass(frozen=True)
class StageRun:
    """One stage's part in an inspection: what ran, what it said, how long it took."""

    stage: str
    version: str
    latency_ms: float
    output: dict[str, Any]


@dataclass
class Inspection:
    """The pipeline's answer for one image.

    Attributes:
        category: the product category used (given or routed).
        routed: whether the CategoryRouter chose the category.
        verdict: ``ok`` or ``defective``.
        anomaly_score: the final score in [0, 1] (see :mod:`models.decision`).
        decided_by: ``detector`` or ``verifier``.
        detector_probability: the detector's probability.
        verifier_score: the verifier's calibrated score, when it ran.
        heatmap: Grad-CAM map ``(H, W)`` in [0, 1] at the detector's input size,
            when asked for.
        defect_types: the defect types, best first, with scores summing to 1,
            when the classifier or the reranker ran (the reranker's order when
            it ran).
        classifier_defect_types: the classifier's own ranking, before reranking.
        boxes: the localizer's boxes ``(defect type, score, (x0, y0, x1, y1))`` in
            the image's pixels, best first, when boxes were asked for.
        class_scores: the classifier's probability of every class (``good``
            and graded levels included), when it ran.
        embedding: the classifier's unit-length embedding, when it ran.
        trace: the stages that ran, in order.
    """

    category: str
    routed: bool
    verdict: str
    anomaly_score: float
    decided_by: str
    detector_probability: float
    verifier_score: float | None = None
    heatmap: np.ndarray | None = None
    defect_types: list[tuple[str, float]] = field(default_factory=list)
    classifier_defect_types: list[tuple[str, float]] = field(default_factory=list)
    boxes: list[tuple[str, float, tuple[float, float, float, float]]] = field(default_factory=list)
    class_scores: dict[str, float] | None = None
    embedding: np.ndarray | None = None
    trace: list[StageRun] = field(default_factory=list)


@dataclass(frozen=True)
class CategoryStages:
    """The models and rule that inspect one category."""

    detector: LoadedStage
    verifier: LoadedStage | None
    rule: DecisionRule
    rule_version: str
    classifier: LoadedStage | None = None
    reranker: LoadedStage | None = None


@dataclass(frozen=True)
class _RankedTypes:
    """The types a category's reranker ranks, with their text embeddings."""

    names: tuple[str, ...]
    known: torch.Tensor  # (N,) bool: types the classifier was trained on
    texts: torch.Tensor  # (N, D) unit-length description embeddings


def batched_inputs(model: torch.nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """The images as one channels-last batch ``(B, 3, S, S)``, by the model's own preprocessing."""
    transform = model.preprocessing.transform()
    device = next(model.parameters()).device
    batch = torch.stack([transform(image) for image in images]).to(device)
    return batch.contiguous(memory_format=torch.channels_last)


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, (time.perf_counter() - started) * 1000.0


class InspectionPipeline:
    """Router → detector → verifier (in the band) → verdict, for every category.

    Args:
        stages: category → its models and rule.
        router: the CategoryRouter, needed only for images given without a category.
        batch_size: images per model call.
        localizer: the DefectLocalizer (one for every category), needed only when
            boxes are asked for.
    """

    def __init__(
        self,
        stages: Mapping[str, CategoryStages],
        router: LoadedStage | None = None,
        batch_size: int = 16,
        localizer: LoadedStage | None = None,
    ) -> None:
        if not stages:
            raise ValueError("the pipeline needs at least one category")
        self.stages = dict(stages)
        self.router = router
        self.localizer = localizer
        self.batch_size = batch_size
        self._described: dict[str, DescriptionCatalog] = {}
        self._ranked_types: dict[str, _RankedTypes] = {}

    @property
    def categories(self) -> list[str]:
        """Categories this pipeline inspects."""
        return sorted(self.stages)

    @classmethod
    def from_registry(
        cls,
        registry: ArtifactRegistry,
        categories: Sequence[str] | None = None,
        ref: str = "production",
        device: str | torch.device = "cpu",
    ) -> InspectionPipeline:
        """Load every category's production artifacts.

        A category needs a detector; without a verifier its rule has no band,
        without a decision artifact the detector decides at 0.5, and without a
        classifier defective parts get no defect type.

        Raises:
            ArtifactError: a requested category has no detector, or none has one.
        """
        wanted = (
            list(categories)
            if categories
            else [c for c in registry.categories() if c != ROUTER_CATEGORY]
        )
        stages = {}
        for category in wanted:
            available = registry.stages(category) if category in registry.categories() else []
            if DETECTOR not in available:
                if categories:
                    raise ArtifactError(f"category {category!r} has no trained detector")
                continue
            detector = load_stage(registry, category, DETECTOR, ref, device)
            verifier = (
                load_stage(registry, category, VERIFIER, ref, device)
                if VERIFIER in available
                else None
            )
            rule, version = DecisionRule(), "default"
            if DECISION in available:
                rule, manifest = load_decision(registry, category, ref)
                version = manifest.version
            if verifier is None:
                rule = DecisionRule(threshold=rule.threshold, lo=rule.threshold, hi=rule.threshold)
            classifier, reranker = (
                load_stage(registry, category, stage, ref, device) if stage in available else None
                for stage in (CLASSIFIER, RERANKER)
            )
            stages[category] = CategoryStages(
                detector, verifier, rule, version, classifier, reranker
            )
        if not stages:
            raise ArtifactError(f"no category in {registry.uri} has a trained detector")
        shared = (
            registry.stages(ROUTER_CATEGORY) if ROUTER_CATEGORY in registry.categories() else []
        )
        router, localizer = (
            load_stage(registry, ROUTER_CATEGORY, stage, ref, device) if stage in shared else None
            for stage in (ROUTER, LOCALIZER)
        )
        return cls(stages, router, localizer=localizer)

    def register_description(self, category: str, description: DefectDescription) -> None:
        """Add (or replace) a described defect type; the reranker ranks it from now on.

        Raises:
            ArtifactError: an unknown category, or one without a reranker.
        """
        if category not in self.stages:
            raise ArtifactError(f"unknown category {category!r}; known: {self.categories}")
        if self.stages[category].reranker is None:
            raise ArtifactError(
                f"category {category!r} has no reranker: train one to rank described types"
            )
        self._described.setdefault(category, DescriptionCatalog()).register(description)
        self._ranked_types.pop(category, None)

    def defect_catalog(self, category: str) -> DescriptionCatalog:
        """The described types a category's reranker ranks: trained ones, then registered."""
        reranker = self.stages[category].reranker
        catalog = reranker.model.config.catalog() if reranker else DescriptionCatalog()
        for name in self._described.get(category, DescriptionCatalog()).names:
            catalog.register(self._described[category][name])
        return catalog

    def _types(self, category: str) -> _RankedTypes:
        if category not in self._ranked_types:
            stages = self.stages[category]
            catalog = self.defect_catalog(category)
            classifier_types = (
                stages.classifier.model.config.defect_types if stages.classifier else ()
            )
            self._ranked_types[category] = _RankedTypes(
                catalog.names,
                torch.tensor([n in classifier_types for n in catalog.names]),
                stages.reranker.model.type_embeddings(catalog),
            )
        return self._ranked_types[category]

    def route(self, images: Sequence[Image.Image]) -> tuple[list[str], list[StageRun]]:
        """Predict each image's category with the router, among those with models."""
        if self.router is None:
            raise ArtifactError("an image came without a category and no router is trained")
        names: list[str] = []
        runs: list[StageRun] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            # Only categories this pipeline has models for can be named.
            inputs = batched_inputs(self.router.model, chunk)
            output, ms = _timed(self.router.model.predict, inputs, set(self.stages))
            for name, probs in zip(output.categories, output.probabilities, strict=True):
                names.append(name)
                runs.append(
                    StageRun(
                        ROUTER,
                        self.router.manifest.version,
                        ms / len(chunk),
                        {"category": name, "confidence": float(probs.max())},
                    )
                )
        return names, runs

    def inspect(
        self,
        images: Sequence[Image.Image],
        categories: Sequence[str | None] | None = None,
        explain: bool = False,
        classify: str = CLASSIFY_DEFECTIVE,
        boxes: bool = False,
    ) -> list[Inspection]:
        """Inspect a batch of images.

        Args:
            images: PIL images in any mode.
            categories: each image's category, or None to route it.
            explain: add the detector's Grad-CAM heatmap.
            classify: ``"defective"``: the defect classifier types the parts
                judged defective; ``"all"``: it scores every image.
            boxes: locate the defects of parts judged defective (the localizer).

        Raises:
            ArtifactError: an unknown category, routing needed without a router,
                or boxes asked for without a localizer.
        """
        if classify not in (CLASSIFY_DEFECTIVE, CLASSIFY_ALL):
            raise ValueError(f"classify must be 'defective' or 'all', got {classify!r}")
        if boxes and self.localizer is None:
            raise ArtifactError("boxes were asked for and no localizer is trained")
        categories = list(categories) if categories is not None else [None] * len(images)
        if len(categories) != len(images):
            raise ValueError(f"{len(images)} images but {len(categories)} categories")
        for name in categories:
            if name is not None and name not in self.stages:
                raise ArtifactError(f"unknown category {name!r}; known: {self.categories}")
        routed = [c is None for c in categories]
        traces: list[list[StageRun]] = [[] for _ in images]
        unrouted = [i for i, r in enumerate(routed) if r]
        if unrouted:
            names, runs = self.route([images[i] for i in unrouted])
            for i, name, run in zip(unrouted, names, runs, strict=True):
                categories[i] = name
                traces[i].append(run)
        results: list[Inspection | None] = [None] * len(images)
        for category in sorted(set(categories)):
            indices = [i for i, c in enumerate(categories) if c == category]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                chunk_images = [images[i] for i in chunk]
                found = self._inspect_category(category, chunk_images, explain)
                self._classify(category, chunk_images, found, classify)
                if boxes:
                    self._localize(chunk_images, found)
                for i, inspection in zip(chunk, found, strict=True):
                    inspection.routed = routed[i]
                    inspection.trace = traces[i] + inspection.trace
                    results[i] = inspection
        return results  # type: ignore[return-value]

    def _inspect_category(
        self, category: str, images: Sequence[Image.Image], explain: bool
    ) -> list[Inspection]:
        stages = self.stages[category]
        detector = stages.detector
        output, ms = _timed(
            detector.model.predict, batched_inputs(detector.model, images), explain=explain
        )
        probabilities = output.probability.cpu().tolist()
        in_band = [i for i, p in enumerate(probabilities) if stages.rule.needs_verifier(p)]
        verifier_scores: dict[int, float] = {}
        verifier_ms = 0.0
        if in_band and stages.verifier is not None:
            model = stages.verifier.model
            checked, verifier_ms = _timed(
                model.predict, batched_inputs(model, [images[i] for i in in_band])
            )
            verifier_scores = dict(zip(in_band, checked.score.cpu().tolist(), strict=True))
            verifier_ms /= len(in_band)
        inspections = []
        for i, probability in enumerate(probabilities):
            score = verifier_scores.get(i)
            decision = stages.rule.decide(probability, score)
            trace = [
                StageRun(
                    DETECTOR,
                    detector.manifest.version,
                    ms / len(images),
                    {"probability": probability, "in_band": i in verifier_scores},
                )
            ]
            if score is not None:
                trace.append(
                    StageRun(
                        VERIFIER, stages.verifier.manifest.version, verifier_ms, {"score": score}
                    )
                )
            heatmap = output.heatmap[i].cpu().numpy() if output.heatmap is not None else None
            inspections.append(
                Inspection(
                    category=category,
                    routed=False,
                    verdict=DEFECTIVE if decision.defective else OK,
                    anomaly_score=decision.anomaly_score,
                    decided_by=decision.decided_by,
                    detector_probability=probability,
                    verifier_score=score,
                    heatmap=heatmap,
                    trace=trace,
                )
            )
        return inspections

    def _classify(
        self,
        category: str,
        images: Sequence[Image.Image],
        inspections: Sequence[Inspection],
        classify: str,
    ) -> None:
        stages = self.stages[category]
        chosen = [
            i
            for i, inspection in enumerate(inspections)
            if classify == CLASSIFY_ALL or inspection.verdict == DEFECTIVE
        ]
        if not chosen:
            return
        chosen_images = [images[i] for i in chosen]
        chosen_inspections = [inspections[i] for i in chosen]
        class_scores = None
        if stages.classifier is not None:
            class_scores = _classify_into(stages.classifier, chosen_images, chosen_inspections)
        if stages.reranker is not None:
            self._rerank(category, chosen_images, chosen_inspections, class_scores)

    def _localize(self, images: Sequence[Image.Image], inspections: Sequence[Inspection]) -> None:
        chosen = [i for i, inspection in enumerate(inspections) if inspection.verdict == DEFECTIVE]
        if not chosen:
            return
        model = self.localizer.model
        picked = [images[i] for i in chosen]
        sizes = [(image.height, image.width) for image in picked]
        found, ms = _timed(model.predict, batched_inputs(model, picked), image_sizes=sizes)
        for i, detections in zip(chosen, found, strict=True):
            inspection = inspections[i]
            inspection.boxes = [
                (label, float(score), tuple(float(v) for v in box))
                for label, score, box in zip(
                    detections.labels, detections.scores.tolist(), detections.boxes, strict=True
                )
            ]
            inspection.trace.append(
                StageRun(
                    LOCALIZER,
                    self.localizer.manifest.version,
                    ms / len(chosen),
                    {"n_boxes": len(inspection.boxes)},
                )
            )

    def _rerank(
        self,
        category: str,
        images: Sequence[Image.Image],
        inspections: Sequence[Inspection],
        class_scores: torch.Tensor | None,
    ) -> None:
        """Reorder the types; ``class_scores`` is the classifier's ``(B, C)`` output, if any."""
        stages = self.stages[category]
        reranker = stages.reranker
        types = self._types(category)
        model = reranker.model
        clip, ms = _timed(model.text_probabilities, batched_inputs(model, images), types.texts)
        classifier_scores = None
        if class_scores is not None:
            classifier_scores = stages.classifier.model.defect_scores(class_scores, types.names)
        fused = model.fuse(classifier_scores, clip.cpu(), types.known)
        for inspection, row in zip(inspections, fused.tolist(), strict=True):
            ranked = sorted(zip(types.names, row, strict=True), key=lambda pair: -pair[1])
            inspection.defect_types = ranked
            before = inspection.classifier_defect_types
            inspection.trace.append(
                StageRun(
                    RERANKER,
                    reranker.manifest.version,
                    ms / len(images),
                    {
                        "defect_type": ranked[0][0],
                        "score": ranked[0][1],
                        "classifier_defect_type": before[0][0] if before else None,
                    },
                )
            )


def _classify_into(
    classifier: LoadedStage, images: Sequence[Image.Image], inspections: Sequence[Inspection]
) -> torch.Tensor:
    """Type the inspections; returns the class probabilities ``(B, C)`` on the CPU."""
    model = classifier.model
    output, ms = _timed(model.predict, batched_inputs(model, images))
    class_scores = output.scores.cpu()
    ranked = model.rank_defects(class_scores)
    embeddings = output.embedding.cpu().numpy()
    for inspection, scores, types, embedding in zip(
        inspections, class_scores.tolist(), ranked, embeddings, strict=True
    ):
        inspection.defect_types = types
        inspection.classifier_defect_types = types
        inspection.embedding = embedding
        inspection.class_scores = dict(zip(model.config.classes, scores, strict=True))
        inspection.trace.append(
            StageRun(
                CLASSIFIER,
                classifier.manifest.version,
                ms / len(images),
                {"defect_type": types[0][0], "score": types[0][1]},
            )
        )
    return class_scores


def validation_scores(
    model: torch.nn.Module, samples: Sequence[Sample], pick: Callable[[Any], torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """One score per validation image, and the binary truth.

    ``pick`` selects the score from ``model.predict``'s output; the images are
    :func:`~models.data.tensors.validation_dataset`'s.
    """
    loader = torch.utils.data.DataLoader(
        validation_dataset(samples, model.preprocessing), batch_size=16
    )
    scores, targets = predict_all(model, loader, lambda m, x: pick(m.predict(x)))
    return scores, targets > 0.5


def fit_decision(
    registry: ArtifactRegistry, samples: Sequence[Sample], category: str
) -> dict[str, Any]:
    """Fit and store a category's decision rule on its validation split.

    Uses the production detector and, when there is one, the production verifier.
    A validation split without defects is completed with synthetic ones, as in
    training, and the rule is then the detector-verifier ensemble
    (:func:`~models.decision.ensemble_rule`).

    Returns:
        The rule and its validation figures.
    """
    val = [s for s in samples if s.category == category and s.split == "val"]
    if not val:
        raise ValueError(f"category {category!r} has no validation images")
    detector = load_stage(registry, category, DETECTOR)
    probabilities, truth = validation_scores(detector.model, val, lambda out: out.probability)
    verifier_scores = None
    fitted_on = {"detector_version": detector.manifest.version}
    if VERIFIER in registry.stages(category):
        verifier = load_stage(registry, category, VERIFIER)
        verifier_scores, _ = validation_scores(verifier.model, val, lambda out: out.score)
        fitted_on["verifier_version"] = verifier.manifest.version
    if verifier_scores is not None and not any(s.is_anomalous for s in val):
        rule, figures = ensemble_rule(probabilities, verifier_scores, truth)
    else:
        rule, figures = fit_decision_rule(probabilities, verifier_scores, truth)
    manifest = save_decision(
        registry, category, rule, fitted_on=fitted_on, metrics=figures | {"n_val": len(truth)}
    )
    return {"category": category, "version": manifest.version, "rule": rule.to_dict(), **figures}
