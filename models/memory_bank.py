"""MemoryBank: a category's memory of good patches, scored by nearest-neighbour distance.

After Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection"
(PatchCore). The frozen ImageNet backbone describes every patch of an image by
its locally aware features: blocks 2 and 4 of EfficientNet-Lite0, each averaged
over a 3x3 neighbourhood, the coarser one resized to the finer one's grid. The
features of every patch of the good training images are reduced to a greedy
coreset (k-centre selection on a random projection, so the few patches kept
cover all of them) and stored. A patch of a new image is as anomalous as it is
far from its nearest stored patch; the image score is the farthest patch's
distance, reweighted by how crowded the bank is around its neighbour (a patch
near a rare good pattern counts less), and the map is the patch distances
resized to the input and smoothed.

It needs no gradient training and no defect image: :meth:`MemoryBank.fit` is the
whole of training. Scores are calibrated on good validation parts
(:func:`calibrate`) so that the image score and every pixel of the map are
probabilities on the category's one scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Preprocessing, create_backbone, patch_features


@dataclass(frozen=True)
class MemoryBankConfig:
    """What builds a :class:`MemoryBank` (stored in its artifact).

    Attributes:
        backbone: a backbone name known to :func:`models.backbone.create_backbone`.
        blocks: the backbone blocks whose features describe a patch.
        input_size: side of the square model input in pixels.
        resize: shorter side before the center crop (default: ``input_size``).
        autocontrast: percent clipped at each end of a per-image contrast stretch
            (0: off); see :class:`~models.backbone.Preprocessing`.
        coreset_ratio: the share of the training patches the bank keeps.
        max_bank: the most patches it keeps, whatever the ratio (bounds the
            serving cost: every patch of an image is compared with every one kept).
        max_candidates: the most training patches the coreset is chosen from; beyond
            it a random draw of them is (bounds the fit: each pick scans every
            candidate: ELPV's 621 good poly cells, 1.46 million patches in three
            views, fit in under three minutes here from a draw of 100,000).
        projection: dimensions of the random projection the coreset is chosen in
            (0: the features themselves).
        neighbours: bank entries around the nearest one that reweight the image
            score (1: the farthest patch's distance as it is).
        sigma: standard deviation, in input pixels, of the Gaussian that smooths the map.
        bank_size: patches in the fitted bank (0 before :meth:`MemoryBank.fit`);
            recorded so that loading allocates the bank it reads.
    """

    backbone: str = "efficientnet_lite0"
    blocks: tuple[int, ...] = (2, 4)
    input_size: int = 224
    resize: int | None = None
    autocontrast: float = 0.0
    coreset_ratio: float = 0.1
    max_bank: int = 16384
    max_candidates: int = 100_000
    projection: int = 128
    neighbours: int = 9
    sigma: float = 4.0
    bank_size: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if min(self.max_bank, self.max_candidates, self.neighbours) < 1 or self.bank_size < 0:
            raise ValueError(
                "need max_bank, max_candidates and neighbours >= 1 and bank_size >= 0, got "
                f"{self.max_bank}, {self.max_candidates}, {self.neighbours} and {self.bank_size}"
            )
        if not self.blocks:
            raise ValueError("blocks must name at least one backbone block")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"blocks": list(self.blocks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryBankConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**(dict(data) | {"blocks": tuple(data.get("blocks", cls.blocks))}))

    def preprocessing(self) -> Preprocessing:
        """The transform this model is fitted and served with."""
        return Preprocessing(
            input_size=self.input_size,
            resize=self.resize or self.input_size,
            autocontrast=self.autocontrast,
        )


class MemoryBankOutput(NamedTuple):
    """What the memory bank says about a batch.

    Attributes:
        score: ``(B,)`` calibrated probability that each part is anomalous.
        raw_score: ``(B,)`` the image's reweighted farthest-patch distance.
        anomaly_map: ``(B, H, W)`` calibrated per-pixel probability at the input size.
    """

    score: torch.Tensor
    raw_score: torch.Tensor
    anomaly_map: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """The probabilities it answers with."""
        return self.score


class MemoryBank(nn.Module):
    """Frozen backbone patch features → nearest stored good patch → score and map.

    Args:
        config: the architecture (and, once fitted, the bank's size).
        pretrained: start from the packaged ImageNet weights (fitting); loading a
            fitted artifact passes False and then loads its state dict.
    """

    def __init__(self, config: MemoryBankConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        backbone, _ = create_backbone(config.backbone, pretrained=pretrained, num_classes=0)
        # Only what the features need: the stem and the blocks up to the deepest used.
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.blocks = backbone.blocks[: max(config.blocks) + 1]
        self.channels = sum(self.blocks[i][-1].conv_pwl.out_channels for i in config.blocks)
        self.requires_grad_(False)
        self.register_buffer("bank", torch.zeros(config.bank_size, self.channels))
        # Calibration (:func:`calibrate`): p = sigmoid((distance - loc) / scale - shift).
        self.register_buffer("score_loc", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))
        self.register_buffer("score_shift", torch.tensor(3.0))
        self.register_buffer("smoothing", _gaussian_kernel(config.sigma))
        self.eval()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # A fitted bank's rows are known only once its weights are read: make room
        # for them (a different feature width still fails the shape check).
        incoming = state_dict.get(prefix + "bank")
        if incoming is not None and len(incoming) != len(self.bank):
            self.bank = torch.zeros(len(incoming), self.channels, device=self.bank.device)
            self.config = replace(self.config, bank_size=len(incoming))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def train(self, mode: bool = True) -> Self:
        """Always in eval mode: nothing in it learns by gradient, its statistics stay ImageNet's."""
        return super().train(False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, C, h, w)`` of normalized images ``(B, 3, H, W)``."""
        return patch_features(self.stem, self.blocks, images, self.config.blocks)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, seed: int = 0) -> dict[str, Any]:
        """Keep a greedy coreset of good training patches ``(N, C)`` as the bank.

        Returns:
            The fit's figures: patches seen, chosen from (at most
            ``max_candidates``) and kept, and the coreset's coverage radius (the
            largest distance from a candidate patch to the bank).
        """
        if features.ndim != 2 or features.shape[1] != self.channels or len(features) == 0:
            raise ValueError(
                f"need (N, {self.channels}) patch features with N > 0, got {tuple(features.shape)}"
            )
        seen = len(features)
        if seen > self.config.max_candidates:
            draw = torch.Generator().manual_seed(seed)
            features = features[torch.randperm(seen, generator=draw)[: self.config.max_candidates]]
        features = features.float()
        size = min(
            self.config.max_bank, max(1, math.ceil(self.config.coreset_ratio * len(features)))
        )
        chosen, radius = greedy_coreset(features, size, self.config.projection, seed)
        self.bank = features[chosen].contiguous()
        self.config = replace(self.config, bank_size=len(chosen))
        return {
            "patches": seen,
            "candidates": len(features),
            "bank_size": len(chosen),
            "coverage_radius": radius,
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch distances ``(B, h, w)`` and raw image scores ``(B,)`` of normalized images.

        Written for any batch size once exported (:mod:`models.runtime`): shapes are
        read from tensors, rows picked by ``gather``, never by Python indices.
        """
        if len(self.bank) == 0:
            raise RuntimeError("the memory bank is empty: fit it first")
        features = self.embed(images)  # (B, C, h, w)
        patches = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
        distances, nearest = nearest_neighbours(patches.flatten(0, 1), self.bank)
        distances = distances.view(patches.shape[:2])
        nearest = nearest.view(patches.shape[:2])
        scores = self._image_scores(patches, distances, nearest)
        return distances.view(features.shape[0], *features.shape[2:]), scores

    def _image_scores(
        self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """The farthest patch distance, weighted by the density of the bank near it (eq. 7)."""
        worst = distances.argmax(dim=1, keepdim=True)  # (B, 1)
        score = distances.gather(1, worst).squeeze(1)
        k = min(self.config.neighbours, len(self.bank))
        if k == 1:
            return score
        anchor = self.bank[nearest.gather(1, worst).squeeze(1)]  # (B, C): its nearest entry
        around = _squared_distances(anchor, self.bank)  # (B, M)
        support = around.topk(k, dim=1, largest=False).indices  # (B, k)
        channels = patches.shape[-1:]
        farthest = patches.gather(1, worst.unsqueeze(-1).expand(-1, -1, *channels))  # (B, 1, C)
        spread = (farthest - self.bank[support]).pow(2).sum(-1).sqrt()  # (B, k)
        weight = 1.0 - torch.softmax(spread, dim=1)[:, 0]
        return weight * score

    def calibrated(self, raw: torch.Tensor) -> torch.Tensor:
        """Distances (image scores or map pixels) as probabilities, by the fitted calibration."""
        return torch.sigmoid((raw - self.score_loc) / self.score_scale - self.score_shift)

    def anomaly_map(self, distances: torch.Tensor) -> torch.Tensor:
        """Patch distances ``(B, h, w)`` resized to the input and smoothed ``(B, H, W)``."""
        size = self.config.input_size
        full = F.interpolate(distances.unsqueeze(1), (size, size), mode="bilinear")
        kernel = self.smoothing
        pad = kernel.shape[-1] // 2
        full = F.pad(full, (pad, pad, pad, pad), mode="reflect")
        full = F.conv2d(full, kernel.view(1, 1, -1, 1))
        full = F.conv2d(full, kernel.view(1, 1, 1, -1))
        return full.squeeze(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> MemoryBankOutput:
        """Scores and maps of normalized images."""
        return self.answer(self(images))

    @torch.no_grad()
    def answer(
        self, output: tuple[torch.Tensor, torch.Tensor], maps: bool = True
    ) -> MemoryBankOutput:
        """The output of :meth:`forward`'s distances and raw scores.

        ``maps``: draw the anomaly maps (else ``anomaly_map`` is empty, ``(B, 0, 0)``).
        """
        distances, raw = (t.float() for t in output)
        drawn = self.calibrated(self.anomaly_map(distances)) if maps else distances[:, :0, :0]
        return MemoryBankOutput(score=self.calibrated(raw), raw_score=raw, anomaly_map=drawn)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalized 1-D Gaussian of radius 4 sigma (as anomalib's PatchCore map)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return kernel / kernel.sum()


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance ``(N,)`` and index ``(N,)`` of each query's nearest bank row.

    In chunks of queries, so the distance matrix stays a few tens of megabytes.
    """
    bank_sq = bank.pow(2).sum(dim=1)  # (M,)
    distances, indices = [], []
    # An exported graph takes the whole batch at once (a chunking traced at one
    # batch size would not fit another).
    parts = (queries,) if torch.onnx.is_in_onnx_export() else queries.split(chunk)
    for part in parts:
        squared = torch.addmm(bank_sq, part, bank.T, alpha=-2.0)  # |b|² - 2 q·b
        best, index = squared.min(dim=1)
        distances.append((best + part.pow(2).sum(dim=1)).clamp_min(0.0).sqrt())
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(N, M)`` between rows of ``a`` and ``b``."""
    squared = torch.addmm(b.pow(2).sum(dim=1), a, b.T, alpha=-2.0)
    return (squared + a.pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0)


def greedy_coreset(
    features: torch.Tensor, size: int, projection: int = 128, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """Indices of ``size`` rows chosen by greedy k-centre selection (PatchCore §3.2).

    Each step adds the row farthest from those chosen so far, in a Gaussian random
    projection to ``projection`` dimensions (Johnson-Lindenstrauss: distances are
    kept within a small factor, and each step costs a matrix-vector product).

    Returns:
        The chosen indices and the coverage radius in the projected space: the
        largest distance from any row to its nearest chosen one.
    """
    n, c = features.shape
    size = min(size, n)
    generator = torch.Generator().manual_seed(seed)
    if 0 < projection < c:
        matrix = torch.randn(c, projection, generator=generator) / math.sqrt(projection)
        points = features @ matrix
    else:
        points = features
    squared = points.pow(2).sum(dim=1)
    nearest = torch.full((n,), float("inf"))
    chosen = torch.empty(size, dtype=torch.long)
    index = int(torch.randint(n, (1,), generator=generator))
    for step in range(size):
        chosen[step] = index
        centre = points[index]
        distance = squared - 2.0 * (points @ centre) + centre.dot(centre)
        torch.minimum(nearest, distance, out=nearest)
        index = int(torch.argmax(nearest))
    radius = float(nearest.max().clamp_min(0.0).sqrt())
    return chosen, radius


def calibrate(
    bank: MemoryBank, good_scores: Sequence[float], quantile: float = 0.99
) -> dict[str, float]:
    """Fit the memory bank's calibration in place from raw scores of good parts.

    Distances are standardised by the good parts' median and spread (median to
    84th percentile: one standard deviation of a normal tail, robust to an odd
    image), and shifted so that the good parts' ``quantile`` maps to 0.5. Pixels
    of the map use the same mapping: a patch as far from the bank as an image's
    worst patch at that quantile is drawn at 0.5.

    Returns:
        The fitted parameters.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    if good.size < 2:
        raise ValueError("calibration needs at least 2 good scores")
    loc = float(np.median(good))
    spread = float(np.quantile(good, 0.84) - loc)
    scale = spread if spread > 1e-12 else float(good.std() or 1.0)
    shift = float(np.quantile((good - loc) / scale, quantile))
    params = {"score_loc": loc, "score_scale": scale, "score_shift": shift}
    for name, value in params.items():
        getattr(bank, name).fill_(value)
    return params
