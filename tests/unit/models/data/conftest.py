"""Small real datasets on disk, one per format, built once per session with PIL.

Images are 32x32 (or 100x80 for Screws) noise PNGs: noise does not compress, so
cutting a file in half really truncates its pixel data. Tests that break a
dataset copy one of these trees into their own ``tmp_path`` first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 32


def write_png(path: Path, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> Path:
    """A noise RGB PNG of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, box: tuple[int, int, int, int] | None, size: int = SIZE) -> Path:
    """An L PNG mask, 255 inside ``box`` (x, y, w, h), all zero when box is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), dtype=np.uint8)
    if box is not None:
        x, y, w, h = box
        mask[y : y + h, x : x + w] = 255
    Image.fromarray(mask, mode="L").save(path)
    return path


def write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


# -- ELPV --------------------------------------------------------------------------

ELPV_PROBABILITIES = ("0.0", "0.3333333333333333", "0.6666666666666666", "1.0")


@pytest.fixture(scope="session")
def elpv_tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own ELPV copy: 3 cells per (type, probability), 24 in all."""
    root = tmp_path_factory.mktemp("elpv_tiny")
    lines = []
    index = 0
    for cell_type in ("mono", "poly"):
        for probability in ELPV_PROBABILITIES:
            for _ in range(3):
                index += 1
                name = f"images/cell{index:04d}.png"
                write_png(root / name, size=(8, 8), seed=index)
                lines.append(f"{name}  {probability:<20}{cell_type}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


# -- MVTec AD ----------------------------------------------------------------------

# category -> {folder type -> image count}; "train" is train/good.
MVTEC_AD_LAYOUT = {
    "bottle": {"train": 12, "good": 3, "broken": 2, "crack": 2},
    "tile": {"train": 5, "good": 1, "scratch": 1},
}


def build_mvtec_ad(root: Path, layout: dict[str, dict[str, int]] = MVTEC_AD_LAYOUT) -> Path:
    """An MVTec AD tree; every defective test image gets its mask."""
    seed = 0
    for category, counts in layout.items():
        for kind, count in counts.items():
            for index in range(count):
                seed += 1
                if kind == "train":
                    write_png(root / category / "train" / "good" / f"{index:03d}.png", seed=seed)
                    continue
                write_png(root / category / "test" / kind / f"{index:03d}.png", seed=seed)
                if kind != "good":
                    mask = root / category / "ground_truth" / kind / f"{index:03d}_mask.png"
                    write_mask(mask, (4, 4, 8, 8))
    # Not categories: a folder without train/ and test/, and a loose file.
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "readme.txt").write_text("not a category")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    return root


@pytest.fixture(scope="session")
def mvtec_ad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mvtec_ad(tmp_path_factory.mktemp("mvtec_ad"))


# -- COCO --------------------------------------------------------------------------

COCO_CATEGORIES = [
    {"id": 1, "name": "scratch", "supercategory": "defect"},
    {"id": 2, "name": "dent", "supercategory": "defect"},
]


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list, area: float | None = None):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}
    if area is not None:
        ann["area"] = area
    ann["iscrowd"] = 0
    return ann


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain COCO tree named ``widgets`` covering each labelling rule.

    train: a.png good (no annotations); b.png 2 scratch + 1 dent -> scratch;
    c.png 1 scratch (area 10) + 1 dent (area 50) -> dent (area breaks the tie);
    d.png 1 scratch + 1 dent, same bbox, no area -> dent (name breaks the tie);
    sub/e.png with product_category gears, defect_type bent and a mask;
    loose.png lies in ROOT, not ROOT/images (the fallback).
    val: f.png good. test: g.png one scratch.
    """
    root = tmp_path_factory.mktemp("coco") / "widgets"
    for seed, name in enumerate(["a", "b", "c", "d", "sub/e", "f", "g"]):
        write_png(root / "images" / f"{name}.png", seed=seed)
    write_png(root / "loose.png", seed=99)
    write_mask(root / "masks" / "e_mask.png", (2, 2, 10, 10))

    def image(image_id: int, file_name: str, **extra: str) -> dict:
        return {"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE, **extra}

    write_json(
        root / "annotations" / "instances_train.json",
        {
            "images": [
                image(1, "a.png"),
                image(2, "b.png"),
                image(3, "c.png"),
                image(4, "d.png"),
                image(
                    5,
                    "sub/e.png",
                    product_category="gears",
                    defect_type="bent",
                    mask_file="e_mask.png",
                ),
                image(6, "loose.png"),
            ],
            "annotations": [
                _ann(1, 2, 1, [1, 2, 3, 4], 12),
                _ann(2, 2, 1, [5, 5, 2, 2], 4),
                _ann(3, 2, 2, [0, 0, 20, 20], 400),
                _ann(4, 3, 1, [0, 0, 5, 2], 10),
                _ann(5, 3, 2, [0, 0, 10, 5], 50),
                _ann(6, 4, 1, [1, 1, 4, 4]),
                _ann(7, 4, 2, [1, 1, 4, 4]),
                _ann(8, 5, 1, [2, 2, 10, 10], 100),
            ],
            "categories": COCO_CATEGORIES,
        },
    )
    write_json(
        root / "annotations" / "instances_val.json",
        {"images": [image(1, "f.png")], "annotations": [], "categories": COCO_CATEGORIES},
    )
    write_json(
        root / "annotations" / "instances_test.json",
        {
            "images": [image(1, "g.png")],
            "annotations": [_ann(1, 1, 1, [3, 3, 6, 6], 36)],
            "categories": COCO_CATEGORIES,
        },
    )
    return root


@pytest.fixture(scope="session")
def coco_no_val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO with train and test files only: 10 good + 10 scratch train images."""
    root = tmp_path_factory.mktemp("coco_no_val") / "plates"
    images, annotations = [], []
    for index in range(20):
        name = f"train_{index:02d}.png"
        write_png(root / "images" / name, seed=index)
        images.append({"id": index, "file_name": name})
        if index >= 10:
            annotations.append(_ann(index, index, 1, [0, 0, 4, 4], 16))
    write_json(
        root / "annotations" / "instances_train.json",
        {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES},
    )
    write_png(root / "images" / "test_00.png", seed=50)
    write_json(
        root / "annotations" / "instances_test.json",
        {
            "images": [{"id": 0, "file_name": "test_00.png"}],
            "annotations": [],
            "categories": COCO_CATEGORIES,
        },
    )
    return root


# -- synthetic (the generator's layout, written by hand) -----------------------------

SYNTHETIC_SURFACES = ("brushed_metal", "textile")
SYNTHETIC_TYPES = ("scratch", "crack", "perforation", "contamination", "deformation")
SYNTHETIC_CLASSES = ("good", "scratch", "crack")  # a subset of the types keeps it small
SYNTHETIC_PER_SPLIT = {"train": 2, "val": 1, "test": 1}


def build_synthetic(out: Path) -> Path:
    """``inspectray data synth --out OUT`` output, in miniature."""
    categories = [
        {"id": i, "name": name, "supercategory": "defect"}
        for i, name in enumerate(SYNTHETIC_TYPES, start=1)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    seed = 0
    for split, count in SYNTHETIC_PER_SPLIT.items():
        images, annotations = [], []
        for surface in SYNTHETIC_SURFACES:
            for cls in SYNTHETIC_CLASSES:
                for index in range(count):
                    seed += 1
                    rel = f"{split}/{surface}/{cls}_{index:04d}.png"
                    write_png(out / "coco" / "images" / rel, seed=seed)
                    box = None if cls == "good" else (4, 6, 10, 8)
                    write_mask(out / "coco" / "masks" / rel, box)
                    image_id = len(images) + 1
                    images.append(
                        {
                            "id": image_id,
                            "file_name": rel,
                            "width": SIZE,
                            "height": SIZE,
                            "product_category": surface,
                            "defect_type": cls,
                            "mask_file": rel,
                        }
                    )
                    if box is not None:
                        x, y, w, h = box
                        annotations.append(
                            {
                                "id": len(annotations) + 1,
                                "image_id": image_id,
                                "category_id": category_id[cls],
                                "bbox": [x, y, w, h],
                                "area": w * h,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                                "iscrowd": 0,
                            }
                        )
        write_json(
            out / "coco" / "annotations" / f"instances_{split}.json",
            {"images": images, "annotations": annotations, "categories": categories},
        )
    # The MVTec AD half of the output: train/good, test/<class>, ground_truth masks.
    for surface in SYNTHETIC_SURFACES:
        for index in range(3):
            write_png(out / "mvtec" / surface / "train" / "good" / f"{index:03d}.png", seed=index)
        for cls in SYNTHETIC_CLASSES:
            write_png(out / "mvtec" / surface / "test" / cls / "000.png", seed=7)
            if cls != "good":
                write_mask(out / "mvtec" / surface / "ground_truth" / cls / "000_mask.png", None)
    write_json(
        out / "manifest.json",
        {
            "generator": "inspectray-synthetic",
            "format_version": 1,
            "seed": 0,
            "images_per_class": 4,
            "size": SIZE,
            "surfaces": list(SYNTHETIC_SURFACES),
            "defect_types": list(SYNTHETIC_TYPES),
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
    )
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("synthetic"))


# -- MVTec Screws ------------------------------------------------------------------

SCREWS_IMAGE = (100, 80)  # width, height

# Rotated boxes (row, col, width, height, phi) whose crops test_mvtec_screws.py
# works out by hand: phi = 0, phi = pi/2, one clipped at the image's top-right
# corner, and one at 30 degrees.
SCREWS_CHECKED_BOXES = [
    (40.0, 50.0, 20.0, 10.0, 0.0),
    (40.0, 50.0, 20.0, 10.0, math.pi / 2),
    (5.0, 95.0, 20.0, 10.0, 0.0),
    (30.5, 40.25, 24.0, 8.0, math.pi / 6),
]


def _screws_split(root: Path, split: str, boxes: list[tuple], first_image_id: int) -> None:
    """One split file: each box on its own image, alternating type_001 / type_002."""
    images, annotations = [], []
    for i, rotated in enumerate(boxes):
        image_id = first_image_id + i
        name = f"screws_{image_id:03d}.png"
        write_png(root / "images" / name, size=SCREWS_IMAGE, seed=image_id)
        images.append(
            {"id": image_id, "file_name": name, "width": SCREWS_IMAGE[0], "height": SCREWS_IMAGE[1]}
        )
        annotations.append(
            {
                "id": 100 + image_id,
                "image_id": image_id,
                "category_id": 1 + i % 2,
                "bbox": list(rotated),
                "area": rotated[2] * rotated[3],
                "is_crowd": 0,
            }
        )
    write_json(
        root / f"mvtec_screws_{split}.json",
        {
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": 1, "name": "type_001", "supercategory": "screw"},
                {"id": 2, "name": "type_002", "supercategory": "nut"},
            ],
        },
    )


@pytest.fixture(scope="session")
def screws_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train: the hand-checked boxes and 4 more; val 2; test 2.

    Train image ids 1..8 (annotation id = 100 + image id), val 11..12, test 21..22.
    """
    root = tmp_path_factory.mktemp("screws")
    plain = [(20.0 + 5 * i, 30.0 + 5 * i, 16.0, 6.0, 0.3 * i) for i in range(4)]
    train = SCREWS_CHECKED_BOXES + plain
    _screws_split(root, "train", train, first_image_id=1)
    _screws_split(root, "val", plain[:2], first_image_id=11)
    _screws_split(root, "test", plain[2:], first_image_id=21)
    return root
