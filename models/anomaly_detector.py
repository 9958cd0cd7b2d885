"""AnomalyDetector: the pretrained EfficientNet-Lite0 with a binary head, one per category.

One model per product category rather than one conditioned on the category: a new
product line is a new artifact trained and promoted on its own, without retraining
or risking the lines already in production, and serving multiplexes the artifacts
by category. At 3.4 M parameters (14 MB) a model per category costs little.

Trained two ways (``models.training``): supervised when the category's training
split has labelled defects, normal-only otherwise, on good images with synthesised
anomalies (CutPaste, DRAEM, thin strokes and shaded dents, :mod:`models.synth_anomalies`).
A supervised detector's head can instead be fitted in one pass (``head: fitted``): a
logistic regression on the frozen backbone's pooled features, in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneStage, Preprocessing, create_backbone
from models.gradcam import grad_cam
from models.heads import HEADS, TRAINED, fit_linear

FLIPS = ("none", "horizontal", "vertical", "both")  # the views ``test_flips`` averages
POOLINGS = ("avg", "gem")


class GeneralizedMeanPool(nn.Module):
    """``(B, C, H, W)`` -> ``(B, C)``: the mean of ``x**p`` over positions, to the ``1/p``.

    ``p = 1`` is average pooling and a large ``p`` tends to max pooling; ``p`` is
    learnt with the head (Radenović et al., "Fine-tuning CNN image retrieval with no
    human annotation", TPAMI 2019). The input is clamped to ``eps`` from below: the
    backbone's features end in a ReLU6 and are not negative.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return features.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


@dataclass(frozen=True)
class AnomalyDetectorConfig:
    """What builds an :class:`AnomalyDetector` (stored in its artifact).

    Attributes:
        backbone: a backbone name known to :func:`models.backbone.create_backbone`.
        input_size: side of the square model input in pixels.
        resize: shorter side before the center crop (default: ``input_size``).
        freeze_stages: the stem and this many of the first blocks stay frozen at
            their ImageNet weights: low-level filters transfer as they are, and on
            a CPU training runs about 1.5x faster.
        dropout: dropout before the binary head.
        autocontrast: percent clipped at each end of a per-image contrast stretch
            (0: off); see :class:`~models.backbone.Preprocessing`.
        test_flips: when judging (not training), average the logit over the image
            and its horizontal, vertical and double flips: four passes per image,
            for parts whose defects look the same flipped (a model trained with
            flip augmentation has learnt that they do).
        pooling: how the last feature map becomes one vector: ``avg`` (the mean
            over positions, ImageNet's) or ``gem`` (a generalised mean whose
            exponent is learnt, from 3: between the mean and the maximum, so a
            crack a few pixels wide is not averaged away by the clean area around
            it; see :class:`GeneralizedMeanPool`).
        head: how the head is learnt: ``"trained"`` with the backbone's later blocks
            by the training loop, or ``"fitted"`` in one pass, the whole backbone
            frozen (:meth:`AnomalyDetector.fit_head`): a weaker judge than a trained
            one, ready in seconds.
    """

    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    resize: int | None = None
    freeze_stages: int = 2
    dropout: float = 0.2
    autocontrast: float = 0.0
    test_flips: bool = False
    pooling: str = "avg"
    head: str = TRAINED

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {sorted(POOLINGS)}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is not one of {sorted(HEADS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnomalyDetectorConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**dict(data))

    def preprocessing(self) -> Preprocessing:
        """The transform this model is trained and served with."""
        return Preprocessing(
            input_size=self.input_size,
            resize=self.resize or self.input_size,
            autocontrast=self.autocontrast,
        )


class DetectorOutput(NamedTuple):
    """What the detector says about a batch.

    Attributes:
        probability: ``(B,)`` probability that each part is anomalous.
        heatmap: ``(B, H, W)`` Grad-CAM maps in [0, 1] at the input size, when asked.
    """

    probability: torch.Tensor
    heatmap: torch.Tensor | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        """The probabilities it answers with (what an exported runtime must reproduce)."""
        return self.probability


class AnomalyDetector(BackboneStage):
    """Binary anomaly classifier: ImageNet backbone, pooled features, one logit.

    Args:
        config: the architecture.
        pretrained: start from the packaged ImageNet weights (training); loading a
            trained artifact passes False and then loads its state dict.
    """

    def __init__(self, config: AnomalyDetectorConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        self.backbone, _ = create_backbone(config.backbone, pretrained=pretrained, num_classes=0)
        blocks = self.backbone.blocks[: config.freeze_stages]
        self.freeze(self.backbone.conv_stem, self.backbone.bn1, *blocks)
        self.pool: nn.Module = nn.Identity()  # avg: the backbone's own pooling
        if config.pooling == "gem":
            self.backbone.global_pool = nn.Identity()  # the backbone returns its last map
            self.pool = GeneralizedMeanPool()
        self.head = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(self.backbone.num_features, 1)
        )
        self._flips = True  # off while Grad-CAM explains the image as sent

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the freshly initialised head (and the pooling's exponent)."""
        yield from self.pool.parameters()
        yield from self.head.parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly logits ``(B,)`` for normalized images ``(B, 3, H, W)``.

        In eval mode with ``test_flips`` the logit is the mean over the four flips.
        """
        if self.training or not self.config.test_flips or not self._flips:
            return self.logits(images)
        return self.flip_logits(images).mean(1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,)`` logits of one view of each image."""
        return self.head(self.features(images)).squeeze(-1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features ``(B, F)`` the head reads (1,280 for EfficientNet-Lite0)."""
        return self.pool(self.backbone(images))

    def fit_head(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        pos_weight: float = 1.0,
        l2: float = 1e-2,
        steps: int = 200,
    ) -> dict[str, float]:
        """Fit the head to pooled ``features`` ``(N, F)`` of images with ``targets`` ``(N,)``.

        A logistic regression: the trained head's loss (binary cross-entropy on
        the targets in [0, 1], graded severities included, defects weighted by
        ``pos_weight``) plus ``l2`` times the squared weights, minimised by
        L-BFGS. The default ``l2`` is a strong prior on 1,280 features and a
        thousand images: on ELPV's validation cells 1e-2 ranked better than 5e-4
        (AUROC 0.937 and 0.857 for mono and poly, against 0.901 and 0.850).

        Returns:
            ``{"images", "train_loss"}`` of the fit.
        """
        targets = targets.float()
        weight = torch.tensor(float(pos_weight))
        head, loss = fit_linear(
            features,
            1,
            lambda logits: F.binary_cross_entropy_with_logits(
                logits.squeeze(-1), targets, pos_weight=weight
            ),
            l2,
            steps,
        )
        self.head[-1].load_state_dict(head.state_dict())
        return {"images": len(targets), "train_loss": loss}

    def flip_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` logits of each image and its flips, in the order of ``FLIPS``."""
        views = torch.cat([images, images.flip(3), images.flip(2), images.flip((2, 3))])
        return self.logits(views).view(len(FLIPS), -1).T

    @property
    def explain_layer(self) -> nn.Module:
        """The layer Grad-CAM explains: the last feature map before pooling."""
        return self.backbone.bn2

    @torch.no_grad()
    def predict(self, images: torch.Tensor, explain: bool = False) -> DetectorOutput:
        """Anomaly probabilities, and Grad-CAM heatmaps when ``explain``."""
        heatmap = None
        if explain:  # the map of the image as sent: its layer runs once per image
            self._flips = False
            try:
                heatmap = grad_cam(self, self.explain_layer, images)
            finally:
                self._flips = True
        return self.answer(self(images))._replace(heatmap=heatmap)

    def answer(self, logits: torch.Tensor) -> DetectorOutput:
        """The output of :meth:`forward`'s logits (from torch or an exported runtime)."""
        return DetectorOutput(probability=torch.sigmoid(logits.float()), heatmap=None)
