"""The defect classifier: which defect a part has, by supervised contrastive embedding.

The backbone's pooled features go through a projection head to a unit-length
embedding, trained with the supervised-contrastive loss (Khosla et al. 2020):
images of one class pull together, other classes push apart. Each class is then
represented by a prototype, the normalised mean embedding of its training images,
and an image's class scores are a softmax over its cosine similarity to every
prototype plus the log of the class's share of the training images (Bayes' rule:
on imbalanced data, such as ELPV where most cells are good, a nearest-prototype
rule alone over-predicts the rare classes). New images of a class land near its
prototype even when the class had few examples, and the embedding itself can be
drawn as a map of the defects.

A second embedding needs no gradient training at all (``embedding="patch"``):
the frozen backbone's locally aware patch features (blocks 2 and 4, as the memory
bank uses), compared with a coreset of the category's good patches. Each image's
embedding is the mean of its patches' departures from the good mean, weighted by
a softmax of how far each patch is from its nearest good patch: the defect's own
patches speak for the image, the good surface around it does not. The prototypes
are fitted on it the same way. On a generated two-surface set (40 images per
class, 128 px) it names the defect type of 96 % of the defective test images,
where the plain pooled features name 77 %; it fits in seconds, so a fresh
registry gets a classifier without training one.

One classifier per category (a new product line is a new artifact). Its classes
are every label of the category's training split (``good`` included), so on
graded data (ELPV's four probability levels) it also grades; the *defect types*
it ranks for an anomalous part are the subset of classes that are defects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneStage, Preprocessing, create_backbone, patch_features
from models.data.sample import GOOD

CONTRASTIVE, PATCH = "contrastive", "patch"
EMBEDDINGS = (CONTRASTIVE, PATCH)


@dataclass(frozen=True)
class DefectClassifierConfig:
    """What builds a :class:`DefectClassifier` (stored in its artifact).

    Attributes:
        classes: every class, in the order of the prototypes.
        defect_types: the classes that are defects, ranked for anomalous parts.
        backbone: backbone name.
        input_size: side of the square model input in pixels.
        embedding_dim: size of the unit-length embedding.
        temperature: softmax temperature of the cosine similarities (training
            loss and class scores).
        freeze_stages: the stem and this many of the first blocks stay frozen.
        autocontrast: percent clipped at each end of a per-image contrast stretch
            (0: off); see :class:`~models.backbone.Preprocessing`.
        embedding: ``contrastive`` (a projection head trained with SupCon) or
            ``patch`` (frozen patch features weighted by their distance to the
            good patches; fitted, not trained).
        blocks: the backbone blocks whose features describe a patch (``patch``).
        focus: how sharply the farthest patches dominate the ``patch`` embedding
            (the softmax of ``focus`` times each patch's distance over the image's
            mean distance).
        max_good_patches: the most good patches the ``patch`` embedding keeps.
        good_patches: good patches kept once fitted; recorded so that loading
            allocates what it reads.
    """

    classes: tuple[str, ...]
    defect_types: tuple[str, ...]
    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    embedding_dim: int = 128
    temperature: float = 0.1
    freeze_stages: int = 2
    autocontrast: float = 0.0
    embedding: str = CONTRASTIVE
    blocks: tuple[int, ...] = (2, 4)
    focus: float = 16.0
    max_good_patches: int = 2048
    good_patches: int = 0

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.focus <= 0 or self.max_good_patches < 1 or self.good_patches < 0 or not self.blocks:
            raise ValueError(
                "need focus > 0, max_good_patches >= 1, good_patches >= 0 and some blocks, got "
                f"{self.focus}, {self.max_good_patches}, {self.good_patches}, {self.blocks}"
            )
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"need at least two distinct classes, got {self.classes!r}")
        unknown = [t for t in self.defect_types if t not in self.classes]
        if not self.defect_types or unknown:
            raise ValueError(
                f"defect_types must be a non-empty subset of the classes {self.classes!r}, "
                f"got {self.defect_types!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {
            "classes": list(self.classes),
            "defect_types": list(self.defect_types),
            "blocks": list(self.blocks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DefectClassifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(
            **(
                dict(data)
                | {
                    "classes": tuple(data["classes"]),
                    "defect_types": tuple(data["defect_types"]),
                    "blocks": tuple(data.get("blocks", cls.blocks)),
                }
            )
        )

    def preprocessing(self) -> Preprocessing:
        """The transform this model is trained and served with."""
        return Preprocessing(
            input_size=self.input_size, resize=self.input_size, autocontrast=self.autocontrast
        )


class ClassifierOutput(NamedTuple):
    """What the classifier says about a batch.

    Attributes:
        scores: ``(B, C)`` probability of each class (softmax over prototypes).
        embedding: ``(B, D)`` unit-length embeddings.
    """

    scores: torch.Tensor
    embedding: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """The probabilities it answers with (what an exported runtime must reproduce)."""
        return self.scores


class DefectClassifier(BackboneStage):
    """Backbone, projection head to a unit sphere, and one prototype per class.

    Args:
        config: the classes and the architecture.
        pretrained: start from the packaged ImageNet weights (training).
    """

    def __init__(self, config: DefectClassifierConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        self.backbone, _ = create_backbone(config.backbone, pretrained=pretrained, num_classes=0)
        if config.embedding == PATCH:
            # Only what the patch features need, all of it frozen.
            blocks = self.backbone.blocks[: max(config.blocks) + 1]
            self.backbone = nn.ModuleDict(
                {
                    "stem": nn.Sequential(self.backbone.conv_stem, self.backbone.bn1),
                    "blocks": blocks,
                }
            )
            self.freeze(self.backbone)
            self.backbone.eval()  # ImageNet's batch statistics, from the start
            width = sum(blocks[i][-1].conv_pwl.out_channels for i in config.blocks)
            self.head = nn.Identity()
            # The good patches (a coreset) and their mean, set by fit_good_patches.
            self.register_buffer("good", torch.zeros(config.good_patches, width))
            self.register_buffer("good_mean", torch.zeros(width))
            self.embedding_dim = width
        else:
            self.freeze(
                self.backbone.conv_stem,
                self.backbone.bn1,
                *self.backbone.blocks[: config.freeze_stages],
            )
            width = self.backbone.num_features
            self.head = nn.Sequential(
                nn.Linear(width, width // 2),
                nn.ReLU(inplace=True),
                nn.Linear(width // 2, config.embedding_dim),
            )
            self.embedding_dim = config.embedding_dim
        # Unit-length class means and log class priors, set by fit_prototypes.
        self.register_buffer("prototypes", torch.zeros(len(config.classes), self.embedding_dim))
        self.register_buffer("log_prior", torch.zeros(len(config.classes)))
        self.register_buffer("has_prototypes", torch.zeros((), dtype=torch.bool))
        self._register_load_state_dict_pre_hook(_uniform_prior_if_missing)
        # Where each defect type sits among the classes (for ranking).
        self.register_buffer(
            "defect_index",
            torch.tensor([config.classes.index(t) for t in config.defect_types]),
            persistent=False,
        )

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the freshly initialised projection head."""
        return self.head.parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings ``(B, D)`` of normalized images ``(B, 3, H, W)``."""
        if self.config.embedding == PATCH:
            return self._patch_embedding(images)
        return F.normalize(self.head(self.backbone(images)).float(), dim=-1)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, C, h, w)`` (``patch`` embedding)."""
        return patch_features(
            self.backbone["stem"], self.backbone["blocks"], images, self.config.blocks
        )

    def _patch_embedding(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.good) == 0:
            raise RuntimeError("the classifier has no good patches yet: call fit_good_patches")
        features = self.patches(images).float()
        patches = features.flatten(2).transpose(1, 2)  # (B, P, C)
        # Squared distance to every good patch: |p|² - 2 p·g + |g|², then the nearest.
        squared = (
            patches.pow(2).sum(-1, keepdim=True)
            - 2.0 * patches @ self.good.T
            + self.good.pow(2).sum(-1)
        )
        distance = squared.min(-1).values.clamp_min(0.0).sqrt()  # (B, P)
        relative = distance / distance.mean(-1, keepdim=True).clamp_min(1e-6)
        weights = torch.softmax(self.config.focus * relative, dim=-1)  # (B, P)
        departure = ((patches - self.good_mean) * weights.unsqueeze(-1)).sum(1)
        return F.normalize(departure, dim=-1)

    @torch.no_grad()
    def fit_good_patches(self, features: torch.Tensor, seed: int = 0) -> dict[str, int]:
        """Keep a greedy coreset of good patch features ``(N, C)`` and their mean.

        Returns:
            The patches seen and kept.
        """
        from models.memory_bank import greedy_coreset

        if self.config.embedding != PATCH:
            raise RuntimeError("only the patch embedding has good patches")
        if features.ndim != 2 or features.shape[1] != self.embedding_dim or not len(features):
            raise ValueError(
                f"need (N, {self.embedding_dim}) patch features with N > 0, "
                f"got {tuple(features.shape)}"
            )
        features = features.float()
        size = min(self.config.max_good_patches, len(features))
        chosen, _ = greedy_coreset(features, size, 128, seed)
        self.good = features[chosen].contiguous()
        self.good_mean.copy_(features.mean(0))
        self.config = replace(self.config, good_patches=len(chosen))
        return {"patches": len(features), "good_patches": len(chosen)}

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # Make room for the good patches it reads (a different width still fails).
        incoming = state_dict.get(prefix + "good")
        if incoming is not None and hasattr(self, "good") and len(incoming) != len(self.good):
            self.good = torch.zeros(len(incoming), self.embedding_dim, device=self.good.device)
            self.config = replace(self.config, good_patches=len(incoming))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def class_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each prototype over the temperature, plus the log prior."""
        if not bool(self.has_prototypes):
            raise RuntimeError("the classifier has no prototypes yet: call fit_prototypes")
        return embedding @ self.prototypes.T / self.config.temperature + self.log_prior

    @torch.no_grad()
    def fit_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Set each class's prototype (normalized mean embedding) and its log prior.

        Raises:
            ValueError: a class has no embedding.
        """
        missing = [
            name for i, name in enumerate(self.config.classes) if not bool((labels == i).any())
        ]
        if missing:
            raise ValueError(f"no training image of class(es) {missing}")
        means = torch.stack(
            [embeddings[labels == i].mean(0) for i in range(len(self.config.classes))]
        )
        self.prototypes.copy_(F.normalize(means, dim=-1))
        counts = torch.bincount(labels, minlength=len(self.config.classes)).float()
        self.log_prior.copy_((counts / counts.sum()).log())
        self.has_prototypes.fill_(True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> ClassifierOutput:
        """Class probabilities and embeddings of a batch."""
        return self.answer(self(images))

    @torch.no_grad()
    def answer(self, embedding: torch.Tensor) -> ClassifierOutput:
        """The output of :meth:`forward`'s embeddings (from torch or an exported runtime)."""
        return ClassifierOutput(self.class_logits(embedding.float()).softmax(-1), embedding)

    def defect_scores(
        self, scores: torch.Tensor, names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Each image's defect-type scores, renormalized over its defect types: ``(B, N)``.

        Args:
            scores: ``(B, C)`` class probabilities from :meth:`predict`.
            names: the types to score, in order (default: its defect types); a type
                it was not trained on scores 0.
        """
        defect = scores[:, self.defect_index.to(scores.device)]
        defect = defect / defect.sum(-1, keepdim=True).clamp_min(1e-12)
        if names is None:
            return defect
        own = {name: i for i, name in enumerate(self.config.defect_types)}
        out = defect.new_zeros(defect.shape[0], len(names))
        for j, name in enumerate(names):
            if name in own:
                out[:, j] = defect[:, own[name]]
        return out

    def rank_defects(
        self, scores: torch.Tensor, k: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """Each image's defect types, best first, with scores renormalized over them.

        Args:
            scores: ``(B, C)`` class probabilities from :meth:`predict`.
            k: keep the top ``k`` (default: all defect types).
        """
        names = self.config.defect_types
        ranked = []
        for row in self.defect_scores(scores).tolist():
            order = sorted(range(len(names)), key=lambda i: -row[i])[: k or len(names)]
            ranked.append([(names[i], row[i]) for i in order])
        return ranked


def _uniform_prior_if_missing(
    state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """Artifacts from before class priors score every class as equally likely."""
    key = prefix + "log_prior"
    if key not in state_dict and prefix + "prototypes" in state_dict:
        state_dict[key] = torch.zeros(state_dict[prefix + "prototypes"].shape[0])


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """The SupCon loss (Khosla et al. 2020, eq. 2, "L_out") of unit-length embeddings.

    Every embedding is an anchor; its positives are the other embeddings with its
    label (other views of the same image included). Anchors without a positive
    in the batch do not contribute.

    Args:
        embeddings: ``(N, D)`` unit-length vectors (all views of the batch, flattened).
        labels: ``(N,)`` class of each.
        temperature: the softmax temperature.

    Returns:
        The mean loss over anchors with positives (0 when none has one).
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need (N, D) embeddings and (N,) labels, got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    n = embeddings.shape[0]
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has = counts > 0
    if not bool(has.any()):
        return embeddings.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has] / counts[has]
    return -mean_log_prob.mean()


def defect_classes(
    labels: Sequence[str], anomalous: Sequence[bool]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The classes (every label, sorted with ``good`` first) and the defect types.

    A label is a defect type when its samples are anomalous (ELPV's 1/3 level is a
    class but not a defect).
    """
    classes = tuple(sorted(set(labels), key=lambda name: (name != GOOD, name)))
    defective = {label for label, bad in zip(labels, anomalous, strict=True) if bad}
    defects = tuple(c for c in classes if c in defective)
    return classes, defects
