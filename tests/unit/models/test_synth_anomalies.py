from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.synth_anomalies import ANOMALY_KINDS, MIN_MASK_FRACTION, synthesize_anomaly

SIZES = [(224, 224), (64, 160), (97, 32)]
# Mean absolute change inside the mask on a uniform-noise image. CutPaste and the scar
# paste content from elsewhere (about 1/3 expected); DRAEM blends with opacity < 0.8,
# so at least 0.2 of a change of about 1/3. A stroke changes brightness by 12-45 %
# at its centre line, a quarter of that at the mask's edge; a dent's shading is at
# most 5-25 % on its steepest slope and fades out to its mask's edge.
MIN_CHANGE = {"cutpaste": 0.1, "scar": 0.1, "stroke": 0.01, "dent": 0.002, "draem": 0.02}


def textured(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def synth(image: torch.Tensor, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return synthesize_anomaly(image, torch.Generator().manual_seed(seed), (kind,))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_anomaly_is_confined_to_a_nonempty_mask_and_changes_it(kind: str, size) -> None:
    image = textured(*size)
    before = image.clone()
    for seed in range(5):
        out, mask = synth(image, seed, kind)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert mask.shape == size and mask.dtype == torch.bool
        assert out.min() >= 0 and out.max() <= 1
        assert mask.any()
        assert torch.equal(out[:, ~mask], image[:, ~mask])
        change = (out - image).abs().mean(dim=0)[mask].mean()
        assert change > MIN_CHANGE[kind], (seed, change)
    assert torch.equal(image, before)  # the input is not modified


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(ANOMALY_KINDS),
    height=st.integers(32, 80),
    width=st.integers(32, 80),
)
def test_any_seed_and_size_gives_a_valid_anomaly(seed: int, kind: str, height: int, width: int):
    image = textured(height, width, seed=1)
    out, mask = synth(image, seed, kind)
    assert mask.shape == (height, width) and mask.any()
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    assert not torch.equal(out[:, mask], image[:, mask])
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_same_seed_reproduces_and_another_seed_differs(kind: str) -> None:
    image = textured(96, 128)
    out_a, mask_a = synth(image, 7, kind)
    out_b, mask_b = synth(image, 7, kind)
    out_c, mask_c = synth(image, 8, kind)
    assert torch.equal(out_a, out_b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(out_a, out_c) and not torch.equal(mask_a, mask_c)


def test_generator_state_advances_between_calls() -> None:
    image = textured(64, 64)
    generator = torch.Generator().manual_seed(3)
    first = synthesize_anomaly(image, generator)
    second = synthesize_anomaly(image, generator)
    assert not torch.equal(first[1], second[1])


def test_kinds_are_drawn_from_the_given_selection() -> None:
    image = textured(64, 64)
    masks = [synth(image, seed, "cutpaste")[1] for seed in range(10)]
    # CutPaste masks are axis-aligned rectangles: the mask fills its bounding box.
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert mask.sum() == box


def test_a_stroke_is_a_thin_long_line_lighter_or_darker_than_the_surface() -> None:
    image = torch.full((3, 224, 224), 0.5)
    lighter = darker = 0
    for seed in range(20):
        out, mask = synth(image, seed, "stroke")
        ys, xs = mask.nonzero(as_tuple=True)
        extent = math.hypot(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        # Long (its middle is inside, so at least about half of 15 % of the side
        # shows) and thin (at most 3.5 px of sigma: under 12 px across).
        assert extent >= 0.07 * 224, (seed, extent)
        assert mask.sum() <= 12 * extent, (seed, int(mask.sum()), extent)
        change = (out - image)[:, mask].mean()
        lighter += bool(change > 0)
        darker += bool(change < 0)
    assert lighter and darker


def test_a_dent_is_shading_only_one_slope_lighter_the_other_darker_no_edge() -> None:
    image = torch.full((3, 224, 224), 0.5)
    for seed in range(10):
        out, mask = synth(image, seed, "dent")
        change = (out - image)[0]
        assert change.max() > 0 > change.min()  # lit on one side, shaded on the other
        assert change.abs().max() <= 0.25 * 0.5 + 1e-6
        # At the mask's border the shading has faded: no step a model could learn
        # instead of the bump.
        outside = (~mask)[None, None].float()
        border = mask & F.max_pool2d(outside, 3, stride=1, padding=1)[0, 0].bool()
        if border.any():
            assert change[border].abs().max() <= 0.1 * change.abs().max(), seed


def test_draem_mask_covers_the_minimum_area() -> None:
    image = textured(128, 128)
    for seed in range(10):
        _, mask = synth(image, seed, "draem")
        assert mask.float().mean() >= MIN_MASK_FRACTION


def test_float64_input_keeps_dtype_and_exact_background() -> None:
    image = textured(48, 48).double()
    out, mask = synth(image, 0, "draem")
    assert out.dtype == torch.float64
    assert torch.equal(out[:, ~mask], image[:, ~mask])


@pytest.mark.parametrize("kinds", [("cutpaste", "blur"), (), ("CutPaste",)])
def test_unknown_or_no_kind_raises_naming_the_allowed_kinds(kinds) -> None:
    with pytest.raises(ValueError, match=r"cutpaste.*scar.*stroke.*dent.*draem"):
        synthesize_anomaly(textured(64, 64), torch.Generator(), kinds)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.rand(64, 64), r"shape \(3, H, W\)"),
        (torch.rand(1, 64, 64), r"shape \(3, H, W\)"),
        (torch.rand(1, 3, 64, 64), r"shape \(3, H, W\)"),
        (torch.rand(3, 31, 64), ">= 32"),
        (torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "floating-point"),
        (torch.randn(3, 64, 64), r"\[0, 1\]"),
        (torch.full((3, 64, 64), float("nan")), r"\[0, 1\]"),
    ],
    ids=["2d", "1-channel", "batched", "too-small", "uint8", "normalized", "nan"],
)
def test_bad_image_raises(image: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize_anomaly(image, torch.Generator())


def test_bad_argument_types_raise() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        synthesize_anomaly([[0.5]], torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        synthesize_anomaly(textured(64, 64), 0)  # type: ignore[arg-type]
