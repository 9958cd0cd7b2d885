"""Box-level metrics of a defect localizer, by the COCO protocol (pycocotools).

Average precision is COCO's: 101-point interpolated precision over recall, at IoU
0.50 (``map50``) and averaged over IoU 0.50:0.05:0.95 (``map50_95``), per class and
averaged over the classes that have ground truth, with at most 100 detections per
image; by object size it is COCO's small (area < 32²), medium (< 96²) and large,
with the area of the ground-truth box. Precision and recall are counted at one
IoU and one score threshold: detections above the threshold are matched, best
score first, to the unmatched ground-truth box of their class with the highest IoU.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AREA_RANGES = ("all", "small", "medium", "large")
MAX_DETECTIONS = 100


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image: its ground truth, or a model's detections.

    Attributes:
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` in the image's pixels.
        labels: class name of each box.
        scores: ``(N,)`` confidence of each detection (``None`` for ground truth).
    """

    boxes: np.ndarray
    labels: Sequence[str]
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(self.labels)} labels")
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(scores) != len(boxes):
                raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
            object.__setattr__(self, "scores", scores)


def _coco_ground_truth(ground_truth: Sequence[ImageBoxes], classes: Sequence[str]) -> COCO:
    images, annotations = [], []
    for image_id, image in enumerate(ground_truth, start=1):
        images.append({"id": image_id})
        for box, label in zip(image.boxes, image.labels, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": classes.index(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_detections(predictions: Sequence[ImageBoxes], classes: Sequence[str]) -> list[dict]:
    results = []
    for image_id, image in enumerate(predictions, start=1):
        assert image.scores is not None
        for box, label, score in zip(image.boxes, image.labels, image.scores, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": classes.index(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    return results


def _mean_ap(precision: np.ndarray) -> float:
    """Mean over the entries COCO computed (-1 marks a class without ground truth)."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``(N, 4)`` with every box of ``b`` ``(M, 4)``, xyxy."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_counts(
    ground_truth: ImageBoxes, predictions: ImageBoxes, iou_threshold: float, score_threshold: float
) -> dict[str, tuple[int, int, int]]:
    """Per class ``(tp, fp, fn)`` of one image's detections above ``score_threshold``."""
    assert predictions.scores is not None
    counts: dict[str, tuple[int, int, int]] = {}
    for name in set(ground_truth.labels) | set(predictions.labels):
        gt = ground_truth.boxes[[label == name for label in ground_truth.labels]]
        chosen = [
            i
            for i, (label, score) in enumerate(
                zip(predictions.labels, predictions.scores, strict=True)
            )
            if label == name and score >= score_threshold
        ]
        chosen.sort(key=lambda i: -predictions.scores[i])
        ious = _iou(predictions.boxes[chosen], gt) if chosen and len(gt) else None
        taken = np.zeros(len(gt), dtype=bool)
        tp = 0
        for row in range(len(chosen)):
            if ious is None:
                break
            candidates = np.where(~taken & (ious[row] >= iou_threshold), ious[row], -1.0)
            best = int(candidates.argmax())
            if candidates[best] >= 0:
                taken[best] = True
                tp += 1
        counts[name] = (tp, len(chosen) - tp, len(gt) - tp)
    return counts


def detection_metrics(
    ground_truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    classes: Sequence[str],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """COCO average precision, precision and recall of detections.

    Args:
        ground_truth: per image, its annotated boxes (images without boxes count:
            their detections are false positives).
        predictions: per image, in the same order, the detections with scores
            (keep low-scoring ones: AP sweeps over the scores).
        classes: every class name; AP is averaged over those with ground truth.
        iou_threshold: IoU at which precision and recall count a match.
        score_threshold: score a detection needs to count for precision and recall.

    Returns:
        ``map50``, ``map50_95``, ``map75``; ``ap50_per_class`` and
        ``ap50_95_per_class`` (``None`` for a class without ground truth);
        ``ap_by_size`` and ``ap50_by_size`` (small/medium/large, ``None`` without
        ground truth of that size); ``n_ground_truth_by_size``; ``precision``,
        ``recall`` (all classes pooled) and ``precision_recall_per_class`` at
        ``iou_threshold`` and ``score_threshold``; the counts.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(predictions)} predicted"
        )
    classes = list(classes)
    unknown = {lab for image in [*ground_truth, *predictions] for lab in image.labels} - set(
        classes
    )
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the classes {classes}")
    if any(image.scores is None for image in predictions):
        raise ValueError("every prediction needs scores")

    n_classes = len(classes)
    # precision[T, R, K, A]: IoU thresholds x recall points x classes x area ranges.
    precision = -np.ones((10, 101, n_classes, len(AREA_RANGES)))
    gt_coco = _coco_ground_truth(ground_truth, classes)
    detections = _coco_detections(predictions, classes)
    if gt_coco.dataset["annotations"]:
        if detections:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluation = COCOeval(gt_coco, gt_coco.loadRes(detections), iouType="bbox")
                evaluation.params.maxDets = [1, 10, MAX_DETECTIONS]
                evaluation.evaluate()
                evaluation.accumulate()
            precision = evaluation.eval["precision"][:, :, :, :, -1]
        else:
            # No detection at all: COCO would refuse the empty result; AP is 0
            # wherever there is ground truth.
            for k in range(n_classes):
                for a, area in enumerate(AREA_RANGES):
                    if _n_ground_truth(ground_truth, classes[k], area):
                        precision[:, :, k, a] = 0.0

    def optional(value: float) -> float | None:
        return None if math.isnan(value) else value

    ap50_per_class = {c: optional(_mean_ap(precision[0, :, k, 0])) for k, c in enumerate(classes)}
    ap_per_class = {c: optional(_mean_ap(precision[:, :, k, 0])) for k, c in enumerate(classes)}
    by_size = {
        area: optional(_mean_ap(precision[:, :, :, a])) for a, area in enumerate(AREA_RANGES)
    }
    by_size50 = {
        area: optional(_mean_ap(precision[0, :, :, a])) for a, area in enumerate(AREA_RANGES)
    }

    totals = np.zeros(3, dtype=int)
    per_class = {c: np.zeros(3, dtype=int) for c in classes}
    for truth, predicted in zip(ground_truth, predictions, strict=True):
        for name, counts in match_counts(truth, predicted, iou_threshold, score_threshold).items():
            per_class[name] += counts
            totals += counts

    def ratios(counts: np.ndarray) -> dict[str, float | None]:
        tp, fp, fn = (int(v) for v in counts)
        return {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    pooled = ratios(totals)
    map50, map50_95 = _mean_ap(precision[0, :, :, 0]), _mean_ap(precision[:, :, :, 0])
    return {
        "map50": 0.0 if math.isnan(map50) else map50,
        "map50_95": 0.0 if math.isnan(map50_95) else map50_95,
        "map75": optional(_mean_ap(precision[5, :, :, 0])),
        "ap50_per_class": ap50_per_class,
        "ap50_95_per_class": ap_per_class,
        "ap_by_size": {k: v for k, v in by_size.items() if k != "all"},
        "ap50_by_size": {k: v for k, v in by_size50.items() if k != "all"},
        "n_ground_truth_by_size": {
            area: _n_ground_truth(ground_truth, None, area) for area in AREA_RANGES[1:]
        },
        "precision": pooled["precision"],
        "recall": pooled["recall"],
        "tp": pooled["tp"],
        "fp": pooled["fp"],
        "fn": pooled["fn"],
        "precision_recall_per_class": {c: ratios(per_class[c]) for c in classes},
        "iou_threshold": iou_threshold,
        "score_threshold": score_threshold,
        "n_images": len(ground_truth),
        "n_ground_truth": int(sum(len(image.labels) for image in ground_truth)),
        "n_detections": int(sum(len(image.labels) for image in predictions)),
    }


def _n_ground_truth(ground_truth: Sequence[ImageBoxes], label: str | None, area: str) -> int:
    """Ground-truth boxes of a class (``None``: any) in a COCO area range."""
    low, high = {
        "all": (0.0, math.inf),
        "small": (0.0, 32.0**2),
        "medium": (32.0**2, 96.0**2),
        "large": (96.0**2, math.inf),
    }[area]
    count = 0
    for image in ground_truth:
        areas = (image.boxes[:, 2] - image.boxes[:, 0]) * (image.boxes[:, 3] - image.boxes[:, 1])
        for box_area, name in zip(areas, image.labels, strict=True):
            count += int((label is None or name == label) and low <= box_area < high)
    return count


def f1_at(
    ground_truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    threshold: float,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """F1, precision, recall (all classes pooled) and boxes per image at one score threshold."""
    tp = fp = fn = 0
    for truth, found in zip(ground_truth, predictions, strict=True):
        for t, f, n in match_counts(truth, found, iou_threshold, threshold).values():
            tp, fp, fn = tp + t, fp + f, fn + n
    return {
        "threshold": float(threshold),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "boxes_per_image": (tp + fp) / max(1, len(predictions)),
    }


def best_f1_threshold(
    ground_truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    iou_threshold: float = 0.5,
    candidates: int = 100,
) -> dict[str, float]:
    """The score threshold at which the detections' F1 is best (:func:`f1_at` there).

    Candidate thresholds are quantiles of the detections' scores; among equal
    F1s the highest threshold wins (fewer boxes, the same matches). Without any
    detection the threshold is 1.
    """
    found = [np.asarray(p.scores, dtype=np.float64) for p in predictions if p.scores is not None]
    scores = np.concatenate(found) if found else np.zeros(0)
    if scores.size == 0:
        return f1_at(ground_truth, predictions, 1.0, iou_threshold)
    best: dict[str, float] = {}
    for cut in np.unique(np.quantile(scores, np.linspace(0.0, 1.0, candidates))):
        at = f1_at(ground_truth, predictions, float(cut), iou_threshold)
        if not best or at["f1"] >= best["f1"]:
            best = at
    return best
