"""The three stage models: shapes, what trains, what stays frozen, typed outputs."""

import pytest
import torch

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig, GeneralizedMeanPool
from models.autoencoder_verifier import (
    AutoencoderVerifier,
    AutoencoderVerifierConfig,
    calibrate,
)
from models.category_router import CategoryRouter, CategoryRouterConfig

SIZE = 64


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_detector_trains_head_and_late_backbone_only(images):
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE, freeze_stages=2)).train()
    assert not model.backbone.bn1.training and not model.backbone.blocks[1].training
    assert model.backbone.blocks[2].training
    model(images).sum().backward()
    frozen = [model.backbone.conv_stem, *model.backbone.blocks[:2]]
    assert all(p.grad is None for m in frozen for p in m.parameters())
    trainable = list(model.backbone_parameters()) + list(model.head_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    head_ids = {id(p) for p in model.head_parameters()}
    assert not head_ids & {id(p) for p in model.backbone_parameters()}


def test_detector_predict_returns_probabilities_and_gradcam(images):
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE)).eval()
    plain = model.predict(images)
    assert plain.heatmap is None and plain.probability.shape == (3,)
    assert ((plain.probability >= 0) & (plain.probability <= 1)).all()
    explained = model.predict(images, explain=True)
    assert explained.heatmap.shape == (3, SIZE, SIZE)
    assert torch.allclose(explained.probability, plain.probability)
    assert explained.heatmap.min() >= 0 and explained.heatmap.max() <= 1
    assert model.preprocessing.input_size == SIZE


def test_detector_test_flips_average_the_four_flips_when_judging_only(images):
    torch.manual_seed(0)
    plain = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE), pretrained=False).eval()
    flipped = AnomalyDetector(
        AnomalyDetectorConfig(input_size=SIZE, test_flips=True), pretrained=False
    ).eval()
    flipped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        views = [images, images.flip(3), images.flip(2), images.flip((2, 3))]
        expected = torch.stack([plain(v) for v in views]).mean(0)
        assert torch.allclose(flipped(images), expected, atol=1e-5)
        per_view = torch.stack([plain(v) for v in views], 1)  # what scripts score view by view
        assert torch.allclose(flipped.flip_logits(images), per_view, atol=1e-5)
        assert not torch.allclose(flipped(images), plain(images), atol=1e-4)
    explained = flipped.predict(images, explain=True)  # the map of the image as sent
    assert explained.heatmap.shape == (3, SIZE, SIZE)
    assert torch.allclose(explained.probability, torch.sigmoid(expected), atol=1e-5)
    with torch.no_grad():
        for model in (plain, flipped):  # training: one pass of the image as sent
            model.train().head[0].p = 0.0
        assert torch.allclose(flipped(images), plain(images), atol=1e-5)


def test_detector_config_roundtrip_and_unknown_key():
    config = AnomalyDetectorConfig(input_size=160, freeze_stages=3, test_flips=True, pooling="gem")
    assert AnomalyDetectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError):
        AnomalyDetectorConfig.from_dict({"no_such_field": 1})


def test_generalized_mean_pool_spans_the_mean_and_the_maximum():
    features = torch.rand(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    features[0, :, 1, 2] = 3.0  # one bright spot on a dim map
    pool = GeneralizedMeanPool()
    with torch.no_grad():
        pool.p.fill_(1.0)
        assert torch.allclose(pool(features), features.mean((2, 3)), atol=1e-6)
        pool.p.fill_(60.0)
        assert torch.allclose(pool(features), features.amax((2, 3)), rtol=0.05)
        pool.p.fill_(3.0)
        between = pool(features)
    assert (between > features.mean((2, 3))).all() and (between < features.amax((2, 3))).all()


def test_detector_gem_pooling_learns_its_exponent_with_the_head(images):
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE, pooling="gem")).train()
    model(images).sum().backward()
    assert model.pool.p.grad is not None and torch.isfinite(model.pool.p.grad)
    assert any(p is model.pool.p for p in model.head_parameters())
    assert not any(p is model.pool.p for p in model.backbone_parameters())
    model.eval()
    with torch.no_grad():  # the pooled vector is the GeM of the last feature map
        features = model.backbone.forward_features(images)
        expected = model.head(model.pool.forward(features)).squeeze(-1)
        assert torch.allclose(model(images), expected, atol=1e-5)
    average = AnomalyDetector(AnomalyDetectorConfig(input_size=SIZE), pretrained=False)
    assert "pool.p" in model.state_dict() and "pool.p" not in average.state_dict()
    with pytest.raises(ValueError, match="pooling 'max' is not one of"):
        AnomalyDetectorConfig(pooling="max")


def test_verifier_backbone_frozen_autoencoder_trains(images):
    model = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE)).train()
    error_map = model(images)
    assert error_map.shape == (3, SIZE // 8, SIZE // 8)
    error_map.mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    assert not model.backbone.training


def test_verifier_score_is_calibrated_probability(images):
    model = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE)).eval()
    out = model.predict(images)
    assert out.score.shape == out.raw_score.shape == (3,)
    assert ((out.score >= 0) & (out.score <= 1)).all()
    # Normal-only calibration: the good parts' 99th percentile maps to 0.5.
    goods = torch.linspace(1.0, 2.0, 101)
    calibrate(model, goods.tolist())
    assert model.calibrated(torch.tensor([float(goods.quantile(0.99))])).item() == pytest.approx(
        0.5, abs=1e-3
    )
    assert model.calibrated(torch.tensor([10.0])).item() > 0.99


def test_verifier_platt_calibration_orders_classes():
    model = AutoencoderVerifier(AutoencoderVerifierConfig(input_size=SIZE))
    goods = [1.0 + 0.01 * i for i in range(50)]
    bads = [3.0 + 0.01 * i for i in range(50)]
    params = calibrate(model, goods, goods + bads, [False] * 50 + [True] * 50)
    assert params["platt_a"] > 0
    assert model.calibrated(torch.tensor([1.2])).item() < 0.2
    assert model.calibrated(torch.tensor([3.3])).item() > 0.8
    with pytest.raises(ValueError):
        calibrate(model, [1.0])


def test_router_predicts_a_known_category(images):
    config = CategoryRouterConfig(categories=("a", "b"), input_size=SIZE)
    model = CategoryRouter(config).eval()
    out = model.predict(images)
    assert set(out.categories) <= {"a", "b"} and out.probabilities.shape == (3, 2)
    assert torch.allclose(out.probabilities.sum(1), torch.ones(3))
    assert CategoryRouterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        CategoryRouterConfig(categories=("a", "a"))
    # Among the categories that have models only: "b" alone, with all the probability.
    only_b = model.predict(images, allowed={"b", "z"})
    assert only_b.categories == ["b"] * 3
    assert torch.allclose(only_b.probabilities[:, 1], torch.ones(3))
    with pytest.raises(ValueError, match="none of"):
        model.predict(images, allowed={"z"})
