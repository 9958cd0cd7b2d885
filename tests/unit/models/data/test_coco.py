"""COCO detection JSON, and the synthetic generator's COCO output."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from models.data import Box, DataError, load_dataset
from tests.unit.models.data.jsonfiles import rewrite_json


def _by_id(root: Path) -> dict:
    return {s.sample_id: s for s in load_dataset("coco", root)}


def test_labels_categories_and_boxes(coco_root: Path) -> None:
    samples = _by_id(coco_root)
    assert set(samples) == {
        "images/a.png",
        "images/b.png",
        "images/c.png",
        "images/d.png",
        "images/sub/e.png",
        "loose.png",
        "images/f.png",
        "images/g.png",
    }
    labels = {i: s.label for i, s in samples.items()}
    assert labels["images/a.png"] == "good"  # no annotations
    assert labels["images/b.png"] == "scratch"  # 2 scratch beat 1 (larger) dent
    assert labels["images/c.png"] == "dent"  # one each: larger total area wins
    assert labels["images/d.png"] == "dent"  # same count and area: first name wins
    assert labels["images/sub/e.png"] == "bent"  # defect_type beats annotations
    assert labels["images/g.png"] == "scratch"

    e = samples["images/sub/e.png"]
    assert e.category == "gears"
    assert e.mask_path == coco_root / "masks" / "e_mask.png"
    assert e.load_mask().sum() == 100  # the 10x10 square
    assert samples["images/a.png"].category == "widgets"  # the root folder's name
    assert samples["images/a.png"].mask_path is None
    assert samples["loose.png"].image_path == coco_root / "loose.png"

    assert samples["images/b.png"].boxes == (
        Box("scratch", (1.0, 2.0, 3.0, 4.0)),
        Box("scratch", (5.0, 5.0, 2.0, 2.0)),
        Box("dent", (0.0, 0.0, 20.0, 20.0)),
    )
    assert samples["images/a.png"].boxes == ()


def test_splits_come_from_file_names(coco_root: Path) -> None:
    samples = _by_id(coco_root)
    assert samples["images/f.png"].split == "val"
    assert samples["images/g.png"].split == "test"
    train = {i for i, s in samples.items() if s.split == "train"}
    assert train == {f"images/{n}.png" for n in "abcd"} | {"images/sub/e.png", "loose.png"}


def test_summary_shape(coco_root: Path) -> None:
    assert load_dataset("coco", coco_root).summary() == {
        "dataset": "coco",
        "categories": {
            "gears": {"train": {"bent": 1}},
            "widgets": {
                "train": {"dent": 2, "good": 2, "scratch": 1},
                "val": {"good": 1},
                "test": {"scratch": 1},
            },
        },
    }


def test_missing_val_file_takes_ten_percent_of_train(coco_no_val_root: Path) -> None:
    summary = load_dataset("coco", coco_no_val_root).summary()
    assert summary["categories"] == {
        "plates": {
            "train": {"good": 9, "scratch": 9},
            "val": {"good": 1, "scratch": 1},
            "test": {"good": 1},
        }
    }


@pytest.fixture
def coco_copy(coco_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(coco_root, tmp_path / "widgets"))


def test_missing_image_names_file_and_json(coco_copy: Path) -> None:
    (coco_copy / "images" / "c.png").unlink()
    train = coco_copy / "annotations" / "instances_train.json"
    with pytest.raises(DataError) as error:
        load_dataset("coco", coco_copy)
    assert "c.png" in str(error.value)
    assert str(train) in str(error.value)


def test_missing_mask_names_file_and_json(coco_copy: Path) -> None:
    (coco_copy / "masks" / "e_mask.png").unlink()
    with pytest.raises(DataError, match=r"mask file not found: .*e_mask.png .*instances_train"):
        load_dataset("coco", coco_copy)


def test_not_json_is_named(coco_copy: Path) -> None:
    val = coco_copy / "annotations" / "instances_val.json"
    val.write_text("{not json")
    with pytest.raises(DataError, match=rf"{re.escape(str(val))} is not valid JSON"):
        load_dataset("coco", coco_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("images"), "missing key 'images'"),
        (lambda p: p.update(annotations={}), "key 'annotations' must be a list"),
        (lambda p: p["images"][1].pop("file_name"), r"missing key 'images\[1\].file_name'"),
        (lambda p: p["images"][0].update(id="1"), r"'images\[0\].id' must be an integer"),
        (lambda p: p["annotations"][2].update(bbox=[1, 2, 3]), r"annotations\[2\].bbox' must be 4"),
        (lambda p: p["annotations"][2].update(bbox=[1, 2, "3", 4]), "must be 4 numbers"),
        (lambda p: p["annotations"][0].update(category_id=9), "unknown category_id 9"),
        (lambda p: p["annotations"][0].update(image_id=77), "image_id 77, which has no image"),
        (lambda p: p["categories"][0].pop("name"), r"missing key 'categories\[0\].name'"),
        (lambda p: p["images"].append(dict(p["images"][0])), "duplicate image id 1"),
    ],
)
def test_malformed_annotations_name_the_json(coco_copy: Path, edit, message: str) -> None:
    train = coco_copy / "annotations" / "instances_train.json"
    rewrite_json(train, edit)
    with pytest.raises(DataError, match=message) as error:
        load_dataset("coco", coco_copy)
    assert str(train) in str(error.value)


def test_json_without_a_split_name_is_rejected(coco_copy: Path) -> None:
    shutil.copy(
        coco_copy / "annotations" / "instances_val.json", coco_copy / "annotations" / "extra.json"
    )
    with pytest.raises(DataError, match=r"cannot tell the split of .*extra.json"):
        load_dataset("coco", coco_copy)


def test_image_in_two_splits_is_rejected(coco_copy: Path) -> None:
    rewrite_json(
        coco_copy / "annotations" / "instances_test.json",
        lambda p: p["images"][0].update(file_name="a.png"),
    )
    with pytest.raises(
        DataError, match=r"listed in both .*instances_test.json and .*instances_train.json"
    ):
        load_dataset("coco", coco_copy)


def test_json_without_images_is_an_empty_category(coco_copy: Path) -> None:
    test = coco_copy / "annotations" / "instances_test.json"
    rewrite_json(test, lambda p: p.update(images=[], annotations=[]))
    with pytest.raises(DataError, match=rf"{re.escape(str(test))} lists no images"):
        load_dataset("coco", coco_copy)


def test_no_annotation_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no annotation files"):
        load_dataset("coco", tmp_path)


# -- synthetic -----------------------------------------------------------------------


def test_synthetic_reads_the_generator_layout(synthetic_root: Path) -> None:
    dataset = load_dataset("synthetic", synthetic_root)
    assert dataset.name == "synthetic"
    assert dataset.categories == ["brushed_metal", "textile"]
    per_class = {"train": 2, "val": 1, "test": 1}
    assert dataset.summary() == {
        "dataset": "synthetic",
        "categories": {
            surface: {
                split: {"crack": n, "good": n, "scratch": n} for split, n in per_class.items()
            }
            for surface in ("brushed_metal", "textile")
        },
    }
    for sample in dataset:
        assert sample.mask_path is not None
        assert sample.image_path.parent.parent.name == sample.split
        if sample.label == "good":
            assert sample.boxes == ()
            assert not sample.load_mask().any()  # a valid, all-zero mask
        else:
            assert sample.boxes == (Box(sample.label, (4.0, 6.0, 10.0, 8.0)),)
            assert sample.load_mask().sum() == 80


def test_synthetic_mvtec_half_loads_as_mvtec_ad(synthetic_root: Path) -> None:
    dataset = load_dataset("mvtec-ad", synthetic_root / "mvtec")
    assert dataset.categories == ["brushed_metal", "textile"]
    assert {s.label for s in dataset if s.split == "test"} == {"good", "scratch", "crack"}


@pytest.fixture
def synthetic_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_root, tmp_path / "synth"))


def test_synthetic_needs_its_manifest(synthetic_copy: Path) -> None:
    (synthetic_copy / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"inspectray data synth --out"):
        load_dataset("synthetic", synthetic_copy)


def test_synthetic_rejects_a_foreign_manifest(synthetic_copy: Path) -> None:
    rewrite_json(synthetic_copy / "manifest.json", lambda p: p.update(generator="someone-else"))
    with pytest.raises(DataError, match=r"'someone-else'.*inspectray data synth --out"):
        load_dataset("synthetic", synthetic_copy)


def test_synthetic_surface_without_images_is_named(synthetic_copy: Path) -> None:
    rewrite_json(synthetic_copy / "manifest.json", lambda p: p["surfaces"].append("wood"))
    with pytest.raises(DataError, match=r"category 'wood' of .*manifest.json has no images"):
        load_dataset("synthetic", synthetic_copy)


def test_synthetic_plain_coco_root_is_not_synthetic(coco_root: Path) -> None:
    with pytest.raises(DataError, match=r"not a synthetic dataset"):
        load_dataset("synthetic", coco_root)
