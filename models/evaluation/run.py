"""Evaluate the InspectionPipeline on a dataset split: records and metrics.

The same pipeline object serving uses judges every test image; the metrics are
computed from its verdicts and final scores, overall and per category.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from models.data import Dataset, Sample
from models.evaluation.localizer_eval import localizer_metrics
from models.evaluation.records import ImageRecord
from models.metrics import (
    balanced_accuracy,
    binary_accuracy,
    binary_counts,
    binary_f1,
    image_auroc,
)
from models.pipeline import CLASSIFY_ALL, InspectionPipeline
from models.stages import VERIFIER


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def binary_metrics(records: Sequence[ImageRecord], thresholds: dict[str, float]) -> dict[str, Any]:
    """The binary metrics of a group of records.

    Args:
        records: the images of the group.
        thresholds: category → the detector's own threshold, to tell what the
            detector alone would have said about the images the verifier saw.
    """
    truth = [r.is_anomalous for r in records]
    counts = binary_counts(truth, [r.predicted_anomalous for r in records])
    band = [r for r in records if r.decided_by == VERIFIER]
    metrics: dict[str, Any] = {
        "n_images": len(records),
        "n_anomalous": sum(truth),
        "image_auroc": _finite(image_auroc(truth, [r.anomaly_score for r in records])),
        "binary_accuracy": binary_accuracy(counts),
        "binary_f1": binary_f1(counts),
        "balanced_accuracy": balanced_accuracy(counts),
        "verifier_call_rate": len(band) / len(records) if records else 0.0,
        "detector_auroc": _finite(image_auroc(truth, [r.detector_probability for r in records])),
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
        "band_n_images": len(band),
    }
    if band:
        alone = [(r.detector_probability >= thresholds[r.category]) == r.is_anomalous for r in band]
        fused = [r.predicted_anomalous == r.is_anomalous for r in band]
        metrics["band_accuracy_detector_alone"] = sum(alone) / len(band)
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
    image whose most probable class is its probability level.
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
    graded = [r for r in records if r.predicted_class is not None]
    if dataset == "elpv" and graded:
        metrics["four_class_accuracy"] = sum(r.predicted_class == r.label for r in graded) / len(
            graded
        )
    return metrics


def described_only(pipeline: InspectionPipeline) -> dict[str, set[str]]:
    """Per category, the ranked types no model was trained on (registered by description)."""
    found = {}
    for category, stages in pipeline.stages.items():
        if stages.reranker is None:
            continue
        trained = set(stages.reranker.model.config.defect_types)
        if stages.classifier is not None:
            trained |= set(stages.classifier.model.config.defect_types)
        found[category] = set(pipeline.defect_catalog(category).names) - trained
    return found


def evaluate(
    pipeline: InspectionPipeline,
    dataset: Dataset,
    split: str = "test",
    route: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[ImageRecord], dict[str, Any]]:
    """Run the pipeline over a split and score it.

    Args:
        pipeline: the loaded pipeline.
        dataset: the data; its categories must be in the pipeline.
        split: the split to judge.
        route: withhold each image's category so the router must name it (its
            accuracy is reported as ``router_accuracy``).
        batch_size: images per pipeline call.
        progress: print a progress line to stderr every batch.

    Returns:
        ``(records, metrics)``; metrics hold the overall figures, ``per_category``,
        when routing ``router_accuracy``, and with a localizer and annotated boxes
        ``localizer_map50``, ``localizer_map50_95`` and the full COCO figures
        under ``localizer``.
    """
    samples: list[Sample] = [
        s for s in dataset.samples if s.split == split and s.category in pipeline.stages
    ]
    missing = sorted(set(dataset.categories) - set(pipeline.stages))
    if not samples:
        raise ValueError(
            f"no {split} images of {dataset.name!r} in a category the pipeline knows "
            f"({pipeline.categories})"
        )
    records: list[ImageRecord] = []
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        given = [None if route else s.category for s in chunk]
        for sample, found in zip(
            chunk,
            # Every image is typed, so defect typing is scored on every true defect,
            # not only on those the detector caught.
            pipeline.inspect([s.load_image() for s in chunk], given, classify=CLASSIFY_ALL),
            strict=True,
        ):
            records.append(
                ImageRecord(
                    sample_id=sample.sample_id,
                    image_path=str(sample.image_path),
                    category=sample.category,
                    label=sample.label,
                    is_anomalous=sample.is_anomalous,
                    anomaly_score=found.anomaly_score,
                    verdict=found.verdict,
                    decided_by=found.decided_by,
                    detector_probability=found.detector_probability,
                    verifier_score=found.verifier_score,
                    routed_category=found.category if found.routed else None,
                    defect_type=found.defect_types[0][0] if found.defect_types else None,
                    classifier_defect_type=(
                        found.classifier_defect_types[0][0]
                        if found.classifier_defect_types
                        else None
                    ),
                    predicted_class=(
                        max(found.class_scores, key=found.class_scores.get)
                        if found.class_scores
                        else None
                    ),
                    embedding=(
                        tuple(found.embedding.tolist()) if found.embedding is not None else None
                    ),
                )
            )
        if progress:
            done = len(records)
            rate = done / (time.perf_counter() - started)
            print(f"eval {done}/{len(samples)} images ({rate:.1f} img/s)", file=sys.stderr)
    thresholds = {c: s.rule.threshold for c, s in pipeline.stages.items()}
    described = described_only(pipeline)
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
            "detector_threshold": stage.rule.threshold,
            "detector_band": [stage.rule.lo, stage.rule.hi],
        }
        for category, stage in sorted(pipeline.stages.items())
        if any(r.category == category for r in records)
    }
    boxed = [s for s in samples if s.boxes or not s.is_anomalous]
    if pipeline.localizer is not None and any(s.boxes for s in boxed):
        # Good images count too: every box drawn on one is a false positive.
        found = localizer_metrics(pipeline.localizer, boxed)
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
