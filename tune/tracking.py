"""Where training runs and sweeps are recorded: TensorBoard event files and MLflow.

Every ``inspectray train`` run writes its epochs as TensorBoard scalars under
``<storage>/tensorboard/<run name>/`` and logs a run (parameters, every epoch's
metrics, the registered version) to the MLflow tracking store, by default an
SQLite file beside the checkpoints (``<storage>/mlflow.db``). Sweeps log their
trials to the same store and write their own event files in their experiment
folder. ``inspectray dashboards`` serves both.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKING_FILE = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"
NO_TRACKING = "none"


def tracking_uri(storage_path: str, given: str | None = None) -> str | None:
    """The MLflow tracking URI: ``given``, else an SQLite store in a local storage folder.

    ``none`` turns tracking off; a storage URL (``s3://...``) has no default store.
    """
    if given:
        return None if given == NO_TRACKING else given
    if "://" in storage_path:
        return None
    folder = Path(storage_path).expanduser().resolve()
    return f"sqlite:///{folder / TRACKING_FILE}"


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def write_tensorboard(folder: Path, history: Sequence[Mapping[str, Any]]) -> Path:
    """Every epoch's numeric metrics as TensorBoard scalars in ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(folder)) as writer:
        for step, epoch in enumerate(history, start=1):
            for key, value in _numbers(epoch).items():
                writer.add_scalar(key, value, global_step=int(epoch.get("epoch", step)))
    return folder


def log_training_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    tags: Mapping[str, str],
) -> str:
    """Log one finished training run to MLflow; returns its run id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow"):  # the store's schema migrations are not news
        logging.getLogger(name).setLevel(logging.WARNING)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    try:
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        for step, epoch in enumerate(history, start=1):
            for key, value in _numbers(epoch).items():
                client.log_metric(run_id, key, value, step=int(epoch.get("epoch", step)))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def record_training(
    storage_path: str,
    given_uri: str | None,
    run_name: str,
    summary: Mapping[str, Any],
    params: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
) -> dict[str, str]:
    """TensorBoard scalars and an MLflow run for a registered training run.

    A tracking store that cannot be written costs a warning, never the trained
    model (it is registered already).

    Returns:
        Where the run was recorded: ``tensorboard`` (folder), ``mlflow`` (run id).
    """
    recorded: dict[str, str] = {}
    category, stage = str(summary["category"]), str(summary["stage"])
    if "://" not in storage_path:
        folder = Path(storage_path).expanduser().resolve() / TENSORBOARD_DIR / run_name
        recorded["tensorboard"] = str(write_tensorboard(folder, history))
    uri = tracking_uri(storage_path, given_uri)
    if uri is not None:
        try:
            recorded["mlflow"] = log_training_run(
                uri,
                experiment=f"{category}/{stage}",
                run_name=run_name,
                params=params,
                history=history,
                tags={
                    "category": category,
                    "stage": stage,
                    "version": str(summary.get("version", "")),
                    "promoted": str(summary.get("promoted", "")),
                },
            )
            recorded["mlflow_uri"] = uri
        except Exception as error:  # the model is registered; only the record is lost
            log.warning("could not log the run to MLflow at %s: %s", uri, error)
    return recorded


__all__ = ["NO_TRACKING", "record_training", "tracking_uri", "write_tensorboard"]
