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
TRAINABLE = ("detector", "verifier", "router", "classifier", "reranker", "localizer", "all")
SWEEPABLE = ("detector", "verifier", "classifier", "reranker", "localizer")
# The option that sets each model-config key (model options are named as such).
OPTION_OF = {
    "input_size": "--input-size",
    "autocontrast": "--autocontrast",
    "freeze_stages": "--freeze-stages",
    "descriptions": "--descriptions",
    "open_clip_model": "--open-clip",
    "open_clip_pretrained": "--open-clip",
}
N_HEATMAPS = 4  # Grad-CAM examples per kind (worst false positives, negatives, true positives)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from cluster.cli import _dataset_root, _registry
    from models.data import load_dataset

    dataset = load_dataset(args.dataset, _dataset_root(args))
    if getattr(args, "hold_out", None):
        dataset = dataset.without_labels(args.hold_out)
    return dataset, _registry(args)


def _descriptions(path: str | None) -> list[dict[str, Any]] | None:
    """The defect descriptions of a JSON file (a list of description objects)."""
    if path is None:
        return None
    from models.data import DataError
    from models.descriptions import DescriptionCatalog

    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read descriptions: {error}") from error
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of descriptions")
    return DescriptionCatalog.from_list(items).to_list()


def _categories(dataset: Any, wanted: str | None) -> list[str]:
    from models.data import DataError

    if wanted is None:
        return list(dataset.categories)
    if wanted not in dataset.categories:
        raise DataError(
            f"dataset {dataset.name!r} has no category {wanted!r}: {dataset.categories}"
        )
    return [wanted]


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` pairs (checked by :func:`_check_options`).

    Values are read as JSON when they parse (numbers, lists, null), else as text.
    """
    from models.config import ConfigError

    options = getattr(args, "model_option", None) or []
    if options and args.stage == "all":
        raise ConfigError("--model-option applies to one stage, not 'all'")
    found: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-option wants KEY=VALUE, got {option!r}")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found


def config_fields(stage: str) -> set[str]:
    """The fields of a stage's model config."""
    from models.stages import STAGE_MODELS

    return {f.name for f in dataclasses.fields(STAGE_MODELS[stage][0])}


def _check_options(overrides: dict[str, Any], stage: str) -> None:
    """Refuse a model-config override that the stage (with ``all``: every stage) lacks."""
    from models.config import ConfigError

    stages = [s for s in TRAINABLE if s != "all"]
    for key in overrides:
        having = [s for s in stages if key in config_fields(s)]
        if stage in having or (stage == "all" and having):
            continue
        if key not in OPTION_OF:
            fields = sorted(config_fields(stage))
            raise ConfigError(f"the {stage} has no option {key!r}; it has {fields}")
        names = ", ".join(having[:-1]) + " and " + having[-1] if len(having) > 1 else having[0]
        raise ConfigError(f"{OPTION_OF[key]} applies to the {names}, not the {stage}")


def stage_settings(settings: Any, stage: str) -> Any:
    """``settings`` without the model-config overrides this stage has no field for."""
    fields = config_fields(stage)
    if set(settings.model_config) <= fields:
        return settings
    config = {k: v for k, v in settings.model_config.items() if k in fields}
    return dataclasses.replace(settings, model_config=config)


def _settings(args: argparse.Namespace, epochs: int) -> Any:
    from tune.trainer import TrainSettings

    overrides: dict[str, Any] = {"input_size": args.input_size} if args.input_size else {}
    if getattr(args, "open_clip", None):
        name, _, tag = args.open_clip.partition(":")
        overrides["open_clip_model"] = name
        overrides["open_clip_pretrained"] = tag or None
    overrides |= _model_options(args)
    descriptions = _descriptions(getattr(args, "descriptions", None))
    if descriptions is not None:
        overrides["descriptions"] = descriptions
    if args.autocontrast is not None:
        overrides["autocontrast"] = args.autocontrast
    if args.freeze_stages is not None:
        overrides["freeze_stages"] = args.freeze_stages
    _check_options(overrides, args.stage)
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
        cpus_per_worker=args.cpus_per_worker,
        model_config=overrides,
        augment=args.augment,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train stages on Ray Train, register and promote them, refit the decision rules."""
    from tune.trainer import STAGES_IN_ORDER, has_boxes, has_labelled_defects, train_stage

    dataset, registry = _load(args)
    categories = _categories(dataset, args.category)
    stages = STAGES_IN_ORDER if args.stage == "all" else (args.stage,)
    settings = _settings(args, args.epochs)
    results = []
    for stage in stages:
        if args.stage == "all" and stage == "localizer" and not has_boxes(dataset):
            print("no localizer: the training split has no boxes", file=sys.stderr)
            continue
        for category in categories[:1] if stage in ("router", "localizer") else categories:
            skip = args.stage == "all" and stage in ("classifier", "reranker")
            if skip and not has_labelled_defects(dataset, category):
                print(f"no {stage} for {category}: no labelled defects", file=sys.stderr)
                continue
            target = "every category" if stage in ("router", "localizer") else category
            print(f"training {stage} for {target} on {args.num_workers} worker(s)", file=sys.stderr)
            results.append(
                train_stage(registry, dataset, stage, category, stage_settings(settings, stage))
            )
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
            # One localizer serves every category: sweep it once.
            for category in _categories(dataset, args.category)[
                : 1 if args.stage == "localizer" else None
            ]
        ]
    from cluster.cli import _print_json

    _print_json({"dataset": dataset.name, "stage": args.stage, "sweeps": sweeps})
    return 0


def _histories_and_sweeps(registry: Any, categories: list[str]) -> tuple[dict, dict]:
    from models.stages import CLASSIFIER, DETECTOR, RERANKER, ROUTER, ROUTER_CATEGORY, VERIFIER

    histories, sweeps = {}, {}
    owners = [(c, s) for c in categories for s in (DETECTOR, VERIFIER, CLASSIFIER, RERANKER)]
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


def _models_of(stage: str, dataset: Any, registry: Any, wanted: str | None) -> list[str]:
    """The dataset's categories that have a production ``stage`` in the registry."""
    categories = [
        c
        for c in _categories(dataset, wanted)
        if c in registry.categories() and stage in registry.stages(c)
    ]
    if not categories:
        from models.artifacts import ArtifactError

        raise ArtifactError(f"no category of {dataset.name!r} has a {stage} in {registry.uri}")
    return categories


def cmd_refit_prototypes(args: argparse.Namespace) -> int:
    """Refit each classifier's prototypes and class priors on the current training split."""
    from tune.trainer import refit_prototypes

    dataset, registry = _load(args)
    refitted = {
        c: refit_prototypes(registry, dataset, c)
        for c in _models_of("classifier", dataset, registry, args.category)
    }
    from cluster.cli import _print_json

    _print_json({"dataset": dataset.name, "refitted": refitted})
    return 0


def cmd_refit_fusion(args: argparse.Namespace) -> int:
    """Refit each reranker's fusion weight on validation against the production classifier.

    Training the classifier does this by itself; this command is for registries
    changed by hand (a classifier promoted or rolled back).
    """
    from tune.trainer import refit_fusion

    dataset, registry = _load(args)
    refitted = {
        c: refit_fusion(registry, dataset.samples, c)
        for c in _models_of("reranker", dataset, registry, args.category)
    }
    from cluster.cli import _print_json

    _print_json({"dataset": dataset.name, "refitted": refitted})
    return 0


def _register_descriptions(pipeline: Any, args: argparse.Namespace) -> None:
    """Register ``--describe`` (built-in) and ``--descriptions`` types with every reranker."""
    from models.descriptions import BUILTIN, DescriptionCatalog, DescriptionError

    catalog = DescriptionCatalog.from_list(_descriptions(args.descriptions) or [])
    for name in args.describe or []:
        if name not in BUILTIN:
            raise DescriptionError(
                f"no built-in description of {name!r}; give it with --descriptions FILE"
            )
        catalog.register(BUILTIN[name])
    if not len(catalog):
        return
    ranked = [c for c, stages in pipeline.stages.items() if stages.reranker is not None]
    if not ranked:
        raise DescriptionError("no category has a reranker to rank the described types")
    for category in ranked:
        for name in catalog.names:
            pipeline.register_description(category, catalog[name])


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the InspectionPipeline over the test split; write metrics and a report."""
    from models.evaluation.run import evaluate
    from models.pipeline import InspectionPipeline

    dataset, registry = _load(args)
    pipeline = InspectionPipeline.from_registry(
        registry, [c for c in dataset.categories if c in registry.categories()] or None
    )
    _register_descriptions(pipeline, args)
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
    command.add_argument(
        "--hold-out",
        action="append",
        metavar="LABEL",
        help="leave this label's images out of the training and validation splits "
        "(repeatable; e.g. to test ranking a type known only by its description)",
    )
    command.add_argument(
        "--descriptions",
        help="JSON list of defect descriptions for the reranker "
        "(name, description, keywords, contrast; default: the built-in ones)",
    )
    command.add_argument(
        "--open-clip",
        metavar="MODEL[:TAG]",
        help="reranker: an open_clip model (and pretrained tag, downloaded: needs internet) "
        "instead of the packaged towers, e.g. ViT-B-32:laion2b_s34b_b79k",
    )
    command.add_argument(
        "--model-option",
        action="append",
        metavar="KEY=VALUE",
        help="set a field of the stage's model config (repeatable), e.g. "
        "backbone=hgnetv2_pico or pretrained_checkpoint=ORG/MODEL for the localizer",
    )
    command.add_argument(
        "--cpus-per-worker",
        type=int,
        help="CPU threads per Ray Train worker (default: the cluster's CPUs shared evenly)",
    )


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

    refit = add(commands, "refit-fusion", cmd_refit_fusion)
    _common(refit)
    refit.add_argument("--category", help="one product category (default: every reranked one)")
    prototypes = add(commands, "refit-prototypes", cmd_refit_prototypes)
    _common(prototypes)
    prototypes.add_argument("--category", help="one product category (default: all)")
    for command in (refit, prototypes):
        command.add_argument(
            "--hold-out",
            action="append",
            metavar="LABEL",
            help="the same held-out labels as the models' training (repeatable)",
        )

    evaluate = add(commands, "eval", cmd_eval)
    _common(evaluate)
    evaluate.add_argument("--out", required=True, help="metrics JSON file")
    evaluate.add_argument("--report", help="folder for report.md and its plots")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument(
        "--describe",
        action="append",
        metavar="TYPE",
        help="register this built-in defect description before judging (repeatable): "
        "the reranker ranks the type from its words alone",
    )
    evaluate.add_argument(
        "--descriptions", help="JSON list of defect descriptions to register before judging"
    )
    evaluate.add_argument(
        "--route", action="store_true", help="withhold categories: the router names them"
    )
