"""MVTec Screws: rotated boxes around screws and nuts, one sample per object.

Ulrich and Steger, "MVTec Screws", in the MVTec ITODD / HALCON deep-learning
examples. Layout::

    ROOT/mvtec_screws_train.json, mvtec_screws_val.json, mvtec_screws_test.json
    ROOT/images/<file_name>

The JSON is COCO-like, but ``bbox`` is a rotated box ``[row, col, width, height,
phi]``: centre at (row, col) pixels, ``phi`` in radians. Each annotation becomes
one :class:`Sample` whose ``crop`` is the axis-aligned rectangle around the
rotated box, so classifiers see one object per image. Without a val file, val is a
stratified 10 % of train (:func:`models.data.splits.split_off_val`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from models.data.coco import json_field, json_numbers, read_categories, read_json
from models.data.dataset import Dataset, dataset_folder
from models.data.sample import SPLITS, Box, DataError, Sample
from models.data.splits import split_off_val

CATEGORY = "screws"
UNSPLIT_FILE = "mvtec_screws.json"


def split_file(root: Path, split: str) -> Path:
    """The annotation file of one split."""
    return root / f"mvtec_screws_{split}.json"


def rotated_corners(row: float, col: float, width: float, height: float, phi: float) -> np.ndarray:
    """Corner points (x, y) of a rotated box, as OpenCV's ``boxPoints`` gives them.

    The box is OpenCV's ``((col, row), (width, height), degrees(-phi))``: width
    runs along x before rotation, and a positive ``phi`` turns counter-clockwise
    in image coordinates (y down), hence the minus.

    Returns:
        (4, 2) array of (x, y) corners.
    """
    theta = -phi
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (width / 2, height / 2)  # (4, 2)
    return half @ rotation.T + (col, row)


def crop_of(
    rotated: tuple[float, float, float, float, float], image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """The axis-aligned integer rectangle around a rotated box, clipped to the image.

    Args:
        rotated: ``(row, col, width, height, phi)``.
        image_width: image width in pixels (the crop is clipped to it).
        image_height: image height in pixels.

    Returns:
        ``(x, y, w, h)``; ``w`` or ``h`` is 0 when the box lies outside the image.
    """
    # Rounding first keeps float noise (cos(pi/2) = 6e-17) from adding a pixel.
    corners = np.round(rotated_corners(*rotated), 6)
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
    x0, x1 = (int(np.clip(v, 0, image_width)) for v in (x0, x1))
    y0, y1 = (int(np.clip(v, 0, image_height)) for v in (y0, y1))
    return x0, y0, x1 - x0, y1 - y0


def _read_split(root: Path, path: Path, split: str) -> list[tuple[tuple[int, int, int], Sample]]:
    """``(sort key, sample)`` for every annotation of one split file."""
    payload = read_json(path)
    categories = read_categories(payload, path)
    images: dict[int, tuple[Path, int, int]] = {}
    for i, entry in enumerate(json_field(payload, "images", "list", path)):
        where = f"images[{i}]"
        image_id = json_field(entry, "id", "int", path, where)
        image_path = root / "images" / json_field(entry, "file_name", "str", path, where)
        if image_id in images:
            raise DataError(f"{path}: duplicate image id {image_id} at {where}")
        if not image_path.is_file():
            raise DataError(f"image file not found: {image_path} (referenced by {where} of {path})")
        images[image_id] = (
            image_path,
            json_field(entry, "width", "int", path, where),
            json_field(entry, "height", "int", path, where),
        )

    rows = []
    ann_ids: set[int] = set()
    for i, entry in enumerate(json_field(payload, "annotations", "list", path)):
        where = f"annotations[{i}]"
        ann_id = json_field(entry, "id", "int", path, where)
        if ann_id in ann_ids:
            raise DataError(f"{path}: duplicate annotation id {ann_id} at {where}")
        ann_ids.add(ann_id)
        image_id = json_field(entry, "image_id", "int", path, where)
        category_id = json_field(entry, "category_id", "int", path, where)
        rotated = tuple(json_numbers(entry, "bbox", 5, path, where))
        if image_id not in images:
            raise DataError(f"{path}: {where} refers to image_id {image_id}, which has no image")
        if category_id not in categories:
            raise DataError(f"{path}: {where} has unknown category_id {category_id}")
        image_path, width, height = images[image_id]
        crop = crop_of(rotated, width, height)
        if crop[2] == 0 or crop[3] == 0:
            raise DataError(
                f"{path}: annotation id {ann_id} ({where}) has an empty crop {crop} in "
                f"{image_path} ({width}x{height}): its box {list(rotated)} lies outside the image"
            )
        label = categories[category_id]
        sample = Sample(
            image_path=image_path,
            category=CATEGORY,
            label=label,
            split=split,
            boxes=(Box(label, (0.0, 0.0, float(crop[2]), float(crop[3])), rotated=rotated),),
            crop=crop,
            sample_id=f"{split}/{image_id}_{ann_id}",
        )
        rows.append(((SPLITS.index(split), image_id, ann_id), sample))
    if not rows:
        raise DataError(f"category {CATEGORY!r} is empty: {path} has no annotations")
    return rows


def load_mvtec_screws(root: Path | None) -> Dataset:
    """Load MVTec Screws, one sample per annotated object.

    Args:
        root: the folder holding the split JSON files and ``images/``.

    Raises:
        DataError: no root, a missing folder, split file or image, a bad
            annotation, or a box entirely outside its image (named).
    """
    root = dataset_folder("mvtec-screws", root)
    rows = []
    for split in SPLITS:
        path = split_file(root, split)
        if not path.is_file():
            if split == "val":
                continue  # carved out of train below
            message = f"MVTec Screws split file not found: {path}"
            if (root / UNSPLIT_FILE).is_file():
                message += (
                    f" ({root / UNSPLIT_FILE} exists, but it is the unsplit annotation file; "
                    "the loader needs the train/val/test files shipped beside it)"
                )
            raise DataError(message)
        rows.extend(_read_split(root, path, split))
    samples = [sample for _, sample in sorted(rows, key=lambda row: row[0])]
    if not any(s.split == "val" for s in samples):
        samples = split_off_val(samples)
    return Dataset("mvtec-screws", tuple(samples))
