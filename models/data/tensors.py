"""Samples as model-ready tensors, with training augmentation and synthetic anomalies.

Each image goes through the serving transform's first half
(:meth:`Preprocessing.geometry`) once and is kept as uint8; every epoch then only
augments and normalizes, which keeps small CPU training runs from spending their
time decoding PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from models.backbone import Preprocessing
from models.data.sample import Sample
from models.synth_anomalies import synthesize_anomaly

# Synthesis modes for parts with only good training images.
NONE, RANDOM, PAIRS = "none", "random", "pairs"
# Augmentation modes: the dihedral group (parts with no canonical orientation), or
# flips only (parts always imaged the same way up, like ELPV's cells, whose
# horizontal busbars tell a crack, across them, from the busbars themselves).
D4, FLIPS = "d4", "flips"
AUGMENTATIONS = (NONE, FLIPS, D4)


class ImageTensorDataset(TorchDataset):
    """``(image (3, S, S) normalized float, target float)`` pairs.

    Args:
        samples: the images.
        targets: one number per sample (binary label or class index).
        preprocessing: the model's transform.
        augment: ``"none"``; ``"flips"``: random horizontal and vertical flips;
            ``"d4"``: flips and right-angle rotations, for parts with no canonical
            orientation.
        synthesis: ``"none"``; ``"random"``: each item becomes, with probability 1/2
            and fresh randomness each epoch, a synthetic anomaly with target 1;
            ``"pairs"``: the dataset is twice as long, the second half being a
            fixed synthetic anomaly of each image (for validation).
        seed: base of every random draw (with the epoch and index).
        repeat: pass over the samples this many times per epoch, each time with
            fresh augmentation (small categories still get enough steps per epoch).
        views: independently augmented views per item; above 1 an item's image is
            ``(views, 3, S, S)`` (contrastive training).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        targets: Sequence[float],
        preprocessing: Preprocessing,
        augment: str = NONE,
        synthesis: str = NONE,
        seed: int = 0,
        repeat: int = 1,
        views: int = 1,
    ) -> None:
        if len(samples) != len(targets):
            raise ValueError(f"{len(samples)} samples but {len(targets)} targets")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if synthesis not in (NONE, RANDOM, PAIRS):
            raise ValueError(f"synthesis must be none, random or pairs, got {synthesis!r}")
        self.samples = list(samples)
        self.targets = [float(t) for t in targets]
        self.preprocessing = preprocessing
        self.augment = augment
        self.synthesis = synthesis
        self.seed = seed
        self.repeat = max(1, int(repeat))
        if views < 1 or (views > 1 and augment == NONE):
            raise ValueError(f"views must be 1, or more with augmentation; got {views}")
        self.views = int(views)
        self.epoch = 0
        self._geometry = preprocessing.geometry()
        self._cache: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations and anomalies for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples) * (2 if self.synthesis == PAIRS else self.repeat)

    def image(self, index: int) -> torch.Tensor:
        """The uint8 ``(3, S, S)`` image of sample ``index`` (cached)."""
        if index not in self._cache:
            self._cache[index] = self._geometry(self.samples[index].load_image())
        return self._cache[index]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = item % len(self.samples)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, item)) % 2**63)
        target = self.targets[index]
        synthesize = self.synthesis == PAIRS and item >= len(self.samples)
        images = []
        for view in range(self.views):
            pixels = self._augmented(self.image(index), generator).to(torch.float32) / 255.0
            if view == 0 and self.synthesis == RANDOM:
                # Drawn after the first view's augmentation, so one-view items keep
                # the random stream they always had.
                synthesize = bool(torch.rand((), generator=generator) < 0.5)
            if synthesize:
                pixels, _ = synthesize_anomaly(pixels, generator)
            images.append(self.preprocessing.normalize(pixels))
        image = images[0] if self.views == 1 else torch.stack(images)
        return image, torch.tensor(1.0 if synthesize else target, dtype=torch.float32)

    def _augmented(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.augment == NONE:
            return image
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-2)
        if self.augment == D4:
            image = image.rot90(int(torch.randint(4, (), generator=generator)), dims=(-2, -1))
        return image

    def all_targets(self) -> list[float]:
        """Targets of every item, as :meth:`__getitem__` would return them (no RANDOM)."""
        if self.synthesis == PAIRS:
            return self.targets + [1.0] * len(self.samples)
        return list(self.targets)


def validation_dataset(
    samples: Sequence[Sample], preprocessing: Preprocessing
) -> ImageTensorDataset:
    """A validation split with binary targets.

    Without real defects it is completed with fixed synthetic ones, so AUROC,
    thresholds and calibration stay defined.
    """
    synthesis = NONE if any(s.is_anomalous for s in samples) else PAIRS
    return ImageTensorDataset(
        samples, [s.is_anomalous for s in samples], preprocessing, synthesis=synthesis
    )


@torch.no_grad()
def predict_all(
    model: nn.Module,
    loader: DataLoader,
    score: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``score(model, images)`` over a loader in eval mode.

    Returns:
        ``(outputs, targets)`` as numpy arrays, in the loader's order.
    """
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for images, target in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        outputs.append(score(model, images).float().cpu())
        targets.append(target)
    return torch.cat(outputs).numpy(), torch.cat(targets).numpy()
