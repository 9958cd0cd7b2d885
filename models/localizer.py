"""The defect localizer: where each defect is, as boxes with a defect type and a score.

A DEIMv2 detector (Huang et al. 2025, "Real-Time Object Detection Meets DINOv3";
Hugging Face ``Deimv2ForObjectDetection``): a convolutional backbone, an encoder
fusing its feature levels, and a DETR decoder whose queries each predict one box
(as a distribution over edge offsets, D-FINE's fine-grained localization) and a
sigmoid score per defect type. Training uses Dense O2O matching and the Matching
Auxiliary Loss, which make DETRs converge in few epochs.

Backbones (:data:`BACKBONES`):

- ``efficientnet_lite0`` (default): the packaged ImageNet EfficientNet-Lite0
  (:mod:`models.backbone`) as a timm backbone, strides 8/16/32, with DEIMv2's
  hybrid encoder. On a 2-core CPU the from-scratch HGNetV2 cannot learn boxes in
  a 30-minute budget; ImageNet features can.
- ``hgnetv2_pico``: DEIMv2-Pico's HGNetV2 and lite encoder (strides 16/32), from
  scratch, for machines with the time to train it.

One localizer serves every surface category: the defect types are shared, so a
single model sees three times the boxes a per-category one would; the categories
it was trained on are part of its config. ``pretrained_checkpoint`` (a hub id or a
local folder) starts from a released DEIMv2 for users with one; nothing here uses
it by default.

Boxes: training targets and raw outputs are normalized ``(cx, cy, w, h)`` in the
model input (after :class:`~models.backbone.Preprocessing`); :meth:`predict`
returns ``(x0, y0, x1, y1)`` either normalized to the model input or, given the
original image sizes, in the original images' pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Self

import torch
from torch import nn
from torchvision.ops import batched_nms

from models.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneStage,
    Preprocessing,
    create_backbone,
)

if TYPE_CHECKING:
    from transformers import Deimv2Config

EFFICIENTNET_LITE0, HGNETV2_PICO = "efficientnet_lite0", "hgnetv2_pico"
BACKBONES = (EFFICIENTNET_LITE0, HGNETV2_PICO)


@dataclass(frozen=True)
class DefectLocalizerConfig:
    """What builds a :class:`DefectLocalizer` (stored in its artifact).

    Attributes:
        defect_types: the box classes, in the order of the detector's outputs.
        categories: the surface categories it was trained on (empty: unspecified).
        backbone: a name of :data:`BACKBONES`.
        input_size: side of the square model input in pixels.
        hidden_dim: width of the encoder and decoder.
        decoder_layers: decoder layers (each refines the boxes).
        num_queries: boxes proposed per image.
        num_denoising: noised ground-truth queries per image in training.
        freeze_stages: EfficientNet: the stem and this many first blocks stay frozen.
        score_threshold: default score a detection needs in :meth:`DefectLocalizer.predict`;
            training fits it on validation (the best F1 at IoU 0.5, :func:`fit_score_threshold`).
        nms_iou: of two boxes of one defect type overlapping more than this, the
            lower-scored is dropped (class-wise non-maximum suppression; 1: none).
        max_detections: detections kept per image before the threshold.
        pretrained_checkpoint: hub id or folder of a released DEIMv2 to start from
            (online users); ``None`` trains from the packaged weights only.
    """

    defect_types: tuple[str, ...]
    categories: tuple[str, ...] = ()
    backbone: str = EFFICIENTNET_LITE0
    input_size: int = 320
    hidden_dim: int = 128
    decoder_layers: int = 3
    num_queries: int = 100
    num_denoising: int = 50
    freeze_stages: int = 2
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100
    pretrained_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not self.defect_types or len(set(self.defect_types)) != len(self.defect_types):
            raise ValueError(f"need distinct defect types, got {self.defect_types!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, at least 64: {self.input_size}")
        if self.hidden_dim % 8 or self.hidden_dim < 32:
            raise ValueError(f"hidden_dim must be a multiple of 8, at least 32: {self.hidden_dim}")
        # DEIMv2 ties the later layers' heads to the first: it needs two layers at least.
        if self.decoder_layers < 2 or self.num_queries < 1 or self.num_denoising < 0:
            raise ValueError("need decoder_layers >= 2, num_queries >= 1 and num_denoising >= 0")
        if not 0 <= self.freeze_stages <= 7:
            raise ValueError(f"freeze_stages must be in [0, 7], got {self.freeze_stages}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be positive, got {self.max_detections}")
        # The encoder proposes one box per feature-map position; the queries are its best.
        strides = (8, 16, 32) if self.backbone == EFFICIENTNET_LITE0 else (16, 32)
        positions = sum((self.input_size // stride) ** 2 for stride in strides)
        if positions < self.num_queries:
            raise ValueError(
                f"input_size {self.input_size} gives {positions} box proposals, fewer than "
                f"num_queries={self.num_queries}: raise input_size or lower num_queries"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {
            "defect_types": list(self.defect_types),
            "categories": list(self.categories),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DefectLocalizerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(
            **(
                dict(data)
                | {
                    "defect_types": tuple(data["defect_types"]),
                    "categories": tuple(data.get("categories", ())),
                }
            )
        )

    def preprocessing(self) -> Preprocessing:
        """The transform this model is trained and served with (ImageNet statistics)."""
        return Preprocessing(
            input_size=self.input_size,
            resize=self.input_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    def deimv2_config(self) -> Deimv2Config:
        """The transformers config of the detector."""
        from transformers import Deimv2Config, HGNetV2Config, TimmBackboneConfig

        size = [self.input_size, self.input_size]
        hidden = self.hidden_dim
        common: dict[str, Any] = {
            "num_labels": len(self.defect_types),
            "id2label": dict(enumerate(self.defect_types)),
            "label2id": {name: i for i, name in enumerate(self.defect_types)},
            "d_model": hidden,
            "encoder_hidden_dim": hidden,
            "encoder_ffn_dim": 4 * hidden,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 4 * hidden,
            "decoder_layers": self.decoder_layers,
            "decoder_activation_function": "silu",
            "num_queries": self.num_queries,
            "num_denoising": self.num_denoising,
            "anchor_image_size": size,
            "eval_size": size,
            # The small DEIMv2 variants (Atto to Pico): one box head, no gateway.
            "use_gateway": False,
            "share_bbox_head": True,
            "hidden_expansion": 0.34,
            "depth_mult": 0.5,
            # Batch-norm statistics are handled by DefectLocalizer.train (timm's
            # BatchNormAct2d must keep its activation, which replacement drops).
            "freeze_backbone_batch_norms": False,
        }
        if self.backbone == EFFICIENTNET_LITE0:
            return Deimv2Config(
                backbone_config=TimmBackboneConfig(
                    backbone=EFFICIENTNET_LITE0, out_indices=[2, 3, 4]
                ),
                encoder_type="hybrid",
                encoder_in_channels=[40, 112, 320],
                feat_strides=[8, 16, 32],
                encode_proj_layers=[2],
                decoder_in_channels=[hidden] * 3,
                num_feature_levels=3,
                decoder_n_points=[3, 6, 3],
                **common,
            )
        # DEIMv2-Pico (the converter's HGNetV2 table; return_idx [2] → out_indices [3]).
        backbone = HGNetV2Config(
            out_indices=[3],
            depths=[3, 3, 3],
            hidden_sizes=[64, 256, 512],
            stem_channels=[3, 16, 16],
            stage_in_channels=[16, 64, 256],
            stage_mid_channels=[16, 32, 64],
            stage_out_channels=[64, 256, 512],
            stage_num_blocks=[1, 1, 2],
            stage_downsample=[False, True, True],
            stage_light_block=[False, False, True],
            stage_kernel_size=[3, 3, 5],
            stage_numb_of_layers=[3, 3, 3],
            use_learnable_affine_block=True,
        )
        return Deimv2Config(
            backbone_config=backbone,
            encoder_type="lite",
            encoder_in_channels=[512],
            feat_strides=[16, 32],
            decoder_in_channels=[hidden] * 2,
            num_feature_levels=2,
            decoder_n_points=[4, 2],
            **common,
        )


class Detections(NamedTuple):
    """The defects found in one image.

    Attributes:
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)``: original-image pixels when
            :meth:`DefectLocalizer.predict` got the image sizes, else normalized to
            the model input.
        scores: ``(N,)`` confidence of each box, best first.
        labels: defect type of each box.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: tuple[str, ...]


class DefectLocalizer(BackboneStage):
    """DEIMv2 over a (packaged) ImageNet backbone; see the module docstring.

    Args:
        config: the defect types and the architecture.
        pretrained: start the backbone from the packaged ImageNet weights, or the
            whole detector from ``config.pretrained_checkpoint`` when it is set
            (training); ``False`` builds random weights to load an artifact into.
    """

    def __init__(self, config: DefectLocalizerConfig, pretrained: bool = True) -> None:
        # transformers loads here, not on import: a training worker or command that
        # never builds a localizer starts sooner.
        from transformers import Deimv2ForObjectDetection

        super().__init__()
        self.config = config
        self.preprocessing = config.preprocessing()
        if pretrained and config.pretrained_checkpoint:
            self.detector = Deimv2ForObjectDetection.from_pretrained(
                config.pretrained_checkpoint,
                config=config.deimv2_config(),
                ignore_mismatched_sizes=True,
            )
        else:
            self.detector = Deimv2ForObjectDetection(config.deimv2_config())
            if pretrained and config.backbone == EFFICIENTNET_LITE0:
                self._load_imagenet_backbone()
        if config.backbone == EFFICIENTNET_LITE0:
            timm_model = self.backbone
            self.freeze(
                timm_model.conv_stem, timm_model.bn1, *timm_model.blocks[: config.freeze_stages]
            )

    @property
    def backbone(self) -> nn.Module:
        """The backbone network inside the detector (timm or HGNetV2)."""
        backbone = self.detector.model.conv_encoder.model
        return getattr(backbone, "_backbone", backbone)

    def _load_imagenet_backbone(self) -> None:
        classifier, _ = create_backbone(EFFICIENTNET_LITE0, pretrained=True, num_classes=0)
        features = self.backbone.state_dict()
        weights = {k: v for k, v in classifier.state_dict().items() if k in features}
        missing = sorted(set(features) - set(weights))
        if missing:
            raise RuntimeError(f"ImageNet weights lack backbone tensors: {missing[:5]}")
        self.backbone.load_state_dict(weights, strict=True)

    def train(self, mode: bool = True) -> Self:
        """Set the training mode; the backbone's batch norms keep their statistics.

        Detection batches are small and correlated; the ImageNet statistics are
        steadier than batch statistics (and eval-mode batch norm is cheaper on CPU).
        """
        super().train(mode)
        if self.config.backbone == EFFICIENTNET_LITE0:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder and decoder: every trainable parameter outside the backbone."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        return (
            p for p in self.detector.parameters() if p.requires_grad and id(p) not in in_backbone
        )

    def forward(
        self, images: torch.Tensor, labels: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> Any:
        """The detector's output (``loss`` too when ``labels`` are given).

        Args:
            images: ``(B, 3, S, S)`` normalized model inputs.
            labels: per image, ``class_labels`` ``(n,)`` int64 and ``boxes``
                ``(n, 4)`` normalized ``(cx, cy, w, h)``.

        Returns:
            ``Deimv2ObjectDetectionOutput``: ``logits`` ``(B, Q, C)``, ``pred_boxes``
            ``(B, Q, 4)`` normalized ``(cx, cy, w, h)``, and ``loss``/``loss_dict``.
        """
        return self.detector(pixel_values=images, labels=None if labels is None else list(labels))

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        score_threshold: float | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Detections]:
        """The defects in a batch of model inputs, best first.

        Args:
            images: ``(B, 3, S, S)`` normalized model inputs.
            score_threshold: minimum score (default: the config's).
            image_sizes: ``(height, width)`` of each original image, to return boxes
                in its pixels (undoing the preprocessing's resize and center crop).

        Returns:
            One :class:`Detections` per image.
        """
        return self.detections(self(images), score_threshold, image_sizes)

    def detections(
        self,
        output: Any,
        score_threshold: float | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Detections]:
        """:meth:`predict`'s post-processing of a :meth:`forward` output.

        Each query scores every defect type (sigmoid); the best ``max_detections``
        (query, type) pairs of an image are its candidates, as in RT-DETR. Those
        above the threshold go through class-wise non-maximum suppression: DETR's
        one-to-one matching leaves near-duplicates when it is undertrained.
        """
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        scores = output.logits.float().sigmoid()  # (B, Q, C)
        n_classes = scores.shape[-1]
        k = min(self.config.max_detections, scores.shape[1] * n_classes)
        top, index = scores.flatten(1).topk(k, dim=1)  # (B, k)
        labels, query = index % n_classes, index // n_classes
        cx, cy, w, h = output.pred_boxes.float().unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
        corners = corners.gather(1, query[..., None].expand(-1, -1, 4))  # (B, k, 4)
        results = []
        for i in range(scores.shape[0]):
            keep = torch.nonzero(top[i] >= threshold).squeeze(1)
            if self.config.nms_iou < 1.0 and len(keep) > 1:
                # batched_nms returns the survivors best first, as topk ordered them.
                kept = batched_nms(
                    corners[i][keep], top[i][keep], labels[i][keep], self.config.nms_iou
                )
                keep = keep[kept]
            boxes = corners[i][keep]
            if image_sizes is not None:
                boxes = self.to_image_pixels(boxes, image_sizes[i])
            names = tuple(self.config.defect_types[j] for j in labels[i][keep].tolist())
            results.append(Detections(boxes.cpu(), top[i][keep].cpu(), names))
        return results

    def to_image_pixels(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Normalized model-input ``xyxy`` boxes → pixels of the original image."""
        scale, offset_x, offset_y = input_geometry(self.preprocessing, image_size)
        size = self.preprocessing.input_size
        offset = boxes.new_tensor([offset_x, offset_y, offset_x, offset_y])
        return (boxes * size + offset) / scale


def input_geometry(preprocessing: Preprocessing, image_size: tuple[int, int]) -> tuple[float, ...]:
    """How an original image maps into the model input.

    Returns:
        ``(scale, offset_x, offset_y)``: an original pixel ``p`` lands at
        ``p * scale - offset`` in the model input (resize of the shorter side, then
        the center crop).
    """
    height, width = image_size
    scale = preprocessing.resize / min(height, width)
    size = preprocessing.input_size
    return scale, (width * scale - size) / 2, (height * scale - size) / 2


def box_targets(
    boxes_xywh: Sequence[Sequence[float]],
    class_labels: Sequence[int],
    image_size: tuple[int, int],
    preprocessing: Preprocessing,
) -> dict[str, torch.Tensor]:
    """Pixel ``(x, y, w, h)`` boxes of an original image → the detector's training target.

    Boxes are clipped to the model input's crop; those left empty are dropped.

    Returns:
        ``class_labels`` ``(n,)`` int64 and ``boxes`` ``(n, 4)`` normalized ``(cx, cy, w, h)``.
    """
    scale, offset_x, offset_y = input_geometry(preprocessing, image_size)
    size = preprocessing.input_size
    kept_boxes, kept_labels = [], []
    for (x, y, w, h), label in zip(boxes_xywh, class_labels, strict=True):
        x0 = min(max((x * scale - offset_x) / size, 0.0), 1.0)
        y0 = min(max((y * scale - offset_y) / size, 0.0), 1.0)
        x1 = min(max(((x + w) * scale - offset_x) / size, 0.0), 1.0)
        y1 = min(max(((y + h) * scale - offset_y) / size, 0.0), 1.0)
        if x1 - x0 > 1e-4 and y1 - y0 > 1e-4:
            kept_boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
            kept_labels.append(int(label))
    return {
        "class_labels": torch.tensor(kept_labels, dtype=torch.int64),
        "boxes": torch.tensor(kept_boxes, dtype=torch.float32).reshape(-1, 4),
    }
