"""The CLIP text-fusion reranker: defect images matched against defect descriptions.

An open_clip ``CustomTextCLIP`` with a timm vision tower (the packaged ImageNet
EfficientNet-Lite0) and a Hugging Face text tower (the packaged MiniLM), each
with a linear projection into one embedding space. Training is LiT-style with
the roles swapped: the text tower is locked (its sentence embedding is already
good), and the image tower with both projections learns to land each defect
image next to its type's description.

The reranker orders a defective part's types by fusing the classifier's scores
with the image-text similarity. Because a type only needs a description to be
scored, a type registered with words alone is ranked at once (open vocabulary).

The locked text transformer is not stored in the artifact: it is the package's,
and is loaded from it again, so an artifact holds only what training changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Preprocessing, create_backbone
from models.descriptions import DescriptionCatalog
from models.text import local_model_folder

# Parameters of the locked text transformer, left out of artifacts.
_LOCKED_PREFIX = "clip.text.transformer."


@dataclass(frozen=True)
class RerankerConfig:
    """What builds a :class:`Reranker` (stored in its artifact).

    Attributes:
        descriptions: the described defect types it was trained on, in order
            (:meth:`~models.descriptions.DescriptionCatalog.to_list` form).
        backbone: the timm vision tower (its ImageNet weights come from the package).
        input_size: side of the square image input in pixels.
        embed_dim: the joint image-text embedding size.
        context_length: token limit of a description.
        text_model: a local Hugging Face model folder for the text tower
            (default: the packaged MiniLM). An open_clip or hub model is a user's
            choice when online; the default runs offline.
        fusion_weight: the classifier's weight ``w`` in ``w·classifier +
            (1 - w)·clip``, chosen on validation data after training.
        autocontrast: per-image contrast stretch; see
            :class:`~models.backbone.Preprocessing`.
        open_clip_model: instead of the packaged towers, an open_clip model by
            name (``"ViT-B-32"``, ...), for users online; its own text tower is
            locked and the image tower trains. ``input_size`` must be the
            model's image size.
        open_clip_pretrained: the open_clip pretrained tag to download
            (``"laion2b_s34b_b79k"``, ...) when training starts; artifacts then
            hold every weight, so serving needs no download.
        lock_text_projection: keep the packaged text tower's projection at its
            (random) initialisation, so descriptions keep the sentence encoder's
            geometry and only the image tower learns (full LiT).
    """

    descriptions: tuple[Mapping[str, Any], ...] = ()
    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    embed_dim: int = 256
    context_length: int = 64
    text_model: str | None = None
    fusion_weight: float = 0.5
    autocontrast: float = 0.0
    open_clip_model: str | None = None
    open_clip_pretrained: str | None = None
    lock_text_projection: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        catalog = DescriptionCatalog.from_list(self.descriptions)  # validates every entry
        if len(catalog) != len(self.descriptions):
            raise ValueError("descriptions name a defect type twice")
        object.__setattr__(self, "descriptions", tuple(catalog.to_list()))

    @property
    def defect_types(self) -> tuple[str, ...]:
        """The types the reranker was trained on."""
        return tuple(d["name"] for d in self.descriptions)

    def catalog(self) -> DescriptionCatalog:
        """The trained types' descriptions."""
        return DescriptionCatalog.from_list(self.descriptions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"descriptions": [dict(d) for d in self.descriptions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RerankerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        data["descriptions"] = tuple(data.get("descriptions", ()))
        return cls(**data)

    def preprocessing(self) -> Preprocessing:
        """The image transform (ImageNet's convention, or CLIP's for open_clip models)."""
        if self.open_clip_model:
            from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

            return Preprocessing(
                input_size=self.input_size,
                resize=self.input_size,
                interpolation="bicubic",
                mean=OPENAI_DATASET_MEAN,
                std=OPENAI_DATASET_STD,
                autocontrast=self.autocontrast,
            )
        return Preprocessing(
            input_size=self.input_size, resize=self.input_size, autocontrast=self.autocontrast
        )


class RerankerOutput(NamedTuple):
    """What the reranker's image tower says about a batch, against its trained descriptions.

    Attributes:
        probabilities: ``(B, N)`` each image's CLIP probability over the trained types.
        embedding: ``(B, D)`` unit-length image embeddings.
    """

    probabilities: torch.Tensor
    embedding: torch.Tensor


class Reranker(nn.Module):
    """CustomTextCLIP over defect images and descriptions, plus score fusion.

    Args:
        config: the towers and the fusion weight.
        pretrained: load the packaged ImageNet weights into the vision tower
            (training). The text tower always loads the packaged MiniLM. With
            ``config.open_clip_model``, download ``open_clip_pretrained`` instead.
    """

    def __init__(self, config: RerankerConfig, pretrained: bool = True) -> None:
        # open_clip (and the transformers under it) loads here, not on import: a
        # training worker or command that never builds a reranker starts seconds sooner.
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
        from open_clip.tokenizer import HFTokenizer

        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        self.hub = bool(config.open_clip_model)
        if self.hub:
            self._build_open_clip(config, pretrained)
            return
        text_model = local_model_folder(config.text_model)
        self.clip = CustomTextCLIP(
            embed_dim=config.embed_dim,
            vision_cfg=CLIPVisionCfg(
                timm_model_name=config.backbone,
                timm_model_pretrained=False,
                timm_pool="avg",
                timm_proj="linear",
                image_size=config.input_size,
            ),
            text_cfg=CLIPTextCfg(
                hf_model_name=text_model,
                hf_tokenizer_name=text_model,
                hf_model_pretrained=True,
                hf_proj_type="linear",
                hf_pooler_type="mean_pooler",
                context_length=config.context_length,
            ),
        )
        if pretrained:
            backbone, _ = create_backbone(config.backbone, pretrained=True, num_classes=0)
            self.clip.visual.trunk.load_state_dict(backbone.state_dict())
        self.clip.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        if config.lock_text_projection:
            self.clip.text.proj.requires_grad_(False)
        self.tokenizer = HFTokenizer(text_model, context_length=config.context_length)
        self.register_state_dict_post_hook(_drop_locked_text)
        self.register_load_state_dict_post_hook(_locked_text_is_not_missing)

    def _build_open_clip(self, config: RerankerConfig, pretrained: bool) -> None:
        """An open_clip model by name: its text tower locked, whole (LiT)."""
        import open_clip

        tag = config.open_clip_pretrained if pretrained else None
        self.clip = open_clip.create_model(config.open_clip_model, pretrained=tag)
        size = self.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        if size != config.input_size:
            raise ValueError(
                f"{config.open_clip_model} takes {size}px images; set input_size={size}"
            )
        self.clip.lock_text_tower()
        self.tokenizer = open_clip.get_tokenizer(config.open_clip_model)

    def train(self, mode: bool = True) -> Reranker:
        """Set the training mode; the locked text tower stays in eval mode."""
        super().train(mode)
        if not self.hub:
            self.clip.text.transformer.eval()
        return self

    def _image_head(self) -> list[nn.Parameter]:
        if not self.hub:
            return list(self.clip.visual.head.parameters())
        return [
            p
            for name, p in self.clip.visual.named_parameters()
            if name.split(".")[0] in ("proj", "head", "attnpool")
        ]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The image (and packaged text) projections and the logit scale."""
        yield from self._image_head()
        if not self.hub:
            yield from (p for p in self.clip.text.proj.parameters() if p.requires_grad)
        yield self.clip.logit_scale

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained vision trunk (trained at the lower backbone learning rate)."""
        head = {id(p) for p in self._image_head()}
        return (p for p in self.clip.visual.parameters() if p.requires_grad and id(p) not in head)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings ``(B, D)`` of normalized images."""
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings ``(N, D)``."""
        if not texts:
            raise ValueError("need at least one text")
        device = self.clip.logit_scale.device
        tokens = self.tokenizer(list(texts)).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """The locked text transformer's pooled features ``(N, H)``, before projection.

        They never change (the tower is locked), so training computes them once.
        """
        if not texts:
            raise ValueError("need at least one text")
        tokens = self.tokenizer(list(texts)).to(self.clip.logit_scale.device)
        if self.hub:  # the whole locked text tower, its projection included
            return self.clip.encode_text(tokens).float()
        text = self.clip.text
        mask = (tokens != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

    def project_texts(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings ``(N, D)`` of :meth:`text_features`."""
        if self.hub:
            return F.normalize(features.float(), dim=-1)
        return F.normalize(self.clip.text.proj(features).float(), dim=-1)

    @torch.no_grad()
    def type_embeddings(self, catalog: DescriptionCatalog) -> torch.Tensor:
        """One unit-length embedding per described type ``(N, D)``, in catalog order.

        Each is the normalised mean over the description's phrasings
        (:meth:`~models.descriptions.DefectDescription.variants`).
        """
        if not len(catalog):
            raise ValueError("the catalog has no description")
        rows = []
        for name in catalog.names:
            variants = self.project_texts(self.text_features(catalog[name].variants()))
            rows.append(F.normalize(variants.mean(0), dim=-1))
        return torch.stack(rows)

    def forward(
        self, images: torch.Tensor, text_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training logits ``(B, N)``: images against projected text features.

        Without text features: the unit-length image embeddings ``(B, D)``, the
        network an exported runtime runs (:mod:`models.runtime`); serving ranks
        them against the descriptions of the moment.
        """
        if text_features is None:
            return self.encode_images(images)
        return self.logits(self.encode_images(images), self.project_texts(text_features))

    @torch.no_grad()
    def answer(self, embedding: torch.Tensor) -> RerankerOutput:
        """Probabilities over the trained descriptions, from :meth:`forward`'s embeddings.

        What an export's parity check compares (from torch or an exported runtime).
        """
        embedding = embedding.float()
        texts = self.type_embeddings(self.config.catalog()).to(embedding.device)
        return RerankerOutput(self.logits(embedding, texts).softmax(-1), embedding)

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities ``(B, N)`` (CLIP's learnt temperature)."""
        return self.clip.logit_scale.exp().clamp(max=100.0) * image_embeddings @ text_embeddings.T

    @torch.no_grad()
    def text_probabilities(
        self, images: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Each image's probability over the described types ``(B, N)``."""
        return self.logits(self.encode_images(images), text_embeddings).softmax(-1)

    def fuse(
        self,
        classifier_scores: torch.Tensor | None,
        clip_probabilities: torch.Tensor,
        known: torch.Tensor | None = None,
        weight: float | None = None,
        described: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused type scores; see :func:`fuse_scores`. ``weight`` defaults to the config's."""
        w = self.config.fusion_weight if weight is None else weight
        return fuse_scores(classifier_scores, clip_probabilities, w, known, described)


def fuse_scores(
    classifier_scores: torch.Tensor | None,
    clip_probabilities: torch.Tensor,
    weight: float,
    known: torch.Tensor | None = None,
    described: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w·classifier + (1 - w)·clip`` per type, renormalised to sum to 1.

    The classifier abstains on types it was never trained on (registered by
    description only): their score is CLIP's alone, so a new type can come first
    as soon as its description matches the image better than any other. CLIP
    abstains on types it has no description of (taught to the classifier by
    reviewers, say): their score is the classifier's alone.

    Args:
        classifier_scores: ``(B, N)`` in the same type order, summing to 1 over
            the known types. None: CLIP ranks alone.
        clip_probabilities: ``(B, N)``, see :meth:`Reranker.text_probabilities`;
            0 for the types without a description.
        weight: the classifier's weight ``w`` in [0, 1].
        known: ``(N,)`` bool, the types the classifier knows (default: all).
        described: ``(N,)`` bool, the types CLIP has a description of (default: all).
    """
    if classifier_scores is None:
        return clip_probabilities
    if classifier_scores.shape != clip_probabilities.shape:
        raise ValueError(
            f"classifier scores {tuple(classifier_scores.shape)} and CLIP probabilities "
            f"{tuple(clip_probabilities.shape)} differ"
        )
    fused = weight * classifier_scores + (1.0 - weight) * clip_probabilities
    if known is not None:
        fused = torch.where(known.to(fused.device), fused, clip_probabilities)
    if described is not None:
        fused = torch.where(described.to(fused.device), fused, classifier_scores)
    return fused / fused.sum(-1, keepdim=True).clamp_min(1e-12)


def fit_fusion_weight(
    classifier_scores: torch.Tensor,
    clip_probabilities: torch.Tensor,
    truth: torch.Tensor,
    grid: int = 21,
    known: torch.Tensor | None = None,
    described: torch.Tensor | None = None,
) -> tuple[float, dict[str, float]]:
    """The classifier weight that ranks the most validation images right.

    Several weights often tie on a small validation split; the median of the
    tied weights is taken, the one farthest from flipping an answer either way.
    (Log-likelihood would favour whichever model is more confident, and the
    classifier's prototype softmax is sharp by construction.)

    Args:
        classifier_scores: ``(B, N)`` classifier scores over the types.
        clip_probabilities: ``(B, N)`` CLIP probabilities over the same types.
        truth: ``(B,)`` index of each image's true type.
        grid: weights tried, evenly spaced over [0, 1].
        known: ``(N,)`` bool, the types the classifier knows (see :func:`fuse_scores`).
        described: ``(N,)`` bool, the types CLIP has a description of.

    Returns:
        The weight and the validation top-1 of the classifier alone, CLIP alone
        and the fused ranking at that weight.
    """
    if len(truth) == 0:
        raise ValueError("no validation image to fit the fusion weight on")

    def top1(weight: float) -> float:
        fused = fuse_scores(classifier_scores, clip_probabilities, weight, known, described)
        return float((fused.argmax(1) == truth).float().mean())

    weights = torch.linspace(0.0, 1.0, grid).tolist()
    scores = [top1(w) for w in weights]
    tied = [w for w, t in zip(weights, scores, strict=True) if t == max(scores)]
    weight = round(tied[(len(tied) - 1) // 2], 4)
    return weight, {
        "val_top1_classifier": float((classifier_scores.argmax(1) == truth).float().mean()),
        "val_top1_clip": float((clip_probabilities.argmax(1) == truth).float().mean()),
        "val_top1_fused": max(scores),
        "fusion_weight": weight,
    }


def _drop_locked_text(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _LOCKED_PREFIX)]:
        del state_dict[key]


def _locked_text_is_not_missing(module: nn.Module, incompatible: Any) -> None:
    locked = [k for k in incompatible.missing_keys if _LOCKED_PREFIX in k]
    for key in locked:
        incompatible.missing_keys.remove(key)
