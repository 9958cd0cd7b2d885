"""Ray Tune sweeps: learning rate x batch size x optimizer, with ASHA early stopping.

Each Tune trial drives one Ray Train run (the Train V2 pattern: the trial function
builds a ``TorchTrainer`` whose ``TuneReportCallback`` forwards every epoch's
metrics to Tune), so ASHA stops weak configurations after their first epochs and
the trials themselves are distributed runs. The best trial's weights are promoted
to the registry. Trial metrics go to TensorBoard event files under the
experiment folder, and to MLflow when a tracking URI is given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from models.artifacts import ArtifactRegistry
from models.data import Dataset
from models.training import FAMILIES
from tune.tracking import tracking_uri
from tune.trainer import (
    DEFAULT_LR,
    FitResult,
    TrainSettings,
    cpus_per_worker,
    ensure_ray,
    family_spec,
    make_trainer,
    register_fit,
    requested_cpus,
    storage_uri,
)

BATCH_SIZES = (8, 16, 32)
OPTIMIZERS = ("adamw", "sgd")


def search_space(stage: str) -> dict[str, Any]:
    """Log-uniform learning rate over two decades around the family's default."""
    default = DEFAULT_LR[stage]
    return {
        "lr": tune.loguniform(default / 10.0, default * 10.0),
        "batch_size": tune.choice(list(BATCH_SIZES)),
        "optimizer": tune.choice(list(OPTIMIZERS)),
    }


def _trial(
    config: dict[str, Any], spec: Mapping[str, Any], settings: TrainSettings, cpus: float
) -> None:
    """One Tune trial: a Ray Train run with the trial's hyperparameters.

    ``cpus``: what each of its workers asks for (:func:`~tune.trainer.requested_cpus`).
    """
    # A failed run fails its trial and Tune retries the trial (the sweep's
    # FailureConfig), not Ray Train: when the scheduler stops a trial, its run's
    # controller dies with the trial, and one still able to retry could start a
    # new worker group after Ray Train's cleaner freed the old one's CPUs,
    # holding them with nobody left to free them.
    trial_settings = dataclasses.replace(
        settings,
        lr=float(config["lr"]),
        batch_size=int(config["batch_size"]),
        optimizer=str(config["optimizer"]),
        max_failures=0,
    )
    name = f"trial-{tune.get_context().get_trial_id()}"
    make_trainer(spec, trial_settings, name, [TuneReportCallback()], cpus=cpus).fit()


def sweep_stage(
    registry: ArtifactRegistry,
    dataset: Dataset,
    stage: str,
    category: str,
    num_samples: int,
    settings: TrainSettings,
    mlflow_uri: str | None = None,
) -> dict[str, Any]:
    """Sweep one stage of one category and promote the best trial.

    Args:
        registry: where the best trial's weights go.
        dataset: the data.
        stage: a trainable stage (``detector``, ``verifier``, ``classifier``, ...).
        category: the product category.
        num_samples: trials.
        settings: everything not swept; ``settings.epochs`` is ASHA's ``max_t``.
        mlflow_uri: the MLflow tracking URI to log the trials to (default:
            ``settings.tracking_uri``, else the store beside the checkpoints;
            ``none``: not logged).

    Returns:
        The trials (config, epochs, best metric), the best trial and the promoted artifact.
    """
    ensure_ray()
    family = FAMILIES[stage]
    metric = family.monitor
    spec = family_spec(dataset, stage, category, settings)
    name = f"tune-{dataset.name}-{category}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    callbacks: list[Any] = [TBXLoggerCallback()]
    tracking = tracking_uri(settings.storage_path, mlflow_uri or settings.tracking_uri)
    if tracking:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=tracking, experiment_name=name))
    # The trial function only drives; its Train workers hold the CPUs, so the trial
    # itself asks for no CPU (a token byte of memory: Tune refuses empty requests)
    # and trials run as many at a time as their workers fit.
    # Beside a service that holds some CPUs, each worker asks for those left free
    # (read once, before any trial holds its own).
    threads = cpus_per_worker(settings)
    cpus = requested_cpus(settings, threads)
    concurrent = max(1, int(_cluster_cpus() // (threads * settings.num_workers)))
    trainable = tune.with_parameters(_trial, spec=spec, settings=settings, cpus=cpus)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"memory": 1}),
        param_space=search_space(stage),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=num_samples,
            scheduler=ASHAScheduler(
                time_attr="epoch", max_t=settings.epochs, grace_period=1, reduction_factor=2
            ),
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_uri(settings.storage_path),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        ),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        history = (
            result.metrics_dataframe.to_dict("records")
            if result.metrics_dataframe is not None
            else []
        )
        values = [row[metric] for row in history if metric in row]
        trials.append(
            {
                "trial_id": str(result.metrics.get("trial_id", Path(result.path).name)),
                "config": {k: result.config[k] for k in ("lr", "batch_size", "optimizer")},
                "metric": metric,
                "epochs": len(values),
                "best_metric": max(values) if values else float("nan"),
                "history": [
                    {"epoch": int(row["epoch"]), metric: float(row[metric])}
                    for row in history
                    if metric in row
                ],
                "checkpoint_path": result.metrics.get("checkpoint_path"),
                "error": str(result.error) if result.error else None,
            }
        )
    finished = [t for t in trials if t["epochs"] and t["checkpoint_path"]]
    if not finished:
        raise RuntimeError(f"no trial of {name} finished an epoch: {[t['error'] for t in trials]}")
    best = max(finished, key=lambda t: t["best_metric"])
    for trial in trials:
        trial["best"] = trial is best
    best_settings = dataclasses.replace(settings, **best["config"])
    # The reported checkpoint is the trial's last; it carries the trial's best weights.
    fit = FitResult.from_checkpoint(ray.train.Checkpoint(best["checkpoint_path"]))
    sweep = [{k: v for k, v in t.items() if k != "checkpoint_path"} for t in trials]
    # The sweep's winner replaces production only if it validates better than it.
    incumbent = _production_metric(registry, spec["category"], stage, metric)
    promote = incumbent is None or best["best_metric"] > incumbent
    registered = register_fit(
        registry, dataset, spec, best_settings, fit, extra_metrics={"sweep": sweep}, promote=promote
    )
    return {
        "experiment": str(Path(storage_uri(settings.storage_path)) / name),
        "metric": metric,
        "trials": sweep,
        "best": {
            "trial_id": best["trial_id"],
            "config": best["config"],
            metric: best["best_metric"],
        },
        "registered": {k: registered[k] for k in ("category", "stage", "version")},
        "promoted": promote,
        "production_" + metric: incumbent,
    }


def _production_metric(
    registry: ArtifactRegistry, category: str, stage: str, metric: str
) -> float | None:
    """The validation metric of the version in production, if there is one."""
    if category not in registry.categories() or stage not in registry.stages(category):
        return None
    value = registry.manifest(category, stage).metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _cluster_cpus() -> float:
    return ray.cluster_resources().get("CPU", 1.0)
