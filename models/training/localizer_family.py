"""The training recipe of the DefectLocalizer: boxes, DEIMv2's loss, COCO mAP@0.5.

One localizer is trained across every surface category (stored under
:data:`~models.stages.SHARED_CATEGORY`, like the router): the categories share
their defect types, and three times the boxes teach a detector far more than one
category's. Training items are the images with boxes plus the good images as
negatives (the detector learns that clean texture is no defect); targets are the
detector's ``labels`` dicts, batched by :meth:`LocalizerFamily.collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from models.backbone import Preprocessing
from models.data.sample import DataError, Sample
from models.data.tensors import AUGMENTATIONS, D4, FLIPS, NONE
from models.localizer import DefectLocalizer, DefectLocalizerConfig, box_targets
from models.metrics.detection import ImageBoxes, best_f1_threshold, detection_metrics, f1_at
from models.stages import LOCALIZER
from models.training.base import Loss, TrainingFamily, register_family, unwrap

Target = dict[str, torch.Tensor]
# Scores kept for mAP: AP sweeps the whole ranking, so low scores must stay in.
EVAL_SCORE_THRESHOLD = 0.01


def transform_boxes(boxes: torch.Tensor, hflip: bool, vflip: bool, turns: int) -> torch.Tensor:
    """Normalized ``(cx, cy, w, h)`` boxes after the same flips and turns as the image.

    The image is flipped horizontally (``flip(-1)``), then vertically
    (``flip(-2)``), then turned ``turns`` quarter turns by ``rot90(dims=(-2, -1))``
    (counter-clockwise: the pixel at column ``x`` and row ``y`` moves to column
    ``y`` and row ``1 - x``).
    """
    boxes = boxes.clone()
    if hflip:
        boxes[:, 0] = 1.0 - boxes[:, 0]
    if vflip:
        boxes[:, 1] = 1.0 - boxes[:, 1]
    for _ in range(turns % 4):
        cx, cy, w, h = boxes.unbind(-1)
        boxes = torch.stack([cy, 1.0 - cx, h, w], -1)
    return boxes


class BoxDataset(TorchDataset):
    """``(image (3, S, S) normalized float, target dict)`` items for the localizer.

    Args:
        samples: the images (with or without boxes).
        defect_types: the class order of the targets.
        preprocessing: the model's transform.
        augment: ``"none"``, ``"flips"`` or ``"d4"`` (flips and quarter turns),
            applied to image and boxes alike.
        seed: base of every random draw (with the epoch and index).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        defect_types: Sequence[str],
        preprocessing: Preprocessing,
        augment: str = NONE,
        seed: int = 0,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.samples = list(samples)
        self.defect_types = tuple(defect_types)
        self.preprocessing = preprocessing
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._geometry = preprocessing.geometry()
        self._cache: dict[int, tuple[torch.Tensor, Target]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, index: int) -> tuple[torch.Tensor, Target]:
        """The uint8 ``(3, S, S)`` model input and target of sample ``index`` (cached)."""
        if index not in self._cache:
            sample = self.samples[index]
            image = sample.load_image()
            target = box_targets(
                [box.xywh for box in sample.boxes],
                [self.defect_types.index(box.label) for box in sample.boxes],
                (image.height, image.width),
                self.preprocessing,
            )
            self._cache[index] = (self._geometry(image), target)
        return self._cache[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, target = self.item(index)
        boxes = target["boxes"]
        if self.augment != NONE:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            hflip = bool(torch.rand((), generator=generator) < 0.5)
            vflip = bool(torch.rand((), generator=generator) < 0.5)
            turns = int(torch.randint(4, (), generator=generator)) if self.augment == D4 else 0
            if hflip:
                image = image.flip(-1)
            if vflip:
                image = image.flip(-2)
            image = image.rot90(turns, dims=(-2, -1))
            boxes = transform_boxes(boxes, hflip, vflip, turns)
        pixels = self.preprocessing.normalize(image.to(torch.float32) / 255.0)
        return pixels, {"class_labels": target["class_labels"], "boxes": boxes}


def collate_boxes(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list]:
    """Stack the images; keep one target dict per image (their box counts differ)."""
    images = torch.stack([image for image, _ in batch])  # (B, 3, S, S)
    return images, [target for _, target in batch]


@register_family
class LocalizerFamily(TrainingFamily):
    """DefectLocalizer: DEIMv2 on every category's boxes, monitored by mAP@0.5."""

    stage = LOCALIZER
    default_lr = 5e-4
    monitor = "val_map50"

    def split(self, name: str) -> list[Sample]:
        """Every category's samples of one split (one localizer serves them all)."""
        return [s for s in self.samples if s.split == name]

    def _check(self) -> None:
        super()._check()
        train = self.split("train")
        self.defect_types = tuple(sorted({b.label for s in train for b in s.boxes}))
        if not self.defect_types:
            raise DataError("the localizer needs boxes; the training split has none")
        unseen = sorted(
            {b.label for s in self.split("val") for b in s.boxes} - set(self.defect_types)
        )
        if unseen:
            raise DataError(f"validation box labels {unseen} are not in the training split")
        self.categories = tuple(sorted({s.category for s in self.samples}))

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return super().describe() | {"categories": list(self.categories)}

    def build_model(self, pretrained: bool = True) -> DefectLocalizer:  # noqa: D102
        config = {
            "defect_types": self.defect_types,
            "categories": self.categories,
            **self.model_config,
        }
        return DefectLocalizer(DefectLocalizerConfig.from_dict(config), pretrained)

    def datasets(self, model: nn.Module) -> tuple[BoxDataset, BoxDataset]:
        """Training: images with boxes and the good ones; validation: the whole split."""
        train = [s for s in self.split("train") if s.boxes or not s.is_anomalous]
        augment = self.augment if self.augment in (D4, FLIPS) else NONE
        preprocessing = unwrap(model).preprocessing
        train_ds = BoxDataset(train, self.defect_types, preprocessing, augment, self.seed)
        return train_ds, BoxDataset(self.split("val"), self.defect_types, preprocessing)

    @staticmethod
    def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list]:
        """The DataLoader's ``collate_fn``: see :func:`collate_boxes`."""
        return collate_boxes(batch)

    def loss(self, train: TorchDataset) -> Loss:
        """DEIMv2's own loss (MAL, L1, GIoU, FGL and DDF over every decoder layer)."""

        def detection_loss(model: nn.Module, images: torch.Tensor, target: Any) -> torch.Tensor:
            return model(images, target).loss

        return detection_loss

    @torch.no_grad()
    def _boxes(
        self, localizer: DefectLocalizer, loader: DataLoader
    ) -> tuple[list[ImageBoxes], list[ImageBoxes], float]:
        """Truth and candidate boxes (down to the AP threshold) in input pixels, and the loss."""
        localizer.eval()
        device = next(localizer.parameters()).device
        size = localizer.config.input_size
        names = localizer.config.defect_types
        truth, predicted, losses = [], [], []
        for images, targets in loader:
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            output = localizer(images.to(device), targets)
            losses.append(float(output.loss) * len(targets))
            for target, found in zip(
                targets, localizer.detections(output, EVAL_SCORE_THRESHOLD), strict=True
            ):
                cx, cy, w, h = (target["boxes"].cpu().double() * size).unbind(-1)
                corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
                labels = [names[i] for i in target["class_labels"].tolist()]
                truth.append(ImageBoxes(corners.numpy(), labels))
                predicted.append(
                    ImageBoxes(found.boxes.double().numpy() * size, found.labels, found.scores)
                )
        return truth, predicted, sum(losses) / max(1, len(truth))

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation loss and COCO metrics, in model-input pixels."""
        localizer = unwrap(model)
        truth, predicted, loss = self._boxes(localizer, loader)
        metrics = detection_metrics(truth, predicted, localizer.config.defect_types)
        return {
            "val_loss": loss,
            "val_map50": metrics["map50"],
            "val_map50_95": metrics["map50_95"],
            "val_precision": _number(metrics["precision"]),
            "val_recall": _number(metrics["recall"]),
        }

    def fit_score_threshold(self, model: nn.Module) -> dict[str, float]:
        """Set the localizer's score threshold where its validation F1 at IoU 0.5 is best.

        Every validation image counts, good ones included: a box on a good part
        is a false positive. The boxes per image at the previous threshold are
        returned beside those at the fitted one.
        """
        localizer = unwrap(model)
        _, val = self.datasets(localizer)
        truth, predicted, _ = self._boxes(
            localizer, DataLoader(val, batch_size=16, collate_fn=self.collate)
        )
        best = best_f1_threshold(truth, predicted, iou_threshold=0.5)
        previous = localizer.config.score_threshold
        before = f1_at(truth, predicted, previous, iou_threshold=0.5)
        localizer.config = replace(localizer.config, score_threshold=best["threshold"])
        return {
            "score_threshold": best["threshold"],
            "val_f1": best["f1"],
            "val_precision": best["precision"],
            "val_recall": best["recall"],
            "boxes_per_image": best["boxes_per_image"],
            "previous_threshold": previous,
            "boxes_per_image_at_previous": before["boxes_per_image"],
            "val_f1_at_previous": before["f1"],
        }


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)
