"""AutoencoderVerifier: a feature-reconstruction autoencoder trained on good parts only.

After Shi et al. 2021, "Unsupervised anomaly segmentation via deep feature
reconstruction" (DFR): the frozen ImageNet backbone describes every image patch by
its multi-scale features; a convolutional autoencoder with a narrow bottleneck
learns to reconstruct the features of good parts only, so a defect, unlike
anything seen in training, reconstructs badly. Reconstructing features rather than
pixels ignores harmless pixel-level variation (noise, texture phase) and keeps the
semantic kind.

The pipeline calls the verifier only for parts the detector is unsure about
(:mod:`models.decision`); its score is calibrated to a probability on validation
data so it can be fused with the detector's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from models.backbone import BackboneStage, Preprocessing, create_backbone, patch_features

# Backbone blocks whose outputs form the feature map: EfficientNet-Lite0 blocks 2
# (40 channels, stride 8) and 4 (112 channels, stride 16), the mid-level features
# DFR and PatchCore find most discriminative for industrial defects.
FEATURE_BLOCKS = (2, 4)


@dataclass(frozen=True)
class AutoencoderVerifierConfig:
    """What builds an :class:`AutoencoderVerifier`.

    Attributes:
        backbone: backbone name.
        input_size: side of the square model input in pixels.
        hidden: channels of the encoder's layers; the last is the bottleneck.
        top_fraction: the image score is the mean of this share of the highest
            error-map cells (small defects stay visible, single-cell noise does not).
        autocontrast: percent clipped at each end of a per-image contrast stretch
            (0: off); see :class:`~models.backbone.Preprocessing`.
    """

    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    hidden: tuple[int, ...] = (96, 32)
    top_fraction: float = 0.02
    autocontrast: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoencoderVerifierConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**(dict(data) | {"hidden": tuple(data.get("hidden", cls.hidden))}))

    def preprocessing(self) -> Preprocessing:
        """The transform this model is trained and served with."""
        return Preprocessing(
            input_size=self.input_size, resize=self.input_size, autocontrast=self.autocontrast
        )


class VerifierOutput(NamedTuple):
    """What the verifier says about a batch.

    Attributes:
        score: ``(B,)`` calibrated probability that the part is anomalous.
        raw_score: ``(B,)`` uncalibrated reconstruction error.
        error_map: ``(B, h, w)`` per-location reconstruction error (feature resolution).
    """

    score: torch.Tensor
    raw_score: torch.Tensor
    error_map: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """The probabilities it answers with (what an exported runtime must reproduce)."""
        return self.score


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class AutoencoderVerifier(BackboneStage):
    """Frozen multi-scale backbone features → 1x1-conv autoencoder → error map and score."""

    def __init__(self, config: AutoencoderVerifierConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        self.backbone, _ = create_backbone(config.backbone, pretrained=pretrained, num_classes=0)
        self.freeze(self.backbone)
        channels = sum(self.backbone.blocks[i][-1].conv_pwl.out_channels for i in FEATURE_BLOCKS)
        # Standardises each feature channel with statistics of good parts.
        self.feature_norm = nn.BatchNorm2d(channels, affine=False)
        widths = [channels, *config.hidden]
        self.encoder = nn.Sequential(*(_conv_block(a, b) for a, b in itertools.pairwise(widths)))
        back = widths[::-1]
        decoder = [_conv_block(a, b) for a, b in itertools.pairwise(back[:-1])]
        self.decoder = nn.Sequential(*decoder, nn.Conv2d(back[-2], back[-1], 1))
        # Calibration, fitted on validation data after training (:func:`calibrate`):
        # z = (raw - loc) / scale, probability = sigmoid(a * z + b).
        self.register_buffer("score_loc", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))
        self.register_buffer("platt_a", torch.tensor(1.0))
        self.register_buffer("platt_b", torch.tensor(-3.0))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The autoencoder."""
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-scale backbone features ``(B, C, H/8, W/8)``, before standardisation."""
        backbone = self.backbone
        stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        return patch_features(stem, backbone.blocks, images, FEATURE_BLOCKS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location squared reconstruction error ``(B, h, w)`` (the training loss map)."""
        features = self.features(images)
        if self.training:  # the statistics of good parts are gathered while training
            target = self.feature_norm(features)
        else:  # the same standardisation, written out: an exported graph needs it so
            norm = self.feature_norm
            scale = torch.rsqrt(norm.running_var + norm.eps)
            target = (features - norm.running_mean[:, None, None]) * scale[:, None, None]
        reconstruction = self.decoder(self.encoder(target))
        return (reconstruction - target).pow(2).mean(dim=1)

    def raw_score(self, error_map: torch.Tensor) -> torch.Tensor:
        """Image score ``(B,)``: mean of the top ``top_fraction`` error-map cells."""
        flat = error_map.flatten(1)
        k = max(1, math.ceil(self.config.top_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def calibrated(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw scores to probabilities with the fitted calibration."""
        z = (raw - self.score_loc) / self.score_scale
        return torch.sigmoid(self.platt_a * z + self.platt_b)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> VerifierOutput:
        """Calibrated score, raw score and error map of each image."""
        return self.answer(self(images))

    @torch.no_grad()
    def answer(self, error_map: torch.Tensor) -> VerifierOutput:
        """The output of :meth:`forward`'s error maps (from torch or an exported runtime)."""
        error_map = error_map.float()
        raw = self.raw_score(error_map)
        return VerifierOutput(score=self.calibrated(raw), raw_score=raw, error_map=error_map)


def calibrate(
    verifier: AutoencoderVerifier,
    good_scores: Sequence[float],
    scores: Sequence[float] | None = None,
    is_anomalous: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Fit the verifier's score calibration in place.

    Raw scores are standardised by the good parts' median and spread; then, when
    labelled scores of both classes are given, a logistic regression (Platt
    scaling) maps them to probabilities. Without anomalous examples the good parts'
    99th percentile maps to 0.5.

    Args:
        verifier: the model whose calibration buffers are set.
        good_scores: raw scores of good parts not used for training.
        scores: raw scores of labelled validation parts, optional.
        is_anomalous: their labels.

    Returns:
        The fitted parameters.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    if good.size < 2:
        raise ValueError("calibration needs at least 2 good scores")
    loc = float(np.median(good))
    spread = float(np.quantile(good, 0.84) - loc)
    scale = spread if spread > 1e-12 else float(good.std() or 1.0)
    a, b = 1.0, -float(np.quantile((good - loc) / scale, 0.99))
    if scores is not None and is_anomalous is not None:
        labels = np.asarray(is_anomalous, dtype=bool)
        if 0 < labels.sum() < labels.size:
            from sklearn.linear_model import LogisticRegression

            z = ((np.asarray(scores, dtype=np.float64) - loc) / scale).reshape(-1, 1)
            fit = LogisticRegression(C=10.0).fit(z, labels)
            a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    params = {"score_loc": loc, "score_scale": scale, "platt_a": a, "platt_b": b}
    for name, value in params.items():
        getattr(verifier, name).fill_(value)
    return params
