"""The exported runtime: ONNX Runtime answers as torch does, or the version stays in torch."""

import pytest
import torch

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from models.artifacts import ArtifactError
from models.inspection import compute
from models.inspection.compute import batched_inputs
from models.runtime import ONNX_FILE, export_runtime, runtime_record
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    SHARED_CATEGORY,
    VERIFIER,
    load_stage,
)
from tests.tiny_models import (
    SIZE,
    add_classifier,
    add_memory_bank,
    add_reranker,
    random_images,
    save,
)


def _export(registry, category, stage, images, **options):
    loaded = load_stage(registry, category, stage)
    inputs = batched_inputs(loaded.model, images).contiguous()
    return export_runtime(registry, loaded.manifest, loaded.model, inputs, **options)


@pytest.mark.parametrize(
    ("category", "stage"),
    [
        ("sure", DETECTOR),
        ("unsure", VERIFIER),
        ("sure", CLASSIFIER),
        (SHARED_CATEGORY, ROUTER),
        ("sure", RERANKER),
    ],
)
def test_an_export_answers_as_torch_does_and_is_served(registry, images, category, stage):
    if stage == CLASSIFIER:
        add_classifier(registry, category)
    if stage == RERANKER:
        add_reranker(registry, category, fusion_weight=0.5)
    if stage == DETECTOR:  # a head that tells images apart, not a constant
        loaded = load_stage(registry, category, stage)
        torch.manual_seed(0)
        torch.nn.init.normal_(loaded.model.head[1].weight, std=0.02)
        torch.nn.init.zeros_(loaded.model.head[1].bias)
        registry.save(
            category,
            stage,
            loaded.model.state_dict(),
            config=loaded.manifest.config,
            preprocessing=loaded.manifest.preprocessing,
            data={},
            promote=True,
        )
    record = _export(registry, category, stage, images)
    assert record["accepted"] and record["max_abs_diff"] <= 1e-4, record
    assert record["images"] == len(images) and set(record["ms_per_image"]) == {
        "torch",
        "onnxruntime",
    }
    torch_stage = load_stage(registry, category, stage)
    served = load_stage(registry, category, stage, runtime="onnxruntime")
    assert torch_stage.runtime is None and served.runtime is not None
    inputs = batched_inputs(served.model, images)
    with torch.inference_mode():
        ours = torch_stage.model.answer(torch_stage.forward(inputs)).probabilities
        theirs = served.model.answer(served.forward(inputs)).probabilities
    assert float((ours - theirs).abs().max()) <= 1e-4
    if stage == RERANKER:  # served: the same ranking, a registered type included
        registered = [{"name": "stain", "description": "a dark blot on the surface"}]
        scores = [{"crack": 0.7, "scratch": 0.3}] * len(images)
        ranked = [
            compute.rerank(s, "sure@1", images, scores, [registered] * len(images), texts)
            for s, texts in ((torch_stage, compute.TypeTexts()), (served, compute.TypeTexts()))
        ]
        for ours_ranked, theirs_ranked in zip(*ranked, strict=True):
            ours_scores = {t.name: t.score for t in ours_ranked.ranked}
            theirs_scores = {t.name: t.score for t in theirs_ranked.ranked}
            assert set(ours_scores) == set(theirs_scores) == {"crack", "scratch", "stain"}
            assert all(abs(ours_scores[n] - theirs_scores[n]) <= 1e-4 for n in ours_scores)
    if stage == DETECTOR:
        assert float(ours.std()) > 1e-3  # the check compared answers that differ
        answers = compute.detect(served, images, [False] * (len(images) - 1) + [True])
        assert answers[-1].heatmap is not None  # explained in torch


def test_a_refused_export_is_served_in_torch_and_a_changed_file_is_refused(registry, images):
    record = _export(registry, "sure", DETECTOR, images, tolerance=-1.0)  # nothing passes
    assert not record["accepted"]
    assert load_stage(registry, "sure", DETECTOR, runtime="onnxruntime").runtime is None
    manifest = _export(registry, "sure", DETECTOR, images) and registry.manifest("sure", DETECTOR)
    assert runtime_record(registry, manifest)["accepted"]
    blob = registry.read_extra(manifest, ONNX_FILE)
    registry.write_extra(manifest, ONNX_FILE, blob[:-8] + b"tampered")
    with pytest.raises(ArtifactError, match="does not match its record"):
        load_stage(registry, "sure", DETECTOR, runtime="onnxruntime")
    with pytest.raises(ArtifactError, match="unknown runtime"):
        load_stage(registry, "sure", DETECTOR, runtime="tensorrt")
    with pytest.raises(ArtifactError, match="beside an artifact"):
        registry.write_extra(manifest, "weights.safetensors", b"")


def test_a_gem_pooled_detector_exports_and_is_served(registry, images):
    torch.manual_seed(0)
    config = AnomalyDetectorConfig(input_size=SIZE, pooling="gem", test_flips=True)
    model = AnomalyDetector(config, pretrained=False)
    torch.nn.init.normal_(model.head[1].weight, std=0.02)
    save(registry, "sure", DETECTOR, model)
    record = _export(registry, "sure", DETECTOR, images)
    assert record["accepted"] and record["max_abs_diff"] <= 1e-4, record
    served = load_stage(registry, "sure", DETECTOR, runtime="onnxruntime")
    assert served.runtime is not None and served.model.config.pooling == "gem"
    inputs = batched_inputs(served.model, images)
    with torch.inference_mode():
        theirs = served.model.answer(served.forward(inputs)).probabilities
        ours = model.eval().answer(model(inputs)).probabilities
    assert float(ours.std()) > 1e-3 and float((ours - theirs).abs().max()) <= 1e-4


def test_a_memory_bank_exports_with_its_search_and_answers_any_batch_as_torch(registry):
    # Exported at a batch of two: the nearest-neighbour search and the score's
    # reweighting must still answer batches of one and of seven as torch does.
    add_memory_bank(registry, "sure")
    images = random_images(7)
    record = _export(registry, "sure", MEMORY_BANK, images)
    assert record["accepted"] and record["max_abs_diff"] <= 1e-4, record
    torch_stage = load_stage(registry, "sure", MEMORY_BANK)
    served = load_stage(registry, "sure", MEMORY_BANK, runtime="onnxruntime")
    assert served.runtime is not None
    for batch in (images[:1], images):
        inputs = batched_inputs(served.model, batch)
        with torch.inference_mode():
            ours = torch_stage.model.answer(torch_stage.forward(inputs))
            theirs = served.model.answer(served.forward(inputs))
        assert float((ours.score - theirs.score).abs().max()) <= 1e-4
        assert float((ours.anomaly_map - theirs.anomaly_map).abs().max()) <= 1e-4
    assert float(ours.raw_score.std()) > 0  # the images' scores differ: a real comparison
    answers = compute.score_patches(served, images, [True] * len(images))
    assert all(a.anomaly_map is not None and a.anomaly_map.shape == (SIZE, SIZE) for a in answers)
