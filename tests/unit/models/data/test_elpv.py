"""ELPV: the real packaged cells, and a user's own copy."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from models.data import DataError, Dataset, load_dataset
from models.data.elpv import package_root

LEVELS = {0.0: "good", 1 / 3: "defect_p33", 2 / 3: "defect_p67", 1.0: "defect_p100"}


@pytest.fixture(scope="module")
def elpv() -> Dataset:
    return load_dataset("elpv")


def _csv_rows() -> list[tuple[str, float, str]]:
    rows = []
    for line in (package_root() / "labels.csv").read_text().splitlines():
        path, probability, cell_type = line.split()
        rows.append((path, float(probability), cell_type))
    return rows


def test_package_loads_every_cell_with_its_csv_label(elpv: Dataset) -> None:
    assert len(elpv) == 2624
    assert elpv.categories == ["solar_cell_mono", "solar_cell_poly"]
    by_id = {s.sample_id: s for s in elpv}
    for path, probability, cell_type in _csv_rows():
        sample = by_id[path]
        assert sample.category == f"solar_cell_{cell_type}"
        assert sample.severity == pytest.approx(probability, abs=1e-12)
        assert sample.label == LEVELS[min(LEVELS, key=lambda p: abs(p - probability))]
        assert sample.image_path == package_root() / path
    # Severity is the exact fraction, not the CSV's 16-digit rounding.
    assert {s.severity for s in elpv} == {0.0, 1 / 3, 2 / 3, 1.0}


def test_each_category_has_all_four_levels_in_every_split(elpv: Dataset) -> None:
    summary = elpv.summary()
    assert summary["dataset"] == "elpv"
    for category in ("solar_cell_mono", "solar_cell_poly"):
        assert list(summary["categories"][category]) == ["train", "val", "test"]
        for counts in summary["categories"][category].values():
            assert sorted(counts) == sorted(LEVELS.values())
            assert all(n > 0 for n in counts.values())
    total = sum(
        n for splits in summary["categories"].values() for c in splits.values() for n in c.values()
    )
    assert total == 2624


def test_split_sizes_and_stratification(elpv: Dataset) -> None:
    split_of = Counter(s.split for s in elpv)
    assert split_of["test"] == pytest.approx(0.25 * 2624, abs=2)
    rest = split_of["train"] + split_of["val"]
    assert split_of["val"] == pytest.approx(0.1 * rest, abs=2)

    strata = Counter((s.label, s.category) for s in elpv)
    per_split = Counter((s.label, s.category, s.split) for s in elpv)
    for (label, category), n in strata.items():
        test = per_split[(label, category, "test")]
        val = per_split[(label, category, "val")]
        assert abs(test - 0.25 * n) <= 1, (label, category, test, n)
        assert abs(val - 0.1 * (n - test)) <= 1, (label, category, val, n - test)


def test_loads_are_identical_and_splits_disjoint(elpv: Dataset) -> None:
    again = load_dataset("elpv")
    assert again == elpv
    assert [s.sample_id for s in elpv] == sorted(s.sample_id for s in elpv)
    ids = Counter(s.sample_id for s in elpv)
    assert max(ids.values()) == 1  # one split per cell


def test_images_decode_lazily_as_300px_rgb(elpv: Dataset) -> None:
    image = elpv.samples[0].load_image()
    assert image.size == (300, 300)
    assert image.mode == "RGB"


def test_custom_root(elpv_tiny_root: Path) -> None:
    dataset = load_dataset("elpv", elpv_tiny_root)
    assert len(dataset) == 24
    assert all(s.image_path.parent == elpv_tiny_root / "images" for s in dataset)
    summary = dataset.summary()["categories"]
    # 3 per stratum, 12 per category: test 3 (one per level short), val 1 of the other 9.
    for category in ("solar_cell_mono", "solar_cell_poly"):
        counts = {split: sum(c.values()) for split, c in summary[category].items()}
        assert counts == {"train": 8, "val": 1, "test": 3}


@pytest.fixture
def tiny_copy(elpv_tiny_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(elpv_tiny_root, tmp_path / "elpv"))


def _edit_line(root: Path, number: int, old: str, new: str) -> None:
    csv = root / "labels.csv"
    lines = csv.read_text().splitlines()
    lines[number - 1] = lines[number - 1].replace(old, new)
    csv.write_text("\n".join(lines) + "\n")


def test_bad_probability_names_the_line(tiny_copy: Path) -> None:
    _edit_line(tiny_copy, 5, "0.3333333333333333", "0.5")
    with pytest.raises(DataError, match=r"labels.csv line 5: probability '0.5'"):
        load_dataset("elpv", tiny_copy)


def test_bad_type_names_the_line(tiny_copy: Path) -> None:
    _edit_line(tiny_copy, 7, "mono", "cigs")
    with pytest.raises(DataError, match=r"labels.csv line 7: type 'cigs'"):
        load_dataset("elpv", tiny_copy)


def test_missing_image_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "images" / "cell0002.png").unlink()
    with pytest.raises(DataError, match=r"image file not found: .*cell0002.png .*line 2"):
        load_dataset("elpv", tiny_copy)


def test_empty_category_is_named(tiny_copy: Path) -> None:
    csv = tiny_copy / "labels.csv"
    csv.write_text("\n".join(line for line in csv.read_text().splitlines() if "poly" not in line))
    with pytest.raises(DataError, match=rf"'solar_cell_poly' is empty: .*{re.escape(str(csv))}"):
        load_dataset("elpv", tiny_copy)


def test_missing_labels_csv_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=rf"ELPV labels not found: {re.escape(str(tmp_path / 'labels.csv'))}"
    ):
        load_dataset("elpv", tmp_path)
