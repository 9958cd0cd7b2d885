"""The training recipe of each model family: model, data, loss, validation metrics.

Families are built from a plain dict (:func:`~models.training.base.build_family`)
so the Ray driver can ship them to training workers; that dict is also stored in
the artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from models.autoencoder_verifier import AutoencoderVerifier, AutoencoderVerifierConfig
from models.category_router import CategoryRouter, CategoryRouterConfig
from models.data.sample import GOOD, DataError, Sample
from models.data.tensors import (
    NONE,
    RANDOM,
    ImageTensorDataset,
    predict_all,
    validation_dataset,
)
from models.defect_classifier import (
    PATCH,
    DefectClassifier,
    DefectClassifierConfig,
    defect_classes,
    supervised_contrastive_loss,
)
from models.descriptions import BUILTIN, DescriptionCatalog, DescriptionError
from models.metrics import image_auroc
from models.reranker import Reranker, RerankerConfig
from models.stages import CLASSIFIER, DETECTOR, RERANKER, ROUTER, VERIFIER
from models.training.base import (
    Loss,
    TrainingFamily,
    pooled_feature_rows,
    register_family,
    unwrap,
)

SUPERVISED, NORMAL_ONLY = "supervised", "normal-only"


@register_family
class DetectorFamily(TrainingFamily):
    """AnomalyDetector: supervised if the training split has defects, else normal-only.

    With ``head: fitted`` (supervised only) nothing runs epochs: the training
    images' pooled features, each with its target (:meth:`features`), fit the
    head in one pass (:meth:`fit`).
    """

    stage = DETECTOR
    default_lr = 3e-3
    min_items_per_epoch = 320

    def _check(self) -> None:
        super()._check()
        if self.gradient_free and self.mode == NORMAL_ONLY:
            raise DataError(
                f"category {self.category!r} has no defective training images, and a "
                "fitted head learns from good and defective ones: train the detector's "
                "head (head: trained) or fit a memory bank"
            )

    @property
    def mode(self) -> str:
        """``supervised`` or ``normal-only``, chosen by the training data."""
        return SUPERVISED if any(s.is_anomalous for s in self.split("train")) else NORMAL_ONLY

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return super().describe() | {"mode": self.mode, "soft_targets": self.soft_targets}

    def repeat(self, n_items: int) -> int:
        """Passes per epoch; twice as many when normal-only.

        Each pass draws fresh synthetic anomalies, and a normal-only category is
        small (27 good training images a surface in the generator's MVTec-layout
        export): on its busy stone_tile surface twice the optimizer steps (16
        epochs instead of 8) lifted the detector's test image AUROC from 0.942 to
        0.966 (docs/memory-bank.md).
        """
        passes = super().repeat(n_items)
        return 2 * passes if self.mode == NORMAL_ONLY else passes

    @property
    def keeps_last_epoch(self) -> bool:
        """True when normal-only: its validation cannot choose an epoch.

        A normal-only category's validation split is a few good images and the
        same images with synthetic anomalies of the very kinds the detector learns
        (the generator's MVTec-layout export: 3 good validation images a surface),
        so its AUROC is 1.0 or noise from the first epochs. Chosen by it, the
        stone_tile detector kept its third of eight epochs, at a training loss
        still near chance, and scored image AUROC 0.662 on the test split; its
        last epoch scored 0.942 (docs/memory-bank.md).
        """
        return self.mode == NORMAL_ONLY

    @property
    def soft_targets(self) -> bool:
        """Whether the training split has graded severities (ELPV) used as targets."""
        return any(s.severity is not None for s in self.split("train"))

    @staticmethod
    def target(sample: Sample) -> float:
        """The training target: the graded severity when known, else 0 or 1.

        ELPV's experts gave each cell a defect probability (0, 1/3, 2/3, 1); training
        on it, rather than on the thresholded label, tells the network that a
        1/3 cell is neither clean nor a sure defect, and its output stays a
        probability whose 0.5 cut is the binary task's.
        """
        if sample.severity is not None:
            return float(sample.severity)
        return float(sample.is_anomalous)

    def build_model(self, pretrained: bool = True) -> AnomalyDetector:  # noqa: D102
        return AnomalyDetector(AnomalyDetectorConfig.from_dict(self.model_config), pretrained)

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        """Training images (augmented, unless the head is fitted) and validation images."""
        train, val = self.split("train"), self.split("val")
        if self.mode == NORMAL_ONLY:
            train = [s for s in train if s.label == GOOD]
        train = self.balanced(train)
        fitted = self.gradient_free
        train_ds = ImageTensorDataset(
            train,
            [self.target(s) for s in train],
            model.preprocessing,
            augment=NONE if fitted else self.augment,
            synthesis=RANDOM if self.mode == NORMAL_ONLY else NONE,
            seed=self.seed,
            repeat=1 if fitted else self.repeat(len(train)),
        )
        return train_ds, validation_dataset(val, model.preprocessing)

    def features(self, model: nn.Module, loader: DataLoader) -> torch.Tensor:
        """Rows ``(N, F + 1)``: each training image's pooled features, then its target."""
        return pooled_feature_rows(model, loader)

    def fit(self, model: nn.Module, features: torch.Tensor, val: DataLoader) -> dict[str, Any]:
        """Fit the head to the rows of :meth:`features`, defects weighted as in :meth:`loss`."""
        targets = features[:, -1]
        return unwrap(model).fit_head(
            features[:, :-1], targets, pos_weight=self.pos_weight(targets.numpy())
        )

    def pos_weight(self, targets: np.ndarray) -> float:
        """The weight of a defect in the loss: the good:defect ratio when supervised, else 1."""
        n_pos = int((targets >= 0.5).sum())
        return (len(targets) - n_pos) / n_pos if self.mode == SUPERVISED and n_pos else 1.0

    def loss(self, train: ImageTensorDataset) -> Loss:
        """Binary cross-entropy, defects weighted by the good:defect ratio (class weights)."""
        pos_weight = torch.tensor(self.pos_weight(np.asarray(train.targets)))

        def bce(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = model(images).float()
            return F.binary_cross_entropy_with_logits(
                logits, target, pos_weight=pos_weight.to(logits.device)
            )

        return bce

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        logits, target = predict_all(model, loader, lambda m, x: m(x))
        probability = 1.0 / (1.0 + np.exp(-logits))
        loss = F.binary_cross_entropy_with_logits(
            torch.from_numpy(logits), torch.from_numpy(target)
        )
        return {
            "val_loss": float(loss),
            "val_auroc": image_auroc(target > 0.5, probability),
            "val_accuracy": float(((probability >= 0.5) == (target > 0.5)).mean()),
        }


@register_family
class VerifierFamily(TrainingFamily):
    """AutoencoderVerifier: reconstructs the features of good training parts only."""

    stage = VERIFIER
    default_lr = 2e-3
    min_items_per_epoch = 800

    def build_model(self, pretrained: bool = True) -> AutoencoderVerifier:  # noqa: D102
        config = AutoencoderVerifierConfig.from_dict(self.model_config)
        return AutoencoderVerifier(config, pretrained)

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:  # noqa: D102
        train = [s for s in self.split("train") if s.label == GOOD]
        if not train:
            raise ValueError(f"category {self.category!r} has no good training images")
        val = self.split("val")
        train_ds = ImageTensorDataset(
            train,
            [0.0] * len(train),
            model.preprocessing,
            augment=self.augment,
            seed=self.seed,
            repeat=self.repeat(len(train)),
        )
        return train_ds, validation_dataset(val, model.preprocessing)

    def loss(self, train: ImageTensorDataset) -> Loss:
        """Mean squared feature-reconstruction error."""
        return lambda model, images, target: model(images).mean()

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        verifier = unwrap(model)
        raw, target = predict_all(model, loader, lambda m, x: verifier.raw_score(m(x)))
        good = target < 0.5
        return {
            "val_loss": float(raw[good].mean()) if good.any() else float("nan"),
            "val_auroc": image_auroc(~good, raw),
        }


@register_family
class RouterFamily(TrainingFamily):
    """CategoryRouter: every category's images, the category is the class.

    With ``head: fitted`` nothing runs epochs: the training images' pooled
    features, each with its class (:meth:`features`), fit the head in one pass
    (:meth:`fit`).
    """

    stage = ROUTER
    default_lr = 3e-3
    monitor = "val_accuracy"
    max_epochs = 4

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories, sorted."""
        return tuple(sorted({s.category for s in self.samples}))

    def features(self, model: nn.Module, loader: DataLoader) -> torch.Tensor:
        """Rows ``(N, F + 1)``: each training image's pooled features, then its class."""
        return pooled_feature_rows(model, loader)

    def fit(self, model: nn.Module, features: torch.Tensor, val: DataLoader) -> dict[str, Any]:
        """Fit the head to the rows of :meth:`features`."""
        return unwrap(model).fit_head(features[:, :-1], features[:, -1].long())

    def split(self, name: str) -> list[Sample]:  # noqa: D102
        return [s for s in self.samples if s.split == name]

    def build_model(self, pretrained: bool = True) -> CategoryRouter:  # noqa: D102
        config = {"categories": self.categories, **self.model_config}
        return CategoryRouter(CategoryRouterConfig.from_dict(config), pretrained)

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:  # noqa: D102
        index = {c: i for i, c in enumerate(self.categories)}
        train, val = self.split("train"), self.split("val")
        return (
            ImageTensorDataset(
                train,
                [index[s.category] for s in train],
                model.preprocessing,
                augment=NONE if self.gradient_free else self.augment,
            ),
            ImageTensorDataset(val, [index[s.category] for s in val], model.preprocessing),
        )

    def loss(self, train: ImageTensorDataset) -> Loss:
        """Cross-entropy with inverse-frequency class weights."""
        counts = np.bincount(np.asarray(train.targets, dtype=int), minlength=len(self.categories))
        weights = torch.tensor(
            counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32
        )

        def cross_entropy(
            model: nn.Module, images: torch.Tensor, target: torch.Tensor
        ) -> torch.Tensor:
            logits = model(images).float()
            return F.cross_entropy(logits, target.long(), weight=weights.to(logits.device))

        return cross_entropy

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        logits, target = predict_all(model, loader, lambda m, x: m(x))
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target).long())
        return {
            "val_loss": float(loss),
            "val_accuracy": float((logits.argmax(axis=1) == target).mean()),
        }


@register_family
class ClassifierFamily(TrainingFamily):
    """DefectClassifier: a supervised-contrastive embedding of every labelled image.

    Each training item is two augmented views of one image; the loss is SupCon over
    the batch's views. Validation fits the prototypes on the (unaugmented) training
    images and scores the validation split against them, so the monitored
    accuracy is the one serving will have.

    With ``embedding: patch`` nothing is trained by gradient: the good training
    images' patches are fitted (:meth:`features`, :meth:`fit`), then the prototypes
    (by :meth:`evaluate`, as for every epoch of the trained embedding).
    """

    stage = CLASSIFIER
    default_lr = 1e-3
    monitor = "val_accuracy"
    min_items_per_epoch = 320

    def _check(self) -> None:
        super()._check()
        train = self.split("train")
        classes, defects = defect_classes([s.label for s in train], [s.is_anomalous for s in train])
        if len(classes) < 2 or not defects:
            raise DataError(
                f"category {self.category!r} needs labelled defects to classify; "
                f"its training labels are {list(classes)}"
            )
        unseen = sorted({s.label for s in self.split("val")} - set(classes))
        if unseen:
            raise DataError(
                f"category {self.category!r}: validation labels {unseen} are not in the "
                "training split"
            )
        self.classes, self.defect_types = classes, defects
        self._prototype_ds: ImageTensorDataset | None = None

    @property
    def gradient_free(self) -> bool:
        """Whether the embedding is fitted (``patch``) rather than trained."""
        return self.model_config.get("embedding") == PATCH

    def build_model(self, pretrained: bool = True) -> DefectClassifier:  # noqa: D102
        config = {"classes": self.classes, "defect_types": self.defect_types, **self.model_config}
        return DefectClassifier(DefectClassifierConfig.from_dict(config), pretrained)

    def features(self, model: nn.Module, loader: DataLoader) -> torch.Tensor:
        """Every patch of the loader's good training images, as rows ``(N, C)`` (``patch``)."""
        classifier = unwrap(model)
        rows = [
            classifier.patches(images).permute(0, 2, 3, 1).flatten(0, 2) for images, _ in loader
        ]
        return torch.cat(rows).cpu()

    def fit(self, model: nn.Module, features: torch.Tensor, val: DataLoader) -> dict[str, Any]:
        """Keep the good patches' coreset (:meth:`evaluate` then fits the prototypes)."""
        return unwrap(model).fit_good_patches(features, seed=self.seed)

    def targets(self, samples: Sequence[Sample]) -> list[int]:
        """Class index of each sample."""
        return [self.classes.index(s.label) for s in samples]

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        """Two augmented views of each training image (``patch``: the good ones, plain).

        With ``balance_classes`` each image of a rare class is shown more often
        (:meth:`balanced`); the prototypes are still the mean of each class's
        images, each once.
        """
        if self.gradient_free:
            goods = [s for s in self.split("train") if s.label == GOOD]
            if not goods:
                raise DataError(f"category {self.category!r} has no good training images")
            val = self.split("val")
            return (
                ImageTensorDataset(goods, [0] * len(goods), model.preprocessing),
                ImageTensorDataset(val, self.targets(val), model.preprocessing),
            )
        train = self.balanced(self.split("train"))
        return self.labelled_datasets(model, train, self.split("val"), self.targets, views=2)

    def loss(self, train: ImageTensorDataset) -> Loss:
        """SupCon over both views of every image in the batch."""

        def supcon(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            views = images.shape[1]
            flat = images.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            embeddings = model(flat).float()
            labels = target.long().repeat_interleave(views)
            return supervised_contrastive_loss(embeddings, labels, unwrap(model).config.temperature)

        return supcon

    def fit_prototypes(self, model: nn.Module) -> dict[str, int]:
        """Set the prototypes from the training images; returns images per class."""
        classifier = unwrap(model)
        if self._prototype_ds is None:
            train = self.split("train")
            self._prototype_ds = ImageTensorDataset(
                train, self.targets(train), classifier.preprocessing
            )
        loader = DataLoader(self._prototype_ds, batch_size=32)
        embeddings, labels = predict_all(classifier, loader, lambda m, x: m(x))
        classifier.fit_prototypes(torch.from_numpy(embeddings), torch.from_numpy(labels).long())
        counts = np.bincount(labels.astype(int), minlength=len(classifier.config.classes))
        return dict(zip(classifier.config.classes, counts.tolist(), strict=True))

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        classifier = unwrap(model)
        self.fit_prototypes(classifier)
        embeddings, target = predict_all(classifier, loader, lambda m, x: m(x))
        logits = classifier.class_logits(torch.from_numpy(embeddings))
        target_t = torch.from_numpy(target).long()
        return {
            "val_loss": float(F.cross_entropy(logits, target_t)),
            "val_accuracy": float((logits.argmax(1) == target_t).float().mean()),
        }


@register_family
class RerankerFamily(TrainingFamily):
    """Reranker: defect images against their type's description, text tower locked.

    Trains on the category's defective images only. Each step scores every image
    against one phrasing of every type's description (a different phrasing each
    step) with cross-entropy over the types; validation scores the held-out
    defective images against each type's averaged phrasings, as serving does.

    The descriptions come from ``model_config["descriptions"]`` (a
    :meth:`~models.descriptions.DescriptionCatalog.to_list`) or the built-in ones.
    """

    stage = RERANKER
    default_lr = 1e-3
    monitor = "val_accuracy"
    min_items_per_epoch = 320

    def _check(self) -> None:
        super()._check()
        train = self.split("train")
        _, defects = defect_classes([s.label for s in train], [s.is_anomalous for s in train])
        if len(defects) < 2:
            raise DataError(
                f"category {self.category!r} needs at least two labelled defect types to "
                f"rerank; its training split has {list(defects)}"
            )
        unseen = sorted({s.label for s in self.split("val") if s.is_anomalous} - set(defects))
        if unseen:
            raise DataError(
                f"category {self.category!r}: validation defect types {unseen} are not in "
                "the training split"
            )
        if not any(s.is_anomalous for s in self.split("val")):
            raise DataError(f"category {self.category!r} has no defective validation images")
        given = DescriptionCatalog.from_list(self.model_config.get("descriptions", ()))
        missing = [t for t in defects if t not in given and t not in BUILTIN]
        if missing:
            raise DescriptionError(
                f"category {self.category!r}: no description of defect type(s) {missing}; "
                "give them with --descriptions FILE"
            )
        self.defect_types = defects
        self.catalog = DescriptionCatalog(given[t] if t in given else BUILTIN[t] for t in defects)
        self._text_bank: list[torch.Tensor] | None = None

    def build_model(self, pretrained: bool = True) -> Reranker:  # noqa: D102
        config = self.model_config | {"descriptions": self.catalog.to_list()}
        return Reranker(RerankerConfig.from_dict(config), pretrained)

    def defective(self, split: str) -> list[Sample]:
        """The split's defective images."""
        return [s for s in self.split(split) if s.is_anomalous]

    def targets(self, samples: Sequence[Sample]) -> list[int]:
        """Type index of each sample."""
        return [self.defect_types.index(s.label) for s in samples]

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:  # noqa: D102
        return self.labelled_datasets(
            model, self.defective("train"), self.defective("val"), self.targets
        )

    def text_bank(self, model: nn.Module) -> list[torch.Tensor]:
        """Each type's phrasings as locked text features (computed once)."""
        if self._text_bank is None:
            reranker = unwrap(model)
            self._text_bank = [
                reranker.text_features(self.catalog[name].variants()) for name in self.catalog.names
            ]
        return self._text_bank

    def loss(self, train: ImageTensorDataset) -> Loss:
        """Cross-entropy over the types, one random phrasing of each per step."""
        generator = torch.Generator().manual_seed(self.seed)

        def contrastive(
            model: nn.Module, images: torch.Tensor, target: torch.Tensor
        ) -> torch.Tensor:
            bank = self.text_bank(model)
            picks = [int(torch.randint(len(b), (1,), generator=generator)) for b in bank]
            features = torch.stack([b[i] for b, i in zip(bank, picks, strict=True)])
            logits = model(images, features).float()
            return F.cross_entropy(logits, target.long())

        return contrastive

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        reranker = unwrap(model)
        texts = reranker.type_embeddings(self.catalog)
        logits, target = predict_all(
            reranker, loader, lambda m, x: m.logits(m.encode_images(x), texts)
        )
        logits_t, target_t = torch.from_numpy(logits), torch.from_numpy(target).long()
        return {
            "val_loss": float(F.cross_entropy(logits_t, target_t)),
            "val_accuracy": float((logits_t.argmax(1) == target_t).float().mean()),
        }
