"""MVTec Screws: rotated boxes become one crop per object."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.data import DataError, load_dataset
from models.data.mvtec_screws import crop_of, rotated_corners
from tests.unit.models.data.jsonfiles import rewrite_json

# (row, col, width, height, phi) -> crop (x, y, w, h), worked out by hand.
BY_HAND = {
    "phi_0": ((40.0, 50.0, 20.0, 10.0, 0.0), (40, 35, 20, 10)),
    "phi_pi_2": ((40.0, 50.0, 20.0, 10.0, math.pi / 2), (45, 30, 10, 20)),
    "clipped": ((5.0, 95.0, 20.0, 10.0, 0.0), (85, 0, 15, 10)),
    # Small coordinates, where cos(pi/2) = 6e-17 would otherwise push a corner
    # just below an integer and widen the crop by a pixel.
    "phi_pi_2_small": ((3.0, 3.0, 2.0, 4.0, math.pi / 2), (1, 2, 4, 2)),
    "phi_pi_small": ((3.0, 3.0, 2.0, 4.0, math.pi), (2, 1, 2, 4)),
}
DEG_30 = (30.5, 40.25, 24.0, 8.0, math.pi / 6)


@pytest.mark.parametrize("case", sorted(BY_HAND))
def test_crop_by_hand(case: str) -> None:
    rotated, crop = BY_HAND[case]
    assert crop_of(rotated, 100, 80) == crop


def test_crop_at_30_degrees_matches_the_half_extent_formula() -> None:
    # Independent: a w x h box turned by phi spans w|cos|+h|sin| by w|sin|+h|cos|.
    row, col, w, h, phi = DEG_30
    half_x = (w * abs(math.cos(phi)) + h * abs(math.sin(phi))) / 2
    half_y = (w * abs(math.sin(phi)) + h * abs(math.cos(phi))) / 2
    x0, y0 = math.floor(col - half_x), math.floor(row - half_y)
    x1, y1 = math.ceil(col + half_x), math.ceil(row + half_y)
    assert (x0, y0, x1 - x0, y1 - y0) == (27, 21, 26, 19)
    assert crop_of(DEG_30, 100, 80) == (27, 21, 26, 19)


def test_corners_match_opencv_box_points() -> None:
    # cv2.boxPoints(((col, row), (w, h), degrees(-phi))), transcribed from OpenCV.
    row, col, w, h, phi = DEG_30
    angle = math.radians(math.degrees(-phi))
    b, a = math.cos(angle) * 0.5, math.sin(angle) * 0.5
    p0 = (col - a * h - b * w, row + b * h - a * w)
    p1 = (col + a * h - b * w, row - b * h - a * w)
    p2 = (2 * col - p0[0], 2 * row - p0[1])
    p3 = (2 * col - p1[0], 2 * row - p1[1])
    expected = {tuple(np.round(p, 9)) for p in (p0, p1, p2, p3)}
    assert {tuple(np.round(p, 9)) for p in rotated_corners(*DEG_30)} == expected


def test_one_sample_per_annotation(screws_root: Path) -> None:
    dataset = load_dataset("mvtec-screws", screws_root)
    by_id = {s.sample_id: s for s in dataset}
    assert set(by_id) == {f"train/{i}_{100 + i}" for i in range(1, 9)} | {
        "val/11_111",
        "val/12_112",
        "test/21_121",
        "test/22_122",
    }
    expected = {BY_HAND[case][0]: BY_HAND[case][1] for case in ("phi_0", "phi_pi_2", "clipped")}
    expected[DEG_30] = (27, 21, 26, 19)
    checked = [s for s in dataset if s.boxes[0].rotated in expected]
    assert len(checked) == len(expected)  # conftest puts each box in train once
    for sample in checked:
        (box,) = sample.boxes
        crop = expected[box.rotated]
        assert sample.crop == crop
        assert box.xywh == (0.0, 0.0, float(crop[2]), float(crop[3]))
        assert box.label == sample.label
        assert sample.load_image().size == crop[2:]
        image_id = int(sample.sample_id.split("/")[1].split("_")[0])
        assert sample.image_path == screws_root / "images" / f"screws_{image_id:03d}.png"
    assert {s.category for s in dataset} == {"screws"}
    assert by_id["train/1_101"].label == "type_001"
    assert by_id["train/2_102"].label == "type_002"


def test_summary_shape(screws_root: Path) -> None:
    assert load_dataset("mvtec-screws", screws_root).summary() == {
        "dataset": "mvtec-screws",
        "categories": {
            "screws": {
                "train": {"type_001": 4, "type_002": 4},
                "val": {"type_001": 1, "type_002": 1},
                "test": {"type_001": 1, "type_002": 1},
            }
        },
    }


@pytest.fixture
def screws_copy(screws_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(screws_root, tmp_path / "screws"))


def test_missing_val_file_takes_ten_percent_of_train(screws_copy: Path) -> None:
    (screws_copy / "mvtec_screws_val.json").unlink()
    summary = load_dataset("mvtec-screws", screws_copy).summary()["categories"]["screws"]
    # 10 % of 8 rounds to 1; the two strata tie, and the tie goes to the first name.
    assert summary["train"] == {"type_001": 3, "type_002": 4}
    assert summary["val"] == {"type_001": 1}


def test_missing_split_file_is_named(screws_copy: Path) -> None:
    test = screws_copy / "mvtec_screws_test.json"
    test.unlink()
    with pytest.raises(DataError, match=rf"split file not found: {re.escape(str(test))}$"):
        load_dataset("mvtec-screws", screws_copy)


def test_only_the_unsplit_file_says_so(screws_copy: Path) -> None:
    (screws_copy / "mvtec_screws_train.json").rename(screws_copy / "mvtec_screws.json")
    with pytest.raises(DataError, match=r"mvtec_screws_train.json .*mvtec_screws.json exists"):
        load_dataset("mvtec-screws", screws_copy)


def test_box_outside_the_image_names_the_annotation(screws_copy: Path) -> None:
    train = screws_copy / "mvtec_screws_train.json"
    rewrite_json(train, lambda p: p["annotations"][2].update(bbox=[40.0, 130.0, 20.0, 10.0, 0.0]))
    with pytest.raises(
        DataError, match=rf"{re.escape(str(train))}: annotation id 103 .* empty crop"
    ):
        load_dataset("mvtec-screws", screws_copy)


def test_missing_image_names_file_and_json(screws_copy: Path) -> None:
    (screws_copy / "images" / "screws_012.png").unlink()
    with pytest.raises(DataError, match=r"screws_012.png \(referenced by .* of .*mvtec_screws_val"):
        load_dataset("mvtec-screws", screws_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["annotations"][0].update(bbox=[1, 2, 3, 4]), "bbox' must be 5 numbers"),
        (lambda p: p["images"][0].pop("width"), r"missing key 'images\[0\].width'"),
        (lambda p: p["annotations"][0].update(category_id=5), "unknown category_id 5"),
        (lambda p: p["annotations"][1].update(id=101), "duplicate annotation id 101"),
        (lambda p: p.update(annotations=[]), "'screws' is empty"),
    ],
)
def test_malformed_json_names_the_file(screws_copy: Path, edit, message: str) -> None:
    train = screws_copy / "mvtec_screws_train.json"
    rewrite_json(train, edit)
    with pytest.raises(DataError, match=message) as error:
        load_dataset("mvtec-screws", screws_copy)
    assert str(train) in str(error.value)
