from __future__ import annotations

import pytest
import torch

from models.backbone import WeightsError
from models.text import TextEncoderConfig, load_text_encoder, packaged_minilm_path


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def test_packaged_model_folder_is_a_hf_model() -> None:
    path = packaged_minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_embeddings_are_unit_norm_and_semantic(encoder) -> None:
    texts = [
        "a deep crack that penetrates and branches through the material",
        "a fracture breaking through the part",
        "a clean uniform surface without defects",
    ]
    with torch.no_grad():
        v = encoder(texts)
    assert v.shape == (3, encoder.dim) == (3, 384)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # crack is near fracture, far from a clean surface


def test_batch_padding_does_not_change_an_embedding(encoder) -> None:
    with torch.no_grad():
        alone = encoder(["scratch"])
        padded = encoder(["scratch", "a much longer sentence about contamination on a panel"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_hub_model_needs_explicit_permission() -> None:
    with pytest.raises(WeightsError, match="allow_hub"):
        load_text_encoder(TextEncoderConfig(hub_id="sentence-transformers/all-MiniLM-L6-v2"))


def test_missing_folder_is_named(tmp_path) -> None:
    with pytest.raises(WeightsError, match=str(tmp_path)):
        load_text_encoder(TextEncoderConfig(path=str(tmp_path)))


def test_empty_input_is_refused(encoder) -> None:
    with pytest.raises(ValueError, match="no texts"):
        encoder([])
