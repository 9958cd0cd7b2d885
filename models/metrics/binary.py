"""Binary good/defective metrics from the verdicts (defective is the positive class)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BinaryCounts:
    """The confusion counts: true/false positives and negatives."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        """Number of images."""
        return self.tp + self.fp + self.tn + self.fn


def binary_counts(is_anomalous: Sequence[bool], predicted: Sequence[bool]) -> BinaryCounts:
    """Count the four outcomes."""
    if len(is_anomalous) != len(predicted):
        raise ValueError(f"{len(is_anomalous)} labels but {len(predicted)} predictions")
    pairs = list(zip((bool(t) for t in is_anomalous), (bool(p) for p in predicted), strict=True))
    return BinaryCounts(
        tp=sum(t and p for t, p in pairs),
        fp=sum(p and not t for t, p in pairs),
        tn=sum(not t and not p for t, p in pairs),
        fn=sum(t and not p for t, p in pairs),
    )


def binary_accuracy(counts: BinaryCounts) -> float:
    """Share of images judged correctly (NaN for no images)."""
    return (counts.tp + counts.tn) / counts.n if counts.n else math.nan


def binary_f1(counts: BinaryCounts) -> float:
    """F1 of the defective class; 0 when there is no true positive."""
    denominator = 2 * counts.tp + counts.fp + counts.fn
    return 2 * counts.tp / denominator if denominator else 0.0


def balanced_accuracy(counts: BinaryCounts) -> float:
    """Mean of the recall on defective and on good parts (over the classes present)."""
    recalls = []
    if counts.tp + counts.fn:
        recalls.append(counts.tp / (counts.tp + counts.fn))
    if counts.tn + counts.fp:
        recalls.append(counts.tn / (counts.tn + counts.fp))
    return sum(recalls) / len(recalls) if recalls else math.nan
