from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from models.backbone import (
    PRETRAINED,
    Preprocessing,
    WeightsError,
    create_backbone,
    imagenet_top1,
    remap_state_dict,
)


@pytest.fixture(scope="module")
def imagenet_model() -> tuple[torch.nn.Module, Preprocessing]:
    return create_backbone("efficientnet_lite0", pretrained=True)


def test_packaged_weights_classify_photos(imagenet_model) -> None:
    model, preprocessing = imagenet_model
    images = {n: Image.fromarray(getattr(photos, n)()) for n in ("chelsea", "coffee")}
    assert imagenet_top1(model, preprocessing, images) == {"chelsea": 285, "coffee": 967}


def test_pretrained_differs_from_random_init(imagenet_model) -> None:
    model, _ = imagenet_model
    random_model, _ = create_backbone(pretrained=False)
    w = model.state_dict()["conv_stem.weight"]
    assert not torch.equal(w, random_model.state_dict()["conv_stem.weight"])
    source = PRETRAINED["efficientnet_lite0"].load()
    assert torch.equal(w, source["_conv_stem.weight"])  # first tensor, same values
    assert torch.equal(model.state_dict()["classifier.bias"], source["_fc.bias"])  # last


def test_new_head_keeps_features_and_trains_every_parameter() -> None:
    model, preprocessing = create_backbone(num_classes=2)
    x = torch.randn(2, 3, preprocessing.input_size, preprocessing.input_size)
    out = model(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_remap_refuses_count_mismatch() -> None:
    target = OrderedDict(a=torch.zeros(2), b=torch.zeros(3))
    with pytest.raises(WeightsError, match="1 tensors, the architecture 2"):
        remap_state_dict(OrderedDict(x=torch.zeros(2)), target)


def test_remap_refuses_shape_mismatch_and_names_it() -> None:
    target = OrderedDict([("conv.weight", torch.zeros(4, 3)), ("conv.bias", torch.zeros(4))])
    source = OrderedDict([("_c.weight", torch.zeros(4, 3)), ("_c.bias", torch.zeros(5))])
    with pytest.raises(WeightsError, match=r"_c.bias \(5,\) -> conv.bias \(4,\)"):
        remap_state_dict(source, target)


def test_remap_refuses_kind_mismatch_even_with_equal_shapes() -> None:
    # A BN running_mean landing on a bias of the same shape would load silently.
    target = OrderedDict([("bn.bias", torch.zeros(4)), ("bn.running_mean", torch.zeros(4))])
    source = OrderedDict([("_bn.running_mean", torch.zeros(4)), ("_bn.bias", torch.zeros(4))])
    with pytest.raises(WeightsError, match="2 tensor"):
        remap_state_dict(source, target)


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(WeightsError, match="unknown backbone"):
        create_backbone("resnet9000")


def test_preprocessing_round_trip_and_output() -> None:
    p = PRETRAINED["efficientnet_lite0"].preprocessing
    assert Preprocessing.from_dict(p.to_dict()) == p
    gray = Image.fromarray((np.arange(300 * 400) % 256).astype(np.uint8).reshape(300, 400))
    x = p.transform()(gray)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # Normalized: a mid-grey pixel maps near (0.5 - mean) / std.
    mid = p.transform()(Image.new("RGB", (224, 224), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(p.mean)) / torch.tensor(p.std)
    assert torch.allclose(mid[:, 0, 0], expected, atol=1e-4)


def test_autocontrast_stretches_dim_images_and_is_stored() -> None:
    dim = np.tile(np.linspace(60, 120, 64).astype(np.uint8), (64, 1))
    image = Image.fromarray(dim).convert("RGB")
    plain = Preprocessing(input_size=64, resize=64)
    stretched = Preprocessing(input_size=64, resize=64, autocontrast=1.0)
    raw, wide = plain.geometry()(image), stretched.geometry()(image)
    assert int(raw.max()) - int(raw.min()) <= 61
    assert int(wide.min()) <= 5 and int(wide.max()) >= 250
    # Grey stays grey: the stretch works on luminance.
    assert torch.equal(wide[0], wide[1]) and torch.equal(wide[1], wide[2])
    assert Preprocessing.from_dict(stretched.to_dict()) == stretched
    # Artifacts written before the option existed load with it off.
    old = {k: v for k, v in plain.to_dict().items() if k != "autocontrast"}
    assert Preprocessing.from_dict(old) == plain


@pytest.mark.parametrize(
    "preprocessing",
    [
        Preprocessing(),
        Preprocessing(autocontrast=1.0),
        Preprocessing(input_size=200, resize=232, interpolation="bicubic", autocontrast=2.0),
    ],
)
def test_a_grayscale_image_gives_exactly_what_its_rgb_copy_gives(
    preprocessing: Preprocessing,
) -> None:
    # Grayscale is resized as one channel, then repeated: the same values, a third of the work.
    rng = np.random.default_rng(3)
    smooth = np.cumsum(rng.normal(0, 3, (171, 253)), axis=1)
    gray = Image.fromarray(np.clip(smooth + 128, 0, 255).astype(np.uint8))
    assert gray.mode == "L"
    ours, theirs = preprocessing.geometry()(gray), preprocessing.geometry()(gray.convert("RGB"))
    assert ours.shape == theirs.shape == (3, preprocessing.input_size, preprocessing.input_size)
    assert torch.equal(ours, theirs)
    transform = preprocessing.transform()
    assert torch.equal(transform(gray), transform(gray.convert("RGB")))


@pytest.mark.parametrize(
    "bad", [{"interpolation": "nearest-ish"}, {"input_size": 300}, {"autocontrast": 60.0}]
)
def test_preprocessing_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        Preprocessing(**bad)
