"""The data commands end to end: generate with the CLI, read back with every loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from models.data import load_dataset
from models.data.registry import verify_images
from models.data.synthetic import CLASSES, SURFACES


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s7"
    preview = out.parent / "preview.png"
    argv = ["data", "synth", "--out", str(out), "--images-per-class", "4", "--seed", "7",
            "--size", "96", "--preview", str(preview)]  # fmt: skip
    assert main(argv) == 0
    assert preview.stat().st_size > 10_000
    return out


def test_synth_then_show_counts_every_class(synth_out: Path, capsys) -> None:
    capsys.readouterr()
    assert (
        main(["data", "show", "--dataset", "synthetic", "--root", str(synth_out), "--verify"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"] == "synthetic"
    assert sorted(summary["categories"]) == sorted(SURFACES)
    for splits in summary["categories"].values():
        # 4 per class: 2 train, 1 val, 1 test, for all six classes.
        assert splits == {
            "train": dict.fromkeys(sorted(CLASSES), 2),
            "val": dict.fromkeys(sorted(CLASSES), 1),
            "test": dict.fromkeys(sorted(CLASSES), 1),
        }


def test_the_mvtec_tree_is_the_same_data(synth_out: Path) -> None:
    coco = load_dataset("synthetic", synth_out)
    mvtec = load_dataset("mvtec-ad", synth_out / "mvtec")
    assert coco.categories == mvtec.categories
    coco_test = sorted((s.category, s.label) for s in coco.select(split="test"))
    mvtec_test = sorted((s.category, s.label) for s in mvtec.select(split="test"))
    assert coco_test == mvtec_test
    assert verify_images(mvtec) > 0
    defect = next(s for s in mvtec.select(split="test") if s.is_anomalous)
    assert defect.load_mask().any()


def test_synth_refuses_to_overwrite_other_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["data", "synth", "--out", str(out), "--images-per-class", "4", "--seed", "1"]
    assert main(argv) == 2
    assert str(out) in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_truncated_image_is_named_by_verify(synth_out: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synth_out, copy)
    victim = next((copy / "coco" / "images" / "test").rglob("*.png"))
    data = victim.read_bytes()
    victim.unlink()  # break the hard link before writing half the bytes
    victim.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    code = main(["data", "show", "--dataset", "synthetic", "--root", str(copy), "--verify"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert victim.name in captured.err
