"""The memory bank's recipe: its good training patches are fitted, not trained by gradient.

The Ray Train loop sees :attr:`~models.training.base.TrainingFamily.gradient_free`
and, instead of epochs, has every worker describe its share of the good training
images (:meth:`MemoryBankFamily.features`); rank 0 gathers the patches, keeps
their coreset and calibrates it (:meth:`MemoryBankFamily.fit`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.data.sample import GOOD
from models.data.tensors import D4, FLIPS, ImageTensorDataset, predict_all, validation_dataset
from models.memory_bank import MemoryBank, MemoryBankConfig, calibrate
from models.metrics import image_auroc
from models.stages import MEMORY_BANK
from models.training.base import Loss, TrainingFamily, register_family, unwrap

MIN_CALIBRATION_GOODS = 8


@register_family
class MemoryBankFamily(TrainingFamily):
    """MemoryBank: a coreset of the good training images' patch features."""

    stage = MEMORY_BANK
    gradient_free = True  # type: ignore[assignment]  # always fitted, never trained

    def goods(self) -> list:
        """The good training images the bank remembers."""
        return [s for s in self.split("train") if s.label == GOOD]

    def _check(self) -> None:
        super()._check()
        if not self.goods():
            raise ValueError(f"category {self.category!r} has no good training images")

    def build_model(self, pretrained: bool = True) -> MemoryBank:  # noqa: D102
        return MemoryBank(MemoryBankConfig.from_dict(self.model_config), pretrained)

    def datasets(self, model: nn.Module) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        """The good training images as they are (:meth:`features` flips them), and validation."""
        goods = self.goods()
        train = ImageTensorDataset(goods, [0.0] * len(goods), model.preprocessing)
        return train, validation_dataset(self.split("val"), model.preprocessing)

    def loss(self, train: Any) -> Loss:
        """None: the bank is fitted (:meth:`fit`), nothing is trained by gradient."""
        raise TypeError(f"the {self.stage} is fitted, not trained by gradient")

    def features(self, model: nn.Module, loader: DataLoader) -> torch.Tensor:
        """Every patch of the loader's images as rows ``(N, C)`` (on the CPU).

        With the ``d4`` or ``flips`` augmentation each image is also remembered
        flipped left-right and upside down: a good texture flipped is still
        good, and on the generator's MVTec-layout export the three views lift
        the memory bank's pixel AUROC from 0.893 to 0.900 and its image AUROC
        from 0.933 to 0.942 (means over three surfaces, docs/memory-bank.md), for a
        bank three times the size.
        """
        bank = unwrap(model)
        device = next(bank.parameters()).device
        rows = []
        for images, _ in loader:
            images = images.to(device)
            views = [images]
            if self.augment in (D4, FLIPS):
                views += [images.flip(-1), images.flip(-2)]
            for view in views:
                rows.append(bank.embed(view).permute(0, 2, 3, 1).flatten(0, 2).cpu())
        return torch.cat(rows)

    def fit(self, model: nn.Module, features: torch.Tensor, val: DataLoader) -> dict[str, Any]:
        """Keep the coreset of ``features`` and calibrate on the good validation parts.

        With fewer than :data:`MIN_CALIBRATION_GOODS` of them (tiny datasets, such
        as the quick set's), the good training parts calibrate too, each scored by
        a bank fitted on the other half of them: scored by the bank that remembers
        them, they would look nearer than any new good part, and every new part
        would then score as a certain defect.
        """
        bank = unwrap(model)
        figures = bank.fit(features, seed=self.seed)
        raw, target = predict_all(bank, val, lambda m, x: m.predict(x).raw_score)
        good = raw[target < 0.5].tolist()
        if len(good) < MIN_CALIBRATION_GOODS:
            good += self.held_out_scores(bank)
        return figures | {"calibration": calibrate(bank, good), "calibration_goods": len(good)}

    def held_out_scores(self, bank: MemoryBank) -> list[float]:
        """Raw scores of the good training parts, each from a bank that never saw it.

        Two folds: a copy of the bank is fitted on every other good image and
        scores the rest, then the other way round. With a single good image, its
        own score (all there is).
        """
        goods = self.goods()

        def loader(samples: list) -> DataLoader:
            dataset = ImageTensorDataset(samples, [0.0] * len(samples), bank.preprocessing)
            return DataLoader(dataset, batch_size=16)

        def raw_scores(scorer: MemoryBank, samples: list) -> list[float]:
            raw, _ = predict_all(scorer, loader(samples), lambda m, x: m.predict(x).raw_score)
            return raw.tolist()

        if len(goods) < 2:
            return raw_scores(bank, goods)
        halves = (goods[0::2], goods[1::2])
        scores = []
        for seen, unseen in (halves, halves[::-1]):
            fold = copy.deepcopy(bank)
            fold.fit(self.features(fold, loader(seen)), seed=self.seed)
            scores += raw_scores(fold, unseen)
        return scores

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:  # noqa: D102
        score, target = predict_all(unwrap(model), loader, lambda m, x: m.predict(x).score)
        truth = target > 0.5
        loss = F.binary_cross_entropy(
            torch.from_numpy(score).clamp(1e-6, 1 - 1e-6),
            torch.from_numpy(truth.astype(np.float32)),
        )
        return {
            "val_loss": float(loss),
            "val_auroc": image_auroc(truth, score),
            "val_accuracy": float(((score >= 0.5) == truth).mean()),
        }
