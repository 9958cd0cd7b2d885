"""The inspection's stages, each declared once: the registry everything else reads.

A :class:`Stage` names a model family (its config dataclass and ``nn.Module``),
whether one model serves every category, the Ray Serve deployment that serves
it, and what ``train all`` needs to train it. The CLI's stage choices,
``train all``'s order, the training families (:mod:`models.training`), the Serve
deployments (:mod:`deployments.stages`), the serving YAML's keys and the
KubeRay renderer all read :data:`STAGES`, as timm's ``create_model`` reads the
models its ``register_model`` entries declare.

The registry keys artifacts by ``(category, stage)``; shared stages (the router
and the localizer) are stored under :data:`SHARED_CATEGORY`, and ``decision``
holds a category's :class:`~models.decision.DecisionRule`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

# This module is read when the command line is parsed: torch and the model
# families load only when a stage is built or loaded.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from models.artifacts import ArtifactRegistry, Manifest
    from models.decision import DecisionRule
    from models.grading import Grading

DETECTOR, VERIFIER, ROUTER, DECISION = "detector", "verifier", "router", "decision"
CLASSIFIER, RERANKER, LOCALIZER = "classifier", "reranker", "localizer"
MEMORY_BANK = "memory-bank"
SHARED_CATEGORY = "all-categories"  # where the stages trained over every category live
# Keys of an artifact's config that describe training, not the architecture.
TRAINING_KEYS = ("training", "hyperparameters")

Needs = Literal["always", "labelled-defects", "boxes"]


@dataclass(frozen=True)
class Stage:
    """One stage of the inspection.

    Attributes:
        name: its key everywhere: artifacts, traces, ``serving.yaml``, the CLI.
        family: ``module:ModelClass`` of its ``nn.Module``; the config dataclass
            is ``ModelClassConfig`` in the same module.
        shared: one model for every category (stored under :data:`SHARED_CATEGORY`).
        deployment: the name of the Ray Serve deployment that serves it; None
            for a stage the ingress runs itself (the category router).
        needs: what ``train all`` needs to train it: ``always``, a category's
            ``labelled-defects``, or annotated ``boxes``.
        sweepable: whether ``inspectray tune`` sweeps it (a stage fitted without
            gradients, the memory bank, has no learning rate to sweep).
        exportable: whether its forward pass is exported to ONNX Runtime when a
            version is registered (:mod:`models.runtime`).
    """

    name: str
    family: str
    shared: bool = False
    deployment: str | None = None
    needs: Needs = "always"
    sweepable: bool = True
    exportable: bool = False

    @property
    def model_type(self) -> type[nn.Module]:
        """The model class (imported on first use)."""
        module, _, name = self.family.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def config_type(self) -> type:
        """The model's config dataclass."""
        module, _, name = self.family.partition(":")
        return getattr(importlib.import_module(module), f"{name}Config")


# In training order: the decision is refitted after the detector, the verifier and
# the memory bank (it uses the three); the reranker's
# fusion weight is fitted against the production classifier.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            ROUTER,
            "models.category_router:CategoryRouter",
            shared=True,
            sweepable=False,
            exportable=True,
        ),
        Stage(
            DETECTOR,
            "models.anomaly_detector:AnomalyDetector",
            deployment="AnomalyDetector",
            exportable=True,
        ),
        Stage(
            VERIFIER,
            "models.autoencoder_verifier:AutoencoderVerifier",
            deployment="AutoencoderVerifier",
            exportable=True,
        ),
        Stage(
            MEMORY_BANK,
            "models.memory_bank:MemoryBank",
            deployment="MemoryBank",
            sweepable=False,
            exportable=True,
        ),
        Stage(
            CLASSIFIER,
            "models.defect_classifier:DefectClassifier",
            deployment="DefectClassifier",
            needs="labelled-defects",
            exportable=True,
        ),
        Stage(
            RERANKER,
            "models.reranker:Reranker",
            deployment="Reranker",
            needs="labelled-defects",
            exportable=True,
        ),
        Stage(
            LOCALIZER,
            "models.localizer:DefectLocalizer",
            shared=True,
            deployment="DefectLocalizer",
            needs="boxes",
        ),
    )
}
CATEGORY_STAGES = tuple(name for name, stage in STAGES.items() if not stage.shared)
SHARED_STAGES = tuple(name for name, stage in STAGES.items() if stage.shared)
DEPLOYED_STAGES = tuple(name for name, stage in STAGES.items() if stage.deployment)
EXPORTABLE_STAGES = tuple(name for name, stage in STAGES.items() if stage.exportable)
RUNTIMES = ("torch", "onnxruntime")  # how a stage's network runs (models.runtime)


def stage(name: str) -> Stage:
    """The declared stage of that name.

    Raises:
        ArtifactError: no such stage.
    """
    if name not in STAGES:
        from models.artifacts import ArtifactError

        raise ArtifactError(f"unknown stage {name!r}; known: {list(STAGES)}")
    return STAGES[name]


class LoadedStage(NamedTuple):
    """A stage model ready for inference, with the manifest it came from.

    ``runtime``: the model's forward pass exported to a faster runtime
    (:mod:`models.runtime`), or None to run it in torch.
    """

    model: nn.Module
    manifest: Manifest
    runtime: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's forward pass, in its runtime."""
        if self.runtime is not None:
            return self.runtime(inputs)
        return self.model(inputs)


def build_stage(name: str, config: Mapping[str, Any], pretrained: bool = False) -> nn.Module:
    """Build a stage model from its config dict (as stored in an artifact)."""
    declared = stage(name)
    architecture = {k: v for k, v in config.items() if k not in TRAINING_KEYS}
    return declared.model_type(declared.config_type.from_dict(architecture), pretrained=pretrained)


def load_stage(
    registry: ArtifactRegistry,
    category: str,
    name: str,
    ref: str = "production",
    device: str | torch.device = "cpu",
    runtime: str = "torch",
    threads: int = 1,
) -> LoadedStage:
    """Load a trained stage model in eval mode.

    Args:
        registry: where it is.
        category: its category.
        name: its stage.
        ref: a version or an alias.
        device: where it runs.
        runtime: ``torch``, or ``onnxruntime`` for its exported forward pass
            when the version has one that passed its parity check (CPU only).
        threads: the exported runtime's threads.

    Raises:
        ArtifactError: no such artifact, weights that do not fit its config, or
            an exported model that does not match its record.
    """
    import torch

    from models.artifacts import ArtifactError
    from models.runtime import attach_runtime

    artifact = registry.load(category, name, ref)
    model = build_stage(name, artifact.manifest.config)
    try:
        model.load_state_dict(artifact.state_dict, strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"{category}/{name}: weights do not fit the config: {error}") from error
    model = model.to(device, memory_format=torch.channels_last).eval()
    on_cpu = torch.device(device).type == "cpu"
    exported = attach_runtime(registry, artifact.manifest, runtime, threads) if on_cpu else None
    return LoadedStage(model, artifact.manifest, exported)


def save_decision(
    registry: ArtifactRegistry,
    category: str,
    rule: DecisionRule,
    *,
    fitted_on: Mapping[str, Any],
    metrics: Mapping[str, Any],
    grading: Grading | None = None,
) -> Manifest:
    """Store a category's decision rule (and grading) as its ``decision`` artifact (promoted)."""
    import torch

    values = torch.tensor(list(rule.to_dict().values()), dtype=torch.float64)
    graded = {"grading": grading.to_dict()} if grading is not None else {}
    return registry.save(
        category,
        DECISION,
        {"rule": values},
        config={"rule": rule.to_dict(), **graded, **fitted_on},
        preprocessing={},
        data=dict(fitted_on),
        metrics=dict(metrics),
        promote=True,
    )


def load_decision(
    registry: ArtifactRegistry, category: str, ref: str = "production"
) -> tuple[DecisionRule, Manifest]:
    """A category's decision rule and its manifest."""
    from models.decision import DecisionRule

    artifact = registry.load(category, DECISION, ref)
    return DecisionRule.from_dict(artifact.manifest.config["rule"]), artifact.manifest
