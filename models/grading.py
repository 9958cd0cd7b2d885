"""The grade of a part, for a category whose defects are graded (ELPV's four levels).

Experts grade each ELPV cell by its probability of being defective: 0 (good),
⅓, ⅔ or 1; a cell is defective from ⅔ on (⅓: still functional). A category
trained on such labels answers a ``grade`` beside its verdict. The verdict's own
cut is one of the grade's, so the two never disagree: a part judged ok is graded
good or ⅓, a part judged defective ⅔ or 1, read from one of two sources, chosen
on the category's validation split (:func:`fit_grading`):

- ``score``: the final anomaly score, cut at thresholds fitted on validation
  below and above the verdict's 0.5. The score orders the levels: ⅓ cells score
  between the good and the certain ones.
- ``classifier``: the defect classifier's most probable level on the verdict's side.

Measured on ELPV's fixed split (docs/elpv.md): the classifier's most probable
class over all four levels never answers ⅓ or ⅔ there (0.758-0.760 of the cells
graded right), where a detector's probability cut at fitted thresholds grades
0.788-0.790 with the models trained on balanced levels, and 0.723 with the
224 px ones; so neither source wins everywhere, and validation chooses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SCORE, CLASSIFIER = "score", "classifier"
SOURCES = (SCORE, CLASSIFIER)


@dataclass(frozen=True)
class Grading:
    """How a graded category grades its parts.

    Attributes:
        levels: the grades, lowest first.
        defective_from: the index of the lowest level a part judged defective can
            get (ELPV: ⅔; a ⅓ cell is still functional): the levels below are
            those of parts judged ok.
        cuts: ``len(levels) - 1`` increasing cuts on the final anomaly score, one
            between each two neighbouring levels; the verdict's own, 0.5, is
            ``cuts[defective_from - 1]``.
        source: ``score`` (the cuts grade) or ``classifier`` (its most probable
            level on the verdict's side grades; the cuts serve where it did not run).
    """

    levels: tuple[str, ...]
    defective_from: int
    cuts: tuple[float, ...]
    source: str = SCORE

    def __post_init__(self) -> None:
        n = len(self.levels)
        if n < 3 or len(set(self.levels)) != n:
            raise ValueError(f"grading needs three distinct levels or more, got {self.levels}")
        if not 1 <= self.defective_from <= n - 1:
            raise ValueError(f"defective_from must be in [1, {n - 1}], got {self.defective_from}")
        if len(self.cuts) != n - 1:
            raise ValueError(f"{n} levels need {n - 1} cuts, got {len(self.cuts)}")
        if any(c < 0.0 or c > 1.0 for c in self.cuts) or list(self.cuts) != sorted(self.cuts):
            raise ValueError(f"the cuts must increase within [0, 1], got {self.cuts}")
        if self.cuts[self.defective_from - 1] != 0.5:
            raise ValueError(f"the verdict's cut (0.5) must separate the levels, got {self.cuts}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    def grade(self, anomaly_score: float, class_scores: Mapping[str, float] | None = None) -> str:
        """The level of a part with this final score (and the classifier's class scores)."""
        if self.source == CLASSIFIER and class_scores:
            defective = anomaly_score >= 0.5
            side = (
                self.levels[self.defective_from :]
                if defective
                else self.levels[: self.defective_from]
            )
            return max(side, key=lambda level: class_scores.get(level, 0.0))
        return self.levels[int(np.searchsorted(self.cuts, anomaly_score, side="right"))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "levels": list(self.levels),
            "defective_from": self.defective_from,
            "cuts": list(self.cuts),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grading:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(str(x) for x in data["levels"]),
            int(data["defective_from"]),
            tuple(float(x) for x in data["cuts"]),
            str(data.get("source", SCORE)),
        )


def graded_levels(
    labelled: Sequence[tuple[str, float | None, bool]],
) -> tuple[tuple[str, ...], int] | None:
    """A category's levels, lowest first, and the index of its lowest defective one.

    From its parts' ``(label, severity, is_anomalous)``. None when it is not
    graded: a label without a severity, fewer than three levels, or defective
    levels that are not all above the others.
    """
    severity: dict[str, float] = {}
    defective: dict[str, bool] = {}
    for label, level, anomalous in labelled:
        if level is None:
            return None
        severity[label], defective[label] = float(level), bool(anomalous)
    levels = tuple(sorted(severity, key=severity.__getitem__))
    flags = [defective[level] for level in levels]
    if len(levels) < 3 or flags != sorted(flags) or all(flags) or not any(flags):
        return None
    return levels, flags.index(True)


def _assign(values: np.ndarray, right: np.ndarray, prefer_high: bool) -> np.ndarray:
    """Levels (column indices of ``right``) that never go down along ``values``, most right.

    ``right[g, k]``: parts of the ``g``-th distinct score whose level is ``k``.
    Dynamic programming; among equally good assignments, the higher levels win
    (``prefer_high``) or the lower ones.
    """

    def pick(row: np.ndarray) -> int:
        best = np.flatnonzero(row >= row.max())
        return int(best[-1] if prefer_high else best[0])

    best = np.zeros_like(right)  # best[g, k]: most right up to g, with g at level k
    best[0] = right[0]
    for g in range(1, len(values)):
        best[g] = right[g] + np.maximum.accumulate(best[g - 1])
    levels = np.zeros(len(values), dtype=np.int64)
    levels[-1] = pick(best[-1])
    for g in range(len(values) - 1, 0, -1):
        levels[g - 1] = pick(best[g - 1][: levels[g] + 1])
    return levels


def _side_cuts(
    scores: np.ndarray, truth: np.ndarray, n_levels: int, low: float, high: float, prefer_high: bool
) -> list[float]:
    """The ``n_levels - 1`` cuts within ``[low, high]`` between one side's levels.

    ``truth`` holds each part's level index on this side (out of range: right at none).
    """
    if n_levels == 1:
        return []
    values, group = np.unique(scores, return_inverse=True)
    if values.size == 0:
        return [high if prefer_high else low] * (n_levels - 1)
    right = np.zeros((values.size, n_levels))
    inside = (truth >= 0) & (truth < n_levels)
    np.add.at(right, (group[inside], truth[inside]), 1)
    levels = _assign(values, right, prefer_high)
    cuts = []
    for boundary in range(1, n_levels):
        first = np.flatnonzero(levels >= boundary)
        if first.size == 0:
            cuts.append(high)
        elif first[0] == 0:
            cuts.append(low)
        else:
            cuts.append(float((values[first[0] - 1] + values[first[0]]) / 2.0))
    return cuts


def _cut_accuracy(scores: np.ndarray, truth: np.ndarray, cuts: Sequence[float]) -> int:
    """How many parts the cuts grade right (``truth``: level indices)."""
    return int((np.searchsorted(np.asarray(cuts), scores, side="right") == truth).sum())


def fit_cuts(
    scores: Sequence[float], truth: Sequence[int], n_levels: int, defective_from: int
) -> tuple[float, ...]:
    """The cuts that grade the most validation parts right (exactly), 0.5 among them.

    The parts judged ok (score below 0.5) get the levels below ``defective_from``,
    those judged defective the others; on each side, in score order, levels that
    never go down. Dynamic programming over the distinct scores finds the
    assignment with the most right, and each cut falls midway between the last
    score of a level and the first of the next. Among equally good ones, the
    levels farthest from the verdict win (on ELPV most cells are good or certain).
    ``truth`` holds level indices.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.int64)
    if s.shape != y.shape:
        raise ValueError(f"need one level per score, got {y.shape} and {s.shape}")
    ok = s < 0.5
    below = _side_cuts(s[ok], y[ok], defective_from, 0.0, 0.5, prefer_high=False)
    above = _side_cuts(
        s[~ok], y[~ok] - defective_from, n_levels - defective_from, 0.5, 1.0, prefer_high=True
    )
    return (*below, 0.5, *above)


def fit_grading(
    scores: Sequence[float],
    labels: Sequence[str],
    levels: Sequence[str],
    defective_from: int,
    class_scores: Sequence[Mapping[str, float]] | None = None,
) -> tuple[Grading, dict[str, Any]]:
    """Fit a category's grading on its validation parts.

    Args:
        scores: each part's final anomaly score (``>= 0.5``: judged defective).
        labels: each part's level.
        levels: the levels, lowest first.
        defective_from: the index of the lowest defective level.
        class_scores: each part's class probabilities from the classifier, when
            the category has one.

    Returns:
        ``(grading, figures)``: the figures hold the validation accuracy of each
        source and the one chosen. The classifier must grade more than one part
        more to be chosen (the score needs no second model).
    """
    index = {level: i for i, level in enumerate(levels)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the levels {list(levels)}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.array([index[label] for label in labels], dtype=np.int64)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"need one score per label, got {s.shape} and {y.shape}")
    cuts = fit_cuts(s, y, len(levels), defective_from)
    by_score = Grading(tuple(levels), defective_from, cuts)
    figures: dict[str, Any] = {"n_val": int(y.size)}
    by_cuts = _cut_accuracy(s, y, cuts)
    figures["val_accuracy_score"] = by_cuts / y.size
    chosen = by_score
    if class_scores is not None:
        by_classifier = Grading(tuple(levels), defective_from, cuts, CLASSIFIER)
        right = sum(
            by_classifier.grade(score, scores_of) == label
            for score, scores_of, label in zip(s, class_scores, labels, strict=True)
        )
        figures["val_accuracy_classifier"] = right / y.size
        if right > by_cuts + 1:
            chosen = by_classifier
    figures["chosen"] = chosen.source
    return chosen, figures
