"""DefectClassifier: the SupCon loss, prototypes and ranking (its family: test_families)."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.defect_classifier import (
    DefectClassifier,
    DefectClassifierConfig,
    defect_classes,
    supervised_contrastive_loss,
)
from models.stages import build_stage

SIZE = 32


def _reference_supcon(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Khosla et al. eq. 2, written as the paper's sums."""
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        losses.append(
            -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives)
            / len(positives)
        )
    return sum(losses) / len(losses)


def test_supcon_matches_the_paper_and_rewards_clusters():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # class 3 has no positive
    z = F.normalize(torch.randn(8, 16), dim=-1)
    loss = supervised_contrastive_loss(z, labels, 0.5)
    assert float(loss) == pytest.approx(_reference_supcon(z, labels, 0.5), rel=1e-5)
    # Embeddings grouped by class score far lower than random ones.
    centres = F.normalize(torch.randn(4, 16), dim=-1)
    grouped = F.normalize(centres[labels] + 0.05 * torch.randn(8, 16), dim=-1)
    assert supervised_contrastive_loss(grouped, labels, 0.5) < loss
    # No anchor with a positive: zero, still differentiable.
    lonely = z.clone().requires_grad_(True)
    zero = supervised_contrastive_loss(lonely, torch.arange(8), 0.5)
    zero.backward()
    assert float(zero.detach()) == 0.0 and lonely.grad is not None
    with pytest.raises(ValueError, match="embeddings"):
        supervised_contrastive_loss(z, labels[:-1])


def test_defect_classes_put_good_first_and_keep_only_defects_as_types():
    labels = ["defect_p100", "good", "defect_p33", "defect_p67", "good"]
    anomalous = [True, False, False, True, False]
    classes, defects = defect_classes(labels, anomalous)
    assert classes == ("good", "defect_p100", "defect_p33", "defect_p67")
    assert defects == ("defect_p100", "defect_p67")


def _model(**overrides) -> DefectClassifier:
    config = DefectClassifierConfig(
        classes=("good", "crack", "scratch"),
        defect_types=("crack", "scratch"),
        input_size=SIZE,
        **overrides,
    )
    return DefectClassifier(config, pretrained=False).eval()


def test_prototypes_classify_and_rank_defects_only():
    model = _model()
    images = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        embedding = model(images)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(6), atol=1e-5)
    with pytest.raises(RuntimeError, match="no prototypes"):
        model.predict(images)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="scratch"):
        model.fit_prototypes(embedding[:4], labels[:4])
    # Three well separated classes: every image nearest its own class's prototype.
    centres = F.normalize(torch.randn(3, embedding.shape[1]), dim=-1) * 10
    spread = F.normalize(centres[labels] + 0.1 * torch.randn_like(embedding), dim=-1)
    model.fit_prototypes(spread, labels)
    scores = (model.class_logits(spread)).softmax(-1)
    assert torch.equal(scores.argmax(1), labels)
    ranked = model.rank_defects(scores, k=2)
    for row, label in zip(ranked, labels.tolist(), strict=True):
        assert {name for name, _ in row} == {"crack", "scratch"}
        assert sum(score for _, score in row) == pytest.approx(1.0)
        assert row[0][1] >= row[1][1]
        if label:  # a defect image ranks its own type first
            assert row[0][0] == model.config.classes[label]
    assert len(model.rank_defects(scores, k=1)[0]) == 1
    # Scores in any type order; a type the classifier never saw gets 0.
    own = model.defect_scores(scores)
    assert torch.allclose(own.sum(1), torch.ones(6))
    other = model.defect_scores(scores, ["scratch", "hole", "crack"])
    assert torch.equal(other[:, 1], torch.zeros(6))
    assert torch.equal(other[:, [2, 0]], own)


def test_config_round_trips_and_refuses_nonsense():
    model = _model(temperature=0.2)
    config = model.config.to_dict()
    rebuilt = build_stage("classifier", config | {"training": {"family": "classifier"}})
    assert rebuilt.config == model.config
    with pytest.raises(ValueError, match="defect_types"):
        DefectClassifierConfig(classes=("good", "crack"), defect_types=("dent",))
    with pytest.raises(ValueError, match="two distinct classes"):
        DefectClassifierConfig(classes=("crack",), defect_types=("crack",))
    with pytest.raises(ValueError, match="temperature"):
        DefectClassifierConfig(("good", "crack"), ("crack",), temperature=0.0)


def test_class_priors_tilt_an_ambiguous_image_towards_the_common_class():
    model = _model()
    dim = model.config.embedding_dim
    axes = torch.eye(dim)[:3]
    # Nine good images, one of each defect; prototypes on three axes.
    labels = torch.tensor([0] * 9 + [1, 2])
    model.fit_prototypes(axes[labels], labels)
    assert torch.allclose(model.log_prior.exp(), torch.tensor([9, 1, 1]) / 11)
    halfway = F.normalize(axes[0] + axes[1], dim=-1)[None]
    scores = model.class_logits(halfway).softmax(-1)[0]
    assert scores[0] > scores[1]  # equally similar: the prior decides
    assert scores[0] / scores[1] == pytest.approx(9.0, rel=1e-4)
    # Artifacts stored before priors existed load with a uniform prior.
    state = {k: v for k, v in model.state_dict().items() if k != "log_prior"}
    fresh = _model()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.log_prior, torch.zeros(3))


def _patch_model(**overrides) -> DefectClassifier:
    config = DefectClassifierConfig(
        classes=("good", "crack", "scratch"),
        defect_types=("crack", "scratch"),
        input_size=64,
        **({"embedding": "patch"} | overrides),
    )
    return DefectClassifier(config, pretrained=True)


def _textured(n: int, seed: int) -> torch.Tensor:
    """Normalized images of one fine stripe texture, with a little noise."""
    draw = torch.Generator().manual_seed(seed)
    stripes = torch.sin(torch.arange(64.0) * 1.3).view(1, 1, 1, 64).expand(n, 3, 64, 64)
    return stripes + 0.3 * torch.randn(n, 3, 64, 64, generator=draw)


def test_the_patch_embedding_is_fitted_and_speaks_for_the_defect():
    model = _patch_model(max_good_patches=64)
    assert not [p for p in model.parameters() if p.requires_grad]  # nothing to train
    assert not model.backbone.training
    with pytest.raises(RuntimeError, match="no good patches"):
        model(_textured(1, 0))
    goods = _textured(4, 1)
    rows = model.patches(goods).permute(0, 2, 3, 1).flatten(0, 2)
    assert rows.shape[1] == model.embedding_dim
    figures = model.fit_good_patches(rows)
    assert figures == {"patches": len(rows), "good_patches": 64}
    assert model.config.good_patches == 64 and model.good.shape == (64, model.embedding_dim)
    with pytest.raises(ValueError, match="patch features"):
        model.fit_good_patches(rows[:, :3])

    def blot(top: int) -> torch.Tensor:  # a square stain
        images = _textured(3, top)
        images[:, :, top : top + 6, 20:26] = 2.5
        return images

    def line(top: int) -> torch.Tensor:  # a thin dark cut across the stripes
        images = _textured(3, top + 100)
        images[:, :, top + 2 : top + 4, 16:36] = -2.5
        return images

    # Prototypes from defects high on the part name the same defects low on it:
    # the embedding follows the defect, not where it lies or the surface around it.
    with torch.no_grad():
        seen = torch.cat([model(goods), model(line(8)), model(blot(8))])
        assert torch.allclose(seen.norm(dim=-1), torch.ones(10), atol=1e-5)
        model.fit_prototypes(seen, torch.tensor([0] * 4 + [1] * 3 + [2] * 3))
        low = torch.cat([line(40), blot(40)])
        named = [row[0][0] for row in model.rank_defects(model.predict(low).scores, k=1)]
        assert named == ["crack"] * 3 + ["scratch"] * 3
    # The stored model loads into the size of bank it holds.
    loaded = build_stage("classifier", model.config.to_dict() | {"good_patches": 0})
    loaded.load_state_dict(model.state_dict(), strict=True)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.predict(low).scores, model.predict(low).scores)
    with pytest.raises(ValueError, match="embedding"):
        _patch_model(embedding="pooled")


@pytest.mark.parametrize("focus", [16.0, 1e-3])
def test_the_patch_embedding_weighs_patches_by_their_distance_to_the_good_ones(focus):
    """One defective patch among 256 noisy good ones: weighted by its distance to the good
    patches, the embedding points at the defect; averaged evenly, the noise drowns it."""
    model = _patch_model(max_good_patches=64, focus=focus)
    width = model.embedding_dim
    draw = torch.Generator().manual_seed(0)
    good = torch.randn(width, generator=draw)
    model.fit_good_patches(good + 0.05 * torch.randn(64, width, generator=draw))
    surface = good.view(1, width, 1, 1) + 0.3 * torch.randn(1, width, 16, 16, generator=draw)
    defect = 2.0 * torch.randn(width, generator=draw)
    surface[0, :, 5, 9] = good + defect
    model.patches = lambda images: surface.expand(len(images), -1, -1, -1)
    with torch.no_grad():
        embedding = model(torch.zeros(1, 3, 64, 64))[0]
    towards_defect = float(F.cosine_similarity(embedding, defect, dim=0))
    if focus > 1:
        assert towards_defect > 0.9
    else:  # without the weighting: what the even average leaves of the defect
        assert towards_defect < 0.5
