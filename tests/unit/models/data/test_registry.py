"""The dataset registry, the shared val rule, and full-decode verification."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from models.data import DATASETS, DataError, Dataset, Sample, load_dataset
from models.data.registry import verify_images
from models.data.splits import split_off_val

# name -> fixture giving its root (ELPV: its custom-root fixture).
ROOT_FIXTURES = {
    "elpv": "elpv_tiny_root",
    "synthetic": "synthetic_root",
    "mvtec-ad": "mvtec_ad_root",
    "mvtec-screws": "screws_root",
    "coco": "coco_root",
}


def test_registry_names_every_format() -> None:
    assert set(DATASETS) == set(ROOT_FIXTURES)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'mvtec'") as error:
        load_dataset("mvtec")
    for name in DATASETS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ["synthetic", "mvtec-ad", "mvtec-screws", "coco"])
def test_formats_without_a_default_ask_for_root(name: str) -> None:
    with pytest.raises(DataError, match=r"--root"):
        load_dataset(name)


@pytest.mark.parametrize("name", sorted(ROOT_FIXTURES))
def test_missing_folder_is_named(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"dataset folder not found: {re.escape(str(missing))}"):
        load_dataset(name, missing)


@pytest.mark.parametrize("name", sorted(ROOT_FIXTURES))
def test_loading_is_deterministic_sorted_and_ids_are_unique(
    name: str, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue(ROOT_FIXTURES[name])
    first, second = load_dataset(name, root), load_dataset(name, str(root))
    assert first == second
    assert first.name == name
    ids = [s.sample_id for s in first]
    assert len(set(ids)) == len(ids)
    assert all(s.sample_id for s in first)
    # Val is taken from train wherever a format lacks one, so every split exists.
    assert {s.split for s in first} == {"train", "val", "test"}


@pytest.mark.parametrize("name", sorted(ROOT_FIXTURES))
def test_every_fixture_fully_decodes(name: str, request: pytest.FixtureRequest) -> None:
    dataset = load_dataset(name, request.getfixturevalue(ROOT_FIXTURES[name]))
    files = {s.image_path for s in dataset} | {s.mask_path for s in dataset if s.mask_path}
    assert verify_images(dataset) == len(files)
    assert verify_images(dataset, workers=1) == len(files)


def test_verify_counts_images_and_masks_once(mvtec_ad_root: Path, screws_root: Path) -> None:
    # bottle 12 train + 7 test, tile 5 + 2 images; 4 + 1 masks of defective test images.
    assert verify_images(load_dataset("mvtec-ad", mvtec_ad_root)) == 26 + 5
    # Screws: 12 photos, one sample per annotation; a shared photo would count once.
    assert verify_images(load_dataset("mvtec-screws", screws_root)) == 12


@pytest.fixture
def mvtec_copy(mvtec_ad_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mvtec_ad_root, tmp_path / "mvtec"))


def test_truncated_png_is_found_by_verify_not_by_indexing(mvtec_copy: Path) -> None:
    bad = mvtec_copy / "bottle" / "test" / "broken" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    dataset = load_dataset("mvtec-ad", mvtec_copy)  # lazy: indexing still succeeds
    with pytest.raises(DataError, match=rf"truncated image {re.escape(str(bad))}"):
        verify_images(dataset)
    (sample,) = [s for s in dataset if s.image_path == bad]
    with pytest.raises(DataError, match=re.escape(str(bad))):
        sample.load_image()


def test_zero_byte_image_is_named(mvtec_copy: Path) -> None:
    bad = mvtec_copy / "tile" / "train" / "good" / "002.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        verify_images(load_dataset("mvtec-ad", mvtec_copy))


def test_verify_names_the_first_bad_file_in_dataset_order(mvtec_copy: Path) -> None:
    # Samples are sorted by id, so bottle/... comes before tile/...
    first = mvtec_copy / "bottle" / "train" / "good" / "011.png"
    later = mvtec_copy / "tile" / "train" / "good" / "000.png"
    for path in (later, first):
        path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(first))):
        verify_images(load_dataset("mvtec-ad", mvtec_copy), workers=2)


def test_mask_of_another_size_is_named(mvtec_copy: Path) -> None:
    mask = mvtec_copy / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    Image.new("L", (16, 16)).save(mask)
    with pytest.raises(DataError, match=rf"mask {re.escape(str(mask))} is"):
        verify_images(load_dataset("mvtec-ad", mvtec_copy))


def test_crop_outside_its_image_is_named(mvtec_ad_root: Path) -> None:
    image = mvtec_ad_root / "tile" / "train" / "good" / "000.png"  # 32x32
    sample = Sample(image, "tile", "good", "train", crop=(20, 0, 20, 10), sample_id="x")
    with pytest.raises(DataError, match=r"crop .* of sample x lies outside"):
        verify_images(Dataset("t", (sample,)))


def _train(category: str, label: str, n: int) -> list[Sample]:
    return [
        Sample(
            Path(f"{category}/{label}/{i}.png"),
            category,
            label,
            "train",
            sample_id=f"{category}/{label}/{i}",
        )
        for i in range(n)
    ]


def test_val_rule_is_ten_percent_per_category_and_stratified() -> None:
    samples = _train("a", "good", 40) + _train("a", "scratch", 20) + _train("b", "good", 7)
    split = split_off_val(samples)
    val = [s for s in split if s.split == "val"]
    counts = {(s.category, s.label): 0 for s in samples}
    for s in val:
        counts[(s.category, s.label)] += 1
    # a: 10 % of 60 = 6, shared 4 / 2; b: 10 % of 7 rounds to 1.
    assert counts == {("a", "good"): 4, ("a", "scratch"): 2, ("b", "good"): 1}
    assert [s.sample_id for s in split] == [s.sample_id for s in samples]  # order kept


def test_val_rule_is_deterministic_and_order_independent() -> None:
    samples = _train("a", "good", 30) + _train("b", "good", 30)
    forward = {s.sample_id for s in split_off_val(samples) if s.split == "val"}
    backward = {s.sample_id for s in split_off_val(samples[::-1]) if s.split == "val"}
    assert forward == backward
    # A category's choice does not depend on the other categories being there.
    only_a = {s.sample_id for s in split_off_val(samples[:30]) if s.split == "val"}
    assert only_a == {i for i in forward if i.startswith("a/")}


def test_val_rule_takes_one_of_two_and_none_of_one() -> None:
    assert sum(s.split == "val" for s in split_off_val(_train("a", "good", 2))) == 1
    assert sum(s.split == "val" for s in split_off_val(_train("a", "good", 1))) == 0
    # Half a sample rounds up, not to even: 2.5 of 25 is 3.
    assert sum(s.split == "val" for s in split_off_val(_train("a", "good", 25))) == 3
    # A label's last train image is never moved out of train.
    lone = _train("a", "good", 9) + _train("a", "rare", 1)
    assert [s.split for s in split_off_val(lone) if s.label == "rare"] == ["train"]


def test_val_rule_leaves_other_splits_alone() -> None:
    test = [Sample(Path("t.png"), "a", "good", "test", sample_id="t")]
    assert split_off_val(test + _train("a", "good", 10))[0].split == "test"


def test_a_label_is_held_out_of_training_and_validation_only() -> None:
    samples = tuple(
        Sample(Path(f"{split}-{label}.png"), "part", label, split, sample_id=f"{split}-{label}")
        for split in ("train", "val", "test")
        for label in ("good", "crack", "dent")
    )
    held = Dataset("d", samples).without_labels(["dent"])
    assert [s.sample_id for s in held.samples if s.label == "dent"] == ["test-dent"]
    assert len(held) == len(samples) - 2
    with pytest.raises(DataError, match="no label"):
        Dataset("d", samples).without_labels(["scratch"])
