"""The decision rule: the first-line score decides, except in its ambiguous band.

The first-line score ``p`` is the detector's probability, the memory bank's
calibrated score, or the two fused by logistic regression,
``p = sigmoid(a·logit(p_detector) + b·logit(p_bank) + c)`` (:meth:`DecisionRule.first_score`);
which of the three is chosen on validation (:func:`fit_scorers`).

Outside ``[lo, hi]`` the first-line score ``p`` decides alone (``p >=
threshold`` is defective). Inside, the verifier's calibrated score ``v`` is fused,
``f = w·p + (1 - w)·v``, and ``f >= fused_threshold`` is defective.

The final anomaly score is one scale for every image and every category: ``p`` is
mapped piecewise-linearly so that the category's threshold lands on 0.5, and an
in-band image's ``f`` is mapped into the band's part of that scale with its own
threshold on 0.5. So ``anomaly_score >= 0.5`` means defective everywhere, and
scores of different categories can be ranked together.

The band, the weight and both thresholds are chosen on validation data
(:func:`fit_decision_rule`) and stored in the ``decision`` artifact of the category.

A category whose validation split has no real defects (normal-only training) is
validated on synthetic anomalies, the very kind the detector was trained to find:
they cannot show where the detector is unsure about real defects, so no band can
be fitted. Its rule is an ensemble instead (:func:`ensemble_rule`): the band is the
whole range and the verifier, trained independently on good parts only, is averaged
with the detector for every part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

DETECTOR = "detector"
VERIFIER = "verifier"
MEMORY_BANK = "memory-bank"
FUSED = f"{DETECTOR}+{MEMORY_BANK}"


class Decision(NamedTuple):
    """The verdict on one part."""

    defective: bool
    anomaly_score: float
    decided_by: str


@dataclass(frozen=True)
class DecisionRule:
    """Thresholds and band for one category.

    Attributes:
        threshold: the detector alone calls ``p >= threshold`` defective.
        lo: lower edge of the ambiguous band (``lo == hi``: no band, no verifier).
        hi: upper edge.
        fusion_weight: the first-line score's weight ``w`` in the in-band fused score.
        fused_threshold: the fused score from which an in-band part is defective.
        detector_weight: the detector's logit weight in the first-line score (0:
            the detector is not needed).
        bank_weight: the memory bank's logit weight in it (0: the detector's
            probability is the first-line score as it is).
        bank_bias: the intercept of the first-line fusion.
    """

    threshold: float = 0.5
    lo: float = 0.5
    hi: float = 0.5
    fusion_weight: float = 1.0
    fused_threshold: float = 0.5
    detector_weight: float = 1.0
    bank_weight: float = 0.0
    bank_bias: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lo <= self.threshold <= self.hi <= 1.0:
            raise ValueError(f"need 0 <= lo <= threshold <= hi <= 1, got {self}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if self.detector_weight < 0 or self.bank_weight < 0:
            raise ValueError(
                f"the first-line weights must be >= 0, got detector {self.detector_weight} "
                f"and memory bank {self.bank_weight}"
            )
        if self.detector_weight == 0 and self.bank_weight == 0:
            raise ValueError("the first-line score needs the detector, the memory bank or both")

    @property
    def uses_detector(self) -> bool:
        """Whether the first-line score needs the detector's probability."""
        return self.detector_weight > 0

    @property
    def uses_bank(self) -> bool:
        """Whether the first-line score needs the memory bank's score."""
        return self.bank_weight > 0

    @property
    def scorer(self) -> str:
        """What the first-line score is: ``detector``, ``memory-bank`` or both fused."""
        if not self.uses_bank:
            return DETECTOR
        return FUSED if self.uses_detector else MEMORY_BANK

    def first_score(self, detector: Any, bank: Any = None) -> Any:
        """The score the threshold and the band apply to, of one part or of arrays of them.

        Raises:
            ValueError: a score the rule needs is missing.
        """
        if self.uses_detector and detector is None:
            raise ValueError("the rule needs the detector's probability")
        if not self.uses_bank:
            score = np.asarray(detector, dtype=np.float64)
        elif bank is None:
            raise ValueError("the rule needs the memory bank's score")
        else:
            z = self.bank_weight * _logit(bank) + self.bank_bias
            if self.uses_detector:
                z = z + self.detector_weight * _logit(detector)
            score = 1.0 / (1.0 + np.exp(-z))
        return float(score) if np.ndim(score) == 0 else score

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionRule:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(v) for k, v in data.items()})

    def needs_verifier(self, probability: float) -> bool:
        """Whether the first-line score falls in the ambiguous band."""
        return self.lo < self.hi and self.lo <= probability <= self.hi

    def decide(self, probability: float, verifier_score: float | None = None) -> Decision:
        """The verdict for a first-line score and, in the band, the verifier's score.

        Raises:
            ValueError: the score is in the band but no verifier score is given.
        """
        if not self.needs_verifier(probability):
            score = _centre(probability, self.threshold)
            return Decision(probability >= self.threshold, score, self.scorer)
        if verifier_score is None:
            raise ValueError(f"probability {probability:.3f} is in the band: need a verifier score")
        fused = self.fusion_weight * probability + (1.0 - self.fusion_weight) * verifier_score
        low, high = _centre(self.lo, self.threshold), _centre(self.hi, self.threshold)
        # Where 0.5 falls inside the band's stretch of the final scale.
        middle = (0.5 - low) / (high - low) if high > low else 0.5
        score = low + (high - low) * _centre(fused, self.fused_threshold, middle)
        return Decision(fused >= self.fused_threshold, score, VERIFIER)


def _logit(p: float | np.ndarray, eps: float = 1e-6) -> float | np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _centre(value: float, threshold: float, target: float = 0.5) -> float:
    """Map [0, 1] onto [0, 1] piecewise-linearly, sending ``threshold`` to ``target``."""
    value = min(1.0, max(0.0, float(value)))
    if value < threshold:
        return target * value / threshold
    if threshold >= 1.0:
        return 1.0
    return target + (1.0 - target) * (value - threshold) / (1.0 - threshold)


def best_threshold(scores: np.ndarray, truth: np.ndarray, default: float) -> float:
    """The cut maximising accuracy; among equals, the one nearest ``default``."""
    candidates = np.unique(np.concatenate([[default], scores, np.nextafter(scores, 2.0)]))
    candidates = candidates[(candidates >= 0.0) & (candidates <= 1.0)]
    accuracy = np.array([((scores >= c) == truth).mean() for c in candidates])
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - default))]])


def fit_decision_rule(
    probabilities: Sequence[float],
    verifier_scores: Sequence[float] | None,
    is_anomalous: Sequence[bool],
    max_call_rate: float = 0.3,
    call_cost: float = 0.02,
) -> tuple[DecisionRule, dict[str, float]]:
    """Choose the threshold, the band and the fusion on validation data.

    The detector threshold maximises validation accuracy. The band is then the
    ``[lo, hi]`` around it (edges at quantiles of the validation probabilities,
    covering at most ``max_call_rate`` of the images) and the fusion weight and
    fused threshold that maximise validation accuracy minus ``call_cost`` per unit
    of verifier call rate, so the band widens only when the verifier earns it.

    Args:
        probabilities: the detector's probability per validation image.
        verifier_scores: the verifier's calibrated score per image, or None when the
            category has no verifier (the rule then has no band).
        is_anomalous: the binary truth.
        max_call_rate: the largest share of images the verifier may see.
        call_cost: accuracy given up per unit of call rate.

    Returns:
        ``(rule, fit_metrics)`` with the validation accuracy of the detector alone
        and of the rule, and the rule's call rate.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(is_anomalous, dtype=bool)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need as many labels as probabilities, got {y.shape} and {p.shape}")
    threshold = best_threshold(p, y, 0.5)
    detector_accuracy = float(((p >= threshold) == y).mean())
    rule = DecisionRule(threshold=threshold, lo=threshold, hi=threshold)
    best = (detector_accuracy, 0.0)
    if verifier_scores is not None and y.any() and not y.all():
        v = np.asarray(verifier_scores, dtype=np.float64)
        edges = np.quantile(p, np.linspace(0.0, 1.0, 21))
        for lo in np.unique(np.clip(edges[edges <= threshold], 0.0, threshold)):
            for hi in np.unique(np.clip(edges[edges >= threshold], threshold, 1.0)):
                band = (p >= lo) & (p <= hi)
                call_rate = float(band.mean())
                if hi <= lo or not band.any() or call_rate > max_call_rate:
                    continue
                outside = ((p >= threshold) == y)[~band].sum()
                for w in (0.0, 0.25, 0.5, 0.75):
                    fused = w * p[band] + (1.0 - w) * v[band]
                    cut = best_threshold(fused, y[band], 0.5)
                    accuracy = float((outside + ((fused >= cut) == y[band]).sum()) / y.size)
                    if accuracy - call_cost * call_rate > best[0] - call_cost * best[1] + 1e-9:
                        best = (accuracy, call_rate)
                        rule = DecisionRule(threshold, float(lo), float(hi), w, cut)
    return rule, {
        "val_accuracy_detector": detector_accuracy,
        "val_accuracy_rule": best[0],
        "val_call_rate": best[1],
    }


def ensemble_rule(
    probabilities: Sequence[float],
    verifier_scores: Sequence[float],
    is_anomalous: Sequence[bool],
) -> tuple[DecisionRule, dict[str, float]]:
    """The rule of a category validated only on synthetic anomalies.

    Every part is verified and the two scores are averaged with equal weight: the
    weight cannot be fitted on anomalies the detector was trained on, since there
    the detector always looks perfect. The detector's threshold and the fused
    threshold still maximise validation accuracy.

    Returns:
        ``(rule, fit_metrics)`` with the same keys as :func:`fit_decision_rule`.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    v = np.asarray(verifier_scores, dtype=np.float64)
    y = np.asarray(is_anomalous, dtype=bool)
    if not p.shape == v.shape == y.shape or p.size == 0:
        raise ValueError(
            f"need one verifier score and label per probability, "
            f"got {v.shape}, {y.shape} and {p.shape}"
        )
    threshold = best_threshold(p, y, 0.5)
    fused = 0.5 * p + 0.5 * v
    cut = best_threshold(fused, y, 0.5)
    rule = DecisionRule(threshold, 0.0, 1.0, 0.5, cut)
    return rule, {
        "val_accuracy_detector": float(((p >= threshold) == y).mean()),
        "val_accuracy_rule": float(((fused >= cut) == y).mean()),
        "val_call_rate": 1.0,
    }


def fit_scorers(
    detector: Sequence[float],
    bank: Sequence[float],
    is_anomalous: Sequence[bool],
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Choose the first-line score on validation: the detector, the memory bank, or both fused.

    Each candidate is judged by its cross-validated accuracy: its threshold (and
    the fusion's logistic regression on the two logits) fitted on the other
    folds, scored on the held-out one. The best wins; on a tie within one image,
    the simpler (the detector, then the memory bank, then the fusion).

    Args:
        detector: the detector's probability per validation image.
        bank: the memory bank's calibrated score per image.
        is_anomalous: the binary truth (real defects).
        folds: cross-validation folds (fewer when a class is smaller).
        seed: the folds' shuffle.

    Returns:
        ``(weights, figures)``: the :class:`DecisionRule` fields
        ``detector_weight``, ``bank_weight`` and ``bank_bias``; the candidates'
        cross-validated accuracies, validation AUROCs and the choice.
    """
    from sklearn.model_selection import StratifiedKFold

    from models.metrics import image_auroc

    p, b = np.asarray(detector, dtype=np.float64), np.asarray(bank, dtype=np.float64)
    y = np.asarray(is_anomalous, dtype=bool)
    if not p.shape == b.shape == y.shape or p.size == 0:
        raise ValueError(f"need one score of each and a label per image, got {p.shape}, {b.shape}")
    features = np.stack([_logit(p), _logit(b)], axis=1)
    candidates = {
        DETECTOR: lambda train: (1.0, 0.0, 0.0),
        MEMORY_BANK: lambda train: (0.0, 1.0, 0.0),
        FUSED: lambda train: _logistic(features[train], y[train]),
    }

    def scores(weights: tuple[float, float, float]) -> np.ndarray:
        a, w, c = weights
        return DecisionRule(detector_weight=a, bank_weight=w, bank_bias=c).first_score(p, b)

    n_folds = min(folds, int(y.sum()), int((~y).sum()))
    splits = (
        list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(features, y))
        if n_folds >= 2
        else [(np.arange(y.size), np.arange(y.size))]  # too few of a class: judged in-sample
    )
    figures: dict[str, Any] = {"folds": len(splits)}
    accuracy = {}
    for name, fit in candidates.items():
        right = 0
        for train, held in splits:
            score = scores(fit(train))
            cut = best_threshold(score[train], y[train], 0.5)
            right += int(((score[held] >= cut) == y[held]).sum())
        accuracy[name] = right / sum(len(held) for _, held in splits)
        figures[f"cv_accuracy_{name}"] = accuracy[name]
    chosen = DETECTOR
    for name in (MEMORY_BANK, FUSED):  # a more complex choice must win by more than one image
        if accuracy[name] > accuracy[chosen] + 1.0 / y.size:
            chosen = name
    fitted = {name: fit(np.arange(y.size)) for name, fit in candidates.items()}
    figures["chosen"] = chosen
    figures |= {f"val_auroc_{name}": image_auroc(y, scores(w)) for name, w in fitted.items()}
    weights = fitted[chosen]
    return dict(zip(("detector_weight", "bank_weight", "bank_bias"), weights, strict=True)), figures


def _logistic(features: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Logistic regression of the truth on the two logits; a negative weight is dropped."""
    from sklearn.linear_model import LogisticRegression

    if y.all() or not y.any():
        return (0.5, 0.5, 0.0)
    fit = LogisticRegression(C=1.0).fit(features, y)
    a, b = (max(0.0, float(w)) for w in fit.coef_[0])
    if a == 0.0 and b == 0.0:
        return (0.5, 0.5, 0.0)
    return (a, b, float(fit.intercept_[0]))
