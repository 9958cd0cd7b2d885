"""The small real registry (:mod:`tests.tiny_models`) and images every unit test can use."""

import pytest

from tests.tiny_models import band_registry, random_images


@pytest.fixture()
def registry(tmp_path):
    return band_registry(str(tmp_path / "registry"))


@pytest.fixture()
def images():
    return random_images()
