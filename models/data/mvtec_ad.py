"""The MVTec AD folder layout (Bergmann et al., "MVTec AD", CVPR 2019).

Layout, one folder per product category::

    ROOT/<category>/train/good/*.png            normal images only
    ROOT/<category>/test/<type>/*.png           ``good`` and one folder per defect type
    ROOT/<category>/ground_truth/<type>/<stem>_mask.png   for every defective test image

Folders without both ``train/`` and ``test/`` (licence files, a readme) are not
categories and are skipped. The layout has no val split: val is a stratified
10 % of train (:func:`models.data.splits.split_off_val`).
"""

from __future__ import annotations

from pathlib import Path

from models.data.dataset import Dataset, dataset_folder
from models.data.sample import GOOD, DataError, Sample
from models.data.splits import split_off_val

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _category_samples(folder: Path) -> list[Sample]:
    """Train and test samples of one category folder."""
    category = folder.name
    good = folder / "train" / GOOD
    train = _images_in(good) if good.is_dir() else []
    if not train:
        raise DataError(f"category {category!r} has no training images: {good} is empty or missing")

    samples = [
        Sample(
            image_path=path,
            category=category,
            label=GOOD,
            split="train",
            sample_id=f"{category}/train/{GOOD}/{path.name}",
        )
        for path in train
    ]
    test = folder / "test"
    for type_folder in sorted(p for p in test.iterdir() if p.is_dir()):
        label = type_folder.name
        for path in _images_in(type_folder):
            mask_path = None
            if label != GOOD:
                mask_path = folder / "ground_truth" / label / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise DataError(f"no mask for test image {path}: expected {mask_path}")
            samples.append(
                Sample(
                    image_path=path,
                    category=category,
                    label=label,
                    split="test",
                    mask_path=mask_path,
                    sample_id=f"{category}/test/{label}/{path.name}",
                )
            )
    if len(samples) == len(train):
        raise DataError(f"category {category!r} has no test images: {test} has none")
    return samples


def load_mvtec_ad(root: Path | None) -> Dataset:
    """Load a dataset in the MVTec AD folder layout.

    Args:
        root: the folder holding one folder per category.

    Raises:
        DataError: no root, a missing folder, no category, a category with no
            train or test images, or a defective test image without its mask.
    """
    root = dataset_folder("mvtec-ad", root)
    folders = sorted(
        p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir() and (p / "test").is_dir()
    )
    if not folders:
        raise DataError(
            f"no category in {root}: expected folders like {root}/<category>/train/good "
            f"and {root}/<category>/test"
        )
    samples = [s for folder in folders for s in _category_samples(folder)]
    samples = split_off_val(samples)
    return Dataset("mvtec-ad", tuple(sorted(samples, key=lambda s: s.sample_id)))
