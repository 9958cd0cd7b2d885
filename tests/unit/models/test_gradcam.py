from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbone import create_backbone
from models.gradcam import grad_cam


class QuadrantNet(nn.Module):
    """Output = mean of the input's top-left quadrant; the rest is seen but ignored.

    The target layer's channel 0 holds the top-left quadrant, channel 1 the rest of
    the image; the head reads channel 0 only. Grad-CAM must weight channel 0 and not
    channel 1, so the heatmap lights up the top-left quadrant only, while a map of
    raw activations would be uniform.
    """

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        nn.init.constant_(self.features.weight, 1 / 3)  # both channels: grey level
        self.target = nn.Identity()
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        quadrant = torch.zeros(height, width)
        quadrant[: height // 2, : width // 2] = 1
        self.register_buffer("split", torch.stack([quadrant, 1 - quadrant]))  # (2, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x) * self.split)  # (B, 2, H, W)
        return self.head(a.mean(dim=(2, 3)))  # (B, 1)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    # A seeded head: for some random heads the score's evidence is negative everywhere
    # and Grad-CAM rightly returns all zeros, which would hide a real map's checks.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _ = create_backbone(num_classes=1)
    return model


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_heatmap_concentrates_where_the_output_comes_from(size) -> None:
    height, width = size
    net = QuadrantNet(height, width)
    images = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(0)) + 0.1
    cam = grad_cam(net, net.target, images)
    assert cam.shape == (3, height, width)
    inside = cam[:, : height // 2, : width // 2]
    outside_mean = (cam.sum(dim=(1, 2)) - inside.sum(dim=(1, 2))) / (height * width * 3 / 4)
    assert (inside.mean(dim=(1, 2)) > 3 * outside_mean).all()
    assert cam.amax(dim=(1, 2)).allclose(torch.ones(3))  # normalized per image


def test_score_selects_what_the_heatmap_explains() -> None:
    net = QuadrantNet(32, 32)
    net.head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.head.weight.copy_(torch.eye(2))  # output k reads channel k
    images = torch.rand(2, 3, 32, 32) + 0.1
    rest = grad_cam(net, net.target, images, score=lambda out: out[:, 1])
    assert rest[:, :16, :16].max() < 0.05 and rest[:, 16:, :].min() > 0.05


def test_constant_map_is_zeros_not_nan() -> None:
    net = QuadrantNet(32, 32)
    with torch.no_grad():
        net.head.weight.zero_()  # the score no longer depends on the target layer
    cam = grad_cam(net, net.target, torch.rand(2, 3, 32, 32))
    assert torch.equal(cam, torch.zeros(2, 32, 32))


@pytest.mark.parametrize("layer", ["bn2", "conv_head"])
def test_efficientnet_heatmaps_leave_the_model_as_it_was(lite0: nn.Module, layer: str) -> None:
    model = lite0
    model.train()
    model.blocks[0].eval()  # a mixed mode must come back as it was, module by module
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        cam = grad_cam(model, getattr(model, layer), images)

    assert cam.shape == (2, 224, 224) and cam.dtype == torch.float32
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert (cam.amax(dim=(1, 2)) == 1).all()  # a real map, not the constant fallback
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    # Eval mode inside: batch-norm running statistics were not updated.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not getattr(model, layer)._forward_hooks


def test_efficientnet_heatmap_matches_without_no_grad_and_in_inference_mode(lite0) -> None:
    model = lite0.eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    plain = grad_cam(model, model.bn2, images)
    with torch.inference_mode():
        inference = grad_cam(model, model.bn2, images.clone())
    assert torch.allclose(plain, inference, atol=1e-6)


def test_frozen_model_still_gets_a_heatmap() -> None:
    net = QuadrantNet(32, 32).requires_grad_(False)
    cam = grad_cam(net, net.target, torch.rand(1, 3, 32, 32) + 0.1)
    assert cam[0, :16, :16].mean() > 3 * cam[0, 16:, 16:].mean()


def test_hooks_and_mode_are_restored_when_scoring_fails() -> None:
    net = QuadrantNet(32, 32).train()

    def broken(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(net, net.target, torch.rand(1, 3, 32, 32), score=broken)
    assert not net.target._forward_hooks and not net.target._backward_hooks
    assert all(m.training for m in net.modules())


def test_bad_arguments_raise() -> None:
    net = QuadrantNet(32, 32)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(net, nn.Identity(), images)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        grad_cam(net, net.target, images[0])
    with pytest.raises(ValueError, match=r"score must return a \(2,\) tensor"):
        grad_cam(net, net.target, images, score=lambda out: out)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        grad_cam(net, net.head, images)  # the head outputs (B, 1)
    assert not net.head._forward_hooks
    two_outputs = QuadrantNet(32, 32)
    two_outputs.head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="pass score="):
        grad_cam(two_outputs, two_outputs.target, images)
