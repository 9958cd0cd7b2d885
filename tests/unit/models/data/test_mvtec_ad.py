"""The MVTec AD folder layout."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from models.data import DataError, load_dataset


def test_summary_shape(mvtec_ad_root: Path) -> None:
    # bottle: 12 train/good -> 1 val; tile: 5 -> 1 val (at least one of two or more).
    assert load_dataset("mvtec-ad", mvtec_ad_root).summary() == {
        "dataset": "mvtec-ad",
        "categories": {
            "bottle": {
                "train": {"good": 11},
                "val": {"good": 1},
                "test": {"broken": 2, "crack": 2, "good": 3},
            },
            "tile": {"train": {"good": 4}, "val": {"good": 1}, "test": {"good": 1, "scratch": 1}},
        },
    }


def test_masks_ids_and_sources(mvtec_ad_root: Path) -> None:
    dataset = load_dataset("mvtec-ad", mvtec_ad_root)
    for sample in dataset:
        folder = "train" if sample.split in ("train", "val") else "test"
        assert sample.image_path.parent == mvtec_ad_root / sample.category / folder / sample.label
        assert (
            sample.sample_id
            == f"{sample.category}/{folder}/{sample.label}/{sample.image_path.name}"
        )
        if sample.is_anomalous:
            expected = f"{sample.image_path.stem}_mask.png"
            assert (
                sample.mask_path
                == mvtec_ad_root / sample.category / "ground_truth" / sample.label / expected
            )
            assert sample.load_mask().sum() == 64
        else:
            assert sample.mask_path is None
    assert "docs" not in dataset.categories  # no train/ and test/: not a category


@pytest.fixture
def mvtec_copy(mvtec_ad_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mvtec_ad_root, tmp_path / "mvtec"))


def test_missing_mask_names_image_and_expected_mask(mvtec_copy: Path) -> None:
    mask = mvtec_copy / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    image = mvtec_copy / "bottle" / "test" / "crack" / "001.png"
    with pytest.raises(
        DataError,
        match=rf"no mask for test image {re.escape(str(image))}: expected {re.escape(str(mask))}",
    ):
        load_dataset("mvtec-ad", mvtec_copy)


def test_empty_train_folder_names_category_and_folder(mvtec_copy: Path) -> None:
    good = mvtec_copy / "tile" / "train" / "good"
    for path in good.iterdir():
        path.unlink()
    with pytest.raises(
        DataError, match=rf"category 'tile' has no training images: {re.escape(str(good))}"
    ):
        load_dataset("mvtec-ad", mvtec_copy)


def test_empty_test_folder_names_category_and_folder(mvtec_copy: Path) -> None:
    test = mvtec_copy / "tile" / "test"
    shutil.rmtree(test)
    test.mkdir()
    with pytest.raises(
        DataError, match=rf"category 'tile' has no test images: {re.escape(str(test))}"
    ):
        load_dataset("mvtec-ad", mvtec_copy)


def test_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "bottle" / "train").mkdir(parents=True)  # no test/: not a category
    with pytest.raises(DataError, match=rf"no category in {re.escape(str(tmp_path))}"):
        load_dataset("mvtec-ad", tmp_path)


def test_jpg_and_stray_files(mvtec_copy: Path) -> None:
    good = mvtec_copy / "tile" / "train" / "good"
    shutil.copy(good / "000.png", good / "100.JPG")  # suffix case does not matter
    (good / "notes.txt").write_text("ignored")
    (good / ".DS_Store").write_bytes(b"\0")
    dataset = load_dataset("mvtec-ad", mvtec_copy)
    names = {s.image_path.name for s in dataset.select("tile") if s.split != "test"}
    assert names == {"000.png", "001.png", "002.png", "003.png", "004.png", "100.JPG"}
