"""The inspection flow on real (small, untrained) models in a real registry, in this process.

The registry (:func:`tests.tiny_models.band_registry`): a detector whose
probability is fixed (0.95 "sure", outside the band; 0.55 "unsure", inside it),
a verifier that calls everything good, and a router that always says "unsure".
"""

import asyncio
import math

import pytest
import torch
import torch.nn.functional as F

from models.artifacts import ArtifactError
from models.defect_classifier import DefectClassifier, DefectClassifierConfig
from models.descriptions import BUILTIN
from models.inspection import (
    Coverage,
    InspectionRefused,
    InspectionRequest,
    LocalInspector,
    inspect,
)
from models.inspection.local import LocalStageCalls
from models.inspection.plan import load_plan
from models.stages import RERANKER
from tests.tiny_models import SIZE, add_classifier, add_localizer, add_reranker, detector, save


def _stages(inspection):
    return [run.stage for run in inspection.trace]


def test_outside_the_band_the_detector_decides_alone(registry, images):
    inspector = LocalInspector(registry)
    assert inspector.categories == ["sure", "unsure"]
    for result in inspector.inspect_images(images, ["sure"] * 3, explain=True):
        assert result.verdict == "defective" and result.decided_by == "detector"
        assert result.verified is None and result.verifier_score is None
        assert _stages(result) == ["detector"]
        assert result.trace[0].output == {"probability": pytest.approx(0.95), "in_band": False}
        assert result.anomaly_score == pytest.approx(0.95, abs=1e-4)
        assert result.detected.heatmap.shape == (SIZE, SIZE)  # asked for
        assert result.model_versions["detector"] == "v1" and result.routed is None


def test_inside_the_band_the_verifier_runs_and_overrules(registry, images):
    for result in LocalInspector(registry).inspect_images(images, ["unsure"] * 3):
        # The detector alone would say defective (0.55 >= 0.5); the verifier says good.
        assert result.verdict == "ok" and result.decided_by == "verifier"
        assert result.verifier_score == pytest.approx(1 / (1 + math.exp(5)), rel=1e-3)
        assert _stages(result) == ["detector", "verifier"]
        assert 0.4 <= result.anomaly_score <= 0.6
        assert result.trace[1].model_version == "v1"
        assert result.detected.heatmap is None  # not asked for
        assert result.verified.error_map.ndim == 2


def test_without_a_category_the_router_names_it_among_those_with_models(registry, images):
    results = LocalInspector(registry).inspect_images(images, [None, "sure", None])
    assert [r.category for r in results] == ["unsure", "sure", "unsure"]
    assert [r.routed is not None for r in results] == [True, False, True]
    assert _stages(results[0])[:2] == ["router", "detector"]
    assert results[0].trace[0].output["category"] == "unsure"


def test_defective_parts_get_ranked_types_and_evaluation_types_every_part(registry, images):
    add_classifier(registry, "sure")
    add_classifier(registry, "unsure")
    inspector = LocalInspector(registry)
    for result in inspector.inspect_images(images, ["sure"] * 3):
        assert result.verdict == "defective"
        assert sorted(t.name for t in result.defect_types) == ["crack", "scratch"]
        assert sum(t.score for t in result.defect_types) == pytest.approx(1.0)
        assert set(result.classified.class_scores) == {"good", "crack", "scratch"}
        assert _stages(result) == ["detector", "classifier"]
        assert result.trace[-1].output["defect_type"] == result.defect_types[0].name
    # Parts judged ok are not typed...
    served = inspector.inspect_images(images, ["unsure"] * 3)
    assert all(r.verdict == "ok" and not r.defect_types and r.classified is None for r in served)
    # ...unless evaluation asks for every part: the answer stays the same.
    graded = LocalInspector(registry, coverage=Coverage.TYPE_ALL).inspect_images(
        images, ["unsure"] * 3
    )
    for plain, typed in zip(served, graded, strict=True):
        assert typed.verdict == plain.verdict and typed.defect_types == ()
        assert [(r.stage, r.output) for r in typed.trace] == [
            (r.stage, r.output) for r in plain.trace
        ]
        assert [run.stage for run in typed.also_ran] == ["classifier"]
        assert len(typed.ranking) == 2 and typed.classified.predicted_class


def _clip_probabilities(inspector, images, *registered):
    """CLIP's probabilities of ``images`` over the reranker's types, plus ``registered``."""
    reranker = inspector.calls.model(
        "reranker", inspector.plan.categories["sure"].model_id("reranker")
    )
    catalog = reranker.model.config.catalog()
    for description in registered:
        catalog.register(description)
    texts = reranker.model.type_embeddings(catalog)
    transform = reranker.model.preprocessing.transform()
    return reranker.model.text_probabilities(torch.stack([transform(i) for i in images]), texts)


def test_the_reranker_reorders_and_ranks_types_known_only_by_description(registry, images):
    add_classifier(registry, "sure")
    add_reranker(registry, "sure", fusion_weight=1.0)
    inspector = LocalInspector(registry)
    # Weight 1: the classifier's order is kept.
    for result in inspector.inspect_images(images, ["sure"] * 3):
        assert _stages(result) == ["detector", "classifier", "reranker"]
        assert [t.name for t in result.defect_types] == [t.name for t in result.classified.ranked]
        assert result.trace[-1].output["classifier_defect_type"] == result.defect_types[0].name
        assert result.descriptions[result.defect_types[0].name] == (
            BUILTIN[result.defect_types[0].name].description
        )
    # A type registered with words only: the classifier abstains, CLIP scores it.
    inspector.register_description("sure", BUILTIN["perforation"])
    clip = _clip_probabilities(inspector, images, BUILTIN["perforation"])
    for result, row in zip(inspector.inspect_images(images, ["sure"] * 3), clip, strict=True):
        scores = {t.name: t.score for t in result.defect_types}
        assert set(scores) == {"crack", "scratch", "perforation"}
        known = result.classified.defect_scores
        raw = [known["crack"], known["scratch"], float(row[2])]
        expected = torch.tensor(raw) / sum(raw)
        got = torch.tensor([scores["crack"], scores["scratch"], scores["perforation"]])
        assert torch.allclose(got, expected, atol=1e-5)
        assert result.descriptions["perforation"] == BUILTIN["perforation"].description
    with pytest.raises(ArtifactError, match="no reranker"):
        inspector.register_description("unsure", BUILTIN["perforation"])
    with pytest.raises(ArtifactError, match="unknown category"):
        inspector.register_description("nope", BUILTIN["perforation"])


def test_a_type_the_reranker_has_no_words_for_is_ranked_by_the_classifier_alone(registry, images):
    # Reviewers taught the classifier "smudge"; the reranker knows crack and scratch.
    classes = ("good", "crack", "scratch", "smudge")
    classifier = DefectClassifier(
        DefectClassifierConfig(classes, classes[1:], input_size=SIZE), pretrained=False
    )
    torch.manual_seed(1)
    classifier.fit_prototypes(F.normalize(torch.randn(4, 128), dim=-1), torch.arange(4))
    save(registry, "sure", "classifier", classifier)
    add_reranker(registry, "sure", fusion_weight=0.5)
    inspector = LocalInspector(registry)
    clip = _clip_probabilities(inspector, images)
    for result, row in zip(inspector.inspect_images(images, ["sure"] * 3), clip, strict=True):
        scores = {t.name: t.score for t in result.defect_types}
        assert set(scores) == {"crack", "scratch", "smudge"}
        own = result.classified.defect_scores
        raw = [0.5 * own["crack"] + 0.5 * float(row[0]), 0.5 * own["scratch"] + 0.5 * float(row[1])]
        raw.append(own["smudge"])
        expected = torch.tensor(raw) / sum(raw)
        got = torch.tensor([scores["crack"], scores["scratch"], scores["smudge"]])
        assert torch.allclose(got, expected, atol=1e-5)


def test_boxes_locate_the_defects_of_defective_parts_when_asked(registry, images):
    with pytest.raises(InspectionRefused, match="no defect localizer"):
        LocalInspector(registry).inspect_images(images, ["sure"] * 3, boxes=True)
    add_localizer(registry)
    inspector = LocalInspector(registry)
    found = inspector.inspect_images(images, ["sure"] * 3, boxes=True)
    for image, result in zip(images, found, strict=True):
        assert len(result.boxes) == 5 and _stages(result)[-1] == "localizer"
        scores = [box.score for box in result.boxes]
        assert scores == sorted(scores, reverse=True)
        for box in result.boxes:
            x0, y0, x1, y1 = box.box
            assert box.defect_type in ("crack", "scratch")
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
    # Parts judged ok are not localized, and boxes are only drawn when asked for.
    ok = inspector.inspect_images(images, ["unsure"] * 3, boxes=True)
    assert all(not r.boxes and "localizer" not in _stages(r) for r in ok)
    assert all(not r.boxes for r in inspector.inspect_images(images, ["sure"] * 3))


def test_every_stage_coverage_runs_everything_and_answers_the_same(registry, images):
    for category in ("sure", "unsure"):
        add_classifier(registry, category)
    add_reranker(registry, "sure", fusion_weight=0.5)
    add_localizer(registry)
    served = LocalInspector(registry)
    everything = LocalInspector(registry, coverage=Coverage.EVERY_STAGE)
    for category, ran in (
        ("sure", ["detector", "verifier", "classifier", "localizer", "reranker"]),
        ("unsure", ["detector", "verifier", "classifier", "localizer"]),
    ):
        for plain, full in zip(
            served.inspect_images(images, [category] * 3),
            everything.inspect_images(images, [category] * 3),
            strict=True,
        ):
            assert full.stages_run == ran and len(plain.stages_run) < len(ran)
            assert full.verdict == plain.verdict and full.decided_by == plain.decided_by
            assert full.anomaly_score == pytest.approx(plain.anomaly_score, abs=1e-6)
            assert _stages(full) == _stages(plain)
            assert [t.name for t in full.defect_types] == [t.name for t in plain.defect_types]
            assert full.boxes == () and plain.boxes == ()


def test_requests_the_models_cannot_answer_are_refused(registry, images, tmp_path):
    inspector = LocalInspector(registry)
    with pytest.raises(InspectionRefused, match="unknown category 'other'"):
        inspector.inspect_images(images[:1], ["other"])
    with pytest.raises(ValueError, match="categories"):
        inspector.inspect_images(images, ["sure"])
    from models.artifacts import ArtifactRegistry

    bare = ArtifactRegistry(str(tmp_path / "bare"))
    save(bare, "sure", "detector", detector(0.95))
    with pytest.raises(InspectionRefused, match="no category router"):
        LocalInspector(bare).inspect_images(images[:1])
    with pytest.raises(ArtifactError, match="no category"):
        LocalInspector(ArtifactRegistry(str(tmp_path / "empty")))


def test_concurrent_inspections_run_each_stage_as_one_batch(registry, images):
    inspector = LocalInspector(registry)
    together = inspector.inspect_images(images * 2, ["unsure"] * 6)
    # One detector batch and one verifier batch for the six images.
    assert inspector.calls.batcher.batch_sizes == [6, 6]
    alone = [LocalInspector(registry).inspect_images([i], ["unsure"])[0] for i in images * 2]
    for a, b in zip(together, alone, strict=True):
        assert a.anomaly_score == pytest.approx(b.anomaly_score, abs=1e-5)
        assert a.verifier_score == pytest.approx(b.verifier_score, abs=1e-5)


def test_a_reranker_embeds_its_trained_descriptions_when_it_loads(registry, images):
    add_classifier(registry, "sure")
    add_reranker(registry, "sure", fusion_weight=0.5)
    model_id = load_plan(registry).categories["sure"].model_id(RERANKER)
    calls = LocalStageCalls(registry)
    assert not calls.texts.has(model_id, [])
    calls.model(RERANKER, model_id)
    # Ready before a line's first defect, whose answer would otherwise wait for the text tower.
    assert calls.texts.has(model_id, [])


def test_the_flow_runs_over_any_stage_calls(registry, images):
    plan = load_plan(registry)
    calls = LocalStageCalls(registry, max_batch_size=1)
    result = asyncio.run(inspect(InspectionRequest(images[0], "unsure"), plan, calls))
    assert result.verdict == "ok" and calls.batcher.batch_sizes == [1, 1]
