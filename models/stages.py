"""The pipeline's stages by name: build from a config, load from the registry.

The registry keys artifacts by ``(category, stage)``. Stage models are
``detector``, ``verifier``, ``classifier``, ``reranker``, ``router`` and
``localizer`` (the router and the localizer are trained over all categories and
stored under :data:`ROUTER_CATEGORY`); ``decision`` holds the category's
:class:`~models.decision.DecisionRule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from models.artifacts import ArtifactError, ArtifactRegistry, Manifest
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.category_router import CategoryRouter, CategoryRouterConfig
from models.decision import DecisionRule
from models.defect_classifier import DefectClassifier, DefectClassifierConfig
from models.localizer import DefectLocalizer, DefectLocalizerConfig
from models.reranker import Reranker, RerankerConfig

DETECTOR, VERIFIER, ROUTER, DECISION = "detector", "verifier", "router", "decision"
CLASSIFIER, RERANKER = "classifier", "reranker"
ROUTER_CATEGORY = "all-categories"
LOCALIZER = "localizer"  # one DefectLocalizer for every category, under ROUTER_CATEGORY

STAGE_MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    DETECTOR: (AnomalyDetectorConfig, AnomalyDetector),
    VERIFIER: (AutoencoderVerifierConfig, AutoencoderVerifier),
    ROUTER: (CategoryRouterConfig, CategoryRouter),
    CLASSIFIER: (DefectClassifierConfig, DefectClassifier),
    RERANKER: (RerankerConfig, Reranker),
    LOCALIZER: (DefectLocalizerConfig, DefectLocalizer),
}
# Keys of an artifact's config that describe training, not the architecture.
TRAINING_KEYS = ("training", "hyperparameters")


class LoadedStage(NamedTuple):
    """A stage model ready for inference, with the manifest it came from."""

    model: nn.Module
    manifest: Manifest


def build_stage(stage: str, config: Mapping[str, Any], pretrained: bool = False) -> nn.Module:
    """Build a stage model from its config dict (as stored in an artifact)."""
    if stage not in STAGE_MODELS:
        raise ArtifactError(f"unknown stage {stage!r}; known: {sorted(STAGE_MODELS)}")
    config_type, model_type = STAGE_MODELS[stage]
    architecture = {k: v for k, v in config.items() if k not in TRAINING_KEYS}
    return model_type(config_type.from_dict(architecture), pretrained=pretrained)


def load_stage(
    registry: ArtifactRegistry,
    category: str,
    stage: str,
    ref: str = "production",
    device: str | torch.device = "cpu",
) -> LoadedStage:
    """Load a trained stage model in eval mode.

    Raises:
        ArtifactError: no such artifact, or weights that do not fit its config.
    """
    artifact = registry.load(category, stage, ref)
    model = build_stage(stage, artifact.manifest.config)
    try:
        model.load_state_dict(artifact.state_dict, strict=True)
    except RuntimeError as error:
        raise ArtifactError(
            f"{category}/{stage}: weights do not fit the config: {error}"
        ) from error
    model = model.to(device, memory_format=torch.channels_last).eval()
    return LoadedStage(model, artifact.manifest)


def save_decision(
    registry: ArtifactRegistry,
    category: str,
    rule: DecisionRule,
    *,
    fitted_on: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> Manifest:
    """Store a category's decision rule as its ``decision`` artifact (promoted)."""
    values = torch.tensor(list(rule.to_dict().values()), dtype=torch.float64)
    return registry.save(
        category,
        DECISION,
        {"rule": values},
        config={"rule": rule.to_dict(), **fitted_on},
        preprocessing={},
        data=dict(fitted_on),
        metrics=dict(metrics),
        promote=True,
    )


def load_decision(
    registry: ArtifactRegistry, category: str, ref: str = "production"
) -> tuple[DecisionRule, Manifest]:
    """A category's decision rule and its manifest."""
    artifact = registry.load(category, DECISION, ref)
    return DecisionRule.from_dict(artifact.manifest.config["rule"]), artifact.manifest
