"""Score drift: do a category's recent answers still look like its validation parts?

A line changes under a model: a lamp ages, a lens gets dirty, a supplier changes
the material. The images drift away from what the model was validated on, and its
scores drift with them, long before anyone counts the wrong verdicts.

Each category's decision artifact stores the final anomaly scores of its good
validation parts (:func:`score_reference`). The service keeps a rolling window of
each category's recent scores (:class:`DriftMonitor`) and compares the two:

- **KS statistic** between the scores of the recent parts judged ok and those of
  the good validation parts below the threshold (both on the ok side of 0.5, so
  a line's defect rate, whatever it is, does not count as drift);
- **share judged defective**: when many more parts are judged defective than
  were among the validation parts, the line or the images have changed (darker,
  blurred), whatever the scores' shape.

A category *drifts* when its window holds enough parts and either figure is over
its limit. With too few good validation parts, only the share judged defective
is watched; without a stored reference, the category is not checked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.5  # the final score's verdict threshold, the same for every category
REFERENCE_POINTS = 201  # quantiles kept of the validation scores


def score_reference(good_scores: Iterable[float], defective_share: float = 0.0) -> dict[str, Any]:
    """The stored reference: quantiles of the good validation parts' final scores.

    Args:
        good_scores: the final anomaly scores of the good validation parts.
        defective_share: the share of all validation parts judged defective.
    """
    scores = np.sort(np.asarray(list(good_scores), dtype=np.float64))
    n_good = int(scores.size)
    if n_good > REFERENCE_POINTS:
        scores = np.quantile(scores, np.linspace(0.0, 1.0, REFERENCE_POINTS))
    return {
        "good_scores": [round(float(s), 6) for s in scores],
        "n_good": n_good,
        "defective_share": round(float(defective_share), 6),
    }


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the CDFs."""
    x, y = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if x.size == 0 or y.size == 0:
        raise ValueError("the KS statistic needs two non-empty samples")
    points = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, points, side="right") / x.size
    cdf_y = np.searchsorted(y, points, side="right") / y.size
    return float(np.max(np.abs(cdf_x - cdf_y)))


@dataclass(frozen=True)
class DriftLimits:
    """When a category is said to drift.

    Attributes:
        window: recent parts kept per category.
        min_parts: parts the window needs before any figure is judged.
        min_reference: good validation parts (judged ok) the KS statistic needs;
            with fewer, only the share judged defective is watched.
        max_ks: the KS statistic above which the ok parts' scores drifted.
        max_share_rise: how far the share judged defective may rise over the
            validation parts' before the line is said to drift.
    """

    window: int = 400
    min_parts: int = 50
    min_reference: int = 20
    max_ks: float = 0.35
    max_share_rise: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.min_parts <= self.window:
            raise ValueError(f"need 1 <= min_parts <= window, got {self}")
        if not (0 < self.max_ks <= 1 and 0 < self.max_share_rise <= 1):
            raise ValueError(f"max_ks and max_share_rise must be in (0, 1], got {self}")


class DriftMonitor:
    """Rolling windows of recent scores per category, judged against their references.

    Args:
        references: category → its stored reference (:func:`score_reference`);
            a category without one is not checked.
        limits: window and limits.
    """

    def __init__(
        self, references: Mapping[str, Mapping[str, Any]], limits: DriftLimits | None = None
    ) -> None:
        self.limits = limits or DriftLimits()
        self.references = {
            name: np.asarray(ref.get("good_scores", ()), dtype=np.float64)
            for name, ref in references.items()
            if ref
        }
        self.expected_share = {
            name: float(ref.get("defective_share", 0.0)) for name, ref in references.items() if ref
        }
        self._recent: dict[str, deque[float]] = {}

    def observe(self, category: str, anomaly_score: float) -> None:
        """Add one answer's final score to its category's window."""
        window = self._recent.get(category)
        if window is None:
            window = self._recent[category] = deque(maxlen=self.limits.window)
        window.append(float(anomaly_score))

    def status(self, category: str) -> dict[str, Any]:
        """The category's figures and whether it drifts (``reason`` says why, or why not)."""
        limits = self.limits
        scores = np.asarray(self._recent.get(category, ()), dtype=np.float64)
        reference = self.references.get(category)
        ok = scores[scores < THRESHOLD]
        status: dict[str, Any] = {
            "parts": int(scores.size),
            "defective_share": float(1.0 - ok.size / scores.size) if scores.size else None,
            "ks": None,
            "drifting": False,
            "reason": None,
        }
        if reference is None:
            status["reason"] = "not checked: no validation scores stored (refit its rule)"
            return status
        if scores.size < limits.min_parts:
            status["reason"] = f"collecting: {scores.size} of {limits.min_parts} parts"
            return status
        ok_reference = reference[reference < THRESHOLD]
        if ok.size >= limits.min_parts // 2 and ok_reference.size >= limits.min_reference:
            status["ks"] = ks_statistic(ok, ok_reference)
        share_limit = self.expected_share.get(category, 0.0) + limits.max_share_rise
        if status["defective_share"] > share_limit:
            status["drifting"] = True
            status["reason"] = (
                f"{status['defective_share']:.0%} of the last {scores.size} parts judged "
                f"defective (validation: {self.expected_share.get(category, 0.0):.0%}, "
                f"limit {share_limit:.0%})"
            )
        elif status["ks"] is not None and status["ks"] > limits.max_ks:
            status["drifting"] = True
            status["reason"] = (
                f"the ok parts' scores moved away from validation's: KS {status['ks']:.2f} "
                f"(limit {limits.max_ks:.2f})"
            )
        return status

    def report(self, categories: Iterable[str]) -> dict[str, dict[str, Any]]:
        """:meth:`status` of each category."""
        return {name: self.status(name) for name in categories}


__all__ = ["DriftLimits", "DriftMonitor", "ks_statistic", "score_reference"]
