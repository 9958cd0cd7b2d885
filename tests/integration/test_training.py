"""Training on a real local Ray cluster: train, evaluate, sweep, two workers, a killed worker.

Small real data (the generator at 96 px) and small inputs (64 px) keep each Ray
Train run to seconds; the models are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from models.artifacts import ArtifactRegistry
from models.data import load_dataset
from models.data.dataset import Dataset
from models.data.synthetic import DEFECT_TYPES, generate
from models.stages import SHARED_CATEGORY
from models.training.families import NORMAL_ONLY
from tune.ray_env import TRAIN_POLL_ENV
from tune.trainer import (
    DEFAULT_LR,
    TrainSettings,
    cpus_per_worker,
    family_spec,
    fit_family,
    requested_cpus,
    train_stage,
)

pytestmark = pytest.mark.slow
CATEGORY = "brushed_metal"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images_per_class=6, seed=1, size=96, surfaces=(CATEGORY, "painted_panel"))
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from tune.trainer import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


def test_the_ray_processes_of_a_cluster_training_starts_poll_their_workers_often():
    """A fresh process's ``ensure_ray``: its Ray workers see the poll interval it set."""
    probe = (
        "import os, ray\n"
        "from tune.trainer import ensure_ray\n"
        "ensure_ray()\n"
        "read = ray.remote(lambda: os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'))\n"
        "print(ray.get(read.remote()))"
    )
    unset = ("RAY_ADDRESS", *TRAIN_POLL_ENV)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == TRAIN_POLL_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


def _settings(tmp_path: Path, **overrides) -> TrainSettings:
    values = {
        "epochs": 2,
        "batch_size": 8,
        "storage_path": str(tmp_path / "runs"),
        "model_config": {"input_size": 64},
    } | overrides
    return TrainSettings(**values)


def _eval(root: Path, registry: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "eval",
            "--dataset",
            "synthetic",
            "--root",
            str(root),
            "--registry",
            str(registry),
            "--out",
            str(out),
            *extra,
        ]
    )


def test_train_all_then_eval_writes_metrics_and_report(ray_cluster, synth_root, tmp_path, capsys):
    registry_dir = tmp_path / "registry"
    code = main(
        [
            "train",
            "all",
            "--dataset",
            "synthetic",
            "--root",
            str(synth_root),
            "--category",
            CATEGORY,
            "--epochs",
            "2",
            "--input-size",
            "96",  # the localizer's 100 queries need 189 proposals (12² + 6² + 3²)
            "--registry",
            str(registry_dir),
            "--storage",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)["trained"]
    stages = [
        "router",
        "detector",
        "verifier",
        "memory-bank",
        "classifier",
        "reranker",
        "localizer",
    ]
    assert [t["stage"] for t in trained] == stages
    registry = ArtifactRegistry(str(registry_dir))
    assert registry.stages(CATEGORY) == [
        "classifier",
        "decision",
        "detector",
        "memory-bank",
        "reranker",
        "verifier",
    ]
    # The reranker's fusion weight was chosen on validation against the classifier.
    fusion = next(t for t in trained if t["stage"] == "reranker")["fusion"]
    assert fusion["classifier_version"] == "v1" and 0.0 <= fusion["fusion_weight"] <= 1.0
    reranker = registry.manifest(CATEGORY, "reranker")
    assert reranker.config["fusion_weight"] == fusion["fusion_weight"]
    assert [d["name"] for d in reranker.config["descriptions"]] == sorted(DEFECT_TYPES)
    # The classifier's prototypes come from every training image of every class.
    classifier = next(t for t in trained if t["stage"] == "classifier")
    assert set(classifier["prototype_images"]) == {"good", *DEFECT_TYPES}
    assert min(classifier["prototype_images"].values()) > 0
    assert registry.stages(SHARED_CATEGORY) == ["localizer", "router"]
    localizer = registry.manifest(SHARED_CATEGORY, "localizer")
    assert localizer.config["defect_types"] == sorted(DEFECT_TYPES)
    detector = registry.manifest(CATEGORY, "detector")
    assert detector.config["training"]["mode"] == "supervised"
    assert len(detector.metrics["history"]) == 2
    assert detector.config["hyperparameters"]["backbone_lr_scale"] < 1
    decision = registry.manifest(CATEGORY, "decision")
    assert decision.config["detector_version"] == "v1"
    assert decision.config["verifier_version"] == "v1"
    assert decision.config["memory_bank_version"] == "v1"
    # The memory bank was fitted, not trained: one pass, a coreset of the good patches.
    bank = registry.manifest(CATEGORY, "memory-bank")
    assert len(bank.metrics["history"]) == 1 and bank.config["bank_size"] > 0
    assert bank.metrics["bank_size"] < bank.metrics["patches"]
    # The localizer's score threshold was fitted on validation (best F1 at IoU 0.5).
    boxes = next(t for t in trained if t["stage"] == "localizer")["boxes"]
    assert localizer.config["score_threshold"] == boxes["score_threshold"]

    out = tmp_path / "metrics.json"
    report = tmp_path / "report"
    code = _eval(synth_root, registry_dir, out, "--report", str(report))
    assert code == 0
    metrics = json.loads(out.read_text())
    for key in (
        "dataset",
        "n_images",
        "image_auroc",
        "binary_accuracy",
        "binary_f1",
        "balanced_accuracy",
        "verifier_call_rate",
        "per_category",
    ):
        assert key in metrics
    test_images = len(load_dataset("synthetic", synth_root).select(CATEGORY, "test"))
    assert metrics["n_images"] == test_images
    assert list(metrics["per_category"]) == [CATEGORY]
    assert 0.0 <= metrics["binary_accuracy"] <= 1.0
    # Both first-line scores are reported beside each other, and the heatmaps are
    # scored against the defect masks (the memory bank draws them).
    assert 0.0 <= metrics["detector_auroc"] <= 1.0 and 0.0 <= metrics["memory_bank_auroc"] <= 1.0
    own = metrics["per_category"][CATEGORY]
    assert own["heatmap_source"] == "memory-bank" and 0.0 <= own["pixel_auroc"] <= 1.0
    assert 0.0 <= own["aupro"] <= 1.0
    assert metrics["localizer"]["boxes_per_image"] >= 0
    text = (report / "report.md").read_text()
    # Every true defect was typed, and ranked before and after reranking.
    assert metrics["n_typed"] == metrics["n_anomalous"] > 0
    assert 0.0 <= metrics["defect_type_top1"] <= 1.0
    assert 0.0 <= metrics["defect_type_top1_classifier_only"] <= 1.0
    assert "n_open_vocabulary" not in metrics  # every type had training images
    # The localizer was scored with the COCO protocol on the test boxes.
    assert 0.0 <= metrics["localizer_map50_95"] <= metrics["localizer_map50"] <= 1.0
    assert set(metrics["localizer"]["ap50_per_class"]) == set(DEFECT_TYPES)
    # Each stage's training history reached the report as a learning-curve plot.
    for stage in ("detector", "verifier", "classifier", "reranker"):
        plots = list(report.glob(f"learning_*_{CATEGORY}_{stage}.png"))
        assert len(plots) == 1 and plots[0].name in text
    assert len(json.loads((report / "records.json").read_text())) == test_images

    # Routing: withhold the categories; the router names them.
    code = _eval(synth_root, registry_dir, tmp_path / "routed.json", "--route")
    assert code == 0
    assert json.loads((tmp_path / "routed.json").read_text())["router_accuracy"] > 0.5


def test_a_held_out_type_is_ranked_from_its_description(ray_cluster, synth_root, tmp_path):
    registry_dir = tmp_path / "registry"
    common = ["--dataset", "synthetic", "--root", str(synth_root), "--category", CATEGORY]
    common += ["--epochs", "1", "--input-size", "64", "--registry", str(registry_dir)]
    common += ["--storage", str(tmp_path / "runs"), "--hold-out", "perforation"]
    for stage in ("detector", "classifier", "reranker"):
        assert main(["train", stage, *common]) == 0
    registry = ArtifactRegistry(str(registry_dir))
    classifier = registry.manifest(CATEGORY, "classifier").config
    assert "perforation" not in classifier["classes"]
    reranker = registry.manifest(CATEGORY, "reranker").config
    assert "perforation" not in [d["name"] for d in reranker["descriptions"]]
    # Refitting the fusion weight stores a new reranker version, weights unchanged.
    refit = ["refit-fusion", *common[:4], "--registry", str(registry_dir)]
    assert main([*refit, "--hold-out", "perforation"]) == 0
    refitted = registry.manifest(CATEGORY, "reranker")
    assert refitted.version == "v2" and refitted.metrics["refitted_from"] == "v1"
    assert refitted.metrics["fusion"]["ranked_by_classifier_alone"] == []
    assert refitted.weights.sha256 == registry.manifest(CATEGORY, "reranker", "v1").weights.sha256
    # Refitting the classifier's prototypes refits the fusion weight after it.
    refit = ["refit-prototypes", *common[:4], "--registry", str(registry_dir)]
    assert main(refit) == 2  # the full training split has a class the classifier lacks
    assert main([*refit, "--hold-out", "perforation"]) == 0
    assert registry.manifest(CATEGORY, "classifier").metrics["refitted_from"] == "v1"
    assert registry.manifest(CATEGORY, "reranker").metrics["refitted_from"] == "v2"

    out = tmp_path / "metrics.json"
    assert _eval(synth_root, registry_dir, out, "--describe", "perforation") == 0
    metrics = json.loads(out.read_text())
    test = load_dataset("synthetic", synth_root).select(CATEGORY, "test")
    assert metrics["n_open_vocabulary"] == sum(s.label == "perforation" for s in test) > 0
    assert 0.0 <= metrics["open_vocabulary_top1"] <= 1.0
    # Without the description, no image can be called a perforation.
    assert _eval(synth_root, registry_dir, tmp_path / "closed.json") == 0
    closed = json.loads((tmp_path / "closed.json").read_text())
    assert "n_open_vocabulary" not in closed
    assert "perforation" not in {k.split("->")[1] for k in closed["defect_type_confusions"]}
    assert (
        main(
            [
                "eval",
                *common[:4],
                "--registry",
                str(registry_dir),
                "--out",
                str(out),
                "--describe",
                "no_such_type",
            ]
        )
        == 2
    )
    # Reviewers teach the classifier the type the reranker has no words for (here:
    # the full training split): the reranker's fusion is refitted with the taught
    # type ranked by the classifier alone (as the flow ranks it: tests/unit/models/inspection).
    full = [arg for arg in common if arg not in ("--hold-out", "perforation")]
    assert main(["train", "classifier", *full]) == 0
    fusion = registry.manifest(CATEGORY, "reranker").metrics["fusion"]
    assert fusion["classifier_version"] == registry.manifest(CATEGORY, "classifier").version
    assert fusion["ranked_by_classifier_alone"] == ["perforation"]


def test_a_normal_only_detector_trains_its_whole_schedule_and_keeps_the_last_epoch(
    ray_cluster, synth_root, tmp_path
):
    # Good parts only: validated on a few of them and their synthetic anomalies,
    # which cannot choose an epoch; patience 1 would stop a run judged by them.
    found = load_dataset("synthetic", synth_root)
    goods = Dataset(found.name, tuple(s for s in found.samples if s.label == "good"))
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    train_stage(registry, goods, "detector", CATEGORY, _settings(tmp_path, epochs=4, patience=1))
    manifest = registry.manifest(CATEGORY, "detector")
    assert manifest.config["training"]["mode"] == NORMAL_ONLY
    assert [h["epoch"] for h in manifest.metrics["history"]] == [1, 2, 3, 4]
    assert manifest.metrics["epoch"] == 4  # the weights kept are the last epoch's


def test_two_workers_train_with_ddp(ray_cluster, synth_root, tmp_path):
    dataset = load_dataset("synthetic", synth_root)
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    summary = train_stage(
        registry, dataset, "detector", CATEGORY, _settings(tmp_path, epochs=1, num_workers=2)
    )
    history = registry.manifest(CATEGORY, "detector").metrics["history"]
    assert summary["version"] == "v1"
    assert history[0]["world_size"] == 2


def _assert_every_cpu_comes_back(ray: Any, within_s: float = 60.0) -> None:
    """Fail, naming what holds them, unless the cluster's CPUs are all free again.

    A training run that ends, killed workers included, gives back every CPU;
    one that does not would leave the next run waiting for CPUs for ever.
    """
    from ray.util.state import list_actors, list_placement_groups

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0.0) < total:
        if time.monotonic() > deadline:
            address = ray.get_runtime_context().gcs_address
            alive = list_actors(address=address, filters=[("state", "=", "ALIVE")])
            groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")])
            pytest.fail(
                f"{ray.available_resources().get('CPU', 0.0)} of {total} CPUs free after "
                f"{within_s:.0f} s; alive actors: {[a.class_name for a in alive]}; "
                f"placement groups: {[(g.name, g.bundles) for g in groups]}"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def _service_holding_all_cpus_but_half_of_one(ray: Any) -> Iterator[None]:
    """An actor that holds the cluster's CPUs but 0.5, as a service's replicas do."""

    @ray.remote(num_cpus=ray.cluster_resources()["CPU"] - 0.5)
    class Replica:
        def ping(self) -> bool:
            return True

    replica = Replica.remote()
    try:
        ray.get(replica.ping.remote(), timeout=60)
        yield
    finally:
        ray.kill(replica)


def test_a_fitted_router_beside_a_service_that_holds_cpus_asks_for_what_is_free(
    ray_cluster, synth_root, tmp_path
):
    """A service's replicas hold a share of the CPUs; a training run still starts."""
    with _service_holding_all_cpus_but_half_of_one(ray_cluster):
        settings = _settings(tmp_path, model_config={"input_size": 64, "head": "fitted"})
        asked = requested_cpus(settings, cpus_per_worker(settings))
        assert 0 < asked <= 0.5 < cpus_per_worker(settings)
        probe = ray_cluster.remote(lambda: True).options(num_cpus=asked).remote()
        assert ray_cluster.get(probe, timeout=60)  # schedulable beside the replica
        dataset = load_dataset("synthetic", synth_root)
        registry = ArtifactRegistry(str(tmp_path / "registry"))
        summary = train_stage(registry, dataset, "router", CATEGORY, settings)
    manifest = registry.manifest(SHARED_CATEGORY, "router")
    assert summary["version"] == manifest.version == "v1"
    assert manifest.config["head"] == "fitted"
    [fit] = manifest.metrics["history"]  # one pass, no epochs
    assert fit["images"] == len(dataset.select(CATEGORY, "train")) * 2
    assert fit["val_accuracy"] == 1.0  # the two surfaces look nothing alike


def test_one_detector_pooled_for_two_categories(ray_cluster, synth_root, tmp_path, capsys):
    registry_dir = tmp_path / "registry"
    common = ["--dataset", "synthetic", "--root", str(synth_root), "--pool-categories"]
    common += ["--epochs", "1", "--input-size", "64", "--registry", str(registry_dir)]
    common += ["--storage", str(tmp_path / "runs")]
    assert main(["train", "detector", *common]) == 0
    trained = json.loads(capsys.readouterr().out)["trained"]
    assert [t["category"] for t in trained] == [CATEGORY, "painted_panel"]
    registry = ArtifactRegistry(str(registry_dir))
    first, second = (registry.load(c, "detector") for c in (CATEGORY, "painted_panel"))
    assert first.state_dict.keys() == second.state_dict.keys()
    assert all(first.state_dict[k].equal(second.state_dict[k]) for k in first.state_dict)
    assert first.manifest.config["training"]["pooled_with"] == ["painted_panel"]
    assert second.manifest.config["training"]["pooled_with"] == [CATEGORY]
    # It learnt from both categories' images; each rule is fitted on its own.
    assert first.manifest.data["categories"] == [CATEGORY, "painted_panel"]
    assert all(registry.stages(c) == ["decision", "detector"] for c in (CATEGORY, "painted_panel"))
    assert main(["train", "verifier", *common]) == 2
    assert "applies to the detector and classifier" in capsys.readouterr().err


def _registered_checkpoints(snapshot: Path) -> int:
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or mid-write
        return 0


# The kill lands after the first checkpoint, with four epochs still to run.
DRILL_EPOCHS = 5


@pytest.mark.faults
def test_killed_worker_resumes_from_its_last_checkpoint(
    ray_cluster, synth_root, tmp_path, fault_report
):
    from ray.util.state import list_actors

    from loadtests.faults import FaultRow

    dataset = load_dataset("synthetic", synth_root)
    settings = _settings(tmp_path, epochs=DRILL_EPOCHS, patience=100, max_failures=2)
    spec = family_spec(dataset, "detector", CATEGORY, settings)
    began = time.monotonic()
    straight = fit_family(spec, settings, "straight")  # the same run, left alone
    straight_s = time.monotonic() - began
    outcome: dict = {}
    began = time.monotonic()
    run = threading.Thread(
        target=lambda: outcome.update(fit=fit_family(spec, settings, "killed")), daemon=True
    )
    run.start()
    # Kill once the controller has registered a checkpoint (its snapshot lists it).
    snapshot = tmp_path / "runs" / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not _registered_checkpoints(snapshot):
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.1)
    workers = list_actors(
        address=ray_cluster.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    assert workers, "no live training worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    run.join(timeout=300)
    killed_s = time.monotonic() - began
    fit = outcome["fit"]
    epochs = [h["epoch"] for h in fit.history]
    resumed = [h["resumed_from"] for h in fit.history]
    final, alone = fit.history[-1], straight.history[-1]
    fault_report.append(
        FaultRow(
            f"training worker SIGKILLed mid-run (detector, {DRILL_EPOCHS} epochs, max_failures 2)",
            tries=1,
            requests=len(epochs),
            failed=0 if epochs == list(range(1, DRILL_EPOCHS + 1)) else 1,
            results_lost=len(set(range(1, DRILL_EPOCHS + 1)) - set(epochs)),
            recover_s=killed_s - straight_s,  # what the kill cost over the same run alone
            extra={
                "resumed_from_epoch": resumed[-1],
                "val_auroc": round(final["val_auroc"], 4),
                "val_auroc_alone": round(alone["val_auroc"], 4),
                "val_loss": round(final["val_loss"], 4),
                "val_loss_alone": round(alone["val_loss"], 4),
            },
        )
    )
    every_epoch = list(range(1, DRILL_EPOCHS + 1))
    assert epochs == every_epoch, "every epoch ran exactly once across the restart"
    assert resumed[0] == 0 and resumed[-1] >= 1, "the last epochs ran after resuming"
    # The same metrics as the run left alone: each epoch draws from its own seed,
    # so only floating-point noise may differ.
    assert abs(final["val_auroc"] - alone["val_auroc"]) <= 0.05, (final, alone)
    assert abs(final["val_loss"] - alone["val_loss"]) <= 0.01 * alone["val_loss"], (final, alone)
    _assert_every_cpu_comes_back(ray_cluster)


def test_tune_sweep_promotes_the_best_trial(ray_cluster, synth_root, tmp_path):
    from tune.sweep import sweep_stage

    _assert_every_cpu_comes_back(ray_cluster)
    dataset = load_dataset("synthetic", synth_root)
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    result = sweep_stage(registry, dataset, "detector", CATEGORY, 2, _settings(tmp_path))
    _assert_every_cpu_comes_back(ray_cluster)  # trials stopped early included
    assert len(result["trials"]) == 2
    assert sum(t["best"] for t in result["trials"]) == 1
    for trial in result["trials"]:
        assert trial["config"]["batch_size"] in (8, 16, 32)
        assert trial["config"]["optimizer"] in ("adamw", "sgd")
        assert DEFAULT_LR["detector"] / 10 <= trial["config"]["lr"] <= DEFAULT_LR["detector"] * 10
    assert result["registered"]["version"] == "v1" and result["promoted"] is True
    manifest = registry.manifest(CATEGORY, "detector")
    assert manifest.metrics["sweep"][0]["trial_id"]
    assert list(Path(result["experiment"]).rglob("events.out.tfevents*")), "no TensorBoard events"
    # Each trial is a run in the tracking store beside the checkpoints.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(Path(result["experiment"]).name)
    assert experiment is not None
    logged = client.search_runs([experiment.experiment_id])
    assert len(logged) == 2 and all("val_auroc" in run.data.metrics for run in logged)
    # A production version that validates better is not replaced by the sweep.
    registry.save(
        CATEGORY,
        "detector",
        registry.load(CATEGORY, "detector").state_dict,
        config=manifest.config,
        preprocessing=manifest.preprocessing,
        data=manifest.data,
        metrics=manifest.metrics | {"val_auroc": 2.0},
        promote=True,
    )
    with _service_holding_all_cpus_but_half_of_one(ray_cluster):  # sweeping beside it
        again = sweep_stage(registry, dataset, "detector", CATEGORY, 1, _settings(tmp_path))
    assert again["promoted"] is False and again["registered"]["version"] == "v3"
    assert registry.resolve(CATEGORY, "detector", "production") == "v2"


def _read_until(process: subprocess.Popen, line: str, timeout_s: float) -> list[str]:
    """The process's stderr lines up to ``line``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = process.stderr.readline()
        if not got and process.poll() is not None:
            break
        lines.append(got.rstrip("\n"))
        if lines[-1] == line:
            return lines
    pytest.fail(f"no {line!r} in {timeout_s:.0f} s: {lines}")


def test_training_runs_are_tracked_and_the_dashboards_serve_them(ray_cluster, synth_root, tmp_path):
    import httpx
    import mlflow

    dataset = load_dataset("synthetic", synth_root)
    registry = ArtifactRegistry(str(tmp_path / "registry"))
    summary = train_stage(registry, dataset, "memory-bank", CATEGORY, _settings(tmp_path))
    runs, tracked = tmp_path / "runs", summary["tracked"]
    assert tracked["mlflow_uri"] == f"sqlite:///{runs / 'mlflow.db'}"
    run = mlflow.MlflowClient(tracked["mlflow_uri"]).get_run(tracked["mlflow"])
    assert run.data.tags["version"] == summary["version"] == "v1"
    assert run.data.metrics["val_auroc"] == summary["best"]["val_auroc"]
    assert run.data.params["batch_size"] == "8"
    assert list(Path(tracked["tensorboard"]).glob("events.out.tfevents*"))

    command = [sys.executable, "-m", "cluster.cli", "dashboards", "--runs", str(runs)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        lines = _read_until(process, "Ctrl-C stops them.", timeout_s=240)
        urls = dict(line.split() for line in lines if line.startswith("  "))
        board, tracking = urls["TensorBoard"], urls["MLflow"]
        assert "<title>TensorBoard</title>" in httpx.get(board, timeout=30).text
        board_runs = httpx.get(f"{board}/data/runs", timeout=30).json()
        assert f"tensorboard/{Path(tracked['tensorboard']).name}" in board_runs, board_runs
        assert "MLflow" in httpx.get(tracking, timeout=30).text
        found = httpx.post(
            f"{tracking}/api/2.0/mlflow/experiments/search", json={"max_results": 100}, timeout=30
        ).json()["experiments"]
        [experiment] = [e for e in found if e["name"] == f"{CATEGORY}/memory-bank"]
        logged = httpx.post(
            f"{tracking}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [experiment["experiment_id"]]},
            timeout=30,
        ).json()["runs"]
        assert [r["info"]["run_id"] for r in logged] == [tracked["mlflow"]]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0
