"""COCO metrics of the registered DefectLocalizer on a split, in original-image pixels."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.data.sample import Sample
from models.metrics.detection import ImageBoxes, detection_metrics
from models.stages import LoadedStage

# AP sweeps the whole ranking: keep every candidate down to this score.
AP_SCORE_THRESHOLD = 0.01


def _ground_truth(sample: Sample) -> ImageBoxes:
    corners = [(x, y, x + w, y + h) for x, y, w, h in (box.xywh for box in sample.boxes)]
    return ImageBoxes(np.asarray(corners).reshape(-1, 4), [box.label for box in sample.boxes])


@torch.no_grad()
def localizer_metrics(
    localizer: LoadedStage,
    samples: Sequence[Sample],
    batch_size: int = 16,
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
) -> dict[str, Any]:
    """COCO metrics of a registered localizer on ``samples`` (e.g. the test split).

    Args:
        localizer: the loaded localizer.
        samples: the images to score, good ones included (their detections are
            false positives).
        batch_size: images per forward pass.
        iou_threshold: IoU of a match for precision and recall.
        score_threshold: score for precision and recall (default: the model's).

    Returns:
        :func:`~models.metrics.detection.detection_metrics`' result (``map50``,
        ``map50_95``, per-class AP, precision/recall, AP by size), plus
        ``map50_by_category``, the artifact ``version``, ``seconds_per_image`` and
        the boxes served per image (``boxes_per_image``, ``max_boxes_per_image``:
        those above the model's ``score_threshold`` after its suppression of duplicates).
    """
    model, manifest = localizer.model, localizer.manifest
    transform = model.preprocessing.transform()
    threshold = model.config.score_threshold if score_threshold is None else score_threshold
    truth, predicted = [], []
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = [sample.load_image() for sample in batch]
        pixels = torch.stack([transform(image) for image in images])  # (B, 3, S, S)
        sizes = [(image.height, image.width) for image in images]
        for sample, found in zip(
            batch, model.predict(pixels, AP_SCORE_THRESHOLD, image_sizes=sizes), strict=True
        ):
            truth.append(_ground_truth(sample))
            predicted.append(ImageBoxes(found.boxes.numpy(), found.labels, found.scores.numpy()))
    seconds = time.perf_counter() - started
    classes = model.config.defect_types
    metrics = detection_metrics(truth, predicted, classes, iou_threshold, threshold)
    by_category = {}
    for category in sorted({s.category for s in samples}):
        chosen = [i for i, s in enumerate(samples) if s.category == category]
        subset = detection_metrics(
            [truth[i] for i in chosen], [predicted[i] for i in chosen], classes
        )
        by_category[category] = subset["map50"]
    served = [int((p.scores >= threshold).sum()) for p in predicted if p.scores is not None]
    return metrics | {
        "score_threshold": threshold,
        "boxes_per_image": sum(served) / max(1, len(served)),
        "max_boxes_per_image": max(served, default=0),
        "map50_by_category": by_category,
        "version": manifest.version,
        "seconds_per_image": seconds / max(1, len(samples)),
    }
