from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbone import Preprocessing
from models.data.sample import Sample
from models.data.tensors import ImageTensorDataset


@pytest.fixture()
def samples(tmp_path: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        out.append(Sample(path, "part", "good", "train", sample_id=str(i)))
    return out


PRE = Preprocessing(input_size=32, resize=32)


def test_items_are_the_serving_transform_without_augmentation(samples):
    dataset = ImageTensorDataset(samples, [0, 1, 0, 1], PRE)
    image, target = dataset[1]
    expected = PRE.transform()(samples[1].load_image())
    assert torch.allclose(image, expected, atol=1e-6)
    assert target.item() == 1.0 and len(dataset) == 4


def test_augmentation_changes_with_the_epoch_and_repeats_with_it(samples):
    dataset = ImageTensorDataset(samples, [0] * 4, PRE, augment="d4", seed=3)
    first = torch.stack([dataset[i][0] for i in range(4)])
    again = torch.stack([dataset[i][0] for i in range(4)])
    assert torch.equal(first, again)
    dataset.set_epoch(1)
    assert not torch.equal(first, torch.stack([dataset[i][0] for i in range(4)]))


def _variants(image: torch.Tensor, turns: bool) -> list[torch.Tensor]:
    flips = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    if not turns:
        return flips
    return [f.rot90(k, dims=(-2, -1)) for f in flips for k in range(4)]


@pytest.mark.parametrize("mode", ["flips", "d4"])
def test_flips_never_turn_a_part_and_d4_does(samples, mode):
    # A square crop, so a quarter turn keeps the shape.
    plain = ImageTensorDataset(samples, [0] * 4, PRE)
    dataset = ImageTensorDataset(samples * 16, [0] * 64, PRE, augment=mode, seed=1)
    turned = 0
    for i in range(64):
        image = dataset[i][0]
        original = plain[i % 4][0]
        assert any(torch.equal(image, v) for v in _variants(original, turns=mode == "d4"))
        turned += not any(torch.equal(image, v) for v in _variants(original, turns=False))
    assert (turned > 0) == (mode == "d4")


def test_unknown_augmentation_is_refused(samples):
    with pytest.raises(ValueError, match="augment must be one of"):
        ImageTensorDataset(samples, [0] * 4, PRE, augment="rotate-ish")


def test_pairs_doubles_with_fixed_synthetic_anomalies(samples):
    dataset = ImageTensorDataset(samples, [0] * 4, PRE, synthesis="pairs")
    assert len(dataset) == 8
    clean, target = dataset[0]
    anomalous, anomalous_target = dataset[4]
    assert target.item() == 0.0 and anomalous_target.item() == 1.0
    assert not torch.equal(clean, anomalous)
    assert torch.equal(anomalous, dataset[4][0])
    assert dataset.all_targets() == [0.0] * 4 + [1.0] * 4


def test_random_synthesis_labels_what_it_perturbs(samples):
    dataset = ImageTensorDataset(samples * 8, [0] * 32, PRE, synthesis="random")
    plain = ImageTensorDataset(samples * 8, [0] * 32, PRE)
    targets = []
    for i in range(32):
        image, target = dataset[i]
        targets.append(target.item())
        assert torch.equal(image, plain[i][0]) == (target.item() == 0.0)
    assert 0 < sum(targets) < 32


def test_bad_arguments(samples):
    with pytest.raises(ValueError, match="targets"):
        ImageTensorDataset(samples, [0], PRE)
    with pytest.raises(ValueError, match="synthesis"):
        ImageTensorDataset(samples, [0] * 4, PRE, synthesis="sometimes")
