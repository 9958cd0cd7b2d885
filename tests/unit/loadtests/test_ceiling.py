"""The bench's ceiling: each category's first-line models alone, in each runtime."""

from __future__ import annotations

from loadtests.bench import measure_ceiling
from loadtests.traffic import Traffic, TrafficImage
from models.artifacts import ArtifactRegistry
from tests.tiny_models import add_exported_detector, add_memory_bank, random_images


def test_the_ceiling_runs_each_categorys_first_line_a_memory_bank_included(tmp_path):
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    add_exported_detector(registry, "metal")
    add_memory_bank(registry, "panel")  # judged by its memory bank alone, as the quick set's
    paths = []
    for i, image in enumerate(random_images()):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    images = [TrafficImage(str(p), c, False) for p in paths for c in ("metal", "panel")]
    ceiling = measure_ceiling(registry.uri, Traffic(images, 0.0), seconds=4.0, batch_sizes=(1,))
    assert ceiling["rps"] > 0
    runtimes = {row["runtime"] for row in ceiling["tried"]}
    assert runtimes == {"torch", "onnxruntime"}
    for row in ceiling["tried"]:  # the bank has no export: it runs in torch, and the row says so
        expected = ["memory-bank panel"] if row["runtime"] == "onnxruntime" else None
        assert row.get("in_torch") == expected
    assert ceiling["best"] in ceiling["tried"]
