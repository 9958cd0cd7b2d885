"""Fitting a category's decision rule on its validation split (after its detector or verifier)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from models.artifacts import ArtifactRegistry
from models.data.sample import Sample
from models.data.tensors import predict_all, validation_dataset
from models.decision import ensemble_rule, fit_decision_rule
from models.stages import DETECTOR, VERIFIER, load_stage, save_decision


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
