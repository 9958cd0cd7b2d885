import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from models.data.sample import DataError, Sample
from models.training import build_family
from models.training.families import NORMAL_ONLY, SUPERVISED


def _samples(tmp_path: Path, labels_by_split: dict[str, list[str]], category="part"):
    rng = np.random.default_rng(0)
    out = []
    for split, labels in labels_by_split.items():
        for i, label in enumerate(labels):
            path = tmp_path / f"{category}-{split}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
            out.append(Sample(path, category, label, split, sample_id=path.stem))
    return out


def _spec(stage, samples, category="part"):
    return {
        "stage": stage,
        "samples": samples,
        "category": category,
        "model_config": {"input_size": 32},
    }


def test_detector_is_supervised_with_defects_and_weights_them(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 6 + ["crack"] * 2, "val": ["good", "crack"]})
    family = build_family(_spec("detector", samples))
    assert family.mode == SUPERVISED and not family.keeps_last_epoch  # real defects judge epochs
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert len(train.samples) == 8 and train.synthesis == "none" and len(val) == 2
    assert len(train) == 320  # repeated to a minimum epoch
    images, target = next(iter(DataLoader(train, batch_size=8)))
    loss = family.loss(train)(model, images, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    metrics = family.evaluate(model, DataLoader(val, batch_size=4))
    assert {"val_loss", "val_auroc", "val_accuracy"} <= set(metrics)


def test_a_pooled_detector_learns_from_its_pooled_categories_only(tmp_path):
    splits = {"train": ["good"] * 3 + ["crack"], "val": ["good", "crack"]}
    samples = [
        *_samples(tmp_path, splits, category="mono"),
        *_samples(tmp_path, splits, category="poly"),
        *_samples(tmp_path, splits, category="other"),
    ]
    alone = build_family(_spec("detector", samples, category="mono"))
    pooled = build_family(_spec("detector", samples, category="mono") | {"pooled_with": ["poly"]})
    assert {s.category for s in alone.split("train")} == {"mono"}
    assert {s.category for s in pooled.split("train")} == {"mono", "poly"}
    assert len(pooled.split("val")) == 4
    assert pooled.describe()["pooled_with"] == ["poly"] and "pooled_with" not in alone.describe()


def test_detector_is_normal_only_without_defects_and_synthesises(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 4, "val": ["good"] * 2})
    family = build_family(_spec("detector", samples))
    assert family.mode == NORMAL_ONLY and family.describe()["mode"] == NORMAL_ONLY
    assert family.keeps_last_epoch  # its validation cannot choose an epoch
    train, val = family.datasets(family.build_model(pretrained=False))
    assert train.synthesis == "random" and train.augment == "d4"
    assert len(train) == 2 * 320  # twice the passes: each draws fresh anomalies
    # Validation gets synthetic defects so AUROC is defined.
    assert val.synthesis == "pairs" and len(val) == 4


def test_verifier_trains_on_good_parts_only(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 3 + ["crack"] * 2, "val": ["good", "crack"]})
    family = build_family(_spec("verifier", samples))
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert [s.label for s in train.samples] == ["good"] * 3
    metrics = family.evaluate(model, DataLoader(val, batch_size=4))
    assert metrics["val_auroc"] in (0.0, 1.0)  # one good and one defect


def test_router_uses_every_category(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 2, "val": ["good"]}, "a")
    samples += _samples(tmp_path, {"train": ["good"] * 3, "val": ["good"]}, "b")
    family = build_family(_spec("router", samples, category="all-categories"))
    assert family.categories == ("a", "b")
    train, _ = family.datasets(family.build_model(pretrained=False))
    assert sorted(train.targets) == [0, 0, 1, 1, 1]


def test_a_fitted_router_head_learns_the_categories_in_one_pass(tmp_path):
    rng = np.random.default_rng(1)
    samples = []
    for category, low in (("dark", 0), ("bright", 170)):
        for split, n in (("train", 6), ("val", 2)):
            for i in range(n):
                path = tmp_path / f"{category}-{split}-{i}.png"
                pixels = rng.integers(low, low + 80, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                samples.append(Sample(path, category, "good", split, sample_id=path.stem))
    spec = _spec("router", samples, category="all-categories")
    assert not build_family(spec).gradient_free  # trained by default
    family = build_family(spec | {"model_config": {"input_size": 32, "head": "fitted"}})
    assert family.gradient_free
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert train.augment == "none"
    rows = family.features(model, DataLoader(train, batch_size=5))
    assert rows.shape == (12, model.backbone.num_features + 1)
    assert sorted(rows[:, -1].tolist()) == sorted(float(t) for t in train.targets)
    fitted = family.fit(model, rows, DataLoader(val, batch_size=4))
    assert fitted["images"] == 12 and fitted["train_accuracy"] == 1.0
    assert family.evaluate(model, DataLoader(val, batch_size=4))["val_accuracy"] == 1.0
    with pytest.raises(ValueError, match="head must be one of"):
        build_family(spec | {"model_config": {"head": "guessed"}}).build_model(pretrained=False)


def test_a_fitted_detector_head_learns_graded_defects_in_one_pass(tmp_path):
    torch.manual_seed(0)  # the untrained backbone's weights
    rng = np.random.default_rng(2)
    samples = []
    for split, n in (("train", 8), ("val", 3)):
        for i in range(n):
            defective = i % 2 == 1
            path = tmp_path / f"cell-{split}-{i}.png"
            low = 170 if defective else 0  # defects are bright: the features separate them
            Image.fromarray(rng.integers(low, low + 80, (40, 40, 3), dtype=np.uint8)).save(path)
            severity = (2 / 3 if i % 4 == 1 else 1.0) if defective else 0.0
            label = "defective" if defective else "good"
            sample = Sample(path, "cell", label, split, sample_id=path.stem, severity=severity)
            samples.append(sample)
    spec = _spec("detector", samples, category="cell")
    assert not build_family(spec).gradient_free  # trained by default
    family = build_family(spec | {"model_config": {"input_size": 32, "head": "fitted"}})
    assert family.gradient_free and family.mode == SUPERVISED
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert train.augment == "none" and len(train) == 8  # every image once, as it is
    rows = family.features(model, DataLoader(train, batch_size=3))
    assert rows.shape == (8, model.backbone.num_features + 1)
    assert sorted(rows[:, -1].tolist()) == pytest.approx(sorted(train.targets))  # soft targets
    before = model.head[-1].weight.clone()
    fitted = family.fit(model, rows, DataLoader(val, batch_size=4))
    assert fitted["images"] == 8 and not torch.equal(before, model.head[-1].weight)
    assert fitted["train_loss"] < math.log(2)  # below the zero head's loss
    assert family.evaluate(model, DataLoader(val, batch_size=4))["val_auroc"] == 1.0
    with pytest.raises(ValueError, match="head 'guessed' is not one of"):
        build_family(spec | {"model_config": {"head": "guessed"}}).build_model(pretrained=False)


def test_a_fitted_detector_head_needs_defective_training_images(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 4, "val": ["good"] * 2})
    with pytest.raises(DataError, match="no defective training images, and a fitted head"):
        build_family(_spec("detector", samples) | {"model_config": {"head": "fitted"}})


def test_bad_specs_are_refused(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 2})
    with pytest.raises(ValueError, match="no val images"):
        build_family(_spec("detector", samples))
    with pytest.raises(ValueError, match="unknown stage"):
        build_family(_spec("painter", samples))
    samples = _samples(tmp_path, {"train": ["good"] * 2, "val": ["good"]})
    with pytest.raises(ValueError, match="augment must be one of"):
        build_family(_spec("detector", samples) | {"augment": "spin"})


def test_parts_imaged_the_same_way_up_train_with_flips_only(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 3 + ["crack"] * 2, "val": ["good", "crack"]})
    for stage in ("detector", "verifier"):
        family = build_family(_spec(stage, samples) | {"augment": "flips"})
        train, val = family.datasets(family.build_model(pretrained=False))
        assert train.augment == "flips" and val.augment == "none"
        assert family.describe()["augment"] == "flips"


LEVELS = {"good": 0.0, "d33": 1 / 3, "d67": 2 / 3, "d100": 1.0}


def _graded(samples):
    """The samples with ELPV-style graded severities, by label (``d33`` is 1/3)."""
    return [
        Sample(
            s.image_path,
            s.category,
            s.label,
            s.split,
            severity=LEVELS[s.label],
            sample_id=s.sample_id,
        )
        for s in samples
    ]


def test_graded_severity_is_the_detector_target(tmp_path):
    samples = _samples(tmp_path, {"train": ["good", "d33", "d67", "d100"], "val": ["good", "d100"]})
    samples = _graded(samples)
    family = build_family(_spec("detector", samples))
    assert family.soft_targets and family.describe()["soft_targets"]
    train, val = family.datasets(family.build_model(pretrained=False))
    assert sorted(set(train.targets)) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    # Validation keeps the binary truth (defective from 0.5 up).
    assert sorted(val.targets) == [0.0, 1.0]


def test_balanced_classes_repeat_rare_levels_by_the_square_root_of_their_rarity(tmp_path):
    counts = {"good": 16, "d33": 4, "d67": 1, "d100": 9}
    labels = [label for label, n in counts.items() for _ in range(n)]
    samples = _samples(tmp_path, {"train": labels, "val": ["good", "d100"]})
    samples = _graded(samples)
    plain = build_family(_spec("detector", samples))
    family = build_family(_spec("detector", samples) | {"balance_classes": True})
    assert family.describe()["balance_classes"] and "balance_classes" not in plain.describe()
    train, val = family.datasets(family.build_model(pretrained=False))
    seen = {level: train.targets.count(value) for level, value in LEVELS.items()}
    # sqrt(16/4) = 2, sqrt(16/1) = 4, sqrt(16/9) = 1.33 -> 1; the largest class once.
    assert seen == {"good": 16, "d33": 8, "d67": 4, "d100": 9}
    assert len({id(s) for s in train.samples}) == sum(counts.values())  # repeats, not copies
    assert len(plain.datasets(plain.build_model(pretrained=False))[0].samples) == 30
    assert sorted(val.targets) == [0.0, 1.0]  # validation is never rebalanced
    # Without graded levels the classes are the labels.
    by_label = [s for s in family.split("train") if s.label in ("good", "d67")]
    by_label = [Sample(s.image_path, s.category, s.label, s.split) for s in by_label]
    assert len(family.balanced(by_label)) == 16 + 4  # sqrt(16/1) = 4


def test_classifier_trains_on_two_views_and_validates_against_prototypes(tmp_path):
    samples = _samples(
        tmp_path,
        {"train": ["good"] * 3 + ["crack"] * 3 + ["scratch"] * 3, "val": ["crack", "scratch"]},
    )
    family = build_family(_spec("classifier", samples))
    model = family.build_model(pretrained=False)
    assert model.config.classes == ("good", "crack", "scratch")
    assert model.config.defect_types == ("crack", "scratch")
    train, val = family.datasets(model)
    images, target = next(iter(DataLoader(train, batch_size=6)))
    assert images.shape == (6, 2, 3, 32, 32)
    loss = family.loss(train)(model.train(), images, target)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None for p in model.head.parameters())
    model.eval()
    metrics = family.evaluate(model, DataLoader(val, batch_size=4))
    assert bool(model.has_prototypes) and math.isfinite(metrics["val_loss"])
    # The accuracy is the prototypes' own verdict on the validation images.
    with torch.no_grad():
        images = torch.stack([val[i][0] for i in range(len(val))])
        predicted = model.predict(images).scores.argmax(1)
    expected = (predicted == torch.tensor(family.targets(val.samples))).float().mean()
    assert metrics["val_accuracy"] == pytest.approx(float(expected))
    assert family.fit_prototypes(model) == {"good": 3, "crack": 3, "scratch": 3}


def test_balanced_classifier_shows_rare_levels_more_often_but_fits_prototypes_once(tmp_path):
    counts = {"good": 16, "d33": 4, "d67": 1, "d100": 9}
    labels = [label for label, n in counts.items() for _ in range(n)]
    samples = _graded(_samples(tmp_path, {"train": labels, "val": ["good", "d100"]}))
    family = build_family(_spec("classifier", samples) | {"balance_classes": True})
    assert family.describe()["balance_classes"]
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    seen = Counter(model.config.classes[int(t)] for t in train.targets)
    assert seen == {"good": 16, "d33": 8, "d67": 4, "d100": 9}
    assert len(val) == 2  # validation is never rebalanced
    assert family.fit_prototypes(model.eval()) == counts


def test_classifier_refuses_parts_without_labelled_defects(tmp_path):
    samples = _samples(tmp_path, {"train": ["good"] * 3, "val": ["good"]})
    with pytest.raises(DataError, match="needs labelled defects"):
        build_family(_spec("classifier", samples))
    samples = _samples(tmp_path, {"train": ["good", "crack"], "val": ["dent"]})
    with pytest.raises(DataError, match="validation labels \\['dent'\\]"):
        build_family(_spec("classifier", samples))


def test_reranker_trains_on_defective_images_against_their_descriptions(tmp_path):
    samples = _samples(
        tmp_path,
        {
            "train": ["good"] * 2 + ["crack"] * 3 + ["scratch"] * 3,
            "val": ["good", "crack", "scratch"],
        },
    )
    spec = _spec("reranker", samples)
    spec["model_config"]["embed_dim"] = 16
    family = build_family(spec)
    model = family.build_model(pretrained=False)
    assert model.config.defect_types == ("crack", "scratch") == family.defect_types
    train, val = family.datasets(model)
    assert {s.label for s in train.samples} == {"crack", "scratch"}
    assert [s.label for s in val.samples] == ["crack", "scratch"]
    images, target = next(iter(DataLoader(train, batch_size=6)))
    loss = family.loss(train)(model.train(), images, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.clip.text.proj.weight.grad is not None
    assert model.clip.visual.head.proj.weight.grad is not None
    assert all(p.grad is None for p in model.clip.text.transformer.parameters())
    model.eval()
    metrics = family.evaluate(model, DataLoader(val, batch_size=4))
    texts = model.type_embeddings(family.catalog)
    with torch.no_grad():
        batch = torch.stack([val[i][0] for i in range(len(val))])
        predicted = model.logits(model.encode_images(batch), texts).argmax(1)
    assert metrics["val_accuracy"] == pytest.approx(
        float((predicted == torch.arange(2)).float().mean())
    )


def test_reranker_needs_described_defect_types(tmp_path):
    samples = _samples(tmp_path, {"train": ["good", "crack", "dent_x"], "val": ["crack"]})
    with pytest.raises(ValueError, match="no description of defect type\\(s\\) \\['dent_x'\\]"):
        build_family(_spec("reranker", samples))
    spec = _spec("reranker", samples)
    spec["model_config"]["descriptions"] = [{"name": "dent_x", "description": "A shallow dent"}]
    family = build_family(spec)
    assert family.catalog.names == ("crack", "dent_x")
    assert family.catalog["crack"].description.startswith("A deep fracture")
    samples = _samples(tmp_path, {"train": ["good", "crack"], "val": ["crack"]})
    with pytest.raises(DataError, match="at least two labelled defect types"):
        build_family(_spec("reranker", samples))
