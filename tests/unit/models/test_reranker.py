"""The CLIP reranker: offline towers, LiT-style locking, small artifacts, fusion."""

import pytest
import torch

from models.backbone import WeightsError, create_backbone
from models.descriptions import BUILTIN, DescriptionCatalog, DescriptionError
from models.reranker import Reranker, RerankerConfig, fit_fusion_weight, fuse_scores

SIZE = 64


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker(RerankerConfig(input_size=SIZE, embed_dim=32)).eval()


def test_vision_tower_starts_from_the_packaged_imagenet_weights(reranker):
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=True, num_classes=0)
    trunk = reranker.clip.visual.trunk.state_dict()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(trunk[name], tensor), name


def test_text_tower_is_locked_but_its_projection_trains(reranker):
    transformer = reranker.clip.text.transformer
    assert not any(p.requires_grad for p in transformer.parameters())
    assert all(p.requires_grad for p in reranker.clip.text.proj.parameters())
    reranker.train()
    assert not transformer.training and reranker.clip.visual.training
    reranker.eval()
    heads = {id(p) for p in reranker.head_parameters()}
    trunk = {id(p) for p in reranker.backbone_parameters()}
    assert heads and trunk and not heads & trunk


def test_descriptions_and_images_embed_on_one_sphere(reranker):
    texts = [BUILTIN[name].text() for name in ("scratch", "crack", "perforation")]
    with torch.no_grad():
        text = reranker.encode_texts(texts)
        images = reranker.encode_images(torch.randn(2, 3, SIZE, SIZE))
    assert text.shape == (3, 32) and images.shape == (2, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(text[0], text[1])
    probabilities = reranker.text_probabilities(torch.randn(2, 3, SIZE, SIZE), text)
    assert probabilities.shape == (2, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="at least one text"):
        reranker.encode_texts([])


def test_artifact_leaves_out_the_locked_text_transformer(reranker, tmp_path):
    state = reranker.state_dict()
    assert not any(".text.transformer." in k for k in state)
    assert any(k.startswith("clip.visual.trunk.") for k in state)
    assert "clip.text.proj.weight" in state and "clip.logit_scale" in state
    with torch.no_grad():
        reranker.clip.logit_scale.fill_(3.0)
    fresh = Reranker(reranker.config, pretrained=False).eval()
    fresh.load_state_dict(reranker.state_dict(), strict=True)
    texts = ["a thin line on the surface"]
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(fresh.encode_texts(texts), reranker.encode_texts(texts), atol=1e-6)
        assert torch.allclose(fresh.encode_images(images), reranker.encode_images(images))
    # A state missing a trained weight is still refused.
    broken = dict(reranker.state_dict())
    del broken["clip.text.proj.weight"]
    with pytest.raises(RuntimeError, match="proj"):
        fresh.load_state_dict(broken, strict=True)


def test_fusion_weighs_renormalises_and_checks_shapes(reranker):
    classifier = torch.tensor([[0.7, 0.3, 0.0]])  # the third type has only a description
    clip = torch.tensor([[0.2, 0.2, 0.6]])
    fused = reranker.fuse(classifier, clip, weight=0.5)
    assert torch.allclose(fused, torch.tensor([[0.45, 0.25, 0.30]]))
    assert torch.equal(reranker.fuse(None, clip), clip)
    assert torch.allclose(reranker.fuse(classifier, clip, weight=1.0), classifier)
    with pytest.raises(ValueError, match="differ"):
        reranker.fuse(classifier[:, :2], clip)
    with pytest.raises(ValueError, match="fusion_weight"):
        RerankerConfig(fusion_weight=1.5)


def test_a_text_tower_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(WeightsError, match=str(tmp_path)):
        Reranker(RerankerConfig(input_size=SIZE, text_model=str(tmp_path)), pretrained=False)


def test_a_type_unknown_to_the_classifier_is_scored_by_clip_alone():
    classifier = torch.tensor([[0.9, 0.1, 0.0]])
    clip = torch.tensor([[0.1, 0.1, 0.8]])
    known = torch.tensor([True, True, False])
    fused = fuse_scores(classifier, clip, 0.5, known)
    raw = torch.tensor([[0.5, 0.1, 0.8]])
    assert torch.allclose(fused, raw / raw.sum())
    assert fused.argmax().item() == 2  # the described type wins on CLIP's word


def test_the_fusion_weight_is_the_one_that_ranks_validation_best():
    truth = torch.tensor([0, 0, 1, 1])
    # The classifier is right on three images, CLIP on two; together on all four.
    classifier = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.45, 0.55], [0.55, 0.45]])
    clip = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.1, 0.9], [0.1, 0.9]])
    weight, figures = fit_fusion_weight(classifier, clip, truth)
    assert figures["val_top1_classifier"] == 0.75 and figures["val_top1_clip"] == 0.75
    assert figures["val_top1_fused"] == 1.0 and 0.0 < weight < 1.0
    fused = fuse_scores(classifier, clip, weight)
    assert torch.equal(fused.argmax(1), truth)
    with pytest.raises(ValueError, match="no validation image"):
        fit_fusion_weight(classifier[:0], clip[:0], truth[:0])
    # When every weight ranks validation perfectly, the middle one is kept.
    weight, figures = fit_fusion_weight(torch.eye(2), torch.eye(2), torch.arange(2))
    assert weight == 0.5 and figures["val_top1_fused"] == 1.0


def test_type_embeddings_average_every_phrasing(reranker):
    catalog = DescriptionCatalog.builtin(["scratch", "crack"])
    types = reranker.type_embeddings(catalog)
    assert types.shape == (2, 32)
    assert torch.allclose(types.norm(dim=-1), torch.ones(2), atol=1e-5)
    phrasings = reranker.project_texts(reranker.text_features(BUILTIN["crack"].variants()))
    expected = torch.nn.functional.normalize(phrasings.mean(0), dim=-1)
    assert torch.allclose(types[1], expected, atol=1e-6)
    # The training logits come through forward, from the locked features.
    images = torch.randn(2, 3, SIZE, SIZE)
    features = reranker.text_features([BUILTIN["crack"].text(), BUILTIN["scratch"].text()])
    with torch.no_grad():
        logits = reranker(images, features)
        texts = reranker.encode_texts([BUILTIN["crack"].text(), BUILTIN["scratch"].text()])
        expected_logits = reranker.logits(reranker.encode_images(images), texts)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_the_config_carries_its_described_types():
    descriptions = [BUILTIN["crack"].to_dict(), BUILTIN["scratch"].to_dict()]
    config = RerankerConfig(descriptions=descriptions, input_size=SIZE)
    assert config.defect_types == ("crack", "scratch")
    assert RerankerConfig.from_dict(config.to_dict()) == config
    assert config.catalog()["crack"] == BUILTIN["crack"]
    with pytest.raises(ValueError, match="twice"):
        RerankerConfig(descriptions=descriptions + descriptions[:1])
    with pytest.raises(DescriptionError, match="markup"):
        RerankerConfig(descriptions=[{"name": "x", "description": "<b>bold</b>"}])


def test_an_open_clip_model_can_replace_the_packaged_towers():
    # Online users name an open_clip model and a pretrained tag; without the tag
    # (as here, offline) the same architecture is built untrained.
    config = RerankerConfig(
        descriptions=[BUILTIN["crack"].to_dict(), BUILTIN["scratch"].to_dict()],
        open_clip_model="ViT-B-32",
        input_size=224,
    )
    model = Reranker(config, pretrained=False).eval()
    assert model.preprocessing.mean != RerankerConfig().preprocessing().mean  # CLIP's
    assert not any(p.requires_grad for p in model.clip.transformer.parameters())
    heads = {id(p) for p in model.head_parameters()}
    trunk = {id(p) for p in model.backbone_parameters()}
    assert id(model.clip.visual.proj) in heads and trunk and not heads & trunk
    types = model.type_embeddings(config.catalog())
    assert types.shape == (2, 512)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224), model.text_features(["a crack"]))
    assert logits.shape == (1, 1)
    # The artifact holds every weight: no download is needed to serve it.
    fresh = Reranker(config, pretrained=False)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert "token_embedding.weight" in "".join(model.state_dict())
    with pytest.raises(ValueError, match="224px"):
        Reranker(RerankerConfig(open_clip_model="ViT-B-32", input_size=64), pretrained=False)


def test_the_text_projection_can_be_locked_too():
    model = Reranker(RerankerConfig(input_size=SIZE, embed_dim=32, lock_text_projection=True))
    assert not any(p.requires_grad for p in model.clip.text.proj.parameters())
    heads = {id(p) for p in model.head_parameters()}
    assert not heads & {id(p) for p in model.clip.text.proj.parameters()}
    assert id(model.clip.logit_scale) in heads


def test_a_type_without_a_description_is_scored_by_the_classifier_alone():
    # "smudge" was taught to the classifier from reviews; CLIP has no words for it.
    classifier = torch.tensor([[0.1, 0.2, 0.7]])
    clip = torch.tensor([[0.3, 0.7, 0.0]])
    described = torch.tensor([True, True, False])
    fused = fuse_scores(classifier, clip, 0.5, described=described)
    raw = torch.tensor([[0.2, 0.45, 0.7]])
    assert torch.allclose(fused, raw / raw.sum())
    assert fused.argmax().item() == 2  # the taught type wins on the classifier's word
    # Without the mask CLIP's silence would count against it.
    assert fuse_scores(classifier, clip, 0.5).argmax().item() == 1


def test_the_fusion_weight_is_fitted_over_types_only_one_side_knows():
    # Types: scratch (both), crack (CLIP only: held out of the classifier), smudge
    # (classifier only: no description). Each image's truth is ranked first by the
    # side that knows it, and by both together on the shared type.
    truth = torch.tensor([0, 1, 2])
    classifier = torch.tensor([[0.6, 0.0, 0.4], [0.5, 0.0, 0.5], [0.3, 0.0, 0.7]])
    clip = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.9, 0.1, 0.0]])
    known = torch.tensor([True, False, True])
    described = torch.tensor([True, True, False])
    weight, figures = fit_fusion_weight(classifier, clip, truth, known=known, described=described)
    assert figures["val_top1_fused"] == 1.0 and 0.0 < weight < 1.0
    fused = fuse_scores(classifier, clip, weight, known, described)
    assert torch.equal(fused.argmax(1), truth)
