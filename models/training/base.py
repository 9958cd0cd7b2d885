"""What every training family is, and the registry of families by stage.

A family (:mod:`models.training.families`, :mod:`models.training.localizer_family`)
builds its model, datasets, loss and validation metrics; it is registered for
its stage (:data:`models.stages.STAGES`) with :func:`register_family`, and the
Ray Train loop in ``tune/`` builds it from a plain dict (:func:`build_family`).
"""

from __future__ import annotations

import abc
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.data.sample import Sample
from models.data.tensors import AUGMENTATIONS, D4, ImageTensorDataset
from models.heads import FITTED
from models.stages import STAGES

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def pooled_feature_rows(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """Rows ``(N, F + 1)``: each image's pooled features (``model.features``), then its target.

    The model runs in eval mode (its frozen backbone keeps its ImageNet batch
    statistics) without gradients. The target travels in the row so that the
    rows of several workers gathered together still carry their own targets.
    """
    inner = unwrap(model).eval()
    device = next(inner.parameters()).device
    with torch.no_grad():
        rows = [
            torch.cat([inner.features(images.to(device)).cpu(), target[:, None].float()], dim=1)
            for images, target in loader
        ]
    return torch.cat(rows)


class TrainingFamily(abc.ABC):
    """Base of the families: the stage name, the monitored metric and defaults.

    A family is registered for its stage with :func:`register_family`.

    Args:
        samples: every sample the family may use (all splits).
        category: the product category (the router uses every category).
        model_config: overrides of the family's config dataclass fields.
        seed: seed of augmentation and synthetic anomalies.
        augment: training augmentation, ``"d4"`` (default) or ``"flips"`` for parts
            always imaged the same way up.
        pooled_with: other categories whose images this model also learns from
            (one model for several product types, registered under each).
        balance_classes: repeat the training images of rare classes (see
            :meth:`balanced`); the detector's and the classifier's families use it.
    """

    stage: ClassVar[str]
    # The head's learning rate with AdamW when none is given (the backbone gets less).
    default_lr: ClassVar[float] = 1e-3
    monitor: ClassVar[str] = "val_auroc"
    # Small categories pass over their images several times per epoch so that an
    # epoch is enough optimizer steps for warm-up, early stopping and ASHA to mean
    # something.
    min_items_per_epoch: ClassVar[int] = 0
    # Epoch cap: a linear head on frozen features converges in a few epochs.
    max_epochs: ClassVar[int] = 1000

    @property
    def gradient_free(self) -> bool:
        """Whether the model is fitted in one pass over the training images, not trained.

        The family then has ``features`` and ``fit`` instead of a loss. By default:
        a family whose config asks for a fitted head (``head: fitted``: the
        detector, the router); the memory bank always is.
        """
        return self.model_config.get("head") == FITTED

    @property
    def keeps_last_epoch(self) -> bool:
        """Whether the run trains its whole schedule and keeps its last epoch.

        False (the default): the epoch with the best ``monitor`` on validation is
        kept, and the run stops after ``patience`` epochs without a better one. A
        family returns True where its validation split cannot judge it.
        """
        return False

    def repeat(self, n_items: int) -> int:
        """Passes per epoch over ``n_items`` training images."""
        return max(1, math.ceil(self.min_items_per_epoch / max(1, n_items)))

    def __init__(
        self,
        samples: Sequence[Sample],
        category: str,
        model_config: Mapping[str, Any] | None = None,
        seed: int = 0,
        augment: str = D4,
        pooled_with: Sequence[str] = (),
        balance_classes: bool = False,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.samples = list(samples)
        self.augment = augment
        self.category = category
        self.pooled_with = tuple(pooled_with)
        self.model_config = dict(model_config or {})
        self.seed = seed
        self.balance_classes = balance_classes
        self._check()

    def split(self, name: str) -> list[Sample]:
        """This family's samples of one split."""
        learnt = (self.category, *self.pooled_with)
        return [s for s in self.samples if s.split == name and s.category in learnt]

    def _check(self) -> None:
        for split in ("train", "val"):
            if not self.split(split):
                raise ValueError(f"category {self.category!r} has no {split} images")

    def describe(self) -> dict[str, Any]:
        """What the artifact records about how the model was trained."""
        pooled = {"pooled_with": list(self.pooled_with)} if self.pooled_with else {}
        balanced = {"balance_classes": True} if self.balance_classes else {}
        described = {"family": self.stage, "category": self.category, "augment": self.augment}
        return described | pooled | balanced

    def balanced(self, samples: Sequence[Sample]) -> list[Sample]:
        """``samples``, each image of a rare class repeated when ``balance_classes``.

        A class is the graded level where the dataset grades defects (ELPV's 0, ⅓,
        ⅔ and 1), else the label. Each image of a class with ``n`` images is
        repeated ``round(sqrt(n_max / n))`` times, ``n_max`` the largest class's
        count: repeat-factor sampling (Gupta et al., "LVIS", CVPR 2019) with the
        largest class as its threshold. The square root lifts a rare class
        without showing its few images so often that the model learns them by
        heart (ELPV's ⅔ level, 4 % of the cells, is shown 4 times an epoch).
        """
        if not self.balance_classes:
            return list(samples)

        def grade(sample: Sample) -> float | str:
            return sample.label if sample.severity is None else sample.severity

        counts = Counter(grade(s) for s in samples)
        most = max(counts.values(), default=0)
        times = {c: max(1, round(math.sqrt(most / n))) for c, n in counts.items()}
        return [s for s in samples for _ in range(times[grade(s)])]

    def labelled_datasets(
        self,
        model: nn.Module,
        train: Sequence[Sample],
        val: Sequence[Sample],
        targets: Callable[[Sequence[Sample]], list[int]],
        views: int = 1,
    ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        """Augmented training images and plain validation images with class targets."""
        train_ds = ImageTensorDataset(
            train,
            targets(train),
            model.preprocessing,
            augment=self.augment,
            seed=self.seed,
            repeat=self.repeat(len(train)),
            views=views,
        )
        return train_ds, ImageTensorDataset(val, targets(val), model.preprocessing)

    @abc.abstractmethod
    def build_model(self, pretrained: bool = True) -> nn.Module:
        """The model to train (ImageNet weights from the package when ``pretrained``)."""

    @abc.abstractmethod
    def datasets(self, model: nn.Module) -> tuple[Any, Any]:
        """The training and validation datasets, in the model's preprocessing."""

    @abc.abstractmethod
    def loss(self, train: Any) -> Loss:
        """``loss(model, inputs, targets)`` for the training dataset's batches."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """The validation metrics, ``monitor`` among them."""


FAMILIES: dict[str, type[TrainingFamily]] = {}
"""The training family of each stage, by stage name."""


def register_family(family: type[TrainingFamily]) -> type[TrainingFamily]:
    """Register ``family`` as the way to train its stage (a class decorator)."""
    if family.stage not in STAGES:
        raise ValueError(f"{family.__name__} trains {family.stage!r}, which no stage declares")
    FAMILIES[family.stage] = family
    return family


def build_family(spec: Mapping[str, Any]) -> TrainingFamily:
    """Build a family from its spec (stage, samples, category, model_config, seed, ...).

    Optional keys: ``augment``, ``pooled_with`` and ``balance_classes``.
    """
    stage = spec["stage"]
    if stage not in FAMILIES:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[stage](
        spec["samples"],
        spec["category"],
        spec.get("model_config"),
        spec.get("seed", 0),
        spec.get("augment", D4),
        spec.get("pooled_with", ()),
        spec.get("balance_classes", False),
    )
