"""The CLIP reranker: offline towers, LiT-style locking, small artifacts, fusion."""

import pytest
import torch

from models.backbone import WeightsError, create_backbone
from models.descriptions import BUILTIN
from models.reranker import Reranker, RerankerConfig

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
