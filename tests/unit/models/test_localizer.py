import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from models.artifacts import ArtifactRegistry
from models.backbone import create_backbone
from models.data.sample import Box, DataError, Sample
from models.localizer import (
    EFFICIENTNET_LITE0,
    HGNETV2_PICO,
    DefectLocalizer,
    DefectLocalizerConfig,
    box_targets,
)
from models.stages import LOCALIZER, SHARED_CATEGORY
from models.training import FAMILIES, build_family
from models.training.localizer_family import LocalizerFamily, transform_boxes

TYPES = ("crack", "scratch")


def tiny_config(backbone=EFFICIENTNET_LITE0, **overrides):
    fields = {
        "defect_types": TYPES,
        "backbone": backbone,
        "input_size": 64,
        "hidden_dim": 32,
        "decoder_layers": 2,
        "num_queries": 10,
        "num_denoising": 4,
        "max_detections": 10,
    }
    return DefectLocalizerConfig(**(fields | overrides))


def targets():
    return [
        {
            "class_labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


@pytest.mark.parametrize("backbone", [EFFICIENTNET_LITE0, HGNETV2_PICO])
def test_forward_with_labels_gives_a_finite_loss_and_gradients(backbone):
    torch.manual_seed(0)
    model = DefectLocalizer(tiny_config(backbone), pretrained=False).train()
    output = model(torch.randn(2, 3, 64, 64), targets())
    # Training adds the denoising queries to the 10 proposals.
    assert output.logits.shape[0] == 2 and output.logits.shape[1] > 10
    assert output.logits.shape[2] == len(TYPES)
    assert math.isfinite(float(output.loss.detach()))
    output.loss.backward()
    head = [p for p in model.head_parameters()]
    with_grad = [p for p in head if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    # Every decoder layer's class head learns; most of the head gets a gradient.
    assert len(with_grad) > 0.8 * len(head)
    assert all(p.grad is not None for p in model.detector.class_embed.parameters())
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.backbone_parameters()
    )


def test_backbone_starts_from_the_packaged_imagenet_weights_and_stays_partly_frozen():
    model = DefectLocalizer(tiny_config(freeze_stages=2), pretrained=True).train()
    imagenet, _ = create_backbone(EFFICIENTNET_LITE0, pretrained=True, num_classes=0)
    assert torch.equal(model.backbone.conv_stem.weight, imagenet.conv_stem.weight)
    assert torch.equal(
        model.backbone.blocks[5][0].conv_pw.weight, imagenet.blocks[5][0].conv_pw.weight
    )
    assert not any(p.requires_grad for p in model.backbone.blocks[1].parameters())
    assert all(p.requires_grad for p in model.backbone.blocks[2].parameters())
    # Backbone batch norms keep the ImageNet statistics; the encoder's train.
    assert not model.backbone.blocks[4][0].bn1.training
    assert model.detector.model.encoder.training
    head, backbone = (
        set(map(id, model.head_parameters())),
        set(map(id, model.backbone_parameters())),
    )
    assert head and backbone and not head & backbone


def test_predict_returns_well_formed_detections():
    torch.manual_seed(0)
    model = DefectLocalizer(tiny_config(), pretrained=False).eval()
    images = torch.randn(3, 3, 64, 64)
    output = model(images)
    assert output.logits.shape == (3, 10, len(TYPES))
    assert output.pred_boxes.shape == (3, 10, 4)
    detections = model.predict(images, score_threshold=0.0)
    assert len(detections) == 3
    for found in detections:
        assert found.boxes.shape == (10, 4)
        assert found.scores.shape == (10,)
        assert len(found.labels) == 10 and set(found.labels) <= set(TYPES)
        assert bool((found.boxes >= 0).all() and (found.boxes <= 1).all())
        assert bool((found.boxes[:, 2] >= found.boxes[:, 0]).all())
        assert bool((found.scores[:-1] >= found.scores[1:]).all())
    # In pixels of a 128 x 256 original (resized to 64 x 128, center crop 64 x 64).
    pixels = model.predict(images, score_threshold=0.0, image_sizes=[(128, 256)] * 3)
    expected = detections[0].boxes * 128 + torch.tensor([64.0, 0.0, 64.0, 0.0])
    assert torch.allclose(pixels[0].boxes, expected, atol=1e-4)
    threshold = float(detections[0].scores[4])
    assert all(bool((d.scores >= threshold).all()) for d in model.predict(images, threshold))


def test_box_targets_invert_the_prediction_mapping():
    model = DefectLocalizer(tiny_config(), pretrained=False)
    target = box_targets([(60.0, 10.0, 40.0, 20.0)], [1], (100, 200), model.preprocessing)
    cx, cy, w, h = target["boxes"][0].tolist()
    corners = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
    assert torch.allclose(
        model.to_image_pixels(corners, (100, 200)),
        torch.tensor([[60.0, 10.0, 100.0, 30.0]]),
        atol=1e-3,
    )
    # A box outside the center crop is dropped.
    assert (
        len(box_targets([(0.0, 0.0, 20.0, 20.0)], [0], (100, 200), model.preprocessing)["boxes"])
        == 0
    )


def test_state_dict_round_trips_through_a_safetensors_artifact(tmp_path):
    torch.manual_seed(0)
    model = DefectLocalizer(tiny_config(), pretrained=False).eval()
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    manifest = registry.save(
        SHARED_CATEGORY,
        LOCALIZER,
        model.state_dict(),
        config=model.config.to_dict(),
        preprocessing=model.preprocessing.to_dict(),
        data={},
    )
    artifact = registry.load(SHARED_CATEGORY, LOCALIZER, manifest.version)
    config = DefectLocalizerConfig.from_dict(artifact.manifest.config)
    assert config == model.config
    restored = DefectLocalizer(config, pretrained=False)
    restored.load_state_dict(artifact.state_dict, strict=True)
    restored.eval()
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(restored(images).logits, model(images).logits, atol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(backbone="resnet50")
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_config(input_size=100)
    with pytest.raises(ValueError, match="distinct"):
        tiny_config(defect_types=("crack", "crack"))
    # 64 px gives 8² + 4² + 2² = 84 proposals: too few for 100 queries.
    with pytest.raises(ValueError, match="84 box proposals, fewer than num_queries=100"):
        tiny_config(num_queries=100)
    assert tiny_config(input_size=96, num_queries=100).num_queries == 100
    with pytest.raises(TypeError):
        DefectLocalizerConfig.from_dict(tiny_config().to_dict() | {"colour": "red"})


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
@pytest.mark.parametrize("hflip", [False, True])
def test_transform_boxes_follows_the_image(turns, hflip):
    image = torch.zeros(1, 20, 20)
    image[0, 2:6, 10:18] = 1.0  # rows 2-5, columns 10-17
    box = torch.tensor([[14 / 20, 4 / 20, 8 / 20, 4 / 20]])
    moved = image.flip(-1) if hflip else image
    moved = moved.rot90(turns, dims=(-2, -1))
    rows, cols = torch.nonzero(moved[0], as_tuple=True)
    expected = torch.tensor(
        [
            [
                (cols.min() + cols.max() + 1) / 40,
                (rows.min() + rows.max() + 1) / 40,
                (cols.max() - cols.min() + 1) / 20,
                (rows.max() - rows.min() + 1) / 20,
            ]
        ]
    )
    assert torch.allclose(transform_boxes(box, hflip, False, turns), expected.float())


def _box_samples(tmp_path, categories=("metal", "tile")):
    """64 x 64 images with one bright rectangle each (its box), plus good ones."""
    samples = []
    rng = np.random.default_rng(0)
    for category in categories:
        for split in ("train", "val"):
            for i, label in enumerate((*TYPES, "good")):
                pixels = np.full((64, 64, 3), 40, dtype=np.uint8)
                boxes = ()
                if label != "good":
                    x, y = int(rng.integers(0, 30)), int(rng.integers(0, 40))
                    pixels[y : y + 20, x : x + 30] = 250
                    boxes = (Box(label, (float(x), float(y), 30.0, 20.0)),)
                path = tmp_path / f"{category}-{split}-{i}.png"
                Image.fromarray(pixels).save(path)
                samples.append(
                    Sample(path, category, label, split, boxes=boxes, sample_id=path.stem)
                )
    return samples


def _spec(samples):
    return {
        "stage": LOCALIZER,
        "samples": samples,
        "category": SHARED_CATEGORY,
        "model_config": {
            "input_size": 64,
            "hidden_dim": 32,
            "decoder_layers": 2,
            "num_queries": 10,
            "num_denoising": 4,
        },
        "augment": "d4",
    }


def test_family_is_registered_and_spans_categories(tmp_path):
    family = build_family(_spec(_box_samples(tmp_path)))
    assert isinstance(family, LocalizerFamily) and FAMILIES[LOCALIZER] is LocalizerFamily
    assert family.defect_types == TYPES
    assert family.categories == ("metal", "tile")
    model = family.build_model(pretrained=False)
    assert model.config.categories == ("metal", "tile")
    assert family.monitor == "val_map50"


def test_family_datasets_carry_box_targets_that_follow_the_augmentation(tmp_path):
    samples = _box_samples(tmp_path)
    family = build_family(_spec(samples))
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert len(train) == len([s for s in samples if s.split == "train"])  # boxes and good ones
    assert len(val) == len([s for s in samples if s.split == "val"])
    std = torch.tensor(model.preprocessing.std)[:, None, None]
    mean = torch.tensor(model.preprocessing.mean)[:, None, None]
    seen_turns = set()
    for epoch in range(4):
        train.set_epoch(epoch)
        for index in range(len(train)):
            image, target = train[index]
            sample = train.samples[index]
            assert target["class_labels"].tolist() == [TYPES.index(b.label) for b in sample.boxes]
            if not sample.boxes:
                assert target["boxes"].shape == (0, 4)
                continue
            bright = ((image * std + mean).mean(0) > 0.6).nonzero()
            rows, cols = bright[:, 0], bright[:, 1]
            cx, cy, w, h = (target["boxes"][0] * 64).tolist()
            assert (cols.min().item(), cols.max().item() + 1) == pytest.approx(
                (cx - w / 2, cx + w / 2), abs=1.01
            )
            assert (rows.min().item(), rows.max().item() + 1) == pytest.approx(
                (cy - h / 2, cy + h / 2), abs=1.01
            )
            seen_turns.add(w > h)
    assert seen_turns == {True, False}  # quarter turns happened


def test_family_loss_collate_and_evaluate(tmp_path):
    torch.manual_seed(0)
    family = build_family(_spec(_box_samples(tmp_path)))
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    images, batch_targets = next(iter(DataLoader(train, batch_size=4, collate_fn=family.collate)))
    assert images.shape == (4, 3, 64, 64)
    assert isinstance(batch_targets, list) and len(batch_targets) == 4
    loss = family.loss(train)(model.train(), images, batch_targets)
    assert math.isfinite(float(loss.detach()))
    metrics = family.evaluate(model, DataLoader(val, batch_size=4, collate_fn=family.collate))
    assert math.isfinite(metrics["val_loss"])
    assert 0.0 <= metrics["val_map50"] <= 1.0


def test_family_needs_boxes(tmp_path):
    samples = [
        Sample(s.image_path, s.category, s.label, s.split, sample_id=s.sample_id)
        for s in _box_samples(tmp_path)
    ]
    with pytest.raises(DataError, match="boxes"):
        build_family(_spec(samples))


def test_near_duplicate_boxes_of_one_type_are_suppressed_others_kept():
    from types import SimpleNamespace

    model = DefectLocalizer(tiny_config(max_detections=4), pretrained=False)
    # Four queries (cx, cy, w, h): 0 and 1 nearly the same box, 2 the same box, 3 elsewhere.
    boxes = torch.tensor(
        [[[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]]
    )
    logits = torch.full((1, 4, len(TYPES)), -9.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 0] = 3.0, 2.0, 1.0, 0.5
    output = SimpleNamespace(logits=logits, pred_boxes=boxes)
    (found,) = model.detections(output, score_threshold=0.5)
    # Query 1 duplicates query 0 (same type): dropped; query 2 is another type: kept.
    assert found.labels == (TYPES[0], TYPES[1], TYPES[0])
    assert torch.allclose(found.scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
    model.config = DefectLocalizerConfig(**(model.config.__dict__ | {"nms_iou": 1.0}))
    (unsuppressed,) = model.detections(output, score_threshold=0.5)
    assert len(unsuppressed.labels) == 4
