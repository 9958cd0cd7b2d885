"""The memory bank: coreset coverage, nearest neighbours, scores and maps, calibration, loading."""

import pytest
import torch

from models.memory_bank import (
    MemoryBank,
    MemoryBankConfig,
    calibrate,
    greedy_coreset,
    nearest_neighbours,
)

SIZE = 64


def test_nearest_neighbours_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, bank = (
        torch.randn(300, 16, generator=generator),
        torch.randn(50, 16, generator=generator),
    )
    distances, indices = nearest_neighbours(queries, bank, chunk=64)
    full = torch.cdist(queries, bank)
    assert torch.equal(indices, full.argmin(dim=1))
    assert torch.allclose(distances, full.min(dim=1).values, atol=1e-4)


def test_greedy_coreset_covers_better_than_random():
    generator = torch.Generator().manual_seed(1)
    # Five tight clusters of very different sizes: a random pick misses the small ones.
    centres = torch.randn(5, 32, generator=generator) * 10
    sizes = [1000, 10, 10, 10, 10]
    points = torch.cat(
        [
            c + 0.1 * torch.randn(n, 32, generator=generator)
            for c, n in zip(centres, sizes, strict=True)
        ]
    )
    chosen, radius = greedy_coreset(points, 5, projection=0, seed=0)
    assert len(set(chosen.tolist())) == 5
    covered = {int(torch.cdist(points[i : i + 1], centres).argmin()) for i in chosen}
    assert covered == set(range(5))  # one per cluster
    assert radius < 2.0
    random_pick = torch.randperm(len(points), generator=generator)[:5]
    random_radius = nearest_neighbours(points, points[random_pick])[0].max()
    assert radius < float(random_radius)


def test_fit_score_map_and_calibration():
    # ImageNet features (the packaged weights): a random backbone's maps mean nothing.
    size = 128
    model = MemoryBank(MemoryBankConfig(input_size=size, coreset_ratio=0.5), pretrained=True)
    generator = torch.Generator().manual_seed(2)
    good = torch.randn(4, 3, size, size, generator=generator) * 0.1
    features = model.embed(good)  # (B, C, h, w)
    assert features.shape[:2] == (4, model.channels) and features.shape[-1] == size // 8
    figures = model.fit(features.permute(0, 2, 3, 1).flatten(0, 2))
    assert figures["bank_size"] == model.config.bank_size == len(model.bank) > 0
    defect = good[:1].clone()
    defect[:, :, 24:56, 24:56] += 3.0  # a bright square no good image has
    out = model.predict(torch.cat([good[:1], defect]))
    assert out.anomaly_map.shape == (2, size, size)
    assert out.raw_score[1] > 3 * out.raw_score[0]
    # The distance map is hottest on the square, coldest far from it.
    distances, _ = model(defect)
    heat = model.anomaly_map(distances)[0]
    row, col = divmod(int(heat.flatten().argmax()), size)
    assert 16 <= row < 64 and 16 <= col < 64
    assert heat[24:56, 24:56].mean() > 2 * heat[96:, 96:].mean()
    calibrate(model, torch.linspace(1.0, 2.0, 101).tolist())
    at_quantile = torch.linspace(1.0, 2.0, 101).quantile(0.99)
    assert model.calibrated(at_quantile).item() == pytest.approx(0.5, abs=1e-3)
    scored = model.predict(torch.cat([good[:1], defect]))  # calibrated
    assert ((scored.score >= 0) & (scored.score <= 1)).all()
    assert ((scored.anomaly_map >= 0) & (scored.anomaly_map <= 1)).all()


def test_a_fit_chooses_from_at_most_max_candidates_patches():
    model = MemoryBank(
        MemoryBankConfig(input_size=SIZE, coreset_ratio=0.1, max_candidates=300), pretrained=False
    )
    features = torch.randn(1000, model.channels, generator=torch.Generator().manual_seed(3))
    figures = model.fit(features, seed=1)
    assert (figures["patches"], figures["candidates"], figures["bank_size"]) == (1000, 300, 30)
    rows = {tuple(r.tolist()) for r in features}
    assert all(tuple(r.tolist()) in rows for r in model.bank)  # the bank keeps real patches
    again = MemoryBank(model.config, pretrained=False)
    again.fit(features, seed=1)
    assert torch.equal(again.bank, model.bank)  # the draw is seeded
    with pytest.raises(ValueError, match="max_candidates"):
        MemoryBankConfig(max_candidates=0)


def test_a_fitted_bank_loads_into_an_unfitted_model_with_its_size():
    config = MemoryBankConfig(input_size=SIZE)
    fitted = MemoryBank(config, pretrained=False)
    fitted.fit(torch.randn(200, fitted.channels))
    fresh = MemoryBank(MemoryBankConfig.from_dict(config.to_dict()), pretrained=False)
    fresh.load_state_dict(fitted.state_dict(), strict=True)
    assert torch.equal(fresh.bank, fitted.bank) and fresh.config.bank_size == len(fitted.bank)
    images = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(fresh.predict(images).raw_score, fitted.predict(images).raw_score)
    wrong = {**fitted.state_dict(), "bank": torch.zeros(10, fitted.channels + 1)}
    with pytest.raises(RuntimeError, match="bank"):
        fresh.load_state_dict(wrong)


def test_empty_bank_and_bad_features_are_refused():
    model = MemoryBank(MemoryBankConfig(input_size=SIZE), pretrained=False)
    with pytest.raises(RuntimeError, match="fit it first"):
        model.predict(torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="patch features"):
        model.fit(torch.randn(10, model.channels + 1))
    with pytest.raises(ValueError, match="coreset_ratio"):
        MemoryBankConfig(coreset_ratio=0.0)


def test_nothing_learns_by_gradient():
    model = MemoryBank(MemoryBankConfig(input_size=SIZE), pretrained=False).train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
