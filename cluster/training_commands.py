"""``inspectray train``, ``inspectray tune`` and ``inspectray eval``.

    inspectray train {detector|verifier|router|all} --dataset NAME [--root DIR]
        [--category C] [--epochs N] [--num-workers W] [--use-gpu] [--registry DIR]
    inspectray tune {detector|verifier} --dataset NAME [--root DIR] --num-samples N
        [--max-epochs N] [--registry DIR]
    inspectray eval --dataset NAME [--root DIR] [--registry DIR] --out metrics.json
        [--report DIR]

Training and sweeps run on Ray (a local cluster, or the one ``RAY_ADDRESS`` names);
each epoch prints a log line; the result is printed as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATASET_CHOICES = ["elpv", "synthetic", "mvtec-ad", "mvtec-screws", "coco"]
TRAINABLE = ("detector", "verifier", "router", "classifier", "all")
SWEEPABLE = ("detector", "verifier", "classifier")
# Stages whose backbone has frozen blocks to choose (--freeze-stages).
FREEZABLE = ("detector", "classifier")
N_HEATMAPS = 4  # Grad-CAM examples per kind (worst false positives, negatives, true positives)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from cluster.cli import _dataset_root, _registry
    from models.data import load_dataset

    return load_dataset(args.dataset, _dataset_root(args)), _registry(args)


def _categories(dataset: Any, wanted: str | None) -> list[str]:
    from models.data import DataError

    if wanted is None:
        return list(dataset.categories)
    if wanted not in dataset.categories:
        raise DataError(
            f"dataset {dataset.name!r} has no category {wanted!r}: {dataset.categories}"
        )
    return [wanted]


def _settings(args: argparse.Namespace, epochs: int) -> Any:
    from tune.trainer import TrainSettings

    overrides = {"input_size": args.input_size} if args.input_size else {}
    if args.autocontrast is not None:
        overrides["autocontrast"] = args.autocontrast
    if args.freeze_stages is not None:
        if args.stage not in (*FREEZABLE, "all"):
            from models.config import ConfigError

            raise ConfigError(
                f"--freeze-stages applies to the detector and classifier, not the {args.stage}"
            )
        overrides["freeze_stages"] = args.freeze_stages
    return TrainSettings(
        epochs=epochs,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        patience=args.patience,
        seed=args.seed,
        storage_path=args.storage,
        model_config=overrides,
        augment=args.augment,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train stages on Ray Train, register and promote them, refit the decision rules."""
    from tune.trainer import STAGES_IN_ORDER, has_labelled_defects, train_stage

    dataset, registry = _load(args)
    categories = _categories(dataset, args.category)
    stages = STAGES_IN_ORDER if args.stage == "all" else (args.stage,)
    settings = _settings(args, args.epochs)
    results = []
    for stage in stages:
        stage_settings = settings
        if stage not in FREEZABLE and "freeze_stages" in settings.model_config:
            config = {k: v for k, v in settings.model_config.items() if k != "freeze_stages"}
            stage_settings = dataclasses.replace(settings, model_config=config)
        for category in categories[:1] if stage == "router" else categories:
            skip = args.stage == "all" and stage == "classifier"
            if skip and not has_labelled_defects(dataset, category):
                print(f"no classifier for {category}: no labelled defects", file=sys.stderr)
                continue
            print(
                f"training {stage} for {category} on {args.num_workers} worker(s)", file=sys.stderr
            )
            results.append(train_stage(registry, dataset, stage, category, stage_settings))
    from cluster.cli import _print_json

    _print_json({"dataset": dataset.name, "registry": registry.uri, "trained": results})
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Sweep lr x batch size x optimizer with ASHA; promote each category's best trial."""
    from tune.sweep import sweep_stage

    dataset, registry = _load(args)
    settings = _settings(args, args.max_epochs)
    # Tune prints its trial table on stdout; this command's stdout is its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        sweeps = [
            sweep_stage(
                registry, dataset, args.stage, category, args.num_samples, settings, args.mlflow_uri
            )
            for category in _categories(dataset, args.category)
        ]
    from cluster.cli import _print_json

    _print_json({"dataset": dataset.name, "stage": args.stage, "sweeps": sweeps})
    return 0


def _histories_and_sweeps(registry: Any, categories: list[str]) -> tuple[dict, dict]:
    from models.stages import CLASSIFIER, DETECTOR, ROUTER, ROUTER_CATEGORY, VERIFIER

    histories, sweeps = {}, {}
    owners = [(c, s) for c in categories for s in (DETECTOR, VERIFIER, CLASSIFIER)]
    owners.append((ROUTER_CATEGORY, ROUTER))
    for category, stage in owners:
        if category not in registry.categories() or stage not in registry.stages(category):
            continue
        metrics = registry.manifest(category, stage).metrics
        key = f"{category}/{stage}"
        if metrics.get("history"):
            histories[key] = metrics["history"]
        if metrics.get("sweep"):
            sweeps[key] = metrics["sweep"]
    return histories, sweeps


def _heatmaps(pipeline: Any, records: list[Any]) -> dict[str, Any]:
    """Grad-CAM maps of the worst false positives and negatives and the surest defects."""
    from models.data.sample import read_image

    fp = sorted(
        (r for r in records if r.predicted_anomalous and not r.is_anomalous),
        key=lambda r: -r.anomaly_score,
    )
    fn = sorted(
        (r for r in records if r.is_anomalous and not r.predicted_anomalous),
        key=lambda r: r.anomaly_score,
    )
    tp = sorted(
        (r for r in records if r.is_anomalous and r.predicted_anomalous),
        key=lambda r: -r.anomaly_score,
    )
    chosen = fp[:N_HEATMAPS] + fn[:N_HEATMAPS] + tp[:N_HEATMAPS]
    maps = {}
    for record in chosen:
        inspection = pipeline.inspect(
            [read_image(Path(record.image_path))], [record.category], explain=True
        )[0]
        maps[record.sample_id] = inspection.heatmap
    return maps


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the InspectionPipeline over the test split; write metrics and a report."""
    from models.evaluation.run import evaluate
    from models.pipeline import InspectionPipeline

    dataset, registry = _load(args)
    pipeline = InspectionPipeline.from_registry(
        registry, [c for c in dataset.categories if c in registry.categories()] or None
    )
    records, metrics = evaluate(pipeline, dataset, split=args.split, route=args.route)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.report:
        from models.evaluation.report import write_report

        histories, sweeps = _histories_and_sweeps(registry, pipeline.categories)
        report = write_report(
            Path(args.report),
            dataset=dataset.name,
            records=records,
            metrics=metrics,
            histories=histories,
            sweeps=sweeps,
            heatmaps=_heatmaps(pipeline, records),
        )
        (Path(args.report) / "records.json").write_text(
            json.dumps([r.to_dict() for r in records], indent=1) + "\n"
        )
        print(f"report: {report}", file=sys.stderr)
    from cluster.cli import _print_json

    _print_json(metrics)
    return 0


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    command.add_argument("--root", help="dataset folder (ELPV: the installed package by default)")
    command.add_argument("--registry", help="registry folder or URL (default: config)")


def _training_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--category", help="one product category (default: all)")
    command.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    command.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    command.add_argument("--lr", type=float, help="head learning rate (default: per stage)")
    command.add_argument("--batch-size", type=int, default=16, help="per worker")
    command.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    command.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--input-size", type=int, help="model input side in pixels (224)")
    command.add_argument(
        "--freeze-stages",
        type=int,
        help="backbone blocks kept frozen after the stem (detector: 2; 0 fine-tunes all)",
    )
    command.add_argument(
        "--augment",
        choices=["d4", "flips"],
        default="d4",
        help="flips and right-angle turns (d4), or flips only for parts always imaged "
        "the same way up (ELPV's cells)",
    )
    command.add_argument(
        "--autocontrast",
        type=float,
        help="stretch each image's contrast, clipping this percent at each end "
        "(faint defects on dim images, such as ELPV's micro-cracks)",
    )
    command.add_argument("--storage", default="runs", help="checkpoint folder or URL")


def add_commands(
    commands: argparse._SubParsersAction,
    add: Callable[..., argparse.ArgumentParser],
) -> None:
    """Register train, tune and eval on the main parser."""
    train = add(commands, "train", cmd_train)
    train.add_argument("stage", choices=TRAINABLE)
    _common(train)
    _training_options(train)
    train.add_argument("--epochs", type=int, default=8, help="maximum epochs (early stopping)")

    tune = add(commands, "tune", cmd_tune)
    tune.add_argument("stage", choices=SWEEPABLE)
    _common(tune)
    _training_options(tune)
    tune.add_argument("--num-samples", type=int, required=True, help="trials per category")
    tune.add_argument("--max-epochs", type=int, default=4, help="ASHA's maximum epochs per trial")
    tune.add_argument("--mlflow-uri", help="also log the trials to this MLflow tracking URI")

    evaluate = add(commands, "eval", cmd_eval)
    _common(evaluate)
    evaluate.add_argument("--out", required=True, help="metrics JSON file")
    evaluate.add_argument("--report", help="folder for report.md and its plots")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument(
        "--route", action="store_true", help="withhold categories: the router names them"
    )
