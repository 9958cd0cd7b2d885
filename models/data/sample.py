"""The one sample type every dataset loader returns, and the data error type.

Every loader (ELPV, the synthetic generator's COCO output, MVTec AD, MVTec Screws,
plain COCO) turns what is on disk into a list of :class:`Sample`. Training,
evaluation and serving only ever see samples, so a new on-disk format is a new
loader and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = "good"
# ELPV: a cell is defective from defect probability 1/2 up (Deitsch et al. 2019).
ANOMALOUS_SEVERITY = 0.5
"""Label of a normal (defect-free) image in every dataset."""

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset on disk is missing, malformed or inconsistent.

    The message always names the file or folder at fault, so a user can fix it.
    """


@dataclass(frozen=True)
class Box:
    """One annotated defect (or object) region.

    Attributes:
        label: defect type (or object class) of the region.
        xywh: axis-aligned box in pixels, COCO order ``(x, y, width, height)``,
            in the coordinates of the sample's image (after its crop, if any).
        rotated: for rotated-box datasets (MVTec Screws), the original
            ``(row, col, width, height, phi)`` with ``phi`` in radians.
    """

    label: str
    xywh: tuple[float, float, float, float]
    rotated: tuple[float, float, float, float, float] | None = None


@dataclass(frozen=True)
class Sample:
    """One image of a product to inspect, with what is known about it.

    Attributes:
        image_path: the image file on disk.
        category: product category (``solar_cell_mono``, ``brushed_metal``, ...);
            one artifact per category and stage is trained on these.
        label: ``"good"`` for a normal image, else the defect type name.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mask_path: pixel mask of the defect (non-zero = defect), when known.
        boxes: annotated regions, in the coordinates of the (cropped) image.
        crop: ``(x, y, width, height)`` region of ``image_path`` that is the
            sample (MVTec Screws crops one object from a larger photo).
        severity: a graded defect level when the dataset has one (ELPV's
            defect probability 0, 1/3, 2/3 or 1).
        sample_id: stable identifier, unique within its dataset.
    """

    image_path: Path
    category: str
    label: str
    split: str
    mask_path: Path | None = None
    boxes: tuple[Box, ...] = field(default=())
    crop: tuple[int, int, int, int] | None = None
    severity: float | None = None
    sample_id: str = ""

    @property
    def is_anomalous(self) -> bool:
        """Whether the part counts as defective for the binary good/defective task.

        With a graded severity (ELPV) a part is defective at severity >= 0.5, the
        functional-vs-defective split of Deitsch et al. 2019; otherwise any label
        other than ``good`` is a defect.
        """
        if self.severity is not None:
            return self.severity >= ANOMALOUS_SEVERITY
        return self.label != GOOD

    def load_image(self) -> Image.Image:
        """Read the image as RGB, cropped to the sample's region.

        Raises:
            DataError: the file is missing, unreadable or truncated (named).
        """
        image = read_image(self.image_path)
        if self.crop is not None:
            x, y, w, h = self.crop
            image = image.crop((x, y, x + w, y + h))
        return image

    def load_mask(self) -> np.ndarray | None:
        """Read the defect mask as a boolean array (H, W), or None if there is none."""
        if self.mask_path is None:
            return None
        mask = np.asarray(read_image(self.mask_path, mode="L")) > 0
        if self.crop is not None:
            x, y, w, h = self.crop
            mask = mask[y : y + h, x : x + w]
        return mask


def read_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode an image file fully, or fail with an error that names it.

    PIL opens lazily; a truncated file only fails when pixels are read, so the
    image is loaded here, inside the error handling.

    Args:
        path: image file.
        mode: PIL mode to convert to (``"RGB"`` or ``"L"``).

    Raises:
        DataError: the file is missing, not an image, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises all three
        raise DataError(f"unreadable or truncated image {path}: {error}") from error
