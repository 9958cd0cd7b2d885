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
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer
from torch import nn

from models.backbone import Preprocessing, create_backbone
from models.text import local_model_folder

# Parameters of the locked text transformer, left out of artifacts.
_LOCKED_PREFIX = "clip.text.transformer."


@dataclass(frozen=True)
class RerankerConfig:
    """What builds a :class:`Reranker` (stored in its artifact).

    Attributes:
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
    """

    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    embed_dim: int = 256
    context_length: int = 64
    text_model: str | None = None
    fusion_weight: float = 0.5
    autocontrast: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RerankerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**dict(data))

    def preprocessing(self) -> Preprocessing:
        """The image transform (the vision tower's ImageNet convention)."""
        return Preprocessing(
            input_size=self.input_size, resize=self.input_size, autocontrast=self.autocontrast
        )


class Reranker(nn.Module):
    """CustomTextCLIP over defect images and descriptions, plus score fusion.

    Args:
        config: the towers and the fusion weight.
        pretrained: load the packaged ImageNet weights into the vision tower
            (training). The text tower always loads the packaged MiniLM.
    """

    def __init__(self, config: RerankerConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
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
        self.tokenizer = HFTokenizer(text_model, context_length=config.context_length)
        self.register_state_dict_post_hook(_drop_locked_text)
        self.register_load_state_dict_post_hook(_locked_text_is_not_missing)

    def train(self, mode: bool = True) -> Reranker:
        """Set the training mode; the locked text transformer stays in eval mode."""
        super().train(mode)
        self.clip.text.transformer.eval()
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The freshly initialised parts: both projections and the logit scale."""
        yield from self.clip.visual.head.parameters()
        yield from (p for p in self.clip.text.proj.parameters() if p.requires_grad)
        yield self.clip.logit_scale

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained vision trunk (trained at the lower backbone learning rate)."""
        return (p for p in self.clip.visual.trunk.parameters() if p.requires_grad)

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
        weight: float | None = None,
    ) -> torch.Tensor:
        """``w·classifier + (1 - w)·clip`` per type, renormalised to sum to 1.

        Args:
            classifier_scores: ``(B, N)`` in the same type order; a type the
                classifier does not know (registered by description only) has 0.
                None: the reranker ranks alone.
            clip_probabilities: ``(B, N)`` from :meth:`text_probabilities`.
            weight: the classifier's weight (default: the config's, fitted on
                validation data).
        """
        w = self.config.fusion_weight if weight is None else weight
        if classifier_scores is None:
            return clip_probabilities
        if classifier_scores.shape != clip_probabilities.shape:
            raise ValueError(
                f"classifier scores {tuple(classifier_scores.shape)} and CLIP probabilities "
                f"{tuple(clip_probabilities.shape)} differ"
            )
        fused = w * classifier_scores + (1.0 - w) * clip_probabilities
        return fused / fused.sum(-1, keepdim=True).clamp_min(1e-12)


def _drop_locked_text(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _LOCKED_PREFIX)]:
        del state_dict[key]


def _locked_text_is_not_missing(module: nn.Module, incompatible: Any) -> None:
    locked = [k for k in incompatible.missing_keys if _LOCKED_PREFIX in k]
    for key in locked:
        incompatible.missing_keys.remove(key)
