from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from models.artifacts import ArtifactRegistry


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_console_script_weights_check_end_to_end() -> None:
    exe = shutil.which("inspectray") or str(Path(sys.executable).parent / "inspectray")
    result = subprocess.run([exe, "weights", "check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    top1 = json.loads(result.stdout)
    assert top1["chelsea"] == 285 and top1["coffee"] == 967
    assert set(top1) == {"astronaut", "chelsea", "coffee", "rocket"}


def test_weights_check_fails_loudly_when_a_class_is_wrong(capsys, monkeypatch) -> None:
    import cluster.cli as cli

    monkeypatch.setattr(cli, "REQUIRED_CLASSES", {"chelsea": 281})  # tabby cat: wrong
    code, top1, err = run_cli(capsys, "weights", "check")
    assert code == 1 and top1["chelsea"] == 285
    assert "chelsea: got class 285, expected 281" in err


def test_config_show_applies_environment(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INSPECTRAY_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:7000/2")
    code, config, _ = run_cli(capsys, "config", "show")
    assert code == 0
    assert config["registry"]["uri"] == str(tmp_path / "reg")
    assert config["redis"]["url"] == "redis://127.0.0.1:7000/2"


def test_bad_config_exits_2_naming_the_key(capsys, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("synth:\n  size: 5\n")
    code, out, err = run_cli(capsys, "--config", str(path), "config", "show")
    assert code == 2 and out is None
    assert "synth.size" in err and "Traceback" not in err


def test_registry_commands(capsys, tmp_path: Path) -> None:
    registry = ArtifactRegistry(str(tmp_path))
    for _ in range(2):
        registry.save(
            "painted_panel", "verifier", {"w": torch.ones(2)},
            config={"family": "verifier"}, preprocessing={}, data={"n_samples": 3},
        )  # fmt: skip
    code, listing, _ = run_cli(capsys, "registry", "list", "--registry", str(tmp_path))
    assert code == 0
    assert listing["artifacts"] == {
        "painted_panel": {"verifier": {"versions": ["v1", "v2"], "aliases": {}}}
    }
    code, promoted, _ = run_cli(
        capsys,
        "registry",
        "promote",
        "painted_panel",
        "verifier",
        "v2",
        "--registry",
        str(tmp_path),
    )
    assert code == 0 and promoted["production"] == "v2"
    code, manifest, _ = run_cli(
        capsys, "registry", "show", "painted_panel", "verifier", "--registry", str(tmp_path)
    )
    assert code == 0 and manifest["version"] == "v2" and manifest["data"] == {"n_samples": 3}
    code, _, err = run_cli(
        capsys, "registry", "show", "painted_panel", "detector", "--registry", str(tmp_path)
    )
    assert code == 2 and "no artifacts for painted_panel/detector" in err


def test_data_show_elpv(capsys) -> None:
    code, summary, _ = run_cli(capsys, "data", "show", "--dataset", "elpv")
    assert code == 0 and summary["dataset"] == "elpv"
    cats = summary["categories"]
    assert set(cats) == {"solar_cell_mono", "solar_cell_poly"}
    total = sum(n for c in cats.values() for s in c.values() for n in s.values())
    assert total == 2624
    assert set(cats["solar_cell_mono"]) == {"train", "val", "test"}
    assert set(cats["solar_cell_mono"]["test"]) == {
        "good",
        "defect_p33",
        "defect_p67",
        "defect_p100",
    }


def test_data_show_missing_folder_is_a_user_error(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    code, out, err = run_cli(
        capsys, "data", "show", "--dataset", "mvtec-ad", "--root", str(missing)
    )
    assert code == 2 and out is None and str(missing) in err


def test_training_commands_refuse_bad_input_before_starting_ray(tmp_path, capsys):
    from cluster.cli import main

    # An unknown category is a user error (exit 2) named in one line.
    code = main(
        [
            "train",
            "detector",
            "--dataset",
            "elpv",
            "--category",
            "solar_cell_cdte",
            "--registry",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "solar_cell_cdte" in capsys.readouterr().err
    # Only the detector has frozen backbone stages to choose.
    code = main(
        ["tune", "verifier", "--dataset", "elpv", "--num-samples", "2", "--freeze-stages", "0"]
    )
    assert code == 2
    assert (
        "--freeze-stages applies to the detector, classifier and localizer, not the verifier"
        in capsys.readouterr().err
    )
    # Descriptions and open_clip models are the reranker's; a bad file is named.
    args = ["train", "detector", "--dataset", "elpv", "--registry", str(tmp_path / "r")]
    descriptions = tmp_path / "d.json"
    descriptions.write_text('[{"name": "dent", "description": "A shallow dent"}]')
    assert main([*args, "--descriptions", str(descriptions)]) == 2
    assert "--descriptions applies to the reranker" in capsys.readouterr().err
    assert main([*args, "--open-clip", "ViT-B-32"]) == 2
    assert "--open-clip applies to the reranker" in capsys.readouterr().err
    descriptions.write_text('[{"name": "dent", "description": "<script>x</script>"}]')
    args[1] = "reranker"
    assert main([*args, "--descriptions", str(descriptions)]) == 2
    assert "markup" in capsys.readouterr().err
    assert main([*args, "--model-option", "no_such=1"]) == 2
    assert "the reranker has no option 'no_such'" in capsys.readouterr().err
    assert main([*args, "--model-option", "embed_dim"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    detector_args = ["train", "detector", "--dataset", "elpv", "--registry", str(tmp_path / "r")]
    assert main([*detector_args, "--model-option", "pooling=max"]) == 2
    assert "the detector: pooling 'max' is not one of ['avg', 'gem']" in capsys.readouterr().err
    assert main([*args, "--balance-classes"]) == 2
    refusal = "--balance-classes applies to the detector and the classifier, not the reranker"
    assert refusal in capsys.readouterr().err
    assert main([*args, "--hold-out", "no_such_label"]) == 2
    assert "no label(s) ['no_such_label']" in capsys.readouterr().err
    # Reviews retrain only what a held-out figure can judge, from an export.
    assert main([*args, "--with-reviews", str(tmp_path)]) == 2
    assert "is not a review export" in capsys.readouterr().err
    args[1] = "localizer"
    assert main([*args, "--with-reviews", str(tmp_path)]) == 2
    assert "cannot retrain the localizer" in capsys.readouterr().err
    # Evaluating an empty registry says what is missing.
    code = main(
        [
            "eval",
            "--dataset",
            "elpv",
            "--registry",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 2
    assert "no category" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_train_all_gives_each_stage_only_the_options_its_model_has():
    from cluster.cli import build_parser
    from cluster.training_commands import stage_settings, train_settings
    from models.data import load_dataset
    from tune.trainer import family_spec

    argv = ["train", "all", "--dataset", "elpv", "--autocontrast", "1", "--freeze-stages", "1"]
    settings = train_settings(build_parser().parse_args(argv), 1)
    assert settings.model_config == {"autocontrast": 1.0, "freeze_stages": 1}
    assert not settings.balance_classes
    balanced = train_settings(build_parser().parse_args([*argv, "--balance-classes"]), 1)
    spec = family_spec(load_dataset("elpv"), "detector", "solar_cell_mono", balanced)
    assert balanced.balance_classes and spec["balance_classes"]  # it reaches the family
    assert stage_settings(settings, "detector") is settings
    assert stage_settings(settings, "verifier").model_config == {"autocontrast": 1.0}
    assert stage_settings(settings, "localizer").model_config == {"freeze_stages": 1}


def test_training_commands_parse_the_documented_options():
    from cluster.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "all",
            "--dataset",
            "synthetic",
            "--root",
            "d",
            "--category",
            "c",
            "--epochs",
            "3",
            "--num-workers",
            "2",
            "--use-gpu",
            "--registry",
            "r",
        ]
    )
    assert (args.stage, args.epochs, args.num_workers, args.use_gpu) == ("all", 3, 2, True)
    args = build_parser().parse_args(
        ["tune", "verifier", "--dataset", "elpv", "--num-samples", "4", "--max-epochs", "2"]
    )
    assert (args.stage, args.num_samples, args.max_epochs) == ("verifier", 4, 2)
    args = build_parser().parse_args(
        ["eval", "--dataset", "elpv", "--out", "m.json", "--report", "rep"]
    )
    assert (args.out, args.report, args.route) == ("m.json", "rep", False)


def test_bench_measures_a_topology_behind_serve_s_own_proxy_on_request(capsys):
    from cluster.bench import served_topology

    assert served_topology("fused") == ("fused", {})
    topology, env = served_topology("split-serve-proxy")
    assert topology == "split"
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    # An unknown name is a usage error naming what it takes.
    with pytest.raises(SystemExit, match="fused-serve-proxy"):
        main(["bench", "--topologies", "fused,mesh"])
