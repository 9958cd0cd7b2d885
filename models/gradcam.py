"""Grad-CAM heatmaps: where in the image a model's score comes from.

Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization", ICCV 2017)
weights each channel of a convolutional layer's activations by the spatial mean of
the score's gradient with respect to it, sums the channels, keeps the positive part
and upsamples the result to the input size.

The gradient is taken with :func:`torch.autograd.grad` with respect to the layer's
activations only, so parameters' ``.grad`` are never touched, and the model runs in
eval mode (no batch-norm statistics updated, no dropout) and is put back in the
mode it was in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_FLAT = 1e-4  # a map whose range is below this fraction of its peak counts as constant


def grad_cam(
    model: nn.Module,
    target_layer: nn.Module,
    images: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grad-CAM heatmaps (B, H, W) in [0, 1] at the input resolution, one per image.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()``, and for frozen
    models (parameters with ``requires_grad=False``).

    Args:
        model: the network; run in eval mode, then every submodule's train/eval flag
            is restored.
        target_layer: a submodule of ``model`` called exactly once per forward pass,
            whose output is a (B, C, h, w) tensor (typically the last convolutional
            block, e.g. ``model.bn2`` or ``model.conv_head`` of a timm EfficientNet).
        images: model input (B, C, H, W), already normalized.
        score: maps the model output to one scalar per image (B,), e.g.
            ``lambda logits: logits[:, k]`` for class ``k``; default: the output
            itself reshaped to (B,) (a binary anomaly logit).

    Returns:
        Heatmaps (B, H, W), float32, detached, on ``images``' device. Each map is
        min-max normalized; a constant map (e.g. a score that does not depend on the
        layer) is all zeros.

    Raises:
        ValueError: ``images`` not 4-D, ``target_layer`` not in ``model`` or not
            called exactly once, its output not (B, C, h, w), or a score not (B,).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not any(module is target_layer for module in model.modules()):
        raise ValueError("target_layer is not a submodule of model")
    batch = images.shape[0]
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple[object, ...], output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4 or output.shape[0] != batch:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(f"target_layer must output a (B, C, h, w) tensor, got {shape}")
        # A fresh leaf: its gradient exists even for frozen models, and autograd stops
        # here instead of running back through the layers below.
        activation = output.detach().requires_grad_(True)
        captured.append(activation)
        return activation.clone()  # the clone may be modified in place by the next layer

    modes = {module: module.training for module in model.modules()}
    handle = target_layer.register_forward_hook(capture)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # Inference-mode tensors cannot take part in autograd; a clone made here can.
            inputs = images.clone() if images.is_inference() else images
            output = model(inputs)
            if len(captured) != 1:
                raise ValueError(
                    f"target_layer must be called once per forward pass, was {len(captured)}"
                )
            scores = _scores(output, score, batch)
            activation = captured[0]
            gradient = None
            if scores.requires_grad:
                # Summing is exact: in eval mode each image's score depends on its own
                # activations only.
                (gradient,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
            if gradient is None:
                gradient = torch.zeros_like(activation)
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training

    with torch.no_grad():
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))  # (B, 1, h, w)
        cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear")[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        flat = span <= _FLAT * cam.abs().amax(dim=(1, 2), keepdim=True)
        cam = torch.where(flat, 0.0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny))
    return cam.clamp(0, 1).to(images.device)


def _scores(
    output: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor] | None, batch: int
) -> torch.Tensor:
    """One scalar per image (B,) from the model output."""
    if score is None:
        if not isinstance(output, torch.Tensor) or output.numel() != batch:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(
                f"model output {shape} is not one value per image; pass score= to pick one"
            )
        return output.reshape(batch)
    scores = score(output)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
        raise ValueError(f"score must return a ({batch},) tensor, got {shape}")
    return scores
