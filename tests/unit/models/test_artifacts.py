from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
import torch

from models.artifacts import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ArtifactRegistry,
    StagedRegistry,
)
from models.backbone import PRETRAINED, create_backbone


def _save(registry: ArtifactRegistry, state: dict, **kw) -> str:
    manifest = registry.save(
        "brushed_metal",
        "detector",
        state,
        config={"family": "detector", "backbone": "efficientnet_lite0", "num_classes": 2},
        preprocessing=PRETRAINED["efficientnet_lite0"].preprocessing.to_dict(),
        data={"dataset": "synthetic", "sha256": "ab" * 32, "n_samples": 10},
        metrics={"val_auroc": 0.97},
        **kw,
    )
    return manifest.version


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path: Path) -> ArtifactRegistry:
    if request.param == "local":
        return ArtifactRegistry(str(tmp_path / "registry"))
    # Any fsspec URL works the same; memory:// stands in for s3:// here.
    return ArtifactRegistry(f"memory://registry-{uuid.uuid4().hex}")


def test_round_trip_rebuilds_the_model(registry: ArtifactRegistry) -> None:
    model, _ = create_backbone(num_classes=2)
    version = _save(registry, model.state_dict(), promote=True)
    assert version == "v1"
    artifact = registry.load("brushed_metal", "detector")  # production alias
    cfg = artifact.manifest.config
    rebuilt, _ = create_backbone(cfg["backbone"], pretrained=False, num_classes=cfg["num_classes"])
    rebuilt.load_state_dict(artifact.state_dict, strict=True)
    x = torch.randn(1, 3, 224, 224)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))
    m = artifact.manifest
    assert m.preprocessing["input_size"] == 224 and m.metrics == {"val_auroc": 0.97}
    assert m.weights.n_parameters == sum(p.numel() for p in model.state_dict().values())
    assert m.libraries["torch"] and m.data["sha256"] == "ab" * 32


def test_versions_aliases_and_refs(registry: ArtifactRegistry) -> None:
    state = {"w": torch.ones(3)}
    assert [_save(registry, state) for _ in range(3)] == ["v1", "v2", "v3"]
    assert registry.versions("brushed_metal", "detector") == ["v1", "v2", "v3"]
    with pytest.raises(ArtifactError, match="no alias 'production'"):
        registry.resolve("brushed_metal", "detector")
    registry.promote("brushed_metal", "detector", "v2")
    assert registry.resolve("brushed_metal", "detector") == "v2"
    assert registry.resolve("brushed_metal", "detector", "latest") == "v3"
    assert registry.resolve("brushed_metal", "detector", "v1") == "v1"
    assert registry.aliases("brushed_metal", "detector") == {"production": "v2"}
    assert registry.categories() == ["brushed_metal"]
    assert registry.stages("brushed_metal") == ["detector"]
    with pytest.raises(ArtifactError, match="no version v9"):
        registry.resolve("brushed_metal", "detector", "v9")
    with pytest.raises(ArtifactError, match="no such version"):
        registry.promote("brushed_metal", "detector", "v9")


def test_a_candidate_is_staged_beside_production_until_promoted(
    registry: ArtifactRegistry,
) -> None:
    state = {"w": torch.ones(3)}
    _save(registry, state, promote=True)
    staged = StagedRegistry(registry)
    assert staged.resolve("brushed_metal", "detector") == "v1"  # no candidate yet: production
    assert _save(staged, state, promote=True) == "v2"  # training promotes: the candidate moves
    assert registry.resolve("brushed_metal", "detector") == "v1"  # what serves is unchanged
    assert staged.resolve("brushed_metal", "detector") == "v2"
    assert staged.load("brushed_metal", "detector").manifest.version == "v2"
    assert staged.staged() == {("brushed_metal", "detector"): "v2"}
    assert staged.promote_staged({"another_category"}) == {}  # not judged: left staged
    assert staged.promote_staged({"brushed_metal"}) == {"brushed_metal": {"detector": "v2"}}
    assert registry.aliases("brushed_metal", "detector") == {"production": "v2"}
    assert staged.staged() == {}

    _save(staged, state, promote=True)  # v3, judged no better
    assert staged.discard_staged() == {"brushed_metal": {"detector": "v3"}}
    assert registry.resolve("brushed_metal", "detector") == "v2"
    assert registry.versions("brushed_metal", "detector") == ["v1", "v2", "v3"]  # history kept
    with pytest.raises(ArtifactError, match="never dropped"):
        registry.drop_alias("brushed_metal", "detector", "production")


def test_the_decision_rule_is_promoted_after_its_models(tmp_path: Path, monkeypatch) -> None:
    staged = StagedRegistry(ArtifactRegistry(str(tmp_path / "registry")))
    for stage in ("decision", "detector", "verifier"):
        staged.save(
            "tile", stage, {"w": torch.ones(1)}, config={}, preprocessing={}, data={}, promote=True
        )
    order: list[str] = []
    promote = ArtifactRegistry.promote

    def recording(self, category, stage, version, alias="production"):
        order.append(stage)
        promote(self, category, stage, version, alias)

    monkeypatch.setattr(ArtifactRegistry, "promote", recording)
    staged.promote_staged({"tile"}, last=("decision",))
    assert order[-1] == "decision" and sorted(order) == ["decision", "detector", "verifier"]


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    version = _save(registry, {"w": torch.arange(16, dtype=torch.float32)}, promote=True)
    weights = tmp_path / "brushed_metal" / "detector" / version / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # flip bits in the last tensor value
    weights.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="refusing a modified artifact"):
        registry.load("brushed_metal", "detector")


def test_a_pickle_in_place_of_weights_is_never_unpickled(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    version = _save(registry, {"w": torch.ones(2)}, promote=True)
    base = tmp_path / "brushed_metal" / "detector" / version
    torch.save({"w": torch.ones(2)}, base / WEIGHTS_FILE)  # a pickle-based file
    # Even with a manifest rewritten to match its hash, safetensors refuses it.
    import hashlib

    manifest = json.loads((base / MANIFEST_FILE).read_text())
    manifest["weights"]["sha256"] = hashlib.sha256((base / WEIGHTS_FILE).read_bytes()).hexdigest()
    (base / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        registry.load("brushed_metal", "detector")


def test_unfinished_version_is_invisible(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    _save(registry, {"w": torch.ones(2)})
    # A writer that died after the weights and before the manifest:
    crashed = tmp_path / "brushed_metal" / "detector" / "v2"
    crashed.mkdir()
    (crashed / WEIGHTS_FILE).write_bytes(b"partial")
    assert registry.versions("brushed_metal", "detector") == ["v1"]
    assert _save(registry, {"w": torch.ones(2)}) == "v3"  # never reuses the crashed folder


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    versions: list[str] = []
    lock = threading.Lock()

    def write() -> None:
        v = _save(ArtifactRegistry(str(tmp_path)), {"w": torch.ones(4)})
        with lock:
            versions.append(v)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]
    assert registry.versions("brushed_metal", "detector") == [f"v{i}" for i in range(1, 7)]


def test_tied_weights_are_stored(tmp_path: Path) -> None:
    shared = torch.randn(4, 4)
    registry = ArtifactRegistry(str(tmp_path))
    _save(registry, {"a": shared, "b": shared}, promote=True)
    state = registry.load("brushed_metal", "detector").state_dict
    assert torch.equal(state["a"], state["b"]) and torch.equal(state["a"], shared)


@pytest.mark.parametrize("bad", ["Brushed Metal", "../escape", "", "a/b"])
def test_names_that_could_escape_the_layout_are_refused(tmp_path: Path, bad: str) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    with pytest.raises(ArtifactError, match="invalid category"):
        registry.save(bad, "detector", {"w": torch.ones(1)}, config={}, preprocessing={}, data={})


def test_missing_artifacts_say_where_they_looked(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    with pytest.raises(ArtifactError, match=str(tmp_path)):
        registry.load("painted_panel", "verifier")


def test_malformed_manifest_is_reported(tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    version = _save(registry, {"w": torch.ones(2)}, promote=True)
    path = tmp_path / "brushed_metal" / "detector" / version / MANIFEST_FILE
    path.write_text('{"category": "brushed_metal"}')
    with pytest.raises(ArtifactError, match="malformed manifest"):
        registry.load("brushed_metal", "detector")
