"""What each stage computes for a batch of decoded images.

The networks run in the stage's runtime (torch, or the exported ONNX Runtime
forward pass of :mod:`models.runtime`); what they output becomes answers in torch.

One function per stage takes the loaded model and a list of PIL images and
returns one typed answer per image (:mod:`models.inspection.answers`), with the
stage's share of the batch's time in ``latency_ms``. The Serve deployments wrap
them with ``@serve.batch`` and model multiplexing; evaluation and the baseline
call them in this process (:class:`~models.inspection.local.LocalStageCalls`):
the same code answers in both.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from models.descriptions import DefectDescription, DescriptionCatalog
from models.inspection.answers import (
    Banked,
    Box,
    Classified,
    Detected,
    Located,
    RankedType,
    Reranked,
    Routed,
    Verified,
)
from models.stages import LoadedStage


def batched_inputs(model: torch.nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """The images as one channels-last batch ``(B, 3, S, S)``, by the model's own preprocessing.

    Each image is cropped and resized on its own, in 8 bits; the batch is then
    moved and normalized at once (the same values as image by image).
    """
    preprocessing = model.preprocessing
    geometry = preprocessing.geometry()
    device = next(model.parameters()).device
    batch = preprocessing.normalize(torch.stack([geometry(image) for image in images]).to(device))
    return batch.contiguous(memory_format=torch.channels_last)


def _per_image_ms(started: float, n: int) -> float:
    return (time.perf_counter() - started) * 1000.0 / max(n, 1)


def route(
    stage: LoadedStage, images: Sequence[Image.Image], allowed: Collection[str] | None = None
) -> list[Routed]:
    """The category the router names for each image, among ``allowed`` (those with models)."""
    started = time.perf_counter()
    with torch.inference_mode():
        output = stage.model.answer(stage.forward(batched_inputs(stage.model, images)), allowed)
    ms = _per_image_ms(started, len(images))
    return [
        Routed(name, float(p.max()), ms)
        for name, p in zip(output.categories, output.probabilities, strict=True)
    ]


def detect(
    stage: LoadedStage, images: Sequence[Image.Image], explain: Sequence[bool]
) -> list[Detected]:
    """The anomaly probability of each image, and its Grad-CAM heatmap where asked.

    Grad-CAM needs gradients, so a batch with any image to explain is run with
    them once for all its images, in torch (whatever the stage's runtime); only
    the asked-for heatmaps are kept.
    """
    started = time.perf_counter()
    inputs = batched_inputs(stage.model, images)
    if any(explain):
        output = stage.model.predict(inputs, explain=True)
    else:
        with torch.inference_mode():
            output = stage.model.answer(stage.forward(inputs))
    probabilities = output.probability.detach().cpu().tolist()
    heatmaps = output.heatmap.detach().cpu().numpy() if output.heatmap is not None else None
    ms = _per_image_ms(started, len(images))
    return [
        Detected(float(p), heatmaps[i] if explain[i] and heatmaps is not None else None, ms)
        for i, p in enumerate(probabilities)
    ]


def score_patches(
    stage: LoadedStage, images: Sequence[Image.Image], with_map: Sequence[bool]
) -> list[Banked]:
    """The memory bank's calibrated score of each image, and its anomaly map where asked."""
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = batched_inputs(stage.model, images)
        output = stage.model.answer(stage.forward(inputs), maps=any(with_map))
    maps = output.anomaly_map.cpu().numpy() if any(with_map) else None
    ms = _per_image_ms(started, len(images))
    return [
        Banked(float(s), maps[i] if with_map[i] and maps is not None else None, ms)
        for i, s in enumerate(output.score.cpu().tolist())
    ]


def verify(stage: LoadedStage, images: Sequence[Image.Image]) -> list[Verified]:
    """The autoencoder verifier's calibrated score and error map of each image."""
    started = time.perf_counter()
    with torch.inference_mode():
        output = stage.model.answer(stage.forward(batched_inputs(stage.model, images)))
    maps = output.error_map.cpu().numpy()
    ms = _per_image_ms(started, len(images))
    return [Verified(float(s), maps[i], ms) for i, s in enumerate(output.score.cpu().tolist())]


def classify(stage: LoadedStage, images: Sequence[Image.Image]) -> list[Classified]:
    """The defect classifier's ranking, class scores and embedding of each image."""
    started = time.perf_counter()
    model = stage.model
    with torch.inference_mode():
        output = model.answer(stage.forward(batched_inputs(model, images)))
    scores = output.scores.cpu()
    ranked = model.rank_defects(scores)
    embeddings = output.embedding.cpu().numpy()
    ms = _per_image_ms(started, len(images))
    return [
        Classified(
            tuple(RankedType(name, float(score)) for name, score in types),
            dict(zip(model.config.classes, row, strict=True)),
            embedding,
            ms,
        )
        for types, row, embedding in zip(ranked, scores.tolist(), embeddings, strict=True)
    ]


def localize(stage: LoadedStage, images: Sequence[Image.Image]) -> list[Located]:
    """The localizer's boxes in each image's own pixels, best first."""
    started = time.perf_counter()
    model = stage.model
    sizes = [(image.height, image.width) for image in images]
    with torch.inference_mode():
        found = model.predict(batched_inputs(model, images), image_sizes=sizes)
    ms = _per_image_ms(started, len(images))
    return [
        Located(
            tuple(
                Box(label, float(score), tuple(float(v) for v in box))  # type: ignore[arg-type]
                for label, score, box in zip(
                    detections.labels, detections.scores.tolist(), detections.boxes, strict=True
                )
            ),
            ms,
        )
        for detections in found
    ]


def catalog_key(registered: Sequence[Mapping[str, Any]]) -> str:
    """A short fingerprint of a set of registered descriptions."""
    text = json.dumps(sorted(registered, key=lambda d: d["name"]), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reranker_catalog(
    stage: LoadedStage, registered: Sequence[Mapping[str, Any]]
) -> DescriptionCatalog:
    """The reranker's trained descriptions, then the registered ones (which may replace)."""
    catalog = stage.model.config.catalog()
    for item in registered:
        catalog.register(DefectDescription.from_dict(dict(item)))
    return catalog


class TypeTexts:
    """The reranker's description embeddings per (model, registered set), computed once.

    Registered descriptions come with each call, so every replica ranks the
    same types without being told apart.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[tuple[str, str], tuple[tuple[str, ...], torch.Tensor]] = {}
        self.max_entries = max_entries

    def has(self, model_id: str, registered: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the embeddings of this model and registered set are computed already."""
        return (model_id, catalog_key(registered)) in self._entries

    def get(
        self, model_id: str, stage: LoadedStage, registered: Sequence[Mapping[str, Any]]
    ) -> tuple[tuple[str, ...], torch.Tensor]:
        """The type names in catalog order and their ``(N, D)`` unit embeddings."""
        key = (model_id, catalog_key(registered))
        if key not in self._entries:
            catalog = reranker_catalog(stage, registered)
            with torch.inference_mode():
                texts = stage.model.type_embeddings(catalog)
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (catalog.names, texts)
        return self._entries[key]


def rerank(
    stage: LoadedStage,
    model_id: str,
    images: Sequence[Image.Image],
    classifier_scores: Sequence[Mapping[str, float] | None],
    registered: Sequence[Sequence[Mapping[str, Any]]],
    texts: TypeTexts,
) -> list[Reranked]:
    """Each image's defect types reordered by ``w·classifier + (1-w)·CLIP``.

    A type the classifier was not trained on (registered by description) is
    scored by CLIP alone, and one CLIP has no description of (taught to the
    classifier from reviews) by the classifier alone
    (:func:`~models.reranker.fuse_scores`).

    Args:
        stage: the category's reranker.
        model_id: its multiplexed id (keys the description-embedding cache).
        images: the images.
        classifier_scores: each image's classifier defect scores (its own types),
            or None when the category has no classifier (CLIP ranks alone).
        registered: each image's registered descriptions (usually all the same).
        texts: the embedding cache.
    """
    started = time.perf_counter()
    model = stage.model
    with torch.inference_mode():
        image_embeddings = stage.forward(batched_inputs(model, images)).float()
    answers = []
    for i in range(len(images)):
        names, text_embeddings = texts.get(model_id, stage, registered[i])
        with torch.inference_mode():
            clip = model.logits(image_embeddings[i : i + 1], text_embeddings).softmax(-1).cpu()
        own = classifier_scores[i]
        fused_input = known = described = None
        if own is not None:
            undescribed = [name for name in own if name not in names]
            names = (*names, *undescribed)
            clip = torch.cat([clip, clip.new_zeros(1, len(undescribed))], dim=1)
            described = torch.arange(len(names)) < clip.shape[1] - len(undescribed)
            known = torch.tensor([name in own for name in names])
            fused_input = torch.tensor([[own.get(name, 0.0) for name in names]])
        fused = model.fuse(fused_input, clip, known, described=described)[0].tolist()
        ranked = sorted(zip(names, fused, strict=True), key=lambda pair: -pair[1])
        answers.append(tuple(RankedType(name, float(score)) for name, score in ranked))
    ms = _per_image_ms(started, len(images))
    return [Reranked(ranked, ms) for ranked in answers]
