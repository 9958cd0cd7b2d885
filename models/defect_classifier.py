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

One classifier per category (a new product line is a new artifact). Its classes
are every label of the category's training split (``good`` included), so on
graded data (ELPV's four probability levels) it also grades; the *defect types*
it ranks for an anomalous part are the subset of classes that are defects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneStage, Preprocessing, create_backbone
from models.data.sample import GOOD


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
    """

    classes: tuple[str, ...]
    defect_types: tuple[str, ...]
    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    embedding_dim: int = 128
    temperature: float = 0.1
    freeze_stages: int = 2
    autocontrast: float = 0.0

    def __post_init__(self) -> None:
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
        # Unit-length class means and log class priors, set by fit_prototypes.
        self.register_buffer("prototypes", torch.zeros(len(config.classes), config.embedding_dim))
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
        return F.normalize(self.head(self.backbone(images)).float(), dim=-1)

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
