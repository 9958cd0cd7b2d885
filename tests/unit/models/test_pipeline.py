"""InspectionPipeline routing, with real (small, untrained) models in a real registry.

The detector's head is set so its probability is known (weight 0, bias b gives
sigmoid(b) for every image); that decides whether the verifier must run.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from models.artifacts import ArtifactError, ArtifactRegistry
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.category_router import CategoryRouter, CategoryRouterConfig
from models.data.sample import Sample
from models.decision import DecisionRule
from models.defect_classifier import DefectClassifier, DefectClassifierConfig
from models.descriptions import BUILTIN
from models.localizer import DefectLocalizer, DefectLocalizerConfig
from models.pipeline import InspectionPipeline, fit_decision
from models.reranker import Reranker, RerankerConfig
from models.stages import ROUTER_CATEGORY, save_decision

SIZE = 64


def _save(registry, category, stage, model):
    registry.save(
        category,
        stage,
        model.state_dict(),
        config=model.config.to_dict(),
        preprocessing=model.preprocessing.to_dict(),
        data={},
        promote=True,
    )


def _detector(probability: float) -> AnomalyDetector:
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE), pretrained=False)
    with torch.no_grad():
        model.head[1].weight.zero_()
        model.head[1].bias.fill_(math.log(probability / (1 - probability)))
    return model


@pytest.fixture()
def registry(tmp_path):
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    rule = DecisionRule(threshold=0.5, lo=0.4, hi=0.6, fusion_weight=0.0, fused_threshold=0.5)
    # "sure": p = 0.95, outside the band. "unsure": p = 0.55, inside it.
    for category, probability in (("sure", 0.95), ("unsure", 0.55)):
        _save(registry, category, "detector", _detector(probability))
        verifier = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE), pretrained=False)
        verifier.platt_a.fill_(0.0)
        verifier.platt_b.fill_(-5.0)  # calibrated score sigmoid(-5): "good"
        _save(registry, category, "verifier", verifier)
        save_decision(registry, category, rule, fitted_on={}, metrics={})
    router = CategoryRouter(CategoryRouterConfig(("sure", "unsure"), input_size=SIZE), False)
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.copy_(torch.tensor([0.0, 3.0]))  # always "unsure"
    _save(registry, ROUTER_CATEGORY, "router", router)
    return registry


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)) for _ in range(3)]


def test_detector_decides_outside_the_band_and_verifier_is_not_called(registry, images):
    pipeline = InspectionPipeline.from_registry(registry)
    assert pipeline.categories == ["sure", "unsure"] and pipeline.router is not None
    results = pipeline.inspect(images, ["sure"] * 3)
    for result in results:
        assert result.verdict == "defective" and result.decided_by == "detector"
        assert result.verifier_score is None
        assert [run.stage for run in result.trace] == ["detector"]
        assert result.anomaly_score == pytest.approx(0.95, abs=1e-4)


def test_verifier_overrules_in_the_band(registry, images):
    pipeline = InspectionPipeline.from_registry(registry)
    results = pipeline.inspect(images, ["unsure"] * 3)
    for result in results:
        # The detector alone would say defective (0.55 >= 0.5); the verifier says good.
        assert result.verdict == "ok" and result.decided_by == "verifier"
        assert result.verifier_score == pytest.approx(1 / (1 + math.exp(5)), rel=1e-3)
        assert [run.stage for run in result.trace] == ["detector", "verifier"]
        assert 0.4 <= result.anomaly_score <= 0.6
        assert result.trace[0].version == "v1"


def test_images_without_category_are_routed(registry, images):
    pipeline = InspectionPipeline.from_registry(registry)
    results = pipeline.inspect(images, [None, "sure", None], explain=True)
    assert [r.category for r in results] == ["unsure", "sure", "unsure"]
    assert [r.routed for r in results] == [True, False, True]
    assert results[0].trace[0].stage == "router"
    assert results[0].heatmap.shape == (SIZE, SIZE)


def _add_classifier(registry, category):
    classifier = DefectClassifier(
        DefectClassifierConfig(("good", "crack", "scratch"), ("crack", "scratch"), input_size=SIZE),
        pretrained=False,
    )
    torch.manual_seed(0)
    classifier.fit_prototypes(F.normalize(torch.randn(3, 128), dim=-1), torch.arange(3))
    _save(registry, category, "classifier", classifier)


def test_defective_parts_get_ranked_defect_types(registry, images):
    _add_classifier(registry, "sure")
    _add_classifier(registry, "unsure")
    pipeline = InspectionPipeline.from_registry(registry)
    for result in pipeline.inspect(images, ["sure"] * 3):
        assert result.verdict == "defective"
        assert [name for name, _ in result.defect_types] in (
            ["crack", "scratch"],
            ["scratch", "crack"],
        )
        assert sum(score for _, score in result.defect_types) == pytest.approx(1.0)
        assert set(result.class_scores) == {"good", "crack", "scratch"}
        assert [run.stage for run in result.trace] == ["detector", "classifier"]
        assert result.trace[-1].output["defect_type"] == result.defect_types[0][0]
    # Parts judged ok are not typed, unless every image is asked for (evaluation).
    ok = pipeline.inspect(images, ["unsure"] * 3)
    assert all(r.verdict == "ok" and not r.defect_types and r.class_scores is None for r in ok)
    graded = pipeline.inspect(images, ["unsure"] * 3, classify="all")
    assert all(r.verdict == "ok" and len(r.defect_types) == 2 for r in graded)
    with pytest.raises(ValueError, match="classify"):
        pipeline.inspect(images, ["sure"] * 3, classify="some")


def _add_reranker(registry, category, fusion_weight):
    descriptions = [BUILTIN[name].to_dict() for name in ("crack", "scratch")]
    config = RerankerConfig(
        descriptions=descriptions, input_size=SIZE, embed_dim=32, fusion_weight=fusion_weight
    )
    _save(registry, category, "reranker", Reranker(config, pretrained=False))


def test_the_reranker_reorders_and_ranks_types_known_only_by_description(registry, images):
    _add_classifier(registry, "sure")
    _add_reranker(registry, "sure", fusion_weight=1.0)
    pipeline = InspectionPipeline.from_registry(registry)
    assert pipeline.stages["sure"].reranker is not None
    # Weight 1: the classifier's order is kept.
    for result in pipeline.inspect(images, ["sure"] * 3):
        assert [run.stage for run in result.trace] == ["detector", "classifier", "reranker"]
        assert [n for n, _ in result.defect_types] == [n for n, _ in result.classifier_defect_types]
        assert result.trace[-1].output["classifier_defect_type"] == result.defect_types[0][0]
    # A type registered with words only: the classifier abstains, CLIP scores it.
    pipeline.register_description("sure", BUILTIN["perforation"])
    assert pipeline.defect_catalog("sure").names == ("crack", "scratch", "perforation")
    reranker = pipeline.stages["sure"].reranker.model
    texts = reranker.type_embeddings(pipeline.defect_catalog("sure"))
    transform = reranker.preprocessing.transform()
    clip = reranker.text_probabilities(torch.stack([transform(i) for i in images]), texts)
    for result, row in zip(pipeline.inspect(images, ["sure"] * 3), clip, strict=True):
        scores = dict(result.defect_types)
        assert set(scores) == {"crack", "scratch", "perforation"}
        known = dict(result.classifier_defect_types)
        raw = [known["crack"], known["scratch"], float(row[2])]
        expected = torch.tensor(raw) / sum(raw)
        got = torch.tensor([scores["crack"], scores["scratch"], scores["perforation"]])
        assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ArtifactError, match="no reranker"):
        pipeline.register_description("unsure", BUILTIN["perforation"])
    with pytest.raises(ArtifactError, match="unknown category"):
        pipeline.register_description("nope", BUILTIN["perforation"])


def _add_localizer(registry):
    """A small untrained DEIMv2 localizer for every category."""
    config = DefectLocalizerConfig(
        defect_types=("crack", "scratch"),
        input_size=SIZE,
        hidden_dim=32,
        decoder_layers=2,
        num_queries=10,
        num_denoising=4,
        max_detections=5,
        score_threshold=0.0,  # untrained: keep every candidate
    )
    _save(registry, ROUTER_CATEGORY, "localizer", DefectLocalizer(config, pretrained=False))


def test_boxes_locate_the_defects_of_defective_parts_only(registry, images):
    with pytest.raises(ArtifactError, match="no localizer"):
        InspectionPipeline.from_registry(registry).inspect(images, ["sure"] * 3, boxes=True)
    _add_localizer(registry)
    pipeline = InspectionPipeline.from_registry(registry)
    found = pipeline.inspect(images, ["sure"] * 3, boxes=True)
    for image, result in zip(images, found, strict=True):
        assert len(result.boxes) == 5 and result.trace[-1].stage == "localizer"
        scores = [score for _, score, _ in result.boxes]
        assert scores == sorted(scores, reverse=True)
        for label, _, (x0, y0, x1, y1) in result.boxes:
            assert label in ("crack", "scratch")
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
    # Parts judged ok are not localized, and boxes are only drawn when asked for.
    ok = pipeline.inspect(images, ["unsure"] * 3, boxes=True)
    assert all(not r.boxes and "localizer" not in [t.stage for t in r.trace] for r in ok)
    assert all(not r.boxes for r in pipeline.inspect(images, ["sure"] * 3))


def test_errors_are_clear(registry, images, tmp_path):
    pipeline = InspectionPipeline.from_registry(registry)
    with pytest.raises(ArtifactError, match="unknown category"):
        pipeline.inspect(images[:1], ["nope"])
    with pytest.raises(ValueError, match="categories"):
        pipeline.inspect(images, ["sure"])
    with pytest.raises(ArtifactError, match="no trained detector"):
        InspectionPipeline.from_registry(registry, ["missing"])
    with pytest.raises(ArtifactError, match="no category"):
        InspectionPipeline.from_registry(ArtifactRegistry(str(tmp_path / "empty")))
    no_router = InspectionPipeline(pipeline.stages)
    with pytest.raises(ArtifactError, match="no router"):
        no_router.inspect(images[:1])


def _val_samples(tmp_path, category, labels):
    rng = np.random.default_rng(1)
    samples = []
    for i, label in enumerate(labels):
        path = tmp_path / f"{category}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, category, label, "val", sample_id=f"{category}-{i}"))
    return samples


def test_a_category_validated_on_synthetic_defects_gets_the_ensemble_rule(registry, tmp_path):
    # Only good validation parts: synthetic anomalies complete the split, and since
    # they are what a normal-only detector trained on, the rule verifies every part.
    samples = _val_samples(tmp_path, "sure", ["good"] * 6)
    fitted = fit_decision(registry, samples, "sure")
    rule = DecisionRule.from_dict(fitted["rule"])
    assert (rule.lo, rule.hi, rule.fusion_weight) == (0.0, 1.0, 0.5)
    assert fitted["val_call_rate"] == 1.0
    assert all(rule.needs_verifier(p) for p in (0.0, 0.3, 0.95, 1.0))


def test_a_category_with_real_validation_defects_gets_a_fitted_band(registry, tmp_path):
    samples = _val_samples(tmp_path, "sure", ["good", "scratch"] * 3)
    fitted = fit_decision(registry, samples, "sure")
    # Every image gets p = 0.95, so any band would hold every image, far over the
    # 30 % call budget: with real defects to fit on, the detector decides alone.
    rule = DecisionRule.from_dict(fitted["rule"])
    assert rule.lo == rule.hi == rule.threshold
    assert fitted["val_call_rate"] == 0.0
