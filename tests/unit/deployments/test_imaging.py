"""Image decoding and validation at the serving boundary (deployments/imaging.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from deployments.imaging import (
    ALLOWED_FORMATS,
    DecodedImage,
    ImageLimits,
    ImageRejected,
    decode_base64,
    decode_image,
    encode_heatmap,
    encode_png,
)

REJECTION_STATUSES = {413, 415, 422}


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _textured(mode: str, size: tuple[int, int] = (48, 32), seed: int = 0) -> Image.Image:
    """A smooth pattern (JPEG keeps it close) with some noise (so it is not trivial)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 4, (height, width))
    if mode == "L":
        return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    channels = np.stack([base, 255 - base, 0.5 * base + 60], axis=-1)
    return Image.fromarray(np.clip(channels, 0, 255).astype(np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR claims ``width`` x ``height`` (CRC fixed up).

    Its data is only 8x8 1-bit pixels, so decoding it would fail as truncated: a
    413 proves the size was refused from the header, before decoding.
    """
    data = bytearray(_encode(Image.new("1", (8, 8)), "PNG"))
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | ... | CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _rejected(data: bytes, **kwargs: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, **kwargs)
    return caught.value


# --- formats and modes --------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("image_format", ALLOWED_FORMATS)
def test_each_format_round_trips(image_format: str, mode: str) -> None:
    original = _textured(mode)
    # JPEG at high quality without chroma subsampling, so the check is of decoding.
    options = {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {}
    data = _encode(original, image_format, **options)

    decoded = decode_image(data)

    assert isinstance(decoded, DecodedImage)
    assert decoded.format == image_format
    assert decoded.image.mode == mode
    assert (decoded.width, decoded.height) == decoded.image.size == (48, 32)
    assert decoded.n_bytes == len(data)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    error = np.abs(np.asarray(decoded.image, dtype=np.int16) - np.asarray(original, dtype=np.int16))
    if image_format == "JPEG":
        assert error.mean() < 3
    else:
        assert error.max() == 0


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_decoded_image_travels_between_processes(image_format: str) -> None:
    decoded = decode_image(_encode(_textured("RGB"), image_format))
    expected = np.asarray(decoded.image)
    # The split topology pickles it to the stage replicas.
    travelled = pickle.loads(pickle.dumps(decoded.image))
    assert travelled.mode == "RGB" and np.array_equal(np.asarray(travelled), expected)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_png_that_decodes_as_it_is_inspected_is_kept_as_sent(mode: str) -> None:
    data = _encode(_textured(mode), "PNG")
    decoded = decode_image(data)
    assert decoded.sent_png == data
    assert decoded.png() is data  # the review queue stores it without encoding again


@pytest.mark.parametrize(
    ("image", "image_format"),
    [
        (_textured("RGB"), "JPEG"),
        (_textured("RGB").convert("RGBA"), "PNG"),  # composited over white
        (_textured("RGB").convert("P"), "PNG"),  # palette: inspected as RGB
        (Image.new("1", (32, 16), 1), "PNG"),
    ],
)
def test_other_images_are_encoded_as_the_png_that_was_inspected(
    image: Image.Image, image_format: str
) -> None:
    decoded = decode_image(_encode(image, image_format))
    assert decoded.sent_png is None
    again = Image.open(io.BytesIO(decoded.png()))
    assert again.format == "PNG" and again.mode == decoded.image.mode
    assert np.array_equal(np.asarray(again), np.asarray(decoded.image))


def test_a_png_with_an_orientation_to_apply_is_not_kept_as_sent() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(_textured("L", (40, 20)), "PNG", exif=exif.tobytes()))
    assert decoded.image.size == (20, 40) and decoded.sent_png is None


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_sixteen_bit_is_scaled_by_its_own_range(image_format: str) -> None:
    # A 12-bit sensor image: clipping to 8 bits would make nearly all of it white.
    ramp = np.linspace(300, 4095, 48 * 32).reshape(32, 48).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), image_format)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    pixels = np.asarray(decode_image(data).image)

    assert decode_image(data).image.mode == "L"
    assert pixels.max() >= 250
    assert pixels.min() <= 5
    assert (pixels == 255).mean() < 0.05
    # Order is kept: the ramp still rises.
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)


def test_float_tiff_is_scaled_to_gray() -> None:
    ramp = np.linspace(-2.0, 0.5, 48 * 32, dtype=np.float32).reshape(32, 48)
    decoded = decode_image(_encode(Image.fromarray(ramp), "TIFF"))
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "L"
    assert pixels[0, 0] == 0
    assert pixels[-1, -1] == 255


def test_uniform_sixteen_bit_image_does_not_divide_by_zero() -> None:
    flat = np.full((16, 16), 1234, dtype=np.uint16)
    decoded = decode_image(_encode(Image.fromarray(flat), "PNG"))
    assert decoded.image.mode == "L"
    assert np.unique(np.asarray(decoded.image)).size == 1


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red, bottom half fully transparent

    decoded = decode_image(_encode(Image.fromarray(rgba), "PNG"))
    pixels = np.asarray(decoded.image)

    assert decoded.image.mode == "RGB"
    assert pixels[0, 0].tolist() == [200, 0, 0]
    assert pixels[15, 15].tolist() == [255, 255, 255]


def test_gray_with_alpha_becomes_gray_over_white() -> None:
    gray = Image.new("L", (16, 16), 40)
    alpha = Image.new("L", (16, 16), 0)
    alpha.paste(255, (0, 0, 16, 8))
    decoded = decode_image(_encode(Image.merge("LA", [gray, alpha]), "PNG"))
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "L"
    assert (pixels[0, 0], pixels[15, 15]) == (40, 255)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_becomes_rgb(transparent: bool) -> None:
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0 = blue, 1 = red
    palette.paste(1, (0, 0, 16, 8))
    options = {"transparency": 0} if transparent else {}

    decoded = decode_image(_encode(palette, "PNG", **options))
    pixels = np.asarray(decoded.image)

    assert decoded.image.mode == "RGB"
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[15, 15].tolist() == ([255, 255, 255] if transparent else [0, 0, 255])


@pytest.mark.parametrize("image_format", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(image_format: str) -> None:
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    decoded = decode_image(_encode(cyan, image_format))
    red, green, blue = np.asarray(decoded.image)[8, 8].tolist()
    assert decoded.image.mode == "RGB"
    assert red < 30 and green > 225 and blue > 225


def test_one_bit_becomes_gray() -> None:
    decoded = decode_image(_encode(Image.new("1", (16, 16), 1), "PNG"))
    assert decoded.image.mode == "L"
    assert np.asarray(decoded.image).min() == 255


@pytest.mark.parametrize("image_format", ["JPEG", "TIFF"])
def test_exif_orientation_is_applied(image_format: str) -> None:
    # 40 wide, 20 high; the left half bright. Orientation 6 means "rotate 90 degrees
    # clockwise to display", which brings the left side to the top.
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), image_format, exif=exif.tobytes())

    decoded = decode_image(data)
    pixels = np.asarray(decoded.image, dtype=float)

    assert (decoded.width, decoded.height) == decoded.image.size == (20, 40)
    assert pixels[:20].mean() > 200
    assert pixels[20:].mean() < 50


def test_multi_frame_tiff_gives_its_first_frame() -> None:
    first = Image.new("L", (20, 10), 10)
    second = Image.new("L", (30, 30), 200)
    data = _encode(first, "TIFF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2

    decoded = decode_image(data)

    assert decoded.image.size == (20, 10)
    assert np.asarray(decoded.image).max() == 10


def test_content_type_parameters_and_case_are_ignored() -> None:
    data = _encode(_textured("L"), "PNG")
    for content_type in ("image/PNG; charset=binary", "application/octet-stream", "image/jpg"):
        # The format comes from the bytes, not from what the caller declared.
        assert decode_image(data, content_type=content_type).format == "PNG"


# --- rejections ---------------------------------------------------------------


def test_zero_bytes_is_422() -> None:
    error = _rejected(b"")
    assert error.status == 422
    assert "0 bytes" in error.detail


def test_too_many_bytes_is_413_and_names_the_limit() -> None:
    data = _encode(_textured("RGB"), "PNG")
    error = _rejected(data, limits=ImageLimits(max_bytes=100))
    assert error.status == 413
    assert error.detail == f"image is {len(data)} bytes; the limit is 100"


def test_too_many_pixels_is_413_before_decoding() -> None:
    error = _rejected(_png_claiming(1000, 1000), limits=ImageLimits(max_pixels=10_000))
    assert error.status == 413
    assert "1000x1000" in error.detail and "10000" in error.detail


def test_the_same_header_under_a_high_limit_fails_as_truncated() -> None:
    # The counterpart of the test above: what a decode of that file would say.
    error = _rejected(_png_claiming(1000, 1000), limits=ImageLimits(max_pixels=2_000_000))
    assert error.status == 422
    assert "truncated" in error.detail


def test_decompression_bomb_is_413_under_the_default_limit() -> None:
    error = _rejected(_png_claiming(100_000, 100_000))
    assert error.status == 413


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_in_pils_warning_range_is_413() -> None:
    error = _rejected(_png_claiming(10_000, 10_000))
    assert error.status == 413
    assert "40000000" in error.detail


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_raised_as_error_is_still_413() -> None:
    error = _rejected(_png_claiming(10_000, 10_000))
    assert error.status == 413


@pytest.mark.parametrize(
    "image_format",
    [
        "GIF",
        pytest.param(
            "WEBP",
            marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP support"),
        ),
        "ICO",
    ],
)
def test_other_formats_are_415_and_say_what_is_accepted(image_format: str) -> None:
    error = _rejected(_encode(_textured("RGB"), image_format))
    assert error.status == 415
    assert image_format in error.detail
    assert all(accepted in error.detail for accepted in ALLOWED_FORMATS)


def test_text_is_415() -> None:
    error = _rejected(b"this is a plain text file, certainly not an image\n")
    assert error.status == 415
    assert "not recognized" in error.detail


@pytest.mark.parametrize("content_type", ["text/plain", "image/gif; charset=utf-8", "video/mp4"])
def test_wrong_content_type_is_415(content_type: str) -> None:
    error = _rejected(_encode(_textured("L"), "PNG"), content_type=content_type)
    assert error.status == 415
    assert content_type.split(";")[0] in error.detail


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "BMP", "TIFF"])
def test_truncated_file_is_422(image_format: str) -> None:
    data = _encode(_textured("RGB", size=(64, 64)), image_format)
    error = _rejected(data[: len(data) // 2])
    assert error.status == 422
    assert image_format in error.detail


def test_corrupt_middle_of_png_is_422() -> None:
    data = bytearray(_encode(_textured("RGB", size=(64, 64)), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xff" * 16  # inside the compressed pixel data
    error = _rejected(bytes(data))
    assert error.status == 422
    assert "corrupt" in error.detail


def test_corrupt_png_header_is_422_not_415() -> None:
    data = bytearray(_encode(_textured("RGB"), "PNG"))
    data[18] ^= 0xFF  # the IHDR width; its CRC no longer matches
    error = _rejected(bytes(data))
    assert error.status == 422
    assert "PNG" in error.detail


def _png_with_short_idat_length() -> bytes:
    data = bytearray(_encode(_textured("RGB"), "PNG"))
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    data[idat - 4 : idat] = struct.pack(">I", length // 2)
    return bytes(data)


def _png_with_short_ihdr_length() -> bytes:
    data = bytearray(_encode(_textured("RGB"), "PNG"))
    data[8:12] = struct.pack(">I", 10)  # IHDR holds 13 bytes
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "pil_error"),
    [(_png_with_short_idat_length, SyntaxError), (_png_with_short_ihdr_length, ValueError)],
)
def test_png_chunk_damage_that_pil_reports_without_oserror_is_422(
    make: Callable[[], bytes], pil_error: type[Exception]
) -> None:
    data = make()
    # PIL raises neither OSError nor ImageRejected here: proof the module catches them.
    with pytest.raises(pil_error):
        Image.open(io.BytesIO(data)).load()
    error = _rejected(data)
    assert error.status == 422
    assert "PNG" in error.detail


def test_tiny_image_is_422() -> None:
    error = _rejected(_encode(Image.new("L", (4, 4)), "PNG"))
    assert error.status == 422
    assert "4x4" in error.detail and "8" in error.detail


def test_min_side_is_configurable() -> None:
    data = _encode(Image.new("L", (4, 4)), "PNG")
    assert decode_image(data, limits=ImageLimits(min_side=4)).image.size == (4, 4)


def test_rejection_carries_status_and_detail_through_pickle() -> None:
    error = ImageRejected(413, "image is 9 bytes; the limit is 8")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(error, ValueError)
    assert str(error) == error.detail
    assert (copy.status, copy.detail, str(copy)) == (413, error.detail, error.detail)


def test_limits_refuse_non_positive_values() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)


# --- base64 -------------------------------------------------------------------


def test_base64_round_trip_plain_and_data_url() -> None:
    data = _encode(_textured("RGB"), "PNG")
    text = base64.b64encode(data).decode("ascii")
    assert decode_base64(text) == data
    assert decode_base64(f"data:image/png;base64,{text}") == data
    assert decode_base64(f"  DATA:image/png;base64,{text}\n") == data


@pytest.mark.parametrize(
    "text",
    ["aGVsbG8", "aGVs bG8=", "aGVsbG8=!", "héllo===", "data:image/png,aGVsbG8="],
)
def test_bad_base64_is_422(text: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_base64(text)
    assert caught.value.status == 422


def test_data_url_of_another_media_type_is_415() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_base64("data:text/plain;base64,aGVsbG8=")
    assert caught.value.status == 415
    assert "text/plain" in caught.value.detail


# --- encoding -----------------------------------------------------------------


def test_heatmap_round_trip_is_bright_where_the_map_is_high() -> None:
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[:4, :4] = 1.0  # top-left quadrant anomalous

    png = base64.b64decode(encode_heatmap(heatmap, (120, 80)), validate=True)
    decoded = decode_image(png)
    pixels = np.asarray(decoded.image, dtype=float)

    assert decoded.format == "PNG"
    assert decoded.image.mode == "L"
    assert decoded.image.size == (120, 80)  # (width, height)
    assert pixels[:30, :50].mean() > 240
    assert pixels[50:, 70:].mean() < 15
    assert pixels[:30, 70:].mean() < 15


def test_heatmap_levels_follow_the_scores() -> None:
    ramp = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (4, 1))
    ramp[0, 0] = np.nan  # counts as 0
    ramp[1, -1] = 7.0  # clipped to 1
    png = base64.b64decode(encode_heatmap(ramp, (11, 4)))
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    expected = np.linspace(0, 255, 11)
    assert np.abs(pixels[2] - expected).max() <= 1  # rounding of float32 scores
    assert (pixels[0, 0], pixels[1, -1]) == (0, 255)


def test_heatmap_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_heatmap(np.zeros((1, 8, 8)), (8, 8))


def test_encode_png_round_trips_exactly() -> None:
    original = _textured("RGB")
    decoded = decode_image(encode_png(original))
    assert np.array_equal(np.asarray(decoded.image), np.asarray(original))


# --- properties: bad bytes only ever give ImageRejected 413/415/422 ------------

_LIMITS = ImageLimits()
_SEEDS = [
    _encode(_textured("RGB", size=(16, 12)), "PNG"),
    _encode(_textured("L", size=(16, 12)), "PNG"),
    _encode(_textured("RGB", size=(16, 12)), "JPEG"),
    _encode(_textured("RGB", size=(16, 12)), "BMP"),
    _encode(_textured("RGB", size=(16, 12)), "TIFF"),
    _encode(_textured("RGB", size=(16, 12)), "TIFF", compression="tiff_lzw"),
]
_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF89a"]


def _assert_decoded_or_rejected(data: bytes) -> None:
    try:
        decoded = decode_image(data, limits=_LIMITS)
    except ImageRejected as error:
        assert error.status in REJECTION_STATUSES
        assert error.detail
        return
    assert decoded.image.mode in ("L", "RGB")
    assert decoded.format in ALLOWED_FORMATS
    assert min(decoded.image.size) >= _LIMITS.min_side
    assert decoded.width * decoded.height <= _LIMITS.max_pixels
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# PIL warns about corrupt EXIF data and decompression bombs while fuzzing.
_QUIET = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


@pytest.mark.fuzz
@_QUIET
@_FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    _assert_decoded_or_rejected(data)


@pytest.mark.fuzz
@_QUIET
@_FUZZ
@given(st.sampled_from(_MAGICS), st.binary(max_size=2048))
def test_bytes_behind_a_known_magic_never_escape(magic: bytes, tail: bytes) -> None:
    # Arbitrary bytes seldom start like an accepted format; these reach the plugins.
    _assert_decoded_or_rejected(magic + tail)


@pytest.mark.fuzz
@_QUIET
@_FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_damaged_valid_files_never_escape(
    seed: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seed)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _assert_decoded_or_rejected(bytes(data))
