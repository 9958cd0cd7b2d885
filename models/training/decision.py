"""Fitting a category's decision rule on its validation split (after its detector or verifier)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from models.artifacts import ArtifactRegistry
from models.data.sample import Sample
from models.data.tensors import predict_all, validation_dataset
from models.decision import DecisionRule, ensemble_rule, fit_decision_rule, fit_scorers
from models.drift import score_reference
from models.grading import Grading, fit_grading, graded_levels
from models.stages import CLASSIFIER, DETECTOR, MEMORY_BANK, VERIFIER, load_stage, save_decision


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

    Uses the production detector, memory bank and verifier the category has.
    The first-line score is chosen on validation (:func:`~models.decision.fit_scorers`)
    when both the detector and the memory bank are there and the split has real
    defects. A split without them is completed with synthetic defects, as in
    training; those are the very kind the detector learnt, so they cannot weigh
    it against the memory bank. The detector is then the first-line score (with
    the verifier, the detector-verifier ensemble,
    :func:`~models.decision.ensemble_rule`), as measured on the generator's
    MVTec-layout export: the ensemble's image AUROC 0.969 against the memory
    bank's 0.933 and every fusion's at most 0.958, and 0.993 once the detector
    learnt strokes and dents (docs/memory-bank.md). A
    category with a memory bank and no detector is judged by the memory bank.

    A category whose labels are graded levels (ELPV's defect probabilities) also
    gets its grading, fitted on the same validation parts' final scores and, where
    it has a classifier, weighed against the classifier's levels
    (:func:`~models.grading.fit_grading`).

    Returns:
        The rule and its validation figures.
    """
    val = [s for s in samples if s.category == category and s.split == "val"]
    if not val:
        raise ValueError(f"category {category!r} has no validation images")
    stages = registry.stages(category)
    real_defects = any(s.is_anomalous for s in val)
    fitted_on: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    truth = np.zeros(0, dtype=bool)
    for stage, pick in ((DETECTOR, "probability"), (MEMORY_BANK, "score")):
        if stage in stages:
            loaded = load_stage(registry, category, stage)
            scores[stage], truth = validation_scores(
                loaded.model, val, lambda out, pick=pick: getattr(out, pick)
            )
            fitted_on[f"{stage.replace('-', '_')}_version"] = loaded.manifest.version
    if not scores:
        raise ValueError(f"category {category!r} has neither a detector nor a memory bank")
    if len(scores) == 2 and real_defects:
        weights, figures["scorers"] = fit_scorers(scores[DETECTOR], scores[MEMORY_BANK], truth)
    elif DETECTOR in scores:
        weights = {"detector_weight": 1.0, "bank_weight": 0.0, "bank_bias": 0.0}
    else:
        weights = {"detector_weight": 0.0, "bank_weight": 1.0, "bank_bias": 0.0}
    first = DecisionRule(**weights).first_score(scores.get(DETECTOR), scores.get(MEMORY_BANK))
    verifier_scores = None
    if VERIFIER in stages:
        verifier = load_stage(registry, category, VERIFIER)
        verifier_scores, _ = validation_scores(verifier.model, val, lambda out: out.score)
        fitted_on["verifier_version"] = verifier.manifest.version
    if verifier_scores is not None and not real_defects:
        rule, fit = ensemble_rule(first, verifier_scores, truth)
    else:
        rule, fit = fit_decision_rule(first, verifier_scores, truth)
    rule = replace(rule, **weights)
    figures |= fit
    # The good validation parts' final scores: what drift is measured against.
    firsts = np.atleast_1d(first).tolist()
    verified = [None] * len(firsts) if verifier_scores is None else verifier_scores.tolist()
    finals = [rule.decide(p, v).anomaly_score for p, v in zip(firsts, verified, strict=True)]
    # The share judged defective among the real parts (synthetic defects are not
    # parts a line makes).
    judged = np.asarray(finals) >= 0.5
    real = np.ones_like(truth) if real_defects else ~truth
    reference = score_reference(
        (s for s, bad in zip(finals, truth, strict=True) if not bad),
        defective_share=float(judged[real].mean()),
    )
    grading = None
    graded = graded_levels(
        [(s.label, s.severity, s.is_anomalous) for s in samples if s.category == category]
    )
    if graded is not None:
        grading, figures["grading_fit"] = _fit_grading(registry, category, val, finals, *graded)
        if CLASSIFIER in stages:
            fitted_on["classifier_version"] = registry.manifest(category, CLASSIFIER).version
    manifest = save_decision(
        registry,
        category,
        rule,
        fitted_on=fitted_on,
        metrics=figures | {"n_val": len(truth), "drift_reference": reference},
        grading=grading,
    )
    answer = {"category": category, "version": manifest.version, "rule": rule.to_dict()}
    if grading is not None:
        answer["grading"] = grading.to_dict()
    return answer | figures


def _fit_grading(
    registry: ArtifactRegistry,
    category: str,
    val: Sequence[Sample],
    finals: Sequence[float],
    levels: Sequence[str],
    defective_from: int,
) -> tuple[Grading, dict[str, Any]]:
    """The grading of a graded category, with the classifier's levels where it has one."""
    class_scores = None
    if CLASSIFIER in registry.stages(category):
        classifier = load_stage(registry, category, CLASSIFIER)
        probabilities, _ = validation_scores(classifier.model, val, lambda out: out.scores)
        classes = classifier.model.config.classes
        class_scores = [dict(zip(classes, row.tolist(), strict=True)) for row in probabilities]
    return fit_grading(finals, [s.label for s in val], levels, defective_from, class_scores)
