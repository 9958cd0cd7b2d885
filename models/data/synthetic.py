"""Synthetic industrial defects: procedural surfaces with masked, boxed defects.

The generator paints defect-free product surfaces (brushed metal, painted panels,
a stone tile made from a real photograph) and five defect types of the project's
taxonomy onto them, then writes the result twice: as COCO instance annotations
(boxes, polygons, masks) and as an MVTec AD folder tree, so both the detector and
the anomaly-detection stages can train on the same images.

Rendering follows the usual "procedural texture + physically motivated shading"
recipe of synthetic inspection data (e.g. Schmedemann et al., "Procedural
synthetic training data generation for AI-based defect detection in industrial
surface inspection", Procedia CIRP 2022): textures from filtered noise (Perlin,
SIGGRAPH 1985, "An image synthesizer") or from photographs, defects as height
maps or albedo changes shaded under one light direction per image, then global
illumination changes and sensor noise.

Scratches and cracks are deliberately confusable: both are thin and long with the
same length range. A scratch is a smooth, shallow groove that catches the light
(bright, low contrast, soft edges); a crack is a jagged random walk, branching,
dark, with a darker core and a shadow cast away from the light.

Every image has its own random generator seeded from ``(seed, surface, class,
index)``, so an image does not depend on what else is generated or in which order.

On disk (``OUT`` is the folder passed to :func:`generate`)::

    OUT/manifest.json
    OUT/coco/annotations/instances_{train,val,test}.json
    OUT/coco/images/<split>/<surface>/<class>_<index:04d>.png   RGB
    OUT/coco/masks/<split>/<surface>/<class>_<index:04d>.png    L, 255 = defect
    OUT/mvtec/<surface>/train/good/<index:04d>.png              COCO train + val good
    OUT/mvtec/<surface>/test/<class>/<index:04d>.png            COCO test, every class
    OUT/mvtec/<surface>/ground_truth/<type>/<index:04d>_mask.png

The MVTec files are hard links to the COCO files (copies where linking fails) and
keep the COCO index in their names.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage, signal
from skimage import measure

from models.data.sample import GOOD, SPLITS, DataError, read_image

GENERATOR = "inspectray-synthetic"
FORMAT_VERSION = 1

DEFECT_TYPES: tuple[str, ...] = ("scratch", "crack", "perforation", "contamination", "deformation")
"""Defect types; their COCO category ids are 1..5 in this order."""

CLASSES: tuple[str, ...] = (GOOD, *DEFECT_TYPES)
"""Image classes: ``good`` (no defect) and the defect types."""

SURFACES: tuple[str, ...] = ("brushed_metal", "painted_panel", "stone_tile")
"""Product categories (surface kinds) the generator can paint."""

TEST_FRACTION = 0.25
VAL_FRACTION = 0.1
MIN_IMAGES_PER_CLASS = 4
MIN_SIZE, MAX_SIZE = 64, 2048

_INSTANCE_COUNTS = (1, 2, 3)
_INSTANCE_PROBS = (0.55, 0.3, 0.15)

Float = np.float32


# --------------------------------------------------------------------------- split rule


def _round_half_up(x: float) -> int:
    # Not Python's banker's rounding, so 25 % of 10 is 3 and the rule matches
    # models.data.splits.
    return math.floor(x + 0.5)


def split_counts(images_per_class: int) -> dict[str, int]:
    """How many images of one (surface, class) pair go to each split.

    ``test`` is 25 % of the images (at least 1), ``val`` 10 % of the rest (at
    least 1), ``train`` the remainder; rounding is half up. Indices are assigned
    in that order: ``0 .. train-1`` are train, then val, then test.

    Args:
        images_per_class: images per (surface, class) pair.

    Returns:
        ``{"train": n, "val": n, "test": n}``.
    """
    test = max(1, _round_half_up(TEST_FRACTION * images_per_class))
    rest = images_per_class - test
    val = max(1, _round_half_up(VAL_FRACTION * rest))
    return {"train": rest - val, "val": val, "test": test}


def _split_of(index: int, counts: dict[str, int]) -> str:
    if index < counts["train"]:
        return "train"
    if index < counts["train"] + counts["val"]:
        return "val"
    return "test"


# --------------------------------------------------------------------------- small helpers


def image_rng(seed: int, surface: str, label: str, index: int) -> np.random.Generator:
    """The random generator of one image, independent of generation order.

    crc32 rather than ``hash()``: Python salts string hashes per process.
    """
    entropy = [seed, zlib.crc32(surface.encode()), zlib.crc32(label.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each (size, size) float32, read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(Float)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _window(cx: float, cy: float, rx: float, ry: float, size: int) -> tuple[slice, slice] | None:
    """Pixel window around a centre, clipped to the image; None if empty."""
    x0, x1 = max(math.floor(cx - rx), 0), min(math.ceil(cx + rx) + 1, size)
    y0, y1 = max(math.floor(cy - ry), 0), min(math.ceil(cy + ry) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _local_grid(win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[win[0], win[1]].astype(Float)
    return yy, xx


def _ellipse_grid(
    win: tuple[slice, slice], centre: np.ndarray, angle: float, radius: float, aspect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Window pixel grid, offsets from ``centre`` and elliptic radius (1 on the rim).

    The ellipse has semi-axes ``radius`` and ``radius * aspect``, rotated by ``angle``.
    """
    yy, xx = _local_grid(win)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return yy, xx, dx, dy, np.hypot(u / radius, v / (radius * aspect))


def _resample_polyline(vertices: np.ndarray, spacing: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points along a polyline every ``spacing`` px, and their arc-length parameter in [0, 1]."""
    seg = np.hypot(*np.diff(vertices, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(arc[-1] / spacing) + 1, 2)
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, vertices[:, 0]), np.interp(s, arc, vertices[:, 1])], 1)
    return pts.astype(Float), (s / max(arc[-1], 1e-6)).astype(Float)


def _curve_distance(
    points: np.ndarray, size: int, pad: float
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]] | None:
    """Distance from every pixel near a curve to the curve, and the nearest sample.

    The curve is a dense point set (at most ~0.5 px apart). Points are binned to
    pixels, a Euclidean distance transform finds each pixel's nearest binned
    pixel, and the distance is then taken to that bin's sub-pixel point: close to
    the exact distance at the cost of one EDT over a small window.

    Args:
        points: (N, 2) curve samples as (x, y).
        size: image side.
        pad: window margin around the curve in px.

    Returns:
        ``(dist, nearest, window)``: distances (h, w) in px, index of the nearest
        sample per pixel (h, w), and the window's slices; None when the curve
        misses the image.
    """
    lo, hi = points.min(0), points.max(0)
    (cx, cy), (rx, ry) = (lo + hi) / 2, (hi - lo) / 2 + pad
    win = _window(cx, cy, rx, ry, size)
    if win is None:
        return None
    y0, x0 = win[0].start, win[1].start
    h, w = win[0].stop - y0, win[1].stop - x0
    ix = np.rint(points[:, 0]).astype(np.intp) - x0
    iy = np.rint(points[:, 1]).astype(np.intp) - y0
    keep = np.nonzero((ix >= 0) & (ix < w) & (iy >= 0) & (iy < h))[0]
    if keep.size == 0:
        return None
    owner = np.full((h, w), -1, dtype=np.intp)
    owner[iy[keep], ix[keep]] = keep  # later samples win a shared pixel; deterministic
    _, (ny, nx) = ndimage.distance_transform_edt(owner < 0, return_indices=True)
    nearest = owner[ny, nx]
    yy, xx = _local_grid(win)
    dist = np.hypot(xx - points[nearest, 0], yy - points[nearest, 1])
    return dist, nearest, win


def _full_mask(local: np.ndarray, win: tuple[slice, slice], size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[win] = local
    return mask


def _place(rng: np.random.Generator, size: int, reach: float) -> np.ndarray:
    """A centre (x, y) at least ``reach`` px (capped at 45 % of the side) from the border."""
    margin = min(reach, 0.45 * size)
    return rng.uniform(margin, size - margin, 2).astype(Float)


# --------------------------------------------------------------------------- surfaces


def _brushed_metal(rng: np.random.Generator, size: int, light: np.ndarray) -> np.ndarray:
    """Brushed metal: anisotropic streaks along one direction, tinted grey, with sheen.

    Streaks are white noise blurred along the brushing direction only. The noise is
    kept at 1/16 (and 1/4) resolution along that axis and interpolated while the
    canvas is rotated, which is equivalent to a long 1-D blur at a fraction of its
    cost. The highlight of brushed metal is stretched across the brushing
    direction (anisotropic reflection, Ward, SIGGRAPH 1992), so the sheen is a band
    varying along the brushing direction.
    """
    s = size / 256
    side = int(size * 1.5) + 8  # large enough for any rotation of the output square
    angle = rng.integers(0, 2) * (np.pi / 2) + rng.normal(0, 0.08)
    cos, sin = math.cos(angle), math.sin(angle)
    yy, xx = _grid(size)
    c = (size - 1) / 2
    # Output pixel -> canvas (row, column) with the canvas streaks along columns.
    u = (xx - c) * cos + (yy - c) * sin + side / 2  # along the brushing direction
    v = -(xx - c) * sin + (yy - c) * cos + side / 2  # across it

    def streaks(factor: int, blur_along: float, blur_across: float) -> np.ndarray:
        noise = rng.standard_normal((side, side // factor + 2), dtype=Float)
        noise = ndimage.gaussian_filter(noise, (blur_across, blur_along / factor), mode="wrap")
        out = ndimage.map_coordinates(noise, [v, u / factor], order=1, mode="nearest")
        return _zscore(out)

    fine = streaks(16, rng.uniform(30, 70) * s, 0.5)
    medium = streaks(4, rng.uniform(6, 14) * s, 0.7)
    coarse = streaks(16, rng.uniform(60, 120) * s, rng.uniform(2, 5) * s)
    texture = 0.6 * fine + 0.35 * medium + 0.5 * coarse

    along = ((xx - c) * cos + (yy - c) * sin) / size
    centre = rng.uniform(-0.4, 0.4)
    width = rng.uniform(0.15, 0.45)
    sheen = np.exp(-(((along - centre) / width) ** 2))
    base = rng.uniform(0.42, 0.62)
    gray = (
        base
        * (1 + rng.uniform(0.12, 0.35) * sheen)
        * (1 + rng.uniform(0.025, 0.05) * texture * (1 + 0.8 * sheen))
    )
    # Steel, aluminium and titanium differ by a faint cool or warm cast.
    tint = np.array([1.0, 1.0, 1.0], Float) + rng.normal(0, 0.015, 3).astype(Float)
    return gray[..., None] * tint


# Industrial coating colours (approximate sRGB of RAL classic shades).
_PAINT_PALETTE = (
    (0.80, 0.18, 0.15),  # RAL 3020 traffic red
    (0.66, 0.13, 0.13),  # RAL 3000 flame red
    (0.89, 0.40, 0.09),  # RAL 2004 pure orange
    (0.93, 0.68, 0.05),  # RAL 1003 signal yellow
    (0.16, 0.45, 0.27),  # RAL 6024 traffic green
    (0.35, 0.47, 0.33),  # RAL 6011 reseda green
    (0.12, 0.40, 0.64),  # RAL 5015 sky blue
    (0.07, 0.28, 0.47),  # RAL 5010 gentian blue
    (0.55, 0.58, 0.58),  # RAL 7001 silver grey
    (0.74, 0.75, 0.72),  # RAL 7035 light grey
    (0.25, 0.28, 0.30),  # RAL 7016 anthracite grey
    (0.80, 0.79, 0.75),  # RAL 9002 grey white, a little darker: gloss and exposure add
)


def _painted_panel(rng: np.random.Generator, size: int, light: np.ndarray) -> np.ndarray:
    """Painted panel: a palette colour with orange-peel relief and a soft reflection.

    Orange peel is the fine waviness of sprayed paint; it is a band-pass height
    field (difference of Gaussians) shaded under the image's light direction.
    """
    s = size / 256
    r, g, b = _PAINT_PALETTE[rng.integers(len(_PAINT_PALETTE))]
    h, sat, val = colorsys.rgb_to_hsv(r, g, b)
    h = (h + rng.normal(0, 0.015)) % 1.0
    sat = float(np.clip(sat * rng.uniform(0.85, 1.1), 0, 1))
    val = float(np.clip(val * rng.uniform(0.85, 1.05), 0.1, 0.82))
    colour = np.array(colorsys.hsv_to_rgb(h, sat, val), Float)

    noise = rng.standard_normal((size, size), dtype=Float)
    fine_sigma = rng.uniform(1.2, 2.2) * s
    relief = ndimage.gaussian_filter(noise, fine_sigma) - ndimage.gaussian_filter(
        noise, 3 * fine_sigma
    )
    gy, gx = np.gradient(relief)
    slope = _zscore(gx * light[0] + gy * light[1])
    shade = 1 + rng.uniform(0.01, 0.03) * slope

    yy, xx = _grid(size)
    # A blurred reflection of a lamp or window on the glossy coat.
    cx, cy = rng.uniform(-0.2, 1.2, 2) * size
    rx, ry = rng.uniform(0.25, 0.7, 2) * size
    gloss = rng.uniform(0.04, 0.18) * np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))
    img = colour * shade[..., None]
    return img + gloss[..., None] * (1 - img)


@lru_cache(maxsize=1)
def _stone_photo() -> np.ndarray:
    # scikit-image ships this photograph of gravel (512 x 512, grey) offline.
    from skimage import data

    return data.gravel()


# Stone colours: grey granite, sandstone beige, red granite, basalt, slate green.
_STONE_COLOURS = (
    (0.58, 0.58, 0.57),
    (0.70, 0.62, 0.50),
    (0.62, 0.44, 0.38),
    (0.38, 0.39, 0.40),
    (0.45, 0.50, 0.46),
)


def _stone_tile(rng: np.random.Generator, size: int, light: np.ndarray) -> np.ndarray:
    """Polished stone tile: a random crop of a real photograph of gravel, tinted.

    Crop, rescale, flip and quarter-turn make each tile different; the photo's
    contrast is reduced so the aggregate reads as a polished stone or terrazzo.
    """
    photo = _stone_photo()
    side = int(np.clip(size * rng.uniform(0.6, 1.5), 32, photo.shape[0]))
    y0, x0 = rng.integers(0, photo.shape[0] - side + 1, 2)
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    tex = np.asarray(crop, dtype=Float)
    tex = np.rot90(tex, int(rng.integers(4)))
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    # Soften the deep crevices between stones: a polished tile is filled and flat.
    tex = _zscore(np.tanh(_zscore(tex) / 1.5))
    colour = np.array(_STONE_COLOURS[rng.integers(len(_STONE_COLOURS))], Float)
    colour = colour * rng.uniform(0.9, 1.1) * (1 + rng.normal(0, 0.015, 3).astype(Float))
    contrast = rng.uniform(0.08, 0.15)
    # Grains vary slightly in hue too, not only in brightness.
    hue_var = 1 + 0.008 * tex[..., None] * rng.normal(0, 1, 3).astype(Float)
    return colour * (1 + contrast * tex)[..., None] * hue_var


_SURFACE_PAINTERS: dict[str, Callable[[np.random.Generator, int, np.ndarray], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "painted_panel": _painted_panel,
    "stone_tile": _stone_tile,
}


# --------------------------------------------------------------------------- defects
# Each painter changes ``img`` (H, W, 3) float in place and returns the instance
# mask (H, W) bool, or None when the instance missed the image.


def _line_length(rng: np.random.Generator, size: int) -> float:
    # Scratches and cracks share this range on purpose: length must not separate them.
    return float(rng.uniform(0.2, 0.6) * size)


def _half_width(rng: np.random.Generator, size: int) -> float:
    # 1 - 3 px lines at 256 px, wider in proportion on larger images.
    return float(rng.uniform(0.5, 1.5) * max(1.0, size / 256))


def _busyness(img: np.ndarray, win: tuple[slice, slice]) -> float:
    """Relative texture contrast (std / mean of luminance) of a window.

    Subtle defects are drawn a little stronger on busy textures, as an inspector
    would only label them where they can be seen.
    """
    luma = img[win].mean(-1)
    return float(luma.std() / (luma.mean() + 1e-6))


def _paint_scratch(
    img: np.ndarray, rng: np.random.Generator, light: np.ndarray
) -> np.ndarray | None:
    """A scratch: a smooth, slightly curved groove whose walls catch the light.

    Shallow and specular, so it is brighter than its surroundings at low to
    moderate contrast, with soft edges, fading at both ends, sometimes with a
    faint parallel twin (a second grit particle of the same stroke). On bright
    surfaces a faint dark fringe on the side away from the light keeps it visible.
    """
    size = img.shape[0]
    length = _line_length(rng, size)
    theta = rng.uniform(0, np.pi)
    d = np.array([math.cos(theta), math.sin(theta)], Float)
    n = np.array([-d[1], d[0]], Float)
    centre = _place(rng, size, length / 2 + 4)
    bend = rng.uniform(-0.12, 0.12) * length
    t = np.linspace(0, 1, int(2 * length) + 2, dtype=Float)[:, None]
    p0, p2 = centre - d * length / 2, centre + d * length / 2
    p1 = centre + n * 2 * bend  # quadratic Bezier control point: mid-point offset = bend
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    t = t[:, 0]
    half = _half_width(rng, size)
    strength = rng.uniform(0.25, 0.55)
    twin = rng.random() < 0.35
    offset = rng.uniform(2.5, 4.5) * max(1.0, size / 256) * rng.choice([-1.0, 1.0])
    glint_freq, glint_phase = rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)

    mask = np.zeros((size, size), dtype=bool)
    lines = [(points, half, strength)]
    if twin:
        lines.append((points + n * offset, 0.5 * max(1.0, size / 256), 0.4 * strength))
    for pts, hw, amp in lines:
        field = _curve_distance(pts, size, pad=hw + 3)
        if field is None:
            continue
        dist, nearest, win = field
        tt = t[nearest]
        taper = np.clip(np.minimum(tt, 1 - tt) / 0.1, 0, 1)
        # Glints: a groove reflects more where its wall faces the light.
        glint = 0.75 + 0.25 * np.sin(2 * np.pi * glint_freq * tt + glint_phase)
        profile = _sigmoid((hw - dist) / 0.35)
        region = img[win]
        boost = 1 + 3 * _busyness(img, win)
        lift = (min(amp * boost, 0.8) * profile * taper * glint)[..., None]
        # On bright surfaces there is little headroom for the glint; there the
        # groove's wall facing away from the light shows as a faint dark fringe.
        brightness = float(np.clip((region.mean() - 0.5) / 0.3, 0, 1))
        if brightness > 0:
            shifted = ndimage.shift(profile, (-light[1], -light[0]), order=1, mode="constant")
            fringe = np.clip(shifted - profile, 0, 1) * taper
            region *= (1 - 0.5 * amp * brightness * fringe)[..., None]
        # Brighten towards white, by at least a third of the amplitude where the
        # surface is already light.
        region += lift * np.maximum(1.05 - region, 0.35)
        mask[win] |= (dist <= hw + 1) & (taper > 0.05)
    return mask if mask.any() else None


def _random_walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of a jagged path and the heading of each segment.

    The heading is an AR(1) process around the initial direction: sharp local
    kinks, but the crack keeps its overall course.
    """
    n = max(int(length / step), 3)
    kinks = rng.normal(0, rng.uniform(0.35, 0.65), n)
    headings = heading + signal.lfilter([1.0], [1.0, -0.6], kinks)
    steps = step * rng.uniform(0.6, 1.4, n)
    moves = np.stack([np.cos(headings), np.sin(headings)], 1) * steps[:, None]
    vertices = np.concatenate([start[None], start + np.cumsum(moves, 0)], 0)
    return vertices.astype(Float), headings


def _paint_crack(img: np.ndarray, rng: np.random.Generator, light: np.ndarray) -> np.ndarray | None:
    """A crack: a jagged, branching, dark fracture with a shadow on one side.

    The path is a random walk; 0 - 3 branches leave it at an angle. The crack is a
    gap into the material, so it is dark with a darker core, and its far wall casts
    a shadow offset away from the light.
    """
    size = img.shape[0]
    scale = max(1.0, size / 256)
    length = _line_length(rng, size)
    theta = rng.uniform(0, 2 * np.pi)
    d = np.array([math.cos(theta), math.sin(theta)], Float)
    centre = _place(rng, size, length / 2 + 4)
    step = rng.uniform(2.5, 4.5) * scale
    half = _half_width(rng, size)
    vertices, headings = _random_walk(rng, centre - d * length / 2, theta, length, step)
    pts, t = _resample_polyline(vertices)
    # Cracks narrow towards their tips.
    widths = [half * (0.35 + 0.65 * np.sqrt(np.clip(np.sin(np.pi * t), 0, 1)))]
    points = [pts]
    n_branches = rng.choice([0, 1, 2, 3], p=[0.15, 0.4, 0.3, 0.15])
    for _ in range(n_branches):
        k = int(rng.uniform(0.2, 0.8) * (len(vertices) - 1))
        b_heading = headings[min(k, len(headings) - 1)] + rng.choice([-1, 1]) * rng.uniform(
            0.45, 1.2
        )
        b_length = rng.uniform(0.2, 0.5) * length
        b_vertices, _ = _random_walk(rng, vertices[k], b_heading, b_length, step)
        b_pts, b_t = _resample_polyline(b_vertices)
        points.append(b_pts)
        widths.append(half * rng.uniform(0.5, 0.8) * (1 - 0.65 * b_t))
    points_all = np.concatenate(points, 0)
    width_all = np.concatenate(widths, 0).astype(Float)

    shadow_shift = rng.uniform(1.0, 2.0) * scale
    field = _curve_distance(points_all, size, pad=half + shadow_shift + 4)
    if field is None:
        return None
    dist, nearest, win = field
    hw = width_all[nearest]
    profile = _sigmoid((hw - dist) / 0.3)
    core = _sigmoid((0.45 * hw - dist) / 0.25)
    wide = _sigmoid((hw + 0.7 * scale - dist) / 0.5)
    # The shadow is the widened crack shifted away from the light.
    shadow = ndimage.shift(
        wide, (-light[1] * shadow_shift, -light[0] * shadow_shift), order=1, mode="constant"
    )
    dark = rng.uniform(0.35, 0.75)
    shadow_dark = rng.uniform(0.3, 0.5) * dark
    keep = (1 - dark * profile) * (1 - 0.7 * (1 - dark) * core) * (1 - shadow_dark * shadow)
    img[win] *= keep[..., None]
    local = (dist <= hw + 1) | (shadow > 0.5)
    return _full_mask(local, win, size) if local.any() else None


def _paint_perforation(
    img: np.ndarray, rng: np.random.Generator, light: np.ndarray
) -> np.ndarray | None:
    """A perforation: a round or elliptic hole with a dark interior and a burred rim.

    Through the hole the camera sees a dark backing; the wall facing the light is
    faintly lit inside the hole, and the raised burr around it is bright on the
    side facing the light and casts a shadow on the other side.
    """
    size = img.shape[0]
    radius = max(float(rng.uniform(0.015, 0.07) * size), 3.0)
    aspect = rng.uniform(0.7, 1.0)
    angle = rng.uniform(0, np.pi)
    rim = rng.uniform(1.0, 2.5) * max(1.0, size / 256)
    centre = _place(rng, size, radius + rim + 6)
    win = _window(centre[0], centre[1], radius + rim + 5, radius + rim + 5, size)
    if win is None:
        return None
    _, _, dx, dy, rho = _ellipse_grid(win, centre, angle, radius, aspect)
    phi = np.arctan2(dy, dx)
    wobble = np.ones_like(phi)
    for k in range(2, 6):  # an irregular punched or drilled outline
        wobble += rng.normal(0, 0.02) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    sd = (rho - wobble) * radius * (1 + aspect) / 2  # approximate signed distance, px
    facing = np.cos(phi) * light[0] + np.sin(phi) * light[1]  # +1: edge towards the light

    hole = _sigmoid(-sd / 0.4)
    backing = rng.uniform(0.02, 0.12) * (1 + rng.normal(0, 0.1, 3)).astype(Float)
    wall = rng.uniform(0.1, 0.3) * np.clip(-facing, 0, 1) * np.exp(sd / (0.25 * radius))
    interior = backing + wall[..., None]
    region = img[win]
    region *= (1 - hole)[..., None]
    region += hole[..., None] * interior
    burr = np.exp(-(((sd - rim / 2) / (0.6 * rim)) ** 2))
    bright = rng.uniform(0.25, 0.55) * burr * (0.55 + 0.45 * facing)
    region += bright[..., None] * (1 - region)
    shade = 0.3 * np.exp(-(((sd - rim - 1) / 1.5) ** 2)) * np.clip(-facing, 0, 1)
    region *= (1 - shade)[..., None]
    local = sd <= rim + 0.5
    return _full_mask(local, win, size) if local.any() else None


def _paint_contamination(
    img: np.ndarray, rng: np.random.Generator, light: np.ndarray
) -> np.ndarray | None:
    """Contamination: an oil stain, a rust bloom or a cluster of dust particles.

    Stains are thresholded noise inside an elliptic envelope, which gives soft,
    irregular edges; they are blended semi-transparently over the surface.
    """
    size = img.shape[0]
    scale = max(1.0, size / 256)
    kind = ("oil", "rust", "dust")[rng.integers(3)]
    radius = rng.uniform(0.04, 0.12) * size
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0, np.pi)
    centre = _place(rng, size, radius + 4)
    win = _window(centre[0], centre[1], 1.4 * radius, 1.4 * radius, size)
    if win is None:
        return None
    yy, xx, _, _, rho = _ellipse_grid(win, centre, angle, radius, aspect)
    shape = yy.shape
    lumpy = _zscore(ndimage.gaussian_filter(rng.standard_normal(shape, dtype=Float), radius / 5))
    mottle = _zscore(ndimage.gaussian_filter(rng.standard_normal(shape, dtype=Float), 1.5 * scale))
    field = (1 - rho) + 0.3 * lumpy
    region = img[win]

    if kind == "dust":
        n = int(rng.integers(6, 30))
        spots = centre + rng.normal(0, 0.45, (n, 2)).astype(Float) * [radius, radius * aspect]
        radii = rng.uniform(0.7, 2.2, n) * scale
        dist = np.full(shape, np.inf, dtype=Float)
        for (sx, sy), r in zip(spots, radii, strict=True):
            dist = np.minimum(dist, np.hypot(xx - sx, yy - sy) - r)
        specks = _sigmoid(-dist / 0.4)
        haze = 0.15 * _smoothstep(0.0, 0.4, field)
        alpha = np.maximum(specks * rng.uniform(0.6, 0.95), haze)
        # Mostly particles that contrast with the surface (light dust on dark
        # surfaces, dark grit on light ones), sometimes not.
        light_surface = float(region.mean()) > 0.5
        dark_specks = light_surface if rng.random() < 0.8 else not light_surface
        colour = np.array([0.16, 0.14, 0.12] if dark_specks else [0.86, 0.84, 0.78], Float)
        colour = np.broadcast_to(colour, (*shape, 3))
        local = (specks > 0.3) | (haze > 0.1)
        local = ndimage.binary_dilation(local)
    else:
        opacity = rng.uniform(0.35, 0.8)
        alpha = _smoothstep(-0.1, 0.4, field) * opacity * (0.85 + 0.15 * np.tanh(mottle))
        if kind == "oil":
            # Oil darkens and browns the surface; a thin film shows faint colour.
            base = np.array([0.10, 0.09, 0.06], Float) * rng.uniform(0.6, 1.4)
            colour = base + 0.03 * mottle[..., None] * np.array([0.5, 1.0, 1.5], Float)
        else:
            rust = np.array([0.58, 0.27, 0.08], Float) * rng.uniform(0.8, 1.1)
            dark_rust = np.array([0.33, 0.15, 0.06], Float)
            mix = _sigmoid(1.5 * mottle)[..., None]
            colour = rust * (1 - mix) + dark_rust * mix
        local = alpha >= 0.3 * opacity
    region *= (1 - alpha)[..., None]
    region += alpha[..., None] * colour
    local = ndimage.binary_fill_holes(local)
    return _full_mask(local, win, size) if local.any() else None


def _paint_deformation(
    img: np.ndarray, rng: np.random.Generator, light: np.ndarray
) -> np.ndarray | None:
    """A dent, bulge or crease: a smooth height map seen only through its shading.

    No material break: the surface keeps its texture, which is displaced slightly
    (the reflection bends), and the slopes are shaded with a Lambertian term
    under the image's light direction.
    """
    size = img.shape[0]
    kind = ("dent", "bulge", "crease")[rng.integers(3)]
    if kind == "crease":
        sig_u = rng.uniform(0.08, 0.2) * size
        sig_v = rng.uniform(0.015, 0.035) * size
    else:
        sig_u = rng.uniform(0.035, 0.1) * size
        sig_v = sig_u * rng.uniform(0.6, 1.0)
    if kind == "crease":
        # A ridge lit along its axis shows no shading; keep the light within 60
        # degrees of the ridge's normal (orientations stay uniform over images).
        angle = math.atan2(light[1], light[0]) + np.pi / 2 + rng.uniform(-np.pi / 3, np.pi / 3)
    else:
        angle = rng.uniform(0, np.pi)
    sign = -1.0 if kind == "dent" else float(rng.choice([-1.0, 1.0])) if kind == "crease" else 1.0
    centre = _place(rng, size, 1.5 * sig_u)
    reach = 3 * sig_u
    win = _window(centre[0], centre[1], reach, reach, size)
    if win is None:
        return None
    yy, xx = _local_grid(win)
    dx, dy = xx - centre[0], yy - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    bump = np.exp(-0.5 * ((u / sig_u) ** 2 + (v / sig_v) ** 2))
    # Analytic gradient of sign * bump, rotated back to image axes.
    gu, gv = -u / sig_u**2 * bump * sign, -v / sig_v**2 * bump * sign
    gx, gy = gu * cos - gv * sin, gu * sin + gv * cos
    peak = float(np.hypot(gx, gy).max()) + 1e-9
    # Normal ~ (-gx, -gy, 1): slopes rising away from the light face it.
    strength = rng.uniform(0.12, 0.28) * (1 + 6 * _busyness(img, win))
    shading = -strength * (gx * light[0] + gy * light[1]) / peak
    shift = rng.uniform(1.0, 3.5) * max(1.0, size / 256) / peak
    coords = [yy + gy * shift, xx + gx * shift]
    channels = [
        ndimage.map_coordinates(img[..., c], coords, order=1, mode="nearest") for c in range(3)
    ]
    img[win] = np.stack(channels, -1) * (1 + shading)[..., None]
    local = bump > 0.2
    return _full_mask(local, win, size) if local.any() else None


_DEFECT_PAINTERS: dict[
    str, Callable[[np.ndarray, np.random.Generator, np.ndarray], np.ndarray | None]
] = {
    "scratch": _paint_scratch,
    "crack": _paint_crack,
    "perforation": _paint_perforation,
    "contamination": _paint_contamination,
    "deformation": _paint_deformation,
}


# --------------------------------------------------------------------------- camera


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global exposure, contrast and uneven illumination (a gradient and a vignette)."""
    size = img.shape[0]
    mean = img.mean()
    img = ((img - mean) * rng.uniform(0.8, 1.2) + mean) * rng.uniform(0.8, 1.15)
    yy, xx = _grid(size)
    ny, nx = yy * (2 / size) - 1, xx * (2 / size) - 1
    a = rng.uniform(0, 2 * np.pi)
    field = 1 + rng.uniform(0, 0.3) * (nx * math.cos(a) + ny * math.sin(a))
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    field *= 1 - rng.uniform(0, 0.3) * ((nx - cx) ** 2 + (ny - cy) ** 2) / 2
    return img * field[..., None]


def _sensor(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Optics blur, read plus shot noise and 8-bit quantisation."""
    if rng.random() < 0.4:
        sigma = rng.uniform(0.3, 0.7)
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0))
    img = np.clip(img, 0, 1)
    read, shot = rng.uniform(0.004, 0.015), rng.uniform(0.005, 0.02)
    luma = rng.standard_normal(img.shape[:2], dtype=Float)[..., None]
    chroma = rng.standard_normal(img.shape, dtype=Float)
    noise = (read + shot * np.sqrt(img)) * (luma + 0.3 * chroma)
    return np.clip((img + noise) * 255 + 0.5, 0, 255).astype(np.uint8)


def render_sample(
    seed: int, surface: str, label: str, index: int, size: int = 256
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image and the masks of its defect instances.

    Args:
        seed: dataset seed.
        surface: one of :data:`SURFACES`.
        label: ``"good"`` or one of :data:`DEFECT_TYPES`.
        index: image index within its (surface, class) pair.
        size: image side in px.

    Returns:
        ``(image, masks)``: uint8 RGB (size, size, 3) and one bool (size, size)
        mask per instance (empty list for ``good``).

    Raises:
        DataError: unknown surface or label.
    """
    if surface not in _SURFACE_PAINTERS:
        raise DataError(f"unknown surface {surface!r}; expected one of {SURFACES}")
    if label not in CLASSES:
        raise DataError(f"unknown class {label!r}; expected one of {CLASSES}")
    rng = image_rng(seed, surface, label, index)
    light_angle = rng.uniform(0, 2 * np.pi)
    light = np.array([math.cos(light_angle), math.sin(light_angle)], Float)  # towards the lamp
    img = _SURFACE_PAINTERS[surface](rng, size, light).astype(Float)
    masks: list[np.ndarray] = []
    if label != GOOD:
        count = rng.choice(_INSTANCE_COUNTS, p=_INSTANCE_PROBS)
        painter = _DEFECT_PAINTERS[label]
        for _ in range(50):  # placement always hits the image; the cap is a safety net
            if len(masks) == count:
                break
            mask = painter(img, rng, light)
            if mask is not None and _box(mask) is not None:
                masks.append(mask)
        if not masks:  # would be a defect image without a defect; never seen
            raise RuntimeError(f"no {label} instance fits a {size} px {surface} image")
    img = _lighting(img, rng)
    return _sensor(img, rng), masks


# --------------------------------------------------------------------------- annotations


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``(x, y, w, h)`` of a mask's pixels; None if it has none or is under 2 px."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    box = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    return box if box[2] >= 2 and box[3] >= 2 else None


def _polygons(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[list[float]]:
    """COCO polygons of a mask: outer contours, pixel-edge coordinates, >= 3 points each.

    ``find_contours`` traces the 0.5 level between pixel centres; +0.5 converts to
    COCO's convention, where pixel ``i`` spans ``[i, i + 1]``. Tiny instances with
    no usable contour get their box as a rectangle.
    """
    x, y, w, h = box
    crop = np.pad(mask[y : y + h, x : x + w], 1).astype(Float)
    polygons = []
    for contour in measure.find_contours(crop, 0.5):
        contour = measure.approximate_polygon(contour, tolerance=0.5)
        if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
            contour = contour[:-1]  # COCO polygons are implicitly closed
        if len(contour) < 3:
            continue
        xs = np.clip(contour[:, 1] - 1 + x + 0.5, x, x + w)
        ys = np.clip(contour[:, 0] - 1 + y + 0.5, y, y + h)
        polygons.append([round(float(v), 2) for v in np.stack([xs, ys], 1).ravel()])
    if not polygons:
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return polygons


def _annotation(mask: np.ndarray) -> dict:
    box = _box(mask)
    assert box is not None  # render_sample keeps only instances with a box
    return {
        "bbox": list(box),
        "area": int(mask.sum()),
        "segmentation": _polygons(mask, box),
        "iscrowd": 0,
    }


# --------------------------------------------------------------------------- writing


def _write_png(path: Path, array: np.ndarray) -> None:
    # compress_level 1: noisy images barely compress further and level 6 costs
    # more than rendering them.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def _check_arguments(
    images_per_class: int, seed: int, size: int, surfaces: Sequence[str] | None
) -> list[str]:
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int):
        raise DataError(f"images_per_class must be an integer, got {images_per_class!r}")
    if images_per_class < MIN_IMAGES_PER_CLASS:
        raise DataError(
            f"images_per_class must be at least {MIN_IMAGES_PER_CLASS} (one test, one val "
            f"and two train images per surface and class), got {images_per_class}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"size must be an integer from {MIN_SIZE} to {MAX_SIZE} px, got {size!r}")
    if surfaces is None:
        return list(SURFACES)
    if isinstance(surfaces, str):
        surfaces = [surfaces]
    chosen = list(surfaces)
    unknown = [s for s in chosen if s not in SURFACES]
    if unknown:
        raise DataError(f"unknown surface(s) {unknown}; expected some of {list(SURFACES)}")
    if not chosen:
        raise DataError(f"no surfaces chosen; expected some of {list(SURFACES)}")
    if len(set(chosen)) != len(chosen):
        raise DataError(f"surfaces listed twice: {chosen}")
    # Canonical order, so the same set of surfaces always gives the same files.
    return [s for s in SURFACES if s in chosen]


def _is_generated_dataset(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"output folder {out} already exists and is not empty; "
            "pass overwrite=True (--overwrite) to replace it"
        )
    # Overwrite replaces an earlier dataset, never an unrelated folder or file
    # that a mistyped path points at.
    if not (out.is_dir() and not out.is_symlink() and _is_generated_dataset(out)):
        raise DataError(
            f"refusing to overwrite {out}: it is not a dataset made by this generator "
            "(no manifest.json from inspectray-synthetic); remove it yourself"
        )


def _manifest(seed: int, images_per_class: int, size: int, surfaces: list[str]) -> dict:
    return {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "images_per_class": images_per_class,
        "size": size,
        "surfaces": surfaces,
        "defect_types": list(DEFECT_TYPES),
        # Per (surface, class) pair; they add up to images_per_class.
        "splits": split_counts(images_per_class),
    }


def _categories() -> list[dict]:
    return [
        {"id": i, "name": name, "supercategory": "defect"}
        for i, name in enumerate(DEFECT_TYPES, start=1)
    ]


def _write_dataset(
    root: Path, seed: int, images_per_class: int, size: int, surfaces: list[str], progress: bool
) -> dict:
    counts = split_counts(images_per_class)
    coco = {
        split: {
            "info": {
                "description": "inspectray synthetic industrial defects",
                "version": "1",
                "seed": seed,
            },
            "licenses": [],
            "categories": _categories(),
            "images": [],
            "annotations": [],
        }
        for split in SPLITS
    }
    for split in SPLITS:
        (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        for surface in surfaces:
            (root / "coco" / "images" / split / surface).mkdir(parents=True, exist_ok=True)
            (root / "coco" / "masks" / split / surface).mkdir(parents=True, exist_ok=True)

    for surface in surfaces:
        started = time.perf_counter()
        mvtec = root / "mvtec" / surface
        (mvtec / "train" / GOOD).mkdir(parents=True, exist_ok=True)
        for label in CLASSES:
            (mvtec / "test" / label).mkdir(parents=True, exist_ok=True)
            if label != GOOD:
                (mvtec / "ground_truth" / label).mkdir(parents=True, exist_ok=True)
        for label in CLASSES:
            for index in range(images_per_class):
                split = _split_of(index, counts)
                name = f"{split}/{surface}/{label}_{index:04d}.png"
                image, masks = render_sample(seed, surface, label, index, size)
                union = np.zeros((size, size), dtype=np.uint8)
                for mask in masks:
                    union[mask] = 255
                image_path = root / "coco" / "images" / name
                mask_path = root / "coco" / "masks" / name
                _write_png(image_path, image)
                _write_png(mask_path, union)

                doc = coco[split]
                image_id = len(doc["images"]) + 1
                doc["images"].append(
                    {
                        "id": image_id,
                        "file_name": name,
                        "width": size,
                        "height": size,
                        "product_category": surface,
                        "defect_type": label,
                        "mask_file": name,
                    }
                )
                if label != GOOD:
                    category_id = DEFECT_TYPES.index(label) + 1
                    for mask in masks:
                        annotation = _annotation(mask)
                        doc["annotations"].append(
                            {
                                "id": len(doc["annotations"]) + 1,
                                "image_id": image_id,
                                "category_id": category_id,
                                **annotation,
                            }
                        )

                stem = f"{index:04d}"
                if split == "test":
                    _link_or_copy(image_path, mvtec / "test" / label / f"{stem}.png")
                    if label != GOOD:
                        _link_or_copy(
                            mask_path, mvtec / "ground_truth" / label / f"{stem}_mask.png"
                        )
                elif label == GOOD:
                    _link_or_copy(image_path, mvtec / "train" / GOOD / f"{stem}.png")
        if progress:
            n = images_per_class * len(CLASSES)
            seconds = time.perf_counter() - started
            print(
                f"synthetic: {surface}: {n} images in {seconds:.1f} s", file=sys.stderr, flush=True
            )

    for split in SPLITS:
        _write_json(root / "coco" / "annotations" / f"instances_{split}.json", coco[split])
    manifest = _manifest(seed, images_per_class, size, surfaces)
    _write_json(root / "manifest.json", manifest)
    return manifest


def generate(
    out: Path,
    images_per_class: int,
    seed: int,
    size: int = 256,
    surfaces: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Generate the synthetic defect dataset into ``out``.

    The dataset is written into a temporary sibling folder and renamed onto
    ``out`` only when complete, so ``out`` never holds a half-written dataset; the
    temporary folder is removed on any error.

    Args:
        out: output folder; must be missing or empty unless ``overwrite``.
        images_per_class: images per (surface, class) pair, for each of ``good``
            and the 5 defect types; at least 4.
        seed: dataset seed (non-negative); the same arguments give byte-identical
            files.
        size: image side in px, 64 to 2048.
        surfaces: product categories to render (default: all of :data:`SURFACES`);
            written in :data:`SURFACES` order.
        overwrite: replace ``out`` if it holds an earlier dataset of this
            generator.
        progress: print one line per surface to stderr.

    Returns:
        The manifest, as written to ``out/manifest.json``.

    Raises:
        DataError: a bad argument, or ``out`` exists and is not empty (without
            ``overwrite``, or not a dataset of this generator).
    """
    out = Path(out)
    chosen = _check_arguments(images_per_class, seed, size, surfaces)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run of a process with our pid
    try:
        tmp.mkdir()
        manifest = _write_dataset(tmp, seed, images_per_class, size, chosen, progress)
        _check_out(out, overwrite)  # it may have appeared while we were rendering
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------- preview


def _read_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise DataError(f"no synthetic dataset at {out}: {path} is missing") from error
    except (OSError, ValueError) as error:
        raise DataError(f"unreadable manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise DataError(f"{path} is not a manifest of {GENERATOR}")
    return manifest


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (OSError, TypeError):  # Pillow built without FreeType
        return ImageFont.load_default()


_SHEET_BACKGROUND = (24, 24, 24)
_SHEET_TEXT = (235, 235, 235)
_OUTLINE = (255, 48, 48)
_BOX = (40, 220, 255)
_OVERLAY_GREYS = 16
"""Grey levels of the overlay panels' background (a muted copy of the image)."""


def _pick_examples(out: Path) -> dict[tuple[str, str], tuple[dict, list[dict]]]:
    """The first test image (else val, else train) of every (surface, class) pair."""
    examples: dict[tuple[str, str], tuple[dict, list[dict]]] = {}
    for split in ("test", "val", "train"):
        path = out / "coco" / "annotations" / f"instances_{split}.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"unreadable annotation file {path}: {error}") from error
        by_image: dict[int, list[dict]] = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for entry in doc["images"]:
            key = (entry["product_category"], entry["defect_type"])
            examples.setdefault(key, (entry, by_image.get(entry["id"], [])))
    return examples


def _overlay(
    image: np.ndarray, mask: np.ndarray, annotations: list[dict], scale: float
) -> Image.Image:
    """A muted grey copy of the image with the mask outline (red) and boxes (cyan).

    ``image`` and ``mask`` are already at panel size; ``scale`` maps the boxes there.

    The copy is posterised to a few grey levels: it only gives context for the
    annotations, and it compresses to almost nothing.
    """
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    level = np.floor((0.15 + 0.55 * luma / 255) * _OVERLAY_GREYS)
    grey = (level * (255 / (_OVERLAY_GREYS - 1))).clip(0, 255).astype(np.uint8)
    overlay = np.repeat(grey[..., None], 3, axis=-1)
    overlay[mask & ~ndimage.binary_erosion(mask, iterations=2)] = _OUTLINE
    picture = Image.fromarray(overlay)
    draw = ImageDraw.Draw(picture)
    for ann in annotations:
        x, y, w, h = (v * scale for v in ann["bbox"])
        # One px outside the box so the box does not hide the outline.
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=_BOX)
    return picture


def _to_palette(sheet: Image.Image, photos: list[np.ndarray]) -> Image.Image:
    """Quantise a sheet to 256 colours without touching the annotation colours.

    Sensor noise makes a full-colour sheet several megabytes. The photos get an
    adaptive palette of their own; the overlay greys, annotation and text colours
    are added exactly, so nearest-colour mapping keeps them.
    """
    fixed = [(round(k * 255 / (_OVERLAY_GREYS - 1)),) * 3 for k in range(_OVERLAY_GREYS)]
    fixed += [_OUTLINE, _BOX, _SHEET_TEXT, _SHEET_BACKGROUND]
    strip = Image.fromarray(np.concatenate([p.reshape(-1, 3) for p in photos])[None])
    # A few k-means passes refine the median-cut palette; without them smooth
    # paint gradients show bands.
    adaptive = strip.quantize(
        colors=256 - len(fixed), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE, kmeans=4
    )
    palette = adaptive.getpalette()[: 3 * (256 - len(fixed))]
    palette += palette[-3:] * (256 - len(fixed) - len(palette) // 3)  # if it used fewer
    for colour in fixed:
        palette += list(colour)
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette)
    return sheet.quantize(palette=holder, dither=Image.Dither.NONE)


def render_preview(out: Path, png_path: Path, surface: str | None = None) -> Path:
    """Draw a contact sheet of a generated dataset: one example per class.

    One row per class (``good`` and every defect type), one column pair per
    surface: the image, and beside it a copy with the mask outline (red) and the
    instance boxes (cyan). Examples are the first test images. The sheet is a
    256-colour PNG, to stay small enough for the docs.

    Args:
        out: a folder written by :func:`generate`.
        png_path: the PNG to write (its folder is created).
        surface: one surface to show, or None for every surface of the dataset.

    Returns:
        ``png_path``.

    Raises:
        DataError: ``out`` is not a generated dataset, or has no such surface.
    """
    out, png_path = Path(out), Path(png_path)
    manifest = _read_manifest(out)
    if surface is not None and surface not in manifest["surfaces"]:
        raise DataError(f"dataset {out} has no surface {surface!r}; it has {manifest['surfaces']}")
    columns = list(manifest["surfaces"]) if surface is None else [surface]
    examples = _pick_examples(out)
    photos: list[np.ndarray] = []

    # Sensor noise barely compresses: three surfaces at 192 px, or one at 256 px,
    # keep the sheet around half a megabyte.
    panel = min(int(manifest["size"]), 256 if len(columns) == 1 else 192)
    scale = panel / int(manifest["size"])
    gap, text_h = 6, 20
    font, header_font = _font(13), _font(16)
    pair_w = 2 * panel + 2
    width = len(columns) * (pair_w + 2 * gap) + gap
    header_h = 26
    row_h = panel + text_h + gap
    height = header_h + len(CLASSES) * row_h + gap
    sheet = Image.new("RGB", (width, height), _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, column in enumerate(columns):
        left = gap + c * (pair_w + 2 * gap)
        draw.text((left, 5), column, fill=_SHEET_TEXT, font=header_font)
        for r, label in enumerate(CLASSES):
            top = header_h + r * row_h
            if (column, label) not in examples:
                raise DataError(f"dataset {out} has no {label!r} image of {column!r}")
            entry, annotations = examples[(column, label)]
            photo = read_image(out / "coco" / "images" / entry["file_name"])
            mask = read_image(out / "coco" / "masks" / entry["mask_file"], "L")
            if photo.width != panel:
                photo = photo.resize((panel, panel), Image.Resampling.LANCZOS)
                # Box filter then a low threshold, so 1 px lines survive the shrink.
                mask = mask.resize((panel, panel), Image.Resampling.BOX)
            image = np.asarray(photo)
            photos.append(image)
            overlay = _overlay(image, np.asarray(mask) > 64, annotations, scale)
            sheet.paste(photo, (left, top))
            sheet.paste(overlay, (left + panel + 2, top))
            count = len(annotations)
            text = label if label == GOOD else f"{label}: {count} instance{'s' * (count != 1)}"
            draw.text((left, top + panel + 3), text, fill=_SHEET_TEXT, font=font)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _to_palette(sheet, photos).save(png_path, format="PNG", optimize=True)
    return png_path
