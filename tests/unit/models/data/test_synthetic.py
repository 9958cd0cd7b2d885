"""Tests of the synthetic defect generator, on small datasets generated once per module."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from models.data import synthetic
from models.data.sample import GOOD, SPLITS, DataError
from models.data.synthetic import CLASSES, DEFECT_TYPES, SURFACES, generate, split_counts

SEED, PER_CLASS, SIZE = 3, 5, 128


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, PER_CLASS, SEED, size=SIZE)
    return out


@pytest.fixture(scope="module")
def coco(dataset: Path) -> dict[str, dict]:
    return {
        split: json.loads(
            (dataset / "coco" / "annotations" / f"instances_{split}.json").read_text()
        )
        for split in SPLITS
    }


# --------------------------------------------------------------------------- arguments and files


def test_split_rule_rounds_half_up_and_keeps_one_of_each() -> None:
    assert split_counts(4) == {"train": 2, "val": 1, "test": 1}
    assert split_counts(5) == {"train": 3, "val": 1, "test": 1}
    # 25 % of 10 is 2.5 -> 3 (not banker's 2); 10 % of the 7 left is 0.7 -> 1.
    assert split_counts(10) == {"train": 6, "val": 1, "test": 3}
    assert split_counts(20) == {"train": 13, "val": 2, "test": 5}
    for n in range(4, 60):
        counts = split_counts(n)
        assert sum(counts.values()) == n
        assert min(counts.values()) >= 1


def test_manifest_describes_the_dataset(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest == {
        "generator": "inspectray-synthetic",
        "format_version": 1,
        "seed": SEED,
        "images_per_class": PER_CLASS,
        "size": SIZE,
        "surfaces": list(SURFACES),
        "defect_types": list(DEFECT_TYPES),
        "splits": split_counts(PER_CLASS),
    }


def test_layout_and_counts_follow_the_split_rule(dataset: Path, coco: dict[str, dict]) -> None:
    counts = split_counts(PER_CLASS)
    start = {"train": 0, "val": counts["train"], "test": counts["train"] + counts["val"]}
    for split in SPLITS:
        doc = coco[split]
        assert doc["info"] == {
            "description": "inspectray synthetic industrial defects",
            "version": "1",
            "seed": SEED,
        }
        assert doc["licenses"] == []
        assert len(doc["images"]) == len(SURFACES) * len(CLASSES) * counts[split]
        assert [e["id"] for e in doc["images"]] == list(range(1, len(doc["images"]) + 1))
        expected = {
            f"{split}/{surface}/{label}_{index:04d}.png"
            for surface in SURFACES
            for label in CLASSES
            for index in range(start[split], start[split] + counts[split])
        }
        assert {e["file_name"] for e in doc["images"]} == expected
        for entry in doc["images"]:
            surface, stem = entry["file_name"].split("/")[1:]
            assert entry["product_category"] == surface
            assert entry["defect_type"] == stem.rsplit("_", 1)[0]
            assert entry["mask_file"] == entry["file_name"]
            assert (entry["width"], entry["height"]) == (SIZE, SIZE)
        # Nothing on disk that the JSON does not list.
        on_disk = {
            str(p.relative_to(dataset / "coco" / "images"))
            for p in (dataset / "coco" / "images" / split).rglob("*.png")
        }
        assert on_disk == expected
        masks_on_disk = {
            str(p.relative_to(dataset / "coco" / "masks"))
            for p in (dataset / "coco" / "masks" / split).rglob("*.png")
        }
        assert masks_on_disk == expected


def test_images_are_rgb_and_masks_binary(dataset: Path, coco: dict[str, dict]) -> None:
    for entry in coco["val"]["images"]:
        with Image.open(dataset / "coco" / "images" / entry["file_name"]) as image:
            assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
            pixels = np.asarray(image)
        # A real texture, not a flat fill or a saturated frame.
        assert 2 < pixels.std() < 80
        assert (pixels == 255).mean() < 0.05
        with Image.open(dataset / "coco" / "masks" / entry["mask_file"]) as mask:
            assert (mask.mode, mask.size) == ("L", (SIZE, SIZE))
            assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_categories_are_the_defect_types_in_order(coco: dict[str, dict]) -> None:
    for doc in coco.values():
        assert doc["categories"] == [
            {"id": i, "name": name, "supercategory": "defect"}
            for i, name in enumerate(
                ["scratch", "crack", "perforation", "contamination", "deformation"], 1
            )
        ]


def test_good_images_are_clean_and_defect_images_annotated(
    dataset: Path, coco: dict[str, dict]
) -> None:
    for doc in coco.values():
        by_image: dict[int, list[dict]] = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for entry in doc["images"]:
            mask = _load(dataset / "coco" / "masks" / entry["mask_file"])
            anns = by_image.get(entry["id"], [])
            if entry["defect_type"] == GOOD:
                assert not mask.any(), entry["file_name"]
                assert anns == []
            else:
                assert mask.any(), entry["file_name"]
                assert 1 <= len(anns) <= 3
                category = DEFECT_TYPES.index(entry["defect_type"]) + 1
                assert {a["category_id"] for a in anns} == {category}


def test_boxes_and_polygons_agree_with_the_masks(dataset: Path, coco: dict[str, dict]) -> None:
    for doc in coco.values():
        assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
        by_image: dict[int, list[dict]] = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for entry in doc["images"]:
            anns = by_image.get(entry["id"], [])
            if not anns:
                continue
            mask = _load(dataset / "coco" / "masks" / entry["mask_file"]) > 0
            covered = np.zeros_like(mask)
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0
                assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
                assert w >= 2 and h >= 2
                inside = mask[y : y + h, x : x + w]
                # Tight: the instance touches all four sides of its box.
                assert inside[0].any() and inside[-1].any()
                assert inside[:, 0].any() and inside[:, -1].any()
                assert 0 < ann["area"] <= inside.sum()
                covered[y : y + h, x : x + w] = True
                assert ann["segmentation"], "no polygon"
                for polygon in ann["segmentation"]:
                    assert len(polygon) >= 6 and len(polygon) % 2 == 0
                    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
                    assert xs.min() >= x and xs.max() <= x + w
                    assert ys.min() >= y and ys.max() <= y + h
            # The boxes together cover every defect pixel.
            assert not (mask & ~covered).any(), entry["file_name"]


def test_polygons_trace_the_instance(dataset: Path, coco: dict[str, dict]) -> None:
    # Rasterising the polygons recovers roughly the annotated area (COCO's own
    # check of a segmentation), for solid defects where outlines are meaningful.
    from skimage.draw import polygon as fill

    checked = 0
    for ann in coco["train"]["annotations"]:
        if DEFECT_TYPES[ann["category_id"] - 1] not in ("perforation", "deformation"):
            continue
        raster = np.zeros((SIZE + 1, SIZE + 1), dtype=bool)
        for poly in ann["segmentation"]:
            rr, cc = fill(np.array(poly[1::2]), np.array(poly[0::2]), raster.shape)
            raster[rr, cc] = True
        assert 0.7 < raster.sum() / ann["area"] < 1.3
        checked += 1
    assert checked >= 5


def test_mvtec_tree_mirrors_the_coco_test_split(dataset: Path) -> None:
    counts = split_counts(PER_CLASS)
    first_test = counts["train"] + counts["val"]
    for surface in SURFACES:
        root = dataset / "mvtec" / surface
        train_good = sorted(p.name for p in (root / "train" / GOOD).iterdir())
        assert train_good == [f"{i:04d}.png" for i in range(first_test)]
        for i in range(first_test):
            split = "train" if i < counts["train"] else "val"
            coco_file = dataset / "coco" / "images" / split / surface / f"good_{i:04d}.png"
            assert os.path.samefile(root / "train" / GOOD / f"{i:04d}.png", coco_file)
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(CLASSES)
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
        for label in CLASSES:
            names = sorted(p.name for p in (root / "test" / label).iterdir())
            assert names == [f"{i:04d}.png" for i in range(first_test, PER_CLASS)]
            for i in range(first_test, PER_CLASS):
                coco_image = dataset / "coco" / "images" / "test" / surface / f"{label}_{i:04d}.png"
                assert (
                    root / "test" / label / f"{i:04d}.png"
                ).read_bytes() == coco_image.read_bytes()
                if label == GOOD:
                    continue
                gt = root / "ground_truth" / label / f"{i:04d}_mask.png"
                coco_mask = dataset / "coco" / "masks" / "test" / surface / f"{label}_{i:04d}.png"
                assert gt.read_bytes() == coco_mask.read_bytes()
                assert _load(gt).any()


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, PER_CLASS, SEED, size=SIZE)
    assert _tree_digest(again) == _tree_digest(dataset)


def test_images_do_not_depend_on_what_else_is_generated(dataset: Path, tmp_path: Path) -> None:
    # Per-image generators: one surface alone renders exactly as within all three.
    alone = tmp_path / "alone"
    manifest = generate(alone, PER_CLASS, SEED, size=SIZE, surfaces=["painted_panel"])
    assert manifest["surfaces"] == ["painted_panel"]
    for path in sorted((alone / "coco" / "images").rglob("*.png")):
        twin = dataset / path.relative_to(alone)
        assert path.read_bytes() == twin.read_bytes(), path.name
    assert not (alone / "mvtec" / "brushed_metal").exists()


def test_another_seed_gives_other_images(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate(other, PER_CLASS, SEED + 1, size=SIZE, surfaces=["stone_tile"])
    paths = sorted((other / "coco" / "images").rglob("*.png"))
    assert len(paths) == PER_CLASS * len(CLASSES)
    for path in paths:
        assert path.read_bytes() != (dataset / path.relative_to(other)).read_bytes()


# ------------------------------------------------------------------ what the defects look like


def _instances(
    label: str, n: int, size: int = 256
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(luminance, instance mask, all-defects mask) of every instance in n images per surface."""
    found = []
    for surface in SURFACES:
        for index in range(n):
            image, masks = synthetic.render_sample(11, surface, label, index, size)
            luma = image.astype(float) @ [0.299, 0.587, 0.114]
            union = np.logical_or.reduce(masks)
            found += [(luma, m, union) for m in masks]
    return found


def _contrast(luma: np.ndarray, mask: np.ndarray, union: np.ndarray) -> float:
    ring = ndimage.binary_dilation(mask, iterations=5) & ~ndimage.binary_dilation(
        union, iterations=2
    )
    return float(luma[mask].mean() - luma[ring].mean())


@pytest.fixture(scope="module")
def lines() -> dict[str, list]:
    return {label: _instances(label, 8) for label in ("scratch", "crack")}


def test_scratches_are_bright_and_cracks_dark(lines: dict[str, list]) -> None:
    scratch = [_contrast(*inst) for inst in lines["scratch"]]
    crack = [_contrast(*inst) for inst in lines["crack"]]
    assert len(scratch) >= 24 and len(crack) >= 24
    # Grey levels (0-255) of the defect pixels minus their surrounding ring.
    assert np.mean(scratch) > 8
    assert np.mean(crack) < -15
    assert np.mean(np.array(scratch) > 0) > 0.9
    assert np.mean(np.array(crack) < 0) > 0.95


def test_scratches_and_cracks_have_the_same_size_but_cracks_branch(
    lines: dict[str, list],
) -> None:
    def extent(mask: np.ndarray) -> int:
        rows, cols = np.nonzero(mask)
        return max(np.ptp(rows), np.ptp(cols)) + 1

    def endpoints(mask: np.ndarray) -> int:
        skeleton = skeletonize(mask)
        neighbours = ndimage.convolve(skeleton.astype(int), np.ones((3, 3), int), mode="constant")
        return int((skeleton & (neighbours == 2)).sum())

    scratch_extent = np.median([extent(m) for _, m, _ in lines["scratch"]])
    crack_extent = np.median([extent(m) for _, m, _ in lines["crack"]])
    # Confusable by size: both span a similar share of the image.
    assert 1 / 1.5 < scratch_extent / crack_extent < 1.5
    # Separable by shape: cracks branch, scratches are single strokes (twins aside).
    scratch_ends = np.mean([endpoints(m) for _, m, _ in lines["scratch"]])
    crack_ends = np.mean([endpoints(m) for _, m, _ in lines["crack"]])
    assert crack_ends > scratch_ends + 1


def test_every_defect_type_stands_out_inside_its_mask() -> None:
    # Colour distance of the mask's pixels from the ring around it, relative to
    # the ring's own spread: above 1 means the annotated pixels differ from the
    # surface around them.
    for label in DEFECT_TYPES:
        ratios = []
        for surface in SURFACES:
            for index in range(4):
                image, masks = synthetic.render_sample(5, surface, label, index, 128)
                rgb = image.astype(float)
                union = np.logical_or.reduce(masks)
                for mask in masks:
                    ring = ndimage.binary_dilation(mask, iterations=6)
                    ring &= ~ndimage.binary_dilation(union, iterations=1)
                    reference = rgb[ring].mean(0)
                    inside = np.linalg.norm(rgb[mask] - reference, axis=1).mean()
                    around = np.linalg.norm(rgb[ring] - reference, axis=1).mean()
                    ratios.append(inside / around)
        assert min(ratios) > 1.0, label
        assert np.median(ratios) > 1.4, label


# --------------------------------------------------------------------------- errors and atomicity


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images_per_class": 3}, "images_per_class"),
        ({"size": 63}, "size"),
        ({"size": 2049}, "size"),
        ({"surfaces": ["wood_veneer"]}, "wood_veneer"),
        ({"surfaces": []}, "surfaces"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_data_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"out": tmp_path / "out", "images_per_class": 4, "seed": 0, "size": 64}
    arguments.update(kwargs)
    with pytest.raises(DataError, match=message):
        generate(**arguments)
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_out_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=str(out)):
        generate(out, 4, 0, size=64)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Overwrite replaces earlier datasets only, not a folder the user typed by mistake.
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate(out, 4, 0, size=64, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_an_earlier_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(out, 4, 0, size=64, surfaces=["brushed_metal"])
    (out / "stale.txt").write_text("from before")
    manifest = generate(out, 4, 1, size=64, surfaces=["stone_tile"], overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in (out / "mvtec").iterdir()) == ["stone_tile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_out_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    generate(out, 4, 0, size=64, surfaces=["painted_panel"])
    assert (out / "manifest.json").is_file()


def test_failure_midway_leaves_no_output_and_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = synthetic._write_png
    calls = []

    def failing_write(path: Path, array: np.ndarray) -> None:
        calls.append(path)
        if len(calls) == 30:
            raise OSError("disk full")
        real_write(path, array)

    monkeypatch.setattr(synthetic, "_write_png", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "out", 4, 0, size=64)
    assert len(calls) == 30
    assert list(tmp_path.iterdir()) == []


def test_progress_prints_one_line_per_surface(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    generate(
        tmp_path / "out", 4, 0, size=64, surfaces=["brushed_metal", "stone_tile"], progress=True
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "brushed_metal" in lines[0] and "stone_tile" in lines[1]


# --------------------------------------------------------------------------- preview


def test_preview_shows_every_class_of_every_surface(dataset: Path, tmp_path: Path) -> None:
    png = synthetic.render_preview(dataset, tmp_path / "sheet" / "all.png")
    with Image.open(png) as sheet:
        width, height = sheet.size
        pixels = np.asarray(sheet.convert("RGB"))
    # One column pair per surface, one row per class, each panel the image size.
    assert width > len(SURFACES) * 2 * SIZE and height > len(CLASSES) * SIZE
    # The red mask outlines and cyan boxes are drawn.
    assert ((pixels == synthetic._OUTLINE).all(-1)).sum() > 50
    assert ((pixels == synthetic._BOX).all(-1)).sum() > 50

    one = synthetic.render_preview(dataset, tmp_path / "one.png", surface="stone_tile")
    with Image.open(one) as sheet:
        assert sheet.size[0] < width
    with pytest.raises(DataError, match="wood"):
        synthetic.render_preview(dataset, tmp_path / "x.png", surface="wood")
    with pytest.raises(DataError, match="manifest"):
        synthetic.render_preview(tmp_path, tmp_path / "y.png")
