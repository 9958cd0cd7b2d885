"""Evaluate the inspection flow on a dataset split: records and metrics.

The flow serving runs judges every test image, with the plan serving loads
(pinned versions and rule overrides included); the metrics are computed from
its verdicts and final scores, overall and per category.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.backbone import Preprocessing
from models.data import Dataset, Sample
from models.evaluation.localizer_eval import localizer_metrics
from models.evaluation.records import ImageRecord
from models.inspection import Inspection, InspectionRequest, LocalInspector
from models.inspection.local import run_to_completion
from models.metrics import (
    balanced_accuracy,
    binary_accuracy,
    binary_counts,
    binary_f1,
    image_auroc,
)
from models.metrics.pixel import aupro, pixel_auroc
from models.stages import DETECTOR, LOCALIZER, MEMORY_BANK, RERANKER, VERIFIER


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def binary_metrics(records: Sequence[ImageRecord], thresholds: dict[str, float]) -> dict[str, Any]:
    """The binary metrics of a group of records.

    Args:
        records: the images of the group.
        thresholds: category → the first-line score's own threshold, to tell what
            it alone would have said about the images the verifier saw.
    """
    truth = [r.is_anomalous for r in records]
    counts = binary_counts(truth, [r.predicted_anomalous for r in records])
    band = [r for r in records if r.decided_by == VERIFIER]
    scored = {}  # each first-line score's AUROC over the images it scored
    for name, field in (("detector", "detector_probability"), ("memory_bank", "memory_bank_score")):
        known = [r for r in records if getattr(r, field) is not None]
        if known:
            values = [getattr(r, field) for r in known]
            scored[f"{name}_auroc"] = _finite(image_auroc([r.is_anomalous for r in known], values))
    metrics: dict[str, Any] = {
        "n_images": len(records),
        "n_anomalous": sum(truth),
        "image_auroc": _finite(image_auroc(truth, [r.anomaly_score for r in records])),
        "binary_accuracy": binary_accuracy(counts),
        "binary_f1": binary_f1(counts),
        "balanced_accuracy": balanced_accuracy(counts),
        "verifier_call_rate": len(band) / len(records) if records else 0.0,
        **scored,
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
        "band_n_images": len(band),
    }
    if band:
        alone = [(r.first_score >= thresholds[r.category]) == r.is_anomalous for r in band]
        fused = [r.predicted_anomalous == r.is_anomalous for r in band]
        metrics["band_accuracy_first_line_alone"] = sum(alone) / len(band)
        metrics["band_accuracy_with_verifier"] = sum(fused) / len(band)
    return metrics


def _confusions(pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Mistakes by kind, ``"true->predicted": count``, most frequent first."""
    counts = Counter(f"{truth}->{guess}" for truth, guess in pairs if truth != guess)
    return dict(counts.most_common())


def defect_type_metrics(
    records: Sequence[ImageRecord], dataset: str, described_only: Mapping[str, set[str]] = {}
) -> dict[str, Any]:
    """How well the pipeline names defects, over the records it typed.

    ``defect_type_top1`` counts truly anomalous images whose top-ranked defect
    type is their label (after reranking); ``defect_type_top1_classifier_only``
    is the same for the classifier's own ranking; the confusion counts list the
    mistakes of each. ``open_vocabulary_top1`` is ``defect_type_top1`` over the
    images of types known only by their description (``described_only``:
    category → types). ``four_class_accuracy`` (ELPV) is the share of every
    image whose grade, as the service answers it (:mod:`models.grading`), is its
    probability level; ``four_class_accuracy_classifier`` the share whose
    classifier's most probable class is (the figure before the service graded).
    """
    typed = [r for r in records if r.is_anomalous and r.defect_type is not None]
    metrics: dict[str, Any] = {"n_typed": len(typed)}
    if typed:
        metrics["defect_type_top1"] = sum(r.defect_type == r.label for r in typed) / len(typed)
        metrics["defect_type_confusions"] = _confusions([(r.label, r.defect_type) for r in typed])
    by_classifier = [r for r in typed if r.classifier_defect_type is not None]
    if by_classifier:
        metrics["defect_type_top1_classifier_only"] = sum(
            r.classifier_defect_type == r.label for r in by_classifier
        ) / len(by_classifier)
        metrics["defect_type_confusions_classifier_only"] = _confusions(
            [(r.label, r.classifier_defect_type) for r in by_classifier]
        )
    novel = [r for r in typed if r.label in described_only.get(r.category, ())]
    if novel:
        metrics["n_open_vocabulary"] = len(novel)
        metrics["open_vocabulary_top1"] = sum(r.defect_type == r.label for r in novel) / len(novel)
    if dataset == "elpv":
        for key, answer in (
            ("four_class_accuracy", "grade"),
            ("four_class_accuracy_classifier", "predicted_class"),
        ):
            graded = [r for r in records if getattr(r, answer) is not None]
            if graded:
                metrics[key] = sum(getattr(r, answer) == r.label for r in graded) / len(graded)
    return metrics


def described_only(inspector: LocalInspector) -> dict[str, set[str]]:
    """Per category, the types registered by description that no model was trained on."""
    found = {}
    for category, models in inspector.plan.categories.items():
        if models.has(RERANKER):
            names = set(inspector.registered_types(category))
            found[category] = names - models.trained_types
    return found


def record(sample: Sample, found: Inspection) -> ImageRecord:
    """What evaluation keeps of one judged test image."""
    ranking, classified = found.ranking, found.classified
    return ImageRecord(
        sample_id=sample.sample_id,
        image_path=str(sample.image_path),
        category=sample.category,
        label=sample.label,
        is_anomalous=sample.is_anomalous,
        anomaly_score=found.anomaly_score,
        verdict=found.verdict,
        decided_by=found.decided_by,
        detector_probability=found.detector_probability,
        memory_bank_score=found.memory_bank_score,
        first_score=found.first_score,
        verifier_score=found.verifier_score,
        routed_category=found.category if found.routed else None,
        defect_type=ranking[0].name if ranking else None,
        classifier_defect_type=classified.ranked[0].name if classified else None,
        predicted_class=classified.predicted_class if classified else None,
        grade=found.grade,
        embedding=tuple(classified.embedding.tolist()) if classified else None,
    )


class PixelScores:
    """A category's heatmaps and defect masks, in the heatmap model's input geometry."""

    def __init__(self) -> None:
        self.masks: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []
        self.sources: set[str] = set()

    def add(
        self,
        sample: Sample,
        image_size: tuple[int, int],
        found: Inspection,
        geometry: Preprocessing,
    ) -> None:
        """Keep one image's heatmap and its mask (all normal for a good image)."""
        mask = sample.load_mask()
        if mask is None:
            width, height = image_size
            mask = np.zeros((height, width), dtype=bool)
        self.masks.append(geometry.mask(mask))
        self.maps.append(np.asarray(found.heatmap, dtype=np.float32))
        self.sources.add(str(found.heatmap_source))

    def metrics(self) -> dict[str, Any]:
        """``pixel_auroc``, ``aupro`` (to 30 % FPR) and the heatmaps' source."""
        return {
            "pixel_auroc": _finite(pixel_auroc(self.masks, self.maps)),
            "aupro": _finite(aupro(self.masks, self.maps)),
            "heatmap_source": "+".join(sorted(self.sources)),
        }


def heatmap_geometry(inspector: LocalInspector, found: Inspection) -> Preprocessing:
    """The preprocessing of the model that drew an inspection's heatmap."""
    stage = MEMORY_BANK if found.heatmap_source == MEMORY_BANK else DETECTOR
    model_id = inspector.plan.categories[found.category].model_id(stage)
    return inspector.calls.model(stage, model_id).model.preprocessing


def evaluate(
    inspector: LocalInspector,
    dataset: Dataset,
    split: str = "test",
    route: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[ImageRecord], dict[str, Any]]:
    """Inspect a split through the inspection flow and score it.

    Every image is also typed when judged ok (the inspector's coverage should be
    :attr:`~models.inspection.flow.Coverage.TYPE_ALL`), so defect typing is
    scored on every true defect, caught or not, and every ELPV cell is graded;
    the served answer is the same whatever the coverage.

    Args:
        inspector: the flow over the models (its plan is what serves).
        dataset: the data; its categories without models are reported.
        split: the split to judge.
        route: withhold each image's category so the router must name it (its
            accuracy is reported as ``router_accuracy``).
        batch_size: images inspected together (each stage batches over them).
        progress: print a progress line to stderr every batch.

    Returns:
        ``(records, metrics)``; metrics hold the overall figures, ``per_category``
        (with ``pixel_auroc`` and ``aupro`` where the split has defect masks),
        when routing ``router_accuracy``, and with a localizer and annotated boxes
        ``localizer_map50``, ``localizer_map50_95`` and the full COCO figures
        under ``localizer``.
    """
    plan = inspector.plan
    samples: list[Sample] = [
        s for s in dataset.samples if s.split == split and s.category in plan.categories
    ]
    missing = sorted(set(dataset.categories) - set(plan.categories))
    if not samples:
        raise ValueError(
            f"no {split} images of {dataset.name!r} in a category with models "
            f"({inspector.categories})"
        )
    records: list[ImageRecord] = []
    started = time.perf_counter()
    # Categories with defect masks: every image's heatmap is scored against its mask.
    masked = {s.category for s in samples if s.mask_path is not None}
    pixels: dict[str, PixelScores] = {c: PixelScores() for c in sorted(masked)}

    async def judge() -> None:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            requests = [
                InspectionRequest(
                    s.load_image(), None if route else s.category, explain=s.category in masked
                )
                for s in chunk
            ]
            for sample, request, found in zip(
                chunk, requests, await inspector.inspect_all(requests), strict=True
            ):
                records.append(record(sample, found))
                if sample.category in pixels and found.heatmap is not None:
                    geometry = heatmap_geometry(inspector, found)
                    pixels[sample.category].add(sample, request.image.size, found, geometry)
            if progress:
                done = len(records)
                rate = done / (time.perf_counter() - started)
                print(f"eval {done}/{len(samples)} images ({rate:.1f} img/s)", file=sys.stderr)

    run_to_completion(judge())
    thresholds = {c: m.rule.threshold for c, m in plan.categories.items()}
    described = described_only(inspector)
    # The final anomaly score puts every category's decision threshold at 0.5.
    metrics: dict[str, Any] = {"dataset": dataset.name, "split": split, "threshold": 0.5}
    metrics |= binary_metrics(records, thresholds) | defect_type_metrics(
        records, dataset.name, described
    )
    metrics["per_category"] = {
        category: binary_metrics([r for r in records if r.category == category], thresholds)
        | defect_type_metrics(
            [r for r in records if r.category == category], dataset.name, described
        )
        | {
            "detector_threshold": models.rule.threshold,
            "detector_band": [models.rule.lo, models.rule.hi],
        }
        for category, models in sorted(plan.categories.items())
        if any(r.category == category for r in records)
    }
    for category, scores in pixels.items():
        if category in metrics["per_category"]:
            metrics["per_category"][category] |= scores.metrics()
    if pixels:
        found = [m["pixel_auroc"] for m in metrics["per_category"].values() if "pixel_auroc" in m]
        metrics["pixel_auroc_mean"] = sum(found) / len(found) if found else None
    boxed = [s for s in samples if s.boxes or not s.is_anomalous]
    if plan.localizer_id is not None and any(s.boxes for s in boxed):
        # Good images count too: every box drawn on one is a false positive.
        localizer = inspector.calls.model(LOCALIZER, plan.localizer_id)
        found = localizer_metrics(localizer, boxed)
        metrics["localizer_map50"] = found["map50"]
        metrics["localizer_map50_95"] = found["map50_95"]
        metrics["localizer"] = found
    if route:
        metrics["router_accuracy"] = sum(r.routed_category == r.category for r in records) / len(
            records
        )
    if missing:
        metrics["categories_without_models"] = missing
    metrics["seconds"] = time.perf_counter() - started
    return records, metrics
