"""Figure and Markdown helpers shared by the report's sections."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
PANEL_INCHES = 2.6
MAX_COLUMNS = 4
# Images are shrunk to this many pixels on their long side before plotting: the
# figure size is fixed in inches, so more pixels only cost time.
MAX_IMAGE_SIDE = 512


def panels(
    n: int, *, ncols: int = MAX_COLUMNS, size: tuple[float, float] = (PANEL_INCHES, PANEL_INCHES)
) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` small multiples, ``ncols`` to a row; spare cells hidden."""
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def save_figure(fig: Figure, out_dir: Path, name: str) -> str:
    """Write ``fig`` as ``out_dir/name`` and return the name the Markdown links."""
    fig.savefig(out_dir / name, dpi=DPI)
    fig.clear()  # free the artists now rather than at garbage collection
    return name


def draw_counts(
    ax: Axes, counts: np.ndarray, columns: Sequence[str], rows: Sequence[str], fontsize: int = 11
) -> None:
    """A count matrix as a heat map with each count written in its cell."""
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, int(counts.max())))
    for (row, col), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if dark else "black", fontsize=fontsize)  # fmt: skip
    rotate = {"rotation": 45, "ha": "right"} if len(columns) > 2 else {}
    ax.set_xticks(range(len(columns)), columns, **rotate)
    ax.set_yticks(range(len(rows)), rows)


def load_rgb(path: str) -> np.ndarray | None:
    """The image as (H, W, 3) uint8, shrunk to ``MAX_IMAGE_SIDE``; None if unreadable."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError):
        return None
    rgb.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    return np.asarray(rgb)


def missing_image(ax: Axes, path: str) -> None:
    """Say in the panel that its image could not be read."""
    ax.text(
        0.5,
        0.5,
        f"image not found\n{shorten(Path(path).name)}",
        ha="center",
        va="center",
        fontsize=8,
        transform=ax.transAxes,
    )


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def shorten(text: str, limit: int = 28) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def slug(key: str) -> str:
    """``key`` as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "key"
