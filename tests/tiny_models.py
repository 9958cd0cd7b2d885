"""Small real stage models (untrained, real architectures) and a registry of them.

The detector's head is set so its probability is known (weight 0, bias b gives
sigmoid(b) for every image); that decides whether the verifier must run, so
every answer of the flow is known without training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from models.artifacts import ArtifactRegistry, Manifest
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.category_router import CategoryRouter, CategoryRouterConfig
from models.decision import DecisionRule
from models.defect_classifier import DefectClassifier, DefectClassifierConfig
from models.descriptions import BUILTIN
from models.localizer import DefectLocalizer, DefectLocalizerConfig
from models.memory_bank import MemoryBank, MemoryBankConfig, calibrate
from models.reranker import Reranker, RerankerConfig
from models.stages import SHARED_CATEGORY, save_decision

SIZE = 64
# "sure": p = 0.95, outside the band. "unsure": p = 0.55, inside it.
PROBABILITIES = {"sure": 0.95, "unsure": 0.55}
BAND_RULE = DecisionRule(threshold=0.5, lo=0.4, hi=0.6, fusion_weight=0.0, fused_threshold=0.5)


def save(registry: ArtifactRegistry, category: str, stage: str, model: torch.nn.Module) -> Manifest:
    """Register ``model`` as the category's stage, promoted."""
    return registry.save(
        category,
        stage,
        model.state_dict(),
        config=model.config.to_dict(),
        preprocessing=model.preprocessing.to_dict(),
        data={},
        promote=True,
    )


def detector(probability: float) -> AnomalyDetector:
    """A detector that says ``probability`` for every image."""
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE), pretrained=False)
    with torch.no_grad():
        model.head[1].weight.zero_()
        model.head[1].bias.fill_(math.log(probability / (1 - probability)))
    return model


def add_exported_detector(registry: ArtifactRegistry, category: str) -> Manifest:
    """:func:`detector` (0.3) saved and exported to ONNX Runtime, checked on a few images."""
    from models.inspection.compute import batched_inputs
    from models.runtime import export_runtime

    manifest = save(registry, category, "detector", detector(0.3))
    model = detector(0.3)
    inputs = batched_inputs(model, random_images())
    assert export_runtime(registry, manifest, model, inputs)["accepted"]
    return manifest


def good_verifier() -> AutoencoderVerifier:
    """A verifier whose calibrated score is sigmoid(-5) for every image: good."""
    verifier = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE), pretrained=False)
    verifier.platt_a.fill_(0.0)
    verifier.platt_b.fill_(-5.0)
    return verifier


def band_registry(path: str) -> ArtifactRegistry:
    """ "sure" and "unsure" with detector, verifier and rule; a router that says "unsure"."""
    registry = ArtifactRegistry(path)
    for category, probability in PROBABILITIES.items():
        save(registry, category, "detector", detector(probability))
        save(registry, category, "verifier", good_verifier())
        save_decision(registry, category, BAND_RULE, fitted_on={}, metrics={})
    router = CategoryRouter(CategoryRouterConfig(tuple(PROBABILITIES), input_size=SIZE), False)
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.copy_(torch.tensor([0.0, 3.0]))  # always "unsure"
    save(registry, SHARED_CATEGORY, "router", router)
    return registry


def add_classifier(registry: ArtifactRegistry, category: str) -> Manifest:
    """A classifier of good, crack and scratch with fixed random prototypes."""
    classifier = DefectClassifier(
        DefectClassifierConfig(("good", "crack", "scratch"), ("crack", "scratch"), input_size=SIZE),
        pretrained=False,
    )
    torch.manual_seed(0)
    classifier.fit_prototypes(F.normalize(torch.randn(3, 128), dim=-1), torch.arange(3))
    return save(registry, category, "classifier", classifier)


def add_reranker(registry: ArtifactRegistry, category: str, fusion_weight: float) -> Manifest:
    """A reranker of crack and scratch (untrained towers)."""
    descriptions = [BUILTIN[name].to_dict() for name in ("crack", "scratch")]
    config = RerankerConfig(
        descriptions=descriptions, input_size=SIZE, embed_dim=32, fusion_weight=fusion_weight
    )
    return save(registry, category, "reranker", Reranker(config, pretrained=False))


def add_localizer(registry: ArtifactRegistry) -> Manifest:
    """A small untrained DEIMv2 localizer for every category (keeps 5 boxes an image)."""
    config = DefectLocalizerConfig(
        defect_types=("crack", "scratch"),
        input_size=SIZE,
        hidden_dim=32,
        decoder_layers=2,
        num_queries=10,
        num_denoising=4,
        max_detections=5,
        score_threshold=0.0,  # untrained: keep every candidate
        nms_iou=1.0,
    )
    return save(registry, SHARED_CATEGORY, "localizer", DefectLocalizer(config, pretrained=False))


def add_memory_bank(registry: ArtifactRegistry, category: str) -> Manifest:
    """An untrained-backbone memory bank that remembers the patches of :func:`random_images`.

    Its calibration maps the images' own distances (about 0) below 0.5: they are good.
    """
    bank = MemoryBank(MemoryBankConfig(input_size=SIZE, coreset_ratio=0.5), pretrained=False)
    transform = bank.preprocessing.transform()
    features = bank.embed(torch.stack([transform(image) for image in random_images()]))
    bank.fit(features.permute(0, 2, 3, 1).flatten(0, 2))
    raw = bank.predict(torch.stack([transform(image) for image in random_images()])).raw_score
    calibrate(bank, [*raw.tolist(), float(raw.max()) + 1.0])
    return save(registry, category, "memory-bank", bank)


def random_images(n: int = 3) -> list[Image.Image]:
    """``n`` noise images of 70 x 80 pixels."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)) for _ in range(n)]
