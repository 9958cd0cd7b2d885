"""Where runs are recorded: the default tracking store, TensorBoard scalars, MLflow runs."""

from pathlib import Path

import mlflow
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.cli import EXIT_USER_ERROR, main
from tune.tracking import record_training, tracking_uri


def test_the_tracking_store_defaults_to_a_file_beside_local_checkpoints(tmp_path):
    assert tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(str(tmp_path), "http://mlflow:5000") == "http://mlflow:5000"
    assert tracking_uri(str(tmp_path), "none") is None
    assert tracking_uri("s3://bucket/runs") is None  # no default store for a URL


def test_a_training_run_becomes_scalars_and_an_mlflow_run(tmp_path):
    history = [{"epoch": 1, "val_auroc": 0.8, "train_loss": 0.5, "note": "x"}]
    history.append({"epoch": 2, "val_auroc": 0.9, "train_loss": float("nan")})
    summary = {"category": "tile", "stage": "detector", "version": "v3", "promoted": True}
    recorded = record_training(str(tmp_path), None, "run-a", summary, {"lr": 0.001}, history)
    events = EventAccumulator(recorded["tensorboard"])
    events.Reload()
    assert [e.value for e in events.Scalars("val_auroc")] == pytest.approx([0.8, 0.9])
    assert [e.step for e in events.Scalars("train_loss")] == [1]  # NaN is not logged
    client = mlflow.MlflowClient(recorded["mlflow_uri"])
    run = client.get_run(recorded["mlflow"])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.tags["version"] == "v3" and run.data.params["lr"] == "0.001"
    steps = client.get_metric_history(run.info.run_id, "val_auroc")
    assert [(m.step, m.value) for m in steps] == [(1, 0.8), (2, 0.9)]
    assert client.get_experiment(run.info.experiment_id).name == "tile/detector"


def test_an_unwritable_store_costs_the_record_not_the_run(tmp_path):
    summary = {"category": "tile", "stage": "detector", "version": "v1"}
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    recorded = record_training(
        str(tmp_path), f"sqlite:///{blocked}/x/mlflow.db", "run-b", summary, {}, [{"epoch": 1}]
    )
    assert "mlflow" not in recorded and Path(recorded["tensorboard"]).is_dir()


def test_dashboards_without_runs_say_so(tmp_path, capsys):
    assert main(["dashboards", "--runs", str(tmp_path / "missing")]) == EXIT_USER_ERROR
    assert "no runs folder" in capsys.readouterr().err
