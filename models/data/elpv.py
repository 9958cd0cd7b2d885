"""ELPV: electroluminescence images of solar cells (Deitsch et al., 2019).

Buerhop-Lutz et al., "A benchmark for visual identification of defective solar
cells in electroluminescence imagery", EU PVSEC 2018; Deitsch et al., "Automatic
classification of defective photovoltaic module cells in electroluminescence
images", Solar Energy 185, 2019.

The ``elpv-dataset`` package ships 2,624 cells (300x300 PNG) and ``labels.csv``
with one line per cell: ``images/cell0001.png  1.0  mono``. The second column is
the experts' defect probability, one of 0, 1/3, 2/3, 1; it becomes both the label
and :attr:`Sample.severity`. The type (``mono``/``poly``crystalline) is the
product category. The package's own ``load_dataset()`` decodes every image into
memory, so the CSV is read here and images stay on disk until used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.data.dataset import Dataset, dataset_folder
from models.data.sample import GOOD, DataError, Sample
from models.data.splits import split_off_val, stratified_holdout

TEST_FRACTION = 0.25

# Defect probability -> label. Exact fractions, since the CSV prints 1/3 to 16 digits.
LEVELS: dict[float, str] = {
    0.0: GOOD,
    1 / 3: "defect_p33",
    2 / 3: "defect_p67",
    1.0: "defect_p100",
}
CATEGORIES: dict[str, str] = {"mono": "solar_cell_mono", "poly": "solar_cell_poly"}


def package_root() -> Path:
    """The data folder of the installed ``elpv-dataset`` package."""
    import elpv_dataset  # only needed when no root is given

    return Path(elpv_dataset.__file__).parent / "data"


def _level(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    for level in LEVELS:
        if abs(value - level) < 1e-6:
            return level
    raise DataError(f"{where}: probability {text!r} is not one of 0, 1/3, 2/3, 1")


def _read_labels(root: Path) -> list[Sample]:
    """One train sample per line of ``root/labels.csv``."""
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"ELPV labels not found: {csv_path}")
    samples = []
    seen: set[str] = set()
    for number, line in enumerate(csv_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{csv_path} line {number}"
        columns = line.split()
        if len(columns) != 3:
            raise DataError(f"{where}: expected 'path probability type', got {line!r}")
        rel_path, probability, cell_type = columns
        level = _level(probability, where)
        if cell_type not in CATEGORIES:
            raise DataError(f"{where}: type {cell_type!r} is not one of {sorted(CATEGORIES)}")
        if rel_path in seen:
            raise DataError(f"{where}: {rel_path} is listed twice")
        seen.add(rel_path)
        image_path = root / rel_path
        if not image_path.is_file():
            raise DataError(f"image file not found: {image_path} (listed at {where})")
        samples.append(
            Sample(
                image_path=image_path,
                category=CATEGORIES[cell_type],
                label=LEVELS[level],
                split="train",
                severity=level,
                sample_id=rel_path,
            )
        )
    for cell_type, category in CATEGORIES.items():
        if not any(s.category == category for s in samples):
            raise DataError(f"category {category!r} is empty: no {cell_type!r} cell in {csv_path}")
    return samples


def load_elpv(root: Path | None = None) -> Dataset:
    """Load ELPV with a deterministic, stratified split.

    Test is 25 % of each (type, probability) stratum, val 10 % of the rest, both
    drawn with seed 0 by :mod:`models.data.splits`.

    Args:
        root: a folder holding ``labels.csv`` and the images it lists; default:
            the installed ``elpv-dataset`` package.

    Raises:
        DataError: a missing folder or image, or a bad CSV line (named).
    """
    root = dataset_folder("elpv", package_root() if root is None else root)
    samples = _read_labels(root)
    test = stratified_holdout(samples, TEST_FRACTION)
    samples = [dataclasses.replace(s, split="test") if s.sample_id in test else s for s in samples]
    samples = split_off_val(samples)
    return Dataset("elpv", tuple(sorted(samples, key=lambda s: s.sample_id)))
