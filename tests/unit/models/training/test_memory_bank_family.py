"""The memory bank's family: good training images only, fitted and calibrated without gradients."""

import pytest
from torch.utils.data import DataLoader

from models.training import build_family
from tests.unit.models.training.test_families import _samples, _spec


def test_the_bank_remembers_good_training_images_and_calibrates_on_validation(tmp_path):
    samples = _samples(
        tmp_path,
        {"train": ["good"] * 5 + ["crack"] * 2, "val": ["good"] * 3 + ["crack"]},
    )
    family = build_family(_spec("memory-bank", samples) | {"model_config": {"input_size": 32}})
    assert family.gradient_free
    model = family.build_model(pretrained=False)
    train, val = family.datasets(model)
    assert len(train) == 5 and train.augment == "none"  # the good ones, as they are
    features = family.features(model, DataLoader(train, batch_size=2))
    # 32 px: a 4 x 4 grid per image, each image as it is and flipped both ways (d4).
    assert features.shape == (3 * 5 * 4 * 4, model.channels)
    plain = build_family(
        _spec("memory-bank", samples) | {"model_config": {"input_size": 32}, "augment": "none"}
    )
    assert len(plain.features(model, DataLoader(train, batch_size=2))) == 5 * 4 * 4
    figures = family.fit(model, features, DataLoader(val, batch_size=2))
    assert figures["patches"] == 240 and figures["bank_size"] == model.config.bank_size == 24
    # Three good validation images are too few: the training ones calibrate too.
    assert set(figures["calibration"]) == {"score_loc", "score_scale", "score_shift"}
    metrics = family.evaluate(model, DataLoader(val, batch_size=2))
    assert {"val_loss", "val_auroc", "val_accuracy"} <= set(metrics)
    with pytest.raises(TypeError, match="not trained by gradient"):
        family.loss(train)


def test_a_category_without_good_training_images_is_refused(tmp_path):
    samples = _samples(tmp_path, {"train": ["crack"] * 3, "val": ["good"]})
    with pytest.raises(ValueError, match="no good training images"):
        build_family(_spec("memory-bank", samples))
