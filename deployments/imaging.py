"""Decode and validate the images callers send, once, before any model sees them.

The router calls :func:`decode_image` on every image; a bad image becomes an
:class:`ImageRejected` whose ``status`` is the HTTP status to answer with and whose
``detail`` says what was wrong (the limit or the format, and what was received):

- 413: more bytes than ``max_bytes``, or more pixels than ``max_pixels`` (read from
  the header, before anything is decompressed: decompression bombs);
- 415: a ``content_type`` that is not an image type we take, bytes that are not an
  image, or an image in a format other than PNG, JPEG, BMP or TIFF;
- 422: no bytes, a truncated or corrupt PNG/JPEG/BMP/TIFF, or a side shorter than
  ``min_side``.

Nothing else ever escapes for bad bytes. What comes out is upright (EXIF
orientation applied) and in mode ``"L"`` (grayscale sources) or ``"RGB"``.

No Ray or web framework here: the router, tests and clients use it as plain Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)

# The magic numbers PIL's own PNG/JPEG/BMP/TIFF plugins accept. Knowing the format
# before PIL opens the bytes lets a corrupt header of an accepted format be a 422
# (damaged upload), not a 415, and keeps other plugins from claiming those bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"MM\x00\x2a", "TIFF"),
    (b"II\x2a\x00", "TIFF"),
    (b"MM\x2a\x00", "TIFF"),
    (b"II\x00\x2a", "TIFF"),
    (b"MM\x00\x2b", "TIFF"),  # BigTIFF
    (b"II\x2b\x00", "TIFF"),
)
# A JPEG carrying a multi-picture (MPF) segment, as many cameras write, opens as MPO.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_HIGH_BIT_DEPTH = ("I", "F")  # and every "I;16..." mode
_DATA_URL = re.compile(r"data:(?P<media_type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_ACCEPTED = ", ".join(ALLOWED_FORMATS)


@dataclass(frozen=True)
class ImageLimits:
    """What the router accepts.

    Attributes:
        max_bytes: The largest upload, in bytes.
        max_pixels: The most pixels (width * height); checked from the header, so a
            decompression bomb is refused before it is decompressed.
        min_side: The shortest side, in pixels, a model can still make sense of.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 8

    def __post_init__(self) -> None:
        """Refuse limits that would accept nothing."""
        for name in ("max_bytes", "max_pixels", "min_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class ImageRejected(ValueError):
    """An image the router will not inspect, with the HTTP status to answer.

    Attributes:
        status: 413, 415 or 422.
        detail: What was wrong, for the caller; also ``str(self)``.
    """

    def __init__(self, status: int, detail: str) -> None:
        """Keep the status beside the message.

        Args:
            status: The HTTP status the router answers with.
            detail: What was wrong, naming the limit or format and what was received.
        """
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[int, str]]:
        """Pickle with both arguments (the default passes only ``args``)."""
        return (type(self), (self.status, self.detail))


@dataclass(frozen=True)
class DecodedImage:
    """An image that passed every check, ready for the models.

    Attributes:
        image: Fully loaded and upright, mode ``"L"`` (grayscale sources) or ``"RGB"``.
        format: The format the bytes were in: PNG, JPEG, BMP or TIFF.
        sha256: Hex digest of the bytes as sent.
        width: Width of ``image`` (after EXIF orientation).
        height: Height of ``image``.
        n_bytes: Size of the bytes as sent.
        sent_png: The bytes as sent when they are a PNG that decodes to exactly
            ``image`` (grayscale or RGB, no orientation to apply), else None.
    """

    image: Image.Image
    format: str
    sha256: str
    width: int
    height: int
    n_bytes: int
    sent_png: bytes | None = None

    def png(self) -> bytes:
        """The image as a PNG file.

        The bytes as sent where they are a PNG that decodes to exactly :attr:`image`,
        else an encoding of it (which costs milliseconds).
        """
        return self.sent_png if self.sent_png is not None else encode_png(self.image)


def decode_base64(text: str) -> bytes:
    """Decode an image sent as base64 text, optionally as a ``data:image/...`` URL.

    Args:
        text: Standard base64 (no line breaks inside; surrounding whitespace is
            ignored), optionally prefixed by ``data:image/<type>;base64,``.

    Returns:
        The decoded bytes (not yet checked to be an image).

    Raises:
        ImageRejected: 422 if the text is not valid base64 or the data URL is not
            base64; 415 if the data URL's media type is not an image type.
    """
    text = text.strip()
    match = _DATA_URL.match(text)
    if match:
        media_type = match["media_type"].strip().lower()
        if not media_type.startswith("image/"):
            raise ImageRejected(
                415, f"data URL has media type {media_type or '(none)'!r}; expected image/..."
            )
        if ";base64" not in match["params"].lower():
            raise ImageRejected(422, "data URL is not base64-encoded (no ';base64')")
        text = text[match.end() :]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:  # ValueError: non-ASCII characters
        raise ImageRejected(422, f"image is not valid base64: {error}") from None


def decode_image(
    data: bytes, content_type: str | None = None, limits: ImageLimits = ImageLimits()
) -> DecodedImage:
    """Check, decode and normalize one image.

    Relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being left at its default
    (False) so that truncated files are refused rather than padded with gray.

    Args:
        data: The image file's bytes, as sent.
        content_type: The declared media type, if any (parameters such as
            ``; charset=`` are ignored; an empty header counts as none). The
            format is read from the bytes either way.
        limits: The size limits to enforce.

    Returns:
        The decoded image, upright, in mode ``"L"`` or ``"RGB"``.

    Raises:
        ImageRejected: With status 413, 415 or 422 (see the module docstring).
    """
    n_bytes = len(data)
    if n_bytes > limits.max_bytes:
        raise ImageRejected(413, f"image is {n_bytes} bytes; the limit is {limits.max_bytes}")
    _check_content_type(content_type)
    if n_bytes == 0:
        raise ImageRejected(422, "image is empty (0 bytes)")

    sniffed = _sniff_format(data)
    try:
        # A sniffed format is opened by its own plugin only; anything else may be
        # identified by any plugin, just so the refusal can name the format.
        source = Image.open(io.BytesIO(data), formats=(sniffed,) if sniffed else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # PIL's own global limit (only a warning unless it is twice exceeded; the
        # warning arrives as an error where warnings are configured so).
        raise ImageRejected(
            413, f"image has too many pixels; the limit is {limits.max_pixels} ({error})"
        ) from None
    except Exception as error:  # plugins raise many types (OSError, SyntaxError, struct.error)
        if sniffed:
            # UnidentifiedImageError's own message only repeats the buffer's repr.
            reason = "" if isinstance(error, UnidentifiedImageError) else f": {error}"
            raise ImageRejected(
                422, f"image starts like a {sniffed} file but its header is corrupt{reason}"
            ) from None
        raise ImageRejected(
            415, f"image format not recognized (first bytes {data[:8]!r}); send {_ACCEPTED}"
        ) from None

    try:
        image_format = _FORMAT_ALIASES.get(source.format or "", source.format or "unknown")
        if image_format not in ALLOWED_FORMATS:
            raise ImageRejected(
                415, f"image format {image_format} is not accepted; send {_ACCEPTED}"
            )
        _check_size(source.size, limits)
        try:
            # Our own pixel check ran above, so PIL's checks can only fire here for
            # frames or tiles that disagree with the header.
            source.load()  # the first frame of a multi-frame TIFF
            image = _to_model_mode(_upright(source))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageRejected(
                413, f"image has too many pixels; the limit is {limits.max_pixels} ({error})"
            ) from None
        except Exception as error:  # OSError (truncated), SyntaxError (broken PNG), ...
            raise ImageRejected(
                422, f"{image_format} image is truncated or corrupt: {error}"
            ) from None
    except BaseException:
        source.close()
        raise
    if image is not source:
        source.close()
    # else: closing would free the pixels handed on; the source is bytes in memory.

    return DecodedImage(
        image=image,
        format=image_format,
        sha256=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        n_bytes=n_bytes,
        sent_png=data if image is source and image_format == "PNG" else None,
    )


def encode_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> str:
    """Encode an anomaly map as a base64 grayscale PNG the size of the input image.

    Args:
        heatmap: ``(H, W)`` float map in [0, 1] (values outside are clipped, NaN
            counts as 0).
        size: ``(width, height)`` to resize to, usually the image sent.

    Returns:
        Base64 (ASCII) of an 8-bit grayscale PNG; 255 where the map is 1.

    Raises:
        ValueError: If the map is not 2-D or the size not positive.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {heatmap.shape}")
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive (width, height), got {size}")
    heatmap = np.nan_to_num(heatmap, nan=0.0, posinf=1.0, neginf=0.0)
    # Resize the float map, then quantize: bilinear on 8-bit values would band.
    as_float = Image.fromarray(np.ascontiguousarray(heatmap))  # mode "F"
    resized = as_float.resize((width, height), Image.Resampling.BILINEAR)
    levels = np.rint(np.clip(np.asarray(resized), 0.0, 1.0) * 255.0).astype(np.uint8)
    return base64.b64encode(encode_png(Image.fromarray(levels))).decode("ascii")


def encode_png(image: Image.Image) -> bytes:
    """Encode an image as PNG bytes.

    Args:
        image: Any image PIL can write as PNG (1, L, LA, I;16, P, RGB, RGBA).

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in ALLOWED_CONTENT_TYPES:
        raise ImageRejected(
            415,
            f"content type {media_type!r} is not accepted; "
            f"send one of {', '.join(sorted(ALLOWED_CONTENT_TYPES))}",
        )


def _sniff_format(data: bytes) -> str | None:
    for magic, image_format in _MAGIC:
        if data.startswith(magic):
            return image_format
    return None


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageRejected(
            413, f"image is {width}x{height} = {pixels} pixels; the limit is {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            422, f"image is {width}x{height} pixels; each side must be at least {limits.min_side}"
        )


def _upright(image: Image.Image) -> Image.Image:
    """The image with its EXIF orientation applied; itself when there is none to apply."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image  # exif_transpose would return a copy
    return ImageOps.exif_transpose(image)


def _to_model_mode(image: Image.Image) -> Image.Image:
    """``"L"`` (grayscale sources) or ``"RGB"``: the image itself if it is one already."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _HIGH_BIT_DEPTH or mode.startswith("I;16"):
        return _rescale_to_8bit(image)
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "La"):
        return _over_white(image.convert("LA"))
    if mode in ("PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in image.info):
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")  # RGB, RGBX, P, CMYK, YCbCr, LAB, HSV


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit or float image to ``"L"`` by its own min..max.

    Clipping at 255 would turn a 12-bit sensor image white, and dividing by the
    type's full range would turn it nearly black; its own range keeps the contrast.
    A uniform image (no range) comes out black.
    """
    values = np.asarray(image).astype(np.float32)  # (H, W); float32 is exact for 16-bit
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size, 0)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return Image.new("L", image.size, 0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    levels = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8))  # mode "L"


def _over_white(image: Image.Image) -> Image.Image:
    """Composite an ``"LA"`` or ``"RGBA"`` image over white, dropping alpha.

    White, not black: transparent margins of product photos are usually meant as
    paper-white background, and black would read as a dark defect.
    """
    base_mode = image.mode[:-1]  # "L" or "RGB"
    background = Image.new(base_mode, image.size, (255,) * len(base_mode))
    background.paste(image.convert(base_mode), mask=image.getchannel("A"))
    return background
