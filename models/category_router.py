"""CategoryRouter: names the product category of an image when a request gives none.

A linear classifier on the frozen ImageNet backbone's pooled features: product lines
differ in global appearance (material, texture, layout), which ImageNet features
separate well, so only the head is learnt. It is either trained by the training
loop over augmented images (``head: trained``), or fitted in one pass: a
multinomial logistic regression on the pooled features of the training images
(``head: fitted``), which takes seconds and needs no epochs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneStage, Preprocessing, create_backbone
from models.heads import HEADS, TRAINED, fit_linear


@dataclass(frozen=True)
class CategoryRouterConfig:
    """What builds a :class:`CategoryRouter`.

    Attributes:
        categories: the category names, in the order of the head's outputs.
        backbone: backbone name.
        input_size: side of the square model input in pixels.
        autocontrast: percent clipped at each end of a per-image contrast stretch
            (0: off); see :class:`~models.backbone.Preprocessing`.
        head: how the head is learnt: ``"trained"`` by the training loop's
            optimizer over epochs of augmented images, or ``"fitted"`` in one pass
            (:meth:`CategoryRouter.fit_head`).
    """

    categories: tuple[str, ...]
    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    autocontrast: float = 0.0
    head: str = TRAINED

    def __post_init__(self) -> None:
        if len(self.categories) < 1 or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"need distinct categories, got {self.categories!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"categories": list(self.categories)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryRouterConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**(dict(data) | {"categories": tuple(data["categories"])}))

    def preprocessing(self) -> Preprocessing:
        """The transform this model is trained and served with."""
        return Preprocessing(
            input_size=self.input_size, resize=self.input_size, autocontrast=self.autocontrast
        )


class RouterOutput(NamedTuple):
    """Predicted category per image, and the probability of every category ``(B, C)``."""

    categories: list[str]
    probabilities: torch.Tensor


class CategoryRouter(BackboneStage):
    """Frozen backbone, trained linear head over the categories."""

    def __init__(self, config: CategoryRouterConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        self.backbone, _ = create_backbone(config.backbone, pretrained=pretrained, num_classes=0)
        self.freeze(self.backbone)
        self.backbone.eval()  # ImageNet's batch statistics, from the start
        self.head = nn.Linear(self.backbone.num_features, len(config.categories))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The linear head."""
        return self.head.parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Category logits ``(B, C)``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's pooled features ``(B, F)`` the head reads."""
        return self.backbone(images)

    def fit_head(
        self, features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, steps: int = 200
    ) -> dict[str, float]:
        """Fit the head to pooled ``features`` ``(N, F)`` of images of class ``labels`` ``(N,)``.

        A multinomial logistic regression: cross-entropy with inverse-frequency
        class weights (as the trained head's loss) plus ``l2`` times the squared
        weights, which keeps the probabilities finite on separable categories,
        minimised by L-BFGS.

        Returns:
            ``{"images", "train_loss", "train_accuracy"}`` of the fit.
        """
        labels = labels.long()
        counts = torch.bincount(labels, minlength=len(self.config.categories)).clamp(min=1)
        weights = (counts.sum() / counts / len(counts)).float()
        head, loss = fit_linear(
            features,
            len(self.config.categories),
            lambda logits: F.cross_entropy(logits, labels, weight=weights),
            l2,
            steps,
        )
        self.head.load_state_dict(head.state_dict())
        with torch.no_grad():
            accuracy = (head(features.float()).argmax(dim=1) == labels).float().mean()
        return {
            "images": len(labels),
            "train_loss": loss,
            "train_accuracy": float(accuracy),
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor, allowed: Collection[str] | None = None) -> RouterOutput:
        """The most probable category of each image.

        Args:
            images: a preprocessed batch.
            allowed: choose only among these categories (those with models), the
                probabilities renormalised over them; ``None``: every category.

        Raises:
            ValueError: ``allowed`` names none of the router's categories.
        """
        return self.answer(self(images), allowed)

    @torch.no_grad()
    def answer(self, logits: torch.Tensor, allowed: Collection[str] | None = None) -> RouterOutput:
        """The output of :meth:`forward`'s logits (from torch or an exported runtime).

        Raises:
            ValueError: ``allowed`` names none of the router's categories.
        """
        probabilities = torch.softmax(logits.float(), dim=-1)
        if allowed is not None:
            keep = torch.tensor([c in allowed for c in self.config.categories])
            if not keep.any():
                raise ValueError(
                    f"the router knows {list(self.config.categories)}, none of {sorted(allowed)}"
                )
            probabilities = probabilities * keep
            probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        names = [self.config.categories[i] for i in probabilities.argmax(dim=-1).tolist()]
        return RouterOutput(categories=names, probabilities=probabilities)
