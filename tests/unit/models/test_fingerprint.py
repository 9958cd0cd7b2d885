from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.data.fingerprint import fingerprint_samples
from models.data.sample import Sample


def _samples(root: Path) -> list[Sample]:
    out = []
    for i, label in enumerate(["good", "good", "scratch"]):
        path = root / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        out.append(Sample(path, "panel", label, "train", sample_id=f"s{i}"))
    return out


def test_same_data_same_fingerprint_in_any_order(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    a = fingerprint_samples("synthetic", samples)
    b = fingerprint_samples("synthetic", list(reversed(samples)))
    assert a == b
    assert a["n_samples"] == 3 and a["labels"] == {"good": 2, "scratch": 1}
    assert a["splits"] == {"train": 3} and a["categories"] == ["panel"]


def test_changed_pixels_label_or_dataset_change_it(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    base = fingerprint_samples("synthetic", samples)["sha256"]
    relabelled = [
        *samples[:2],
        Sample(samples[2].image_path, "panel", "crack", "train", sample_id="s2"),
    ]
    assert fingerprint_samples("synthetic", relabelled)["sha256"] != base
    assert fingerprint_samples("elpv", samples)["sha256"] != base
    Image.new("RGB", (8, 8), (1, 2, 3)).save(samples[0].image_path)  # same name, new pixels
    assert fingerprint_samples("synthetic", samples)["sha256"] != base
