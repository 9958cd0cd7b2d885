"""Synthetic anomalies, so an anomaly detector can be trained on good images only.

When a product category has only good training images (the MVTec AD layout), the
detector is trained as a binary classifier: good images against the same good
images carrying a synthesised anomaly. Five kinds are implemented:

- ``"cutpaste"``: CutPaste (Li, Sohn, Yoon & Pfister, "CutPaste: Self-Supervised
  Learning for Anomaly Detection and Localization", CVPR 2021). A rectangle of
  2-15 % of the image area, aspect ratio 0.3-3.3 (log-uniform), is cut,
  colour-jittered and pasted at another place.
- ``"scar"``: the CutPaste-Scar variant of the same paper. A thin long rectangle
  (width 2-16 px, length 10-25 % of the shorter side) is cut, colour-jittered,
  rotated by -45..45 degrees and pasted.
- ``"stroke"``: a thin curved line lighter or darker than the surface, with a
  soft (Gaussian) cross-section: the scratches and hairline cracks that CutPaste's
  scar, a strip of the surface's own texture, cannot show on a busy surface
  (speckled stone, cast metal), where a strip of texture looks like texture. It is
  a smooth random walk of 15-50 % of the shorter side, 1-3.5 px wide at 224 px,
  that changes the brightness by 12-45 % at its centre line; the mask is where
  that change is at least a quarter of its peak.
- ``"dent"``: a shallow dent or bulge seen only through its shading, the faint,
  low-contrast defect no kind above makes: a smooth (Gaussian) height bump of 4-12 %
  of the shorter side, round or elongated, lit from a random side, so one slope
  brightens and the other darkens by 5-25 % at most (Lambertian shading), or by
  1-2.5 times the relative contrast of a busy surface's texture, which would
  otherwise hide it. The mask is the bump out to where its shading has fallen to
  about 5 % of its peak, so no edge is left at the mask's border.
- ``"draem"``: DRAEM (Zavrtanik, Kristan & Skocaj, "DRAEM - A Discriminatively
  Trained Reconstruction Embedding for Surface Anomaly Detection", ICCV 2021). A
  thresholded, rotated Perlin-noise mask selects where a source texture is blended
  in: ``out = img * (1 - m) + (1 - beta) * src * m + beta * img * m``. DRAEM takes
  its sources from the DTD texture dataset, which is not available offline; here
  the source is either the image itself, flipped, rolled and re-coloured, or a
  procedural texture (stripes or Perlin clouds with noise).

Every random draw comes from the caller's :class:`torch.Generator`, so a seed
reproduces an anomaly exactly. Pixels outside the returned mask are returned
unchanged, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

ANOMALY_KINDS = ("cutpaste", "scar", "stroke", "dent", "draem")

MIN_SIDE = 32
"""Smallest accepted image height and width, in pixels."""

CUTPASTE_AREA = (0.02, 0.15)
CUTPASTE_ASPECT = (0.3, 3.3)
SCAR_WIDTH_PX = (2, 16)
SCAR_LENGTH = (0.10, 0.25)  # fraction of the shorter side
SCAR_ANGLE_DEG = (-45.0, 45.0)
JITTER = 0.1  # CutPaste's ColorJitter(0.1, 0.1, 0.1, 0.1)

STROKE_LENGTH = (0.15, 0.5)  # fraction of the shorter side
STROKE_SIGMA_PX = (0.5, 1.75)  # Gaussian sigma at 224 px (lines 2 sigma wide), scaled above
STROKE_BEND_RAD = (-1.5, 1.5)  # total turn along the stroke
STROKE_CONTRAST = (0.12, 0.45)  # relative brightness change at the centre line
STROKE_MASK_LEVEL = 0.25

DENT_SIGMA = (0.04, 0.12)  # fraction of the shorter side, along the longer axis
DENT_ASPECT = (0.4, 1.0)  # shorter over longer axis
DENT_SHADING = (0.05, 0.25)  # brightness change on the steepest slope facing the light
DENT_MAX_SHADING = 0.5  # on the busiest surfaces
DENT_REACH = 3.0  # sigmas: the mask's edge, where the shading is about 5 % of its peak

PERLIN_MAX_SCALE_EXP = 5  # DRAEM: 2**0 .. 2**5 lattice cells per side
PERLIN_MIN_CELL_PX = 4  # small images get fewer cells, so a cell spans >= 4 px
PERLIN_THRESHOLD = 0.5
DRAEM_ANGLE_DEG = (-90.0, 90.0)
# The paper states beta ~ U[0.1, 1.0]; its reference code uses U[0, 0.8). Opacity near
# 1 leaves a labelled anomaly that is invisible, so we keep the paper's floor and the
# code's ceiling.
DRAEM_OPACITY = (0.1, 0.8)
MIN_MASK_FRACTION = 0.005
MAX_MASK_DRAWS = 10

_GRAY = (0.299, 0.587, 0.114)


def synthesize_anomaly(
    image: torch.Tensor,
    generator: torch.Generator,
    kinds: Sequence[str] = ANOMALY_KINDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put one synthetic anomaly of a randomly chosen kind into a good image.

    Args:
        image: float tensor (3, H, W) in [0, 1], before mean/std normalization;
            H, W >= :data:`MIN_SIDE`. It is not modified.
        generator: source of every random draw; the same generator state gives the
            same result. Random numbers are drawn on its device.
        kinds: kinds to choose from, uniformly (repeat a kind to weight it); a single
            string is one kind. Allowed: :data:`ANOMALY_KINDS`.

    Returns:
        ``(anomalous, mask)``: the anomalous image, same shape, dtype and device as
        ``image``, in [0, 1]; and the anomaly mask (H, W) bool, never empty. Pixels
        outside the mask are equal to ``image``'s.

    Raises:
        TypeError: ``image`` is not a tensor or ``generator`` not a torch.Generator.
        ValueError: bad shape, dtype or value range, or unknown / no kinds.
    """
    _check_image(image)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    choices = _check_kinds(kinds)
    kind = choices[_randint(generator, 0, len(choices))]
    anomalous, mask = _SYNTHESIZERS[kind](image.to(torch.float32), generator)
    # where(): outside the mask the caller's pixels come back exactly, whatever the dtype.
    return torch.where(mask, anomalous.to(image.dtype).clamp(0, 1), image), mask


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor in [0, 1], got {image.dtype}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if min(image.shape[1:]) < MIN_SIDE:
        raise ValueError(f"image height and width must be >= {MIN_SIDE}, got {tuple(image.shape)}")
    # Catches normalized (mean/std) inputs and NaN: comparisons with NaN are False.
    if not (image.min() >= 0 and image.max() <= 1):
        raise ValueError("image values must lie in [0, 1] (pass it before mean/std normalization)")


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    choices = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in choices if k not in ANOMALY_KINDS]
    if unknown or not choices:
        raise ValueError(f"kinds must be a non-empty selection of {ANOMALY_KINDS}, got {kinds!r}")
    return choices


# ---------------------------------------------------------------------------- random draws


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator, device=generator.device))


def _rand(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------- CutPaste


def _cutpaste(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (Li et al., CVPR 2021): a jittered rectangle pasted elsewhere."""
    _, height, width = image.shape
    area = _uniform(generator, *CUTPASTE_AREA) * height * width
    aspect = math.exp(_uniform(generator, *(math.log(a) for a in CUTPASTE_ASPECT)))  # h / w
    h = min(height, max(1, round(math.sqrt(area * aspect))))
    w = min(width, max(1, round(math.sqrt(area / aspect))))
    # The patch covers <= ~15 % of the image, so there are >= 2 positions; the paste
    # position is drawn among those other than the cut position.
    cols = width - w + 1
    positions = (height - h + 1) * cols
    src = _randint(generator, 0, positions)
    dst = _randint(generator, 0, positions - 1)
    dst += dst >= src
    (y0, x0), (y1, x1) = divmod(src, cols), divmod(dst, cols)

    patch = _color_jitter(image[:, y0 : y0 + h, x0 : x0 + w], generator)
    out = image.clone()
    out[:, y1 : y1 + h, x1 : x1 + w] = patch
    mask = torch.zeros((height, width), dtype=torch.bool, device=image.device)
    mask[y1 : y1 + h, x1 : x1 + w] = True
    return out, mask


def _scar(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar (Li et al., CVPR 2021): a thin rotated strip pasted elsewhere."""
    _, height, width = image.shape
    length = max(2, round(_uniform(generator, *SCAR_LENGTH) * min(height, width)))
    strip = min(length, _randint(generator, SCAR_WIDTH_PX[0], SCAR_WIDTH_PX[1] + 1))
    angle = math.radians(_uniform(generator, *SCAR_ANGLE_DEG))
    cos, sin = math.cos(angle), math.sin(angle)

    # Destination: integer centre whose rotated bounding box fits in the image. The
    # centre pixel is always inside the strip, so the mask is never empty.
    ry = min((height - 1) // 2, math.ceil(abs(length / 2 * cos) + abs(strip / 2 * sin)))
    rx = min((width - 1) // 2, math.ceil(abs(length / 2 * sin) + abs(strip / 2 * cos)))
    cy = _randint(generator, ry, height - ry)
    cx = _randint(generator, rx, width - rx)
    # Source: centre of the upright strip (length along y), inside the image.
    sy = _randint(generator, *_centre_range(height, length))
    sx = _randint(generator, *_centre_range(width, strip))

    dy = torch.arange(-ry, ry + 1, device=image.device, dtype=torch.float32)[:, None]
    dx = torch.arange(-rx, rx + 1, device=image.device, dtype=torch.float32)[None, :]
    u = cos * dy + sin * dx  # along the strip
    v = -sin * dy + cos * dx  # across the strip
    inside = (u >= -length / 2) & (u < length / 2) & (v >= -strip / 2) & (v < strip / 2)
    src_y = (sy + u[inside]).round().long().clamp(0, height - 1)
    src_x = (sx + v[inside]).round().long().clamp(0, width - 1)

    window = (slice(cy - ry, cy + ry + 1), slice(cx - rx, cx + rx + 1))
    mask = torch.zeros((height, width), dtype=torch.bool, device=image.device)
    mask[window] = inside
    pixels = _color_jitter(image[:, src_y, src_x][:, :, None], generator)[:, :, 0]  # (3, N)
    out = image.clone()
    out[:, mask] = pixels  # boolean indexing is row-major, like inside's pixel order
    return out, mask


def _stroke(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin curved line, lighter or darker than the surface (a scratch or hairline crack)."""
    _, height, width = image.shape
    side = min(height, width)
    length = _uniform(generator, *STROKE_LENGTH) * side
    sigma = _uniform(generator, *STROKE_SIGMA_PX) * max(1.0, side / 224)
    bend = _uniform(generator, *STROKE_BEND_RAD)
    heading = _uniform(generator, 0.0, 2 * math.pi)
    # The centre line: points every half pixel along a path whose heading turns
    # smoothly (a constant bend plus a slow wobble), its middle inside the image
    # (so the mask is never empty).
    steps = max(2, math.ceil(2 * length))
    t = torch.linspace(0.0, 1.0, steps, device=image.device)
    wobble = _uniform(generator, -0.3, 0.3) * torch.sin(
        2 * math.pi * (t * _uniform(generator, 0.5, 2.0) + _uniform(generator, 0.0, 1.0))
    )
    angle = heading + bend * t + wobble
    step = length / (steps - 1)
    zero = torch.zeros(1, device=image.device)
    x = torch.cat([zero, (step * angle[:-1].cos()).cumsum(0)])
    y = torch.cat([zero, (step * angle[:-1].sin()).cumsum(0)])
    middle = steps // 2  # placed inside the image: most of the stroke is seen
    x = x - x[middle] + _uniform(generator, 0, width - 1)
    y = y - y[middle] + _uniform(generator, 0, height - 1)
    # Only the pixels of the stroke's bounding box (with 3 sigma of margin) are measured.
    reach = 3 * sigma
    y0, y1 = max(0, math.floor(y.min() - reach)), min(height, math.ceil(y.max() + reach) + 1)
    x0, x1 = max(0, math.floor(x.min() - reach)), min(width, math.ceil(x.max() + reach) + 1)
    yy, xx = torch.meshgrid(
        torch.arange(y0, y1, device=image.device, dtype=torch.float32),
        torch.arange(x0, x1, device=image.device, dtype=torch.float32),
        indexing="ij",
    )
    pixels = torch.stack([yy.flatten(), xx.flatten()], 1)  # (P, 2)
    distance = torch.cdist(pixels, torch.stack([y, x], 1)).min(dim=1).values  # (P,)
    profile = torch.exp(-0.5 * (distance / sigma) ** 2).view(yy.shape)
    contrast = _uniform(generator, *STROKE_CONTRAST)
    window = image[:, y0:y1, x0:x1]
    if _uniform(generator, 0, 1) < 0.5:  # lighter: a scratch catching the light
        changed = window + contrast * profile * (1 - window)
    else:  # darker: a groove or crack in shadow
        changed = window * (1 - contrast * profile)
    out = image.clone()
    out[:, y0:y1, x0:x1] = changed
    mask = torch.zeros((height, width), dtype=torch.bool, device=image.device)
    mask[y0:y1, x0:x1] = profile >= STROKE_MASK_LEVEL
    return out, mask


def _dent(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A shallow dent or bulge: a smooth height bump seen only through its shading."""
    _, height, width = image.shape
    side = min(height, width)
    sigma_u = _uniform(generator, *DENT_SIGMA) * side
    sigma_v = sigma_u * _uniform(generator, *DENT_ASPECT)
    angle = _uniform(generator, 0.0, math.pi)
    light = _uniform(generator, 0.0, 2 * math.pi)
    strength = _uniform(generator, *DENT_SHADING)
    cy, cx = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    yy, xx = torch.meshgrid(
        torch.arange(height, device=image.device, dtype=torch.float32) - cy,
        torch.arange(width, device=image.device, dtype=torch.float32) - cx,
        indexing="ij",
    )
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = xx * cos + yy * sin, -xx * sin + yy * cos  # along and across the bump
    bump = torch.exp(-0.5 * ((u / sigma_u) ** 2 + (v / sigma_v) ** 2))
    # The height's gradient, back in image axes; a dent and a bulge are the same
    # shading with the light on the other side, so the light's angle covers both.
    grad_u, grad_v = -u / sigma_u**2 * bump, -v / sigma_v**2 * bump
    grad_x, grad_y = grad_u * cos - grad_v * sin, grad_u * sin + grad_v * cos
    facing = grad_x * math.cos(light) + grad_y * math.sin(light)
    mask = ((u / sigma_u) ** 2 + (v / sigma_v) ** 2) <= DENT_REACH**2
    # A dent shallower than the surface's own texture is hidden by it: a label
    # with nothing to see. On a busy surface it is drawn at 1-2.5 times the
    # texture's relative contrast under it.
    luma = (image * torch.tensor(_GRAY, device=image.device)[:, None, None]).sum(0)[mask]
    texture = float(luma.std() / luma.mean().clamp_min(1e-6)) if luma.numel() > 1 else 0.0
    strength = min(DENT_MAX_SHADING, max(strength, _uniform(generator, 1.0, 2.5) * texture))
    shading = strength * facing / facing.abs().max().clamp_min(1e-12)
    return image * (1 + shading), mask


def _centre_range(side: int, extent: int) -> tuple[int, int]:
    """[low, high) of integer centres keeping ``extent`` pixels inside ``side``."""
    half = min((side - 1) // 2, extent // 2)
    return half, side - half


def _color_jitter(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter of strength :data:`JITTER`.

    Like torchvision's ``ColorJitter(0.1, 0.1, 0.1, 0.1)`` that CutPaste uses, in a
    fixed order; hue is a rotation about the grey axis of RGB space.
    """
    brightness, contrast, saturation = (_uniform(generator, 1 - JITTER, 1 + JITTER) for _ in "bcs")
    hue = _uniform(generator, -JITTER, JITTER) * 2 * math.pi

    x = (patch * brightness).clamp(0, 1)
    mean = _gray(x).mean()
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = _gray(x)
    x = (gray + (x - gray) * saturation).clamp(0, 1)
    return _rotate_hue(x, hue).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (1, ...) of an RGB tensor (3, ...)."""
    r, g, b = x
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b)[None]


def _rotate_hue(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate RGB colours (3, ...) by ``angle`` radians about the grey axis (Rodrigues)."""
    c, s, k = math.cos(angle), math.sin(angle), 1 / math.sqrt(3)
    t = (1 - c) / 3
    rotation = torch.tensor(
        [
            [c + t, t - s * k, t + s * k],
            [t + s * k, c + t, t - s * k],
            [t - s * k, t + s * k, c + t],
        ],
        dtype=x.dtype,
        device=x.device,
    )
    return torch.tensordot(rotation, x, dims=1)


# ---------------------------------------------------------------------------- DRAEM


def _draem(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM (Zavrtanik et al., ICCV 2021): a texture blended in under a Perlin mask."""
    _, height, width = image.shape
    mask = _perlin_mask(height, width, generator, image.device)
    if _uniform(generator, 0, 1) < 0.5:
        source = _self_source(image, generator)
    else:
        source = _procedural_source(height, width, generator, image.device)
    beta = _uniform(generator, *DRAEM_OPACITY)
    blended = (1 - beta) * source + beta * image
    return torch.where(mask, blended, image), mask


def _perlin_mask(
    height: int, width: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Thresholded, rotated Perlin noise (H, W) bool with >= 0.5 % of the pixels set.

    Masks below that are redrawn up to :data:`MAX_MASK_DRAWS` times; after that the
    last noise's highest pixels are taken, so the mask is never empty.
    """
    min_pixels = max(1, math.ceil(MIN_MASK_FRACTION * height * width))
    cells = min(height, width) / PERLIN_MIN_CELL_PX
    max_exp = max(0, min(PERLIN_MAX_SCALE_EXP, int(math.log2(cells))))
    for _ in range(MAX_MASK_DRAWS):
        scale = (2 ** _randint(generator, 0, max_exp + 1), 2 ** _randint(generator, 0, max_exp + 1))
        angle = math.radians(_uniform(generator, *DRAEM_ANGLE_DEG))
        noise = _perlin_noise(height, width, scale, angle, generator, device)
        mask = noise > PERLIN_THRESHOLD
        if int(mask.sum()) >= min_pixels:
            return mask
    kth = torch.topk(noise.flatten(), min_pixels).values[-1]
    return noise >= kth


def _perlin_noise(
    height: int,
    width: int,
    scale: tuple[int, int],
    angle: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """2-D Perlin gradient noise (Perlin, SIGGRAPH 2002 fade curve), rotated by ``angle``.

    Scaled by sqrt(2) to about [-1, 1], as in DRAEM's reference code, which its
    threshold of 0.5 assumes.

    Args:
        height: output rows.
        width: output columns.
        scale: lattice cells per shorter image side, along y and x (before rotation).
        angle: rotation of the pattern, radians.
        generator: draws the unit gradient at every lattice point.
        device: where to compute.

    Returns:
        Noise (H, W) float32 in about [-1, 1].
    """
    side = min(height, width)
    y = torch.arange(height, device=device, dtype=torch.float32)[:, None] + 0.5 - height / 2
    x = torch.arange(width, device=device, dtype=torch.float32)[None, :] + 0.5 - width / 2
    cos, sin = math.cos(angle), math.sin(angle)
    # Rotating the sampling coordinates rotates the pattern; no resampling needed.
    u = (cos * y - sin * x) * (scale[0] / side)  # (H, W), in lattice cells
    v = (sin * y + cos * x) * (scale[1] / side)
    u0, v0 = u.floor(), v.floor()
    fu, fv = u - u0, v - v0
    iu = (u0 - u0.min()).long()
    iv = (v0 - v0.min()).long()
    cols = int(iv.max()) + 2
    angles = 2 * math.pi * _rand(generator, (int(iu.max()) + 2, cols), device)
    grad_u, grad_v = angles.cos().flatten(), angles.sin().flatten()

    def corner(du: int, dv: int) -> torch.Tensor:
        index = (iu + du) * cols + (iv + dv)
        return grad_u[index] * (fu - du) + grad_v[index] * (fv - dv)

    wu = fu * fu * fu * (fu * (fu * 6 - 15) + 10)
    wv = fv * fv * fv * (fv * (fv * 6 - 15) + 10)
    top = torch.lerp(corner(0, 0), corner(0, 1), wv)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wv)
    return math.sqrt(2) * torch.lerp(top, bottom, wu)


def _self_source(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The image flipped, rolled by a quarter to three quarters of each side, re-coloured."""
    _, height, width = image.shape
    flips = [dim for dim in (1, 2) if _uniform(generator, 0, 1) < 0.5]
    source = image.flip(flips) if flips else image
    shifts = (
        _randint(generator, height // 4, 3 * height // 4 + 1),
        _randint(generator, width // 4, 3 * width // 4 + 1),
    )
    return _recolor(source.roll(shifts, dims=(1, 2)), generator)


def _procedural_source(
    height: int, width: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Stripes or Perlin clouds between two random colours, plus Gaussian noise (3, H, W)."""
    if _uniform(generator, 0, 1) < 0.5:
        cycles = _uniform(generator, 2, 32)  # per shorter side
        direction = _uniform(generator, 0, math.pi)
        phase = _uniform(generator, 0, 2 * math.pi)
        y = torch.arange(height, device=device, dtype=torch.float32)[:, None]
        x = torch.arange(width, device=device, dtype=torch.float32)[None, :]
        along = y * math.cos(direction) + x * math.sin(direction)
        wave = torch.sin(along * (2 * math.pi * cycles / min(height, width)) + phase)
        if _uniform(generator, 0, 1) < 0.5:
            wave = wave.sign()
        pattern = 0.5 + 0.5 * wave
    else:
        scale = (2 ** _randint(generator, 1, 5), 2 ** _randint(generator, 1, 5))
        angle = _uniform(generator, 0, math.pi)
        noise = _perlin_noise(height, width, scale, angle, generator, device)
        pattern = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-6)
    low, high = _rand(generator, (3, 1, 1), device), _rand(generator, (3, 1, 1), device)
    sigma = _uniform(generator, 0, 0.1)
    grain = torch.randn((3, height, width), generator=generator, device=generator.device)
    return (low + (high - low) * pattern + sigma * grain.to(device)).clamp(0, 1)


def _recolor(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Three distinct colour operations in random order, as DRAEM does for its sources."""
    for i in torch.randperm(len(_RECOLOR_OPS), generator=generator, device=generator.device)[:3]:
        x = _RECOLOR_OPS[int(i)](x, generator).clamp(0, 1)
    return x


def _gamma(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.pow(_uniform(g, 0.5, 2.0))


def _brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x * _uniform(g, 0.8, 1.2) + _uniform(g, -0.3, 0.3)


def _solarize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.where(x >= _uniform(g, 0.125, 0.5), 1 - x, x)


def _posterize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    levels = 2 ** _randint(g, 2, 5)
    return (x * levels).floor().clamp_max(levels - 1) / (levels - 1)


def _invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1 - x


def _shuffle_channels(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x[torch.randperm(3, generator=g, device=g.device).to(x.device)]


def _autocontrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-6)


_RECOLOR_OPS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    _gamma,
    _brightness,
    _solarize,
    _posterize,
    _invert,
    _shuffle_channels,
    _autocontrast,
)

_SYNTHESIZERS: dict[
    str, Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
] = {"cutpaste": _cutpaste, "scar": _scar, "stroke": _stroke, "dent": _dent, "draem": _draem}
