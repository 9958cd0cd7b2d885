"""What each stage computes for a batch of decoded images, in plain PyTorch.

The Serve deployments (:mod:`deployments.stages`) wrap these functions with
batching and model multiplexing; anything else that needs a stage's answer in
the serving format (a process running every stage itself, tests) calls them
directly, so the two cannot drift. Each function takes a loaded stage and a
list of PIL images and returns one JSON-ready dict per image, with the
stage's share of the batch's time in ``latency_ms``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from deployments.imaging import encode_heatmap
from models.descriptions import DefectDescription, DescriptionCatalog
from models.pipeline import batched_inputs
from models.stages import LoadedStage


def _per_image_ms(started: float, n: int) -> float:
    return (time.perf_counter() - started) * 1000.0 / max(n, 1)


def detect(
    stage: LoadedStage, images: Sequence[Image.Image], explain: Sequence[bool]
) -> list[dict[str, Any]]:
    """The anomaly probability of each image, and its Grad-CAM heatmap where asked.

    Grad-CAM needs gradients, so a batch with any image to explain is run with
    them once for all its images; only the asked-for heatmaps are encoded.

    Returns:
        ``{"probability", "heatmap_png" (base64 PNG at the image's size, or None),
        "latency_ms"}`` per image.
    """
    started = time.perf_counter()
    inputs = batched_inputs(stage.model, images)
    if any(explain):
        output = stage.model.predict(inputs, explain=True)
    else:
        with torch.inference_mode():
            output = stage.model.predict(inputs)
    probabilities = output.probability.detach().cpu().tolist()
    answers = []
    for i, (image, probability) in enumerate(zip(images, probabilities, strict=True)):
        heatmap = None
        if explain[i] and output.heatmap is not None:
            heatmap = encode_heatmap(output.heatmap[i].detach().cpu().numpy(), image.size)
        answers.append({"probability": float(probability), "heatmap_png": heatmap})
    ms = _per_image_ms(started, len(images))
    return [answer | {"latency_ms": ms} for answer in answers]


def verify(stage: LoadedStage, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """The autoencoder verifier's calibrated score of each image."""
    started = time.perf_counter()
    with torch.inference_mode():
        output = stage.model.predict(batched_inputs(stage.model, images))
    ms = _per_image_ms(started, len(images))
    return [{"score": float(s), "latency_ms": ms} for s in output.score.cpu().tolist()]


def route(stage: LoadedStage, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """The category the router names for each image, with its probability."""
    started = time.perf_counter()
    with torch.inference_mode():
        output = stage.model.predict(batched_inputs(stage.model, images))
    ms = _per_image_ms(started, len(images))
    return [
        {"category": name, "confidence": float(p.max()), "latency_ms": ms}
        for name, p in zip(output.categories, output.probabilities, strict=True)
    ]


def classify(stage: LoadedStage, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """The defect classifier's scores of each image.

    Returns:
        ``{"defect_scores": {type: p} (renormalised over its defect types),
        "ranked": [[type, p], ...] best first, "class_scores": {class: p},
        "latency_ms"}`` per image.
    """
    started = time.perf_counter()
    model = stage.model
    with torch.inference_mode():
        output = model.predict(batched_inputs(model, images))
    scores = output.scores.cpu()
    defect = model.defect_scores(scores).tolist()
    ranked = model.rank_defects(scores)
    ms = _per_image_ms(started, len(images))
    names = model.config.defect_types
    return [
        {
            "defect_scores": dict(zip(names, row, strict=True)),
            "ranked": [[name, float(score)] for name, score in types],
            "class_scores": dict(zip(model.config.classes, all_scores, strict=True)),
            "latency_ms": ms,
        }
        for row, types, all_scores in zip(defect, ranked, scores.tolist(), strict=True)
    ]


def localize(stage: LoadedStage, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """The localizer's boxes in each image's own pixels, best first."""
    started = time.perf_counter()
    model = stage.model
    sizes = [(image.height, image.width) for image in images]
    with torch.inference_mode():
        found = model.predict(batched_inputs(model, images), image_sizes=sizes)
    ms = _per_image_ms(started, len(images))
    return [
        {
            "boxes": [
                {"defect_type": label, "score": float(score), "box": [float(v) for v in box]}
                for label, score, box in zip(
                    detections.labels, detections.scores.tolist(), detections.boxes, strict=True
                )
            ],
            "latency_ms": ms,
        }
        for detections in found
    ]


def catalog_key(registered: Sequence[Mapping[str, Any]]) -> str:
    """A short fingerprint of a set of registered descriptions."""
    text = json.dumps(sorted(registered, key=lambda d: d["name"]), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TypeTexts:
    """The reranker's description embeddings per (model, registered set), computed once.

    Registered descriptions come with each request (from Redis, through the
    router), so every replica ranks the same types without being told apart.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[tuple[str, str], tuple[tuple[str, ...], torch.Tensor]] = {}
        self.max_entries = max_entries

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


def reranker_catalog(
    stage: LoadedStage, registered: Sequence[Mapping[str, Any]]
) -> DescriptionCatalog:
    """The reranker's trained descriptions, then the registered ones (which may replace)."""
    catalog = stage.model.config.catalog()
    for item in registered:
        catalog.register(DefectDescription.from_dict(dict(item)))
    return catalog


def rerank(
    stage: LoadedStage,
    model_id: str,
    images: Sequence[Image.Image],
    classifier_scores: Sequence[Mapping[str, float] | None],
    registered: Sequence[Sequence[Mapping[str, Any]]],
    texts: TypeTexts,
) -> list[dict[str, Any]]:
    """Each image's defect types reordered by ``w·classifier + (1-w)·CLIP``.

    Args:
        stage: the category's reranker.
        model_id: its multiplexed id (keys the description-embedding cache).
        images: the images.
        classifier_scores: each image's classifier defect scores (its own types),
            or None when the category has no classifier (CLIP ranks alone).
        registered: each image's registered descriptions (usually all the same).
        texts: the embedding cache.

    Returns:
        ``{"ranked": [[type, score], ...] best first, "latency_ms"}`` per image.
    """
    started = time.perf_counter()
    model = stage.model
    with torch.inference_mode():
        image_embeddings = model.encode_images(batched_inputs(model, images))
    answers: list[dict[str, Any]] = []
    for i in range(len(images)):
        names, text_embeddings = texts.get(model_id, stage, registered[i])
        with torch.inference_mode():
            clip = model.logits(image_embeddings[i : i + 1], text_embeddings).softmax(-1).cpu()
        own = classifier_scores[i]
        fused_input = known = None
        if own is not None:
            known = torch.tensor([name in own for name in names])
            fused_input = torch.tensor([[own.get(name, 0.0) for name in names]])
        fused = model.fuse(fused_input, clip, known)[0].tolist()
        ranked = sorted(zip(names, fused, strict=True), key=lambda pair: -pair[1])
        answers.append({"ranked": [[name, float(score)] for name, score in ranked]})
    ms = _per_image_ms(started, len(images))
    return [answer | {"latency_ms": ms} for answer in answers]
