"""The pieces of scripts/detector_variants.py that turn scores into figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "detector_variants.py"
spec = importlib.util.spec_from_file_location("detector_variants", SCRIPT)
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)


def test_four_level_cuts_recover_levels_a_score_separates() -> None:
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 4, 400)
    scores = levels * 2.0 + rng.uniform(-0.9, 0.9, 400)  # levels apart, no overlap
    cuts = variants.four_level_cuts(scores, levels)
    assert np.all(np.diff(cuts) > 0)
    assert (np.searchsorted(cuts, scores, side="right") == levels).mean() == 1.0


def test_averaged_weights_are_the_mean_of_the_checkpoints_and_keep_integer_buffers(
    tmp_path: Path,
) -> None:
    paths = []
    for i, value in enumerate((1.0, 3.0)):
        state = {"w": torch.full((2,), value), "num_batches_tracked": torch.tensor(10 * (i + 1))}
        torch.save({"model": state, "optimizer": {}}, tmp_path / f"{i}.pt")
        paths.append(str(tmp_path / f"{i}.pt"))
    mean = variants.averaged_weights(paths)
    assert torch.equal(mean["w"], torch.full((2,), 2.0))
    assert mean["w"].dtype == torch.float32
    assert int(mean["num_batches_tracked"]) == 20


def test_measure_fits_each_categorys_threshold_on_validation_and_scores_the_test_split() -> None:
    # Category "a": anomalies score above 0; category "b": above 3. One shared cut
    # would miss b's good images; a cut per category gets both right.
    logits = np.array([-1.0, 1.0, -1.0, 1.0, 2.0, 4.0, 2.0, 4.0])
    meta = {
        "truth": np.array([False, True] * 4),
        "split": np.array(["val", "val", "test", "test"] * 2),
        "category": np.array(["a"] * 4 + ["b"] * 4),
    }
    row = variants.measure("x", logits, meta)
    assert row["accuracy"] == 1.0
    assert row["accuracy_a"] == row["accuracy_b"] == 1.0
    assert row["auroc"] == 0.75  # the pooled ranking: b's good image outranks a's anomaly
