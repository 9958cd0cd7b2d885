"""Every dataset by name, and a full decode check of a loaded dataset.

``load_dataset(name, root)`` is the one entry point: the CLI, training and the
tests name a dataset, never a loader. A new on-disk format is one loader
registered in :data:`DATASETS`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from models.data.coco import load_coco, load_synthetic
from models.data.dataset import Dataset
from models.data.elpv import load_elpv
from models.data.mvtec_ad import load_mvtec_ad
from models.data.mvtec_screws import load_mvtec_screws
from models.data.sample import DataError, read_image

DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "elpv": load_elpv,
    "synthetic": load_synthetic,
    "mvtec-ad": load_mvtec_ad,
    "mvtec-screws": load_mvtec_screws,
    "coco": load_coco,
}
"""Loader of each dataset name; a loader takes the dataset folder (None: its default)."""


def load_dataset(name: str, root: Path | str | None = None) -> Dataset:
    """Index a dataset: check every referenced file exists, decode nothing.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset folder; only ELPV has a default (the installed package).

    Raises:
        DataError: an unknown name (the known ones are listed), a format that needs
            a root and got none (the message says ``--root``), or anything wrong
            on disk (the file is named).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name](None if root is None else Path(root).expanduser())


def _decode_size(path: Path, mode: str) -> tuple[int, int]:
    return read_image(path, mode=mode).size


def verify_images(dataset: Dataset, workers: int = 2) -> int:
    """Fully decode every image and mask file of a dataset.

    Indexing only checks that files exist; a truncated or corrupt file is found
    here. Masks must have their image's size, and crops must lie inside it.

    Args:
        dataset: a loaded dataset.
        workers: decoding threads (PIL releases the GIL while decoding).

    Returns:
        The number of distinct files decoded (images and masks; a photo shared
        by several MVTec Screws crops counts once).

    Raises:
        DataError: the first bad file in dataset order, named.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs: dict[Path, str] = {}  # file -> PIL mode, in first-seen (dataset) order
    for sample in dataset:
        jobs.setdefault(sample.image_path, "RGB")
        if sample.mask_path is not None:
            jobs.setdefault(sample.mask_path, "L")

    executor = ThreadPoolExecutor(max_workers=workers)
    try:
        # map yields in submission order, so the first error raised is the first
        # bad file in dataset order, whichever thread hit it.
        sizes = dict(zip(jobs, executor.map(_decode_size, jobs, jobs.values()), strict=True))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

    for sample in dataset:
        width, height = sizes[sample.image_path]
        if sample.mask_path is not None and sizes[sample.mask_path] != (width, height):
            raise DataError(
                f"mask {sample.mask_path} is {sizes[sample.mask_path]}, but its image "
                f"{sample.image_path} is {(width, height)}"
            )
        if sample.crop is not None:
            x, y, w, h = sample.crop
            if x < 0 or y < 0 or x + w > width or y + h > height:
                raise DataError(
                    f"crop {sample.crop} of sample {sample.sample_id} lies outside its image "
                    f"{sample.image_path} ({width}x{height})"
                )
    return len(jobs)
