"""``inspectray train``, ``inspectray tune`` and ``inspectray eval``.

    inspectray train {STAGE|all} --dataset NAME [--root DIR]
        [--category C] [--epochs N] [--num-workers W] [--use-gpu] [--registry DIR]
        [--with-reviews DIR]
    inspectray tune STAGE --dataset NAME [--root DIR] --num-samples N
        [--max-epochs N] [--registry DIR]
    inspectray eval --dataset NAME [--root DIR] [--registry DIR] [--config serving.yaml]
        --out metrics.json [--report DIR]
    inspectray refit-box-threshold --dataset NAME [--root DIR] [--registry DIR]

The stages are those :data:`models.stages.STAGES` declares.

Training and sweeps run on Ray (a local cluster, or the one ``RAY_ADDRESS`` names);
each epoch prints a log line; the result is printed as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from cluster.arguments import add_command, dataset_choices, dataset_root, print_json, registry
from models.stages import CLASSIFIER, DETECTOR, STAGES

ALL = "all"
SWEEPABLE = tuple(name for name, stage in STAGES.items() if stage.sweepable)
# The option that sets each model-config key (model options are named as such).
OPTION_OF = {
    "input_size": "--input-size",
    "autocontrast": "--autocontrast",
    "freeze_stages": "--freeze-stages",
    "descriptions": "--descriptions",
    "open_clip_model": "--open-clip",
    "open_clip_pretrained": "--open-clip",
}
N_HEATMAPS = 4  # heatmap examples per kind (worst false positives, negatives, true positives)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from models.data import load_dataset

    dataset = load_dataset(args.dataset, dataset_root(args))
    if getattr(args, "hold_out", None):
        dataset = dataset.without_labels(args.hold_out)
    return dataset, registry(args)


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
    if options and args.stage == ALL:
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
    return {f.name for f in dataclasses.fields(STAGES[stage].config_type)}


def _check_options(overrides: dict[str, Any], stage: str) -> None:
    """Refuse an override the stage's config lacks (``all``: every stage's) or refuses."""
    from models.config import ConfigError

    for key in overrides:
        having = [s for s in STAGES if key in config_fields(s)]
        if stage in having or (stage == ALL and having):
            continue
        if key not in OPTION_OF:
            fields = sorted(config_fields(stage))
            raise ConfigError(f"the {stage} has no option {key!r}; it has {fields}")
        names = ", ".join(having[:-1]) + " and " + having[-1] if len(having) > 1 else having[0]
        raise ConfigError(f"{OPTION_OF[key]} applies to the {names}, not the {stage}")
    for name in STAGES if stage == ALL else (stage,):  # and a value each config refuses
        given = {k: v for k, v in overrides.items() if k in config_fields(name)}
        try:
            STAGES[name].config_type(**given)
        except TypeError:
            continue  # a field only the training fills in (the router's categories)
        except ValueError as error:
            raise ConfigError(f"the {name}: {error}") from error


def stage_settings(settings: Any, stage: str) -> Any:
    """``settings`` without the model-config overrides this stage has no field for."""
    fields = config_fields(stage)
    if set(settings.model_config) <= fields:
        return settings
    config = {k: v for k, v in settings.model_config.items() if k in fields}
    return dataclasses.replace(settings, model_config=config)


def train_settings(args: argparse.Namespace, epochs: int) -> Any:
    """The TrainSettings the command's options ask for (model options checked)."""
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
    if getattr(args, "balance_classes", False) and args.stage not in (DETECTOR, CLASSIFIER, ALL):
        from models.config import ConfigError

        raise ConfigError(
            f"--balance-classes applies to the {DETECTOR} and the {CLASSIFIER}, "
            f"not the {args.stage}"
        )
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
        tracking_uri=args.mlflow_uri,
        cpus_per_worker=args.cpus_per_worker,
        model_config=overrides,
        augment=args.augment,
        pool_categories=getattr(args, "pool_categories", False),
        balance_classes=getattr(args, "balance_classes", False),
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train stages on Ray Train, register and promote them, refit the decision rules.

    With ``--with-reviews DIR`` the reviewed parts join the training split, the
    retrained models (and the rules fitted to them) are staged as candidates, and
    each category's candidate is promoted only if it beats production on the
    held-out test split (:mod:`models.evaluation.promotion`).
    """
    from models.artifacts import StagedRegistry

    dataset, store = _load(args)
    categories = _categories(dataset, args.category)
    stages = list(STAGES) if args.stage == ALL else [args.stage]
    settings = train_settings(args, args.epochs)
    reviews = None
    target = store
    if args.with_reviews:
        stages = _judgeable(stages, args.stage)
        dataset, reviews = _with_reviews(Path(args.with_reviews), dataset, categories)
        target = StagedRegistry(store)
        for category, left in target.discard_staged().items():
            print(f"dropped an unfinished candidate of {category}: {left}", file=sys.stderr)
    results = _train_stages(target, dataset, categories, stages, settings, args.stage)
    out: dict[str, Any] = {"dataset": dataset.name, "registry": store.uri, "trained": results}
    if reviews is not None:
        out["reviews"] = reviews
        out["judged"] = _judge_and_promote(store, target, dataset, results)
    print_json(out)
    return 0


def _train_stages(
    target: Any,
    dataset: Any,
    categories: list[str],
    stages: list[str],
    settings: Any,
    asked: str,
) -> list[dict[str, Any]]:
    """Train each stage for each category into ``target``; the training summaries."""
    from tune.trainer import POOLABLE, has_boxes, has_labelled_defects, train_pooled, train_stage

    if settings.pool_categories and asked not in (*POOLABLE, ALL):
        from models.config import ConfigError

        raise ConfigError(
            f"--pool-categories applies to the {' and '.join(POOLABLE)}, not the {asked}, "
            "which learns each category's own good parts"
        )
    results = []
    for name in stages:
        stage = STAGES[name]
        if asked == ALL and stage.needs == "boxes" and not has_boxes(dataset):
            print(f"no {name}: the training split has no boxes", file=sys.stderr)
            continue
        chosen = list(categories[:1] if stage.shared else categories)
        if asked == ALL and stage.needs == "labelled-defects":
            for category in [c for c in chosen if not has_labelled_defects(dataset, c)]:
                print(f"no {name} for {category}: no labelled defects", file=sys.stderr)
                chosen.remove(category)
        own = stage_settings(settings, name)
        if settings.pool_categories and name in POOLABLE and len(chosen) > 1:
            print(f"training one {name} for {', '.join(chosen)}", file=sys.stderr)
            results.extend(train_pooled(target, dataset, name, chosen, own))
            continue
        for category in chosen:
            where = "every category" if stage.shared else category
            workers = settings.num_workers
            print(f"training {name} for {where} on {workers} worker(s)", file=sys.stderr)
            results.append(train_stage(target, dataset, name, category, own))
    return results


def _with_reviews(root: Path, dataset: Any, categories: list[str]) -> tuple[Any, dict[str, Any]]:
    """The dataset with an export's reviews of these categories in its training split."""
    from collections import Counter

    from cluster.reviews import reviewed_samples

    samples, others = reviewed_samples(root, categories)
    for category, count in sorted(others.items()):
        print(f"{count} review(s) of {category} left out: not trained here", file=sys.stderr)
    labels = dict(sorted(Counter(s.label for s in samples).items()))
    print(f"training with {len(samples)} reviewed part(s): {labels}", file=sys.stderr)
    added = {"added": len(samples), "labels": labels, "left_out": others}
    return dataset.with_training(samples), added


def _judgeable(stages: list[str], asked: str) -> list[str]:
    """The stages retrained on reviews: those a held-out figure judges (no localizer)."""
    from models.config import ConfigError
    from models.evaluation.promotion import FIGURES

    if asked != ALL and asked not in FIGURES:
        raise ConfigError(
            f"--with-reviews cannot retrain the {asked}: reviews carry no boxes, and no "
            f"held-out figure would judge it; these can: {sorted(FIGURES)}"
        )
    for name in [s for s in stages if s not in FIGURES]:
        print(f"no {name}: reviews carry no boxes", file=sys.stderr)
    return [s for s in stages if s in FIGURES]


def _judge_and_promote(
    store: Any, staged: Any, dataset: Any, results: list[dict[str, Any]]
) -> dict[str, Any]:
    """Judge each retrained category's candidate against production; promote the winners.

    Both are inspected through the flow on the dataset's test split (the
    reviews only ever train); a category's candidate is promoted, its decision
    rule last, when it beats production, else it stays an unpromoted version.
    """
    from models.data import DataError, Dataset
    from models.evaluation.promotion import Judgement, judge, judged_figures
    from models.evaluation.run import evaluate
    from models.stages import DECISION, SHARED_CATEGORY

    trained: dict[str, set[str]] = {}
    for result in results:
        trained.setdefault(result["category"], set()).add(result["stage"])
    shared = trained.pop(SHARED_CATEGORY, set())
    judged = set(trained) or set(dataset.categories)  # a shared stage: judged on every category
    test = tuple(s for s in dataset.samples if s.split == "test" and s.category in judged)
    held = Dataset(dataset.name, test)
    if not held.samples:
        staged.discard_staged()
        raise DataError(f"{dataset.name!r} has no test images of {sorted(judged)} to judge on")
    metrics, plans = {}, {}
    for side, models in (("production", store), ("candidate", staged)):
        inspector = evaluation_inspector(models)
        plans[side] = set(inspector.plan.categories)
        print(f"judging the {side} on {len(held.samples)} held-out images", file=sys.stderr)
        _, metrics[side] = evaluate(inspector, held, route=bool(shared), progress=False)
    judgements: dict[str, Judgement] = {}
    for category, stages in sorted(trained.items()):
        if category not in plans["production"]:
            judgements[category] = Judgement(True, "production has no model of it to beat")
            continue
        judgements[category] = judge(
            metrics["production"]["per_category"].get(category, {}),
            metrics["candidate"]["per_category"].get(category, {}),
            judged_figures(stages),
        )
    if shared:
        judgements[SHARED_CATEGORY] = judge(
            metrics["production"], metrics["candidate"], judged_figures(shared)
        )
    winners = {c for c, j in judgements.items() if j.promoted}
    promoted = staged.promote_staged(winners, last=(DECISION,))
    kept = staged.discard_staged()
    for category, judgement in judgements.items():
        done = "promoted" if judgement.promoted else "production kept"
        print(f"{category}: {done} ({judgement.reason})", file=sys.stderr)
    return {
        "held_out": {"split": "test", "images": len(held.samples)},
        "categories": {
            category: judgement.to_dict()
            | {
                "promoted_versions": promoted.get(category, {}),
                "not_promoted": kept.get(category, {}),
            }
            for category, judgement in judgements.items()
        },
    }


def cmd_tune(args: argparse.Namespace) -> int:
    """Sweep lr x batch size x optimizer with ASHA; promote each category's best trial."""
    from tune.sweep import sweep_stage

    dataset, store = _load(args)
    settings = train_settings(args, args.max_epochs)
    # Tune prints its trial table on stdout; this command's stdout is its JSON.
    with contextlib.redirect_stdout(sys.stderr):
        sweeps = [
            sweep_stage(
                store, dataset, args.stage, category, args.num_samples, settings, args.mlflow_uri
            )
            # A shared stage serves every category: sweep it once.
            for category in _categories(dataset, args.category)[
                : 1 if STAGES[args.stage].shared else None
            ]
        ]
    print_json({"dataset": dataset.name, "stage": args.stage, "sweeps": sweeps})
    return 0


def _histories_and_sweeps(store: Any, plan: Any, evaluated: set[str]) -> tuple[dict, dict]:
    """The training curves and sweeps of the evaluated categories' models and the shared ones."""
    from models.inspection.plan import split_model_id
    from models.stages import SHARED_CATEGORY

    histories, sweeps = {}, {}
    for stage, model_id in plan.model_ids():
        category, version = split_model_id(model_id)
        if category not in evaluated | {SHARED_CATEGORY}:
            continue
        metrics = store.manifest(category, stage, version).metrics
        key = f"{category}/{stage}"
        if metrics.get("history"):
            histories[key] = metrics["history"]
        if metrics.get("sweep"):
            sweeps[key] = metrics["sweep"]
    return histories, sweeps


def _heatmaps(inspector: Any, records: list[Any]) -> dict[str, Any]:
    """Heatmaps of the worst false positives and negatives and the surest defects."""
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
    explained = inspector.inspect_images(
        [read_image(Path(r.image_path)) for r in chosen],
        [r.category for r in chosen],
        explain=True,
    )
    return {r.sample_id: found.heatmap for r, found in zip(chosen, explained, strict=True)}


def _models_of(stage: str, dataset: Any, store: Any, wanted: str | None) -> list[str]:
    """The dataset's categories that have a production ``stage`` in the registry."""
    categories = [
        c
        for c in _categories(dataset, wanted)
        if c in store.categories() and stage in store.stages(c)
    ]
    if not categories:
        from models.artifacts import ArtifactError

        raise ArtifactError(f"no category of {dataset.name!r} has a {stage} in {store.uri}")
    return categories


def cmd_refit_prototypes(args: argparse.Namespace) -> int:
    """Refit each classifier's prototypes and class priors on the current training split."""
    from tune.trainer import refit_prototypes

    dataset, store = _load(args)
    refitted = {
        c: refit_prototypes(store, dataset, c)
        for c in _models_of("classifier", dataset, store, args.category)
    }
    print_json({"dataset": dataset.name, "refitted": refitted})
    return 0


def cmd_export_runtime(args: argparse.Namespace) -> int:
    """Export the production CNN stages to ONNX Runtime, each checked on validation images.

    Training exports every version it registers; this command is for versions
    registered before, or a runtime upgraded since. A version whose export is
    above the tolerance stays served in torch.
    """
    from models.stages import EXPORTABLE_STAGES, SHARED_CATEGORY, STAGES, load_stage
    from tune.trainer import export_checked

    dataset, store = _load(args)
    wanted = _categories(dataset, args.category)
    exported: dict[str, Any] = {}
    for stage in EXPORTABLE_STAGES:
        if STAGES[stage].shared:  # trained over every category: checked on all of them
            targets = [(SHARED_CATEGORY, list(dataset.samples))]
        else:
            targets = [(c, dataset.select(c)) for c in wanted]
        for category, samples in targets:
            if category not in store.categories() or stage not in store.stages(category):
                continue
            loaded = load_stage(store, category, stage)
            record = export_checked(store, loaded.manifest, loaded.model, samples)
            exported[f"{category}/{stage}"] = {"version": loaded.manifest.version} | record
    if not exported:
        from models.artifacts import ArtifactError

        raise ArtifactError(f"no category of {dataset.name!r} has a CNN stage in {store.uri}")
    print_json({"dataset": dataset.name, "exported": exported})
    return 0


def cmd_refit_fusion(args: argparse.Namespace) -> int:
    """Refit each reranker's fusion weight on validation against the production classifier.

    Training the classifier does this by itself; this command is for registries
    changed by hand (a classifier promoted or rolled back).
    """
    from tune.trainer import refit_fusion

    dataset, store = _load(args)
    refitted = {
        c: refit_fusion(store, dataset.samples, c)
        for c in _models_of("reranker", dataset, store, args.category)
    }
    print_json({"dataset": dataset.name, "refitted": refitted})
    return 0


def cmd_refit_box_threshold(args: argparse.Namespace) -> int:
    """Refit the localizer's score threshold (best validation F1 at IoU 0.5).

    Training the localizer does this by itself; this command is for localizers
    registered before it did, or validation data changed since.
    """
    from tune.trainer import refit_box_threshold

    dataset, store = _load(args)
    print_json({"dataset": dataset.name, "refitted": refit_box_threshold(store, dataset)})
    return 0


def _register_descriptions(inspector: Any, args: argparse.Namespace) -> None:
    """Register ``--describe`` (built-in) and ``--descriptions`` types with every reranker."""
    from models.descriptions import BUILTIN, DescriptionCatalog, DescriptionError
    from models.stages import RERANKER

    catalog = DescriptionCatalog.from_list(_descriptions(args.descriptions) or [])
    for name in args.describe or []:
        if name not in BUILTIN:
            raise DescriptionError(
                f"no built-in description of {name!r}; give it with --descriptions FILE"
            )
        catalog.register(BUILTIN[name])
    if not len(catalog):
        return
    ranked = [c for c, models in inspector.plan.categories.items() if models.has(RERANKER)]
    if not ranked:
        raise DescriptionError("no category has a reranker to rank the described types")
    for category in ranked:
        for name in catalog.names:
            inspector.register_description(category, catalog[name])


def evaluation_inspector(store: Any, serving_config: str | Path | None = None) -> Any:
    """The flow ``inspectray eval`` judges with: the served plan, every part typed.

    Args:
        store: the artifact registry.
        serving_config: the serving YAML whose pinned versions, rule overrides
            and runtimes the service runs with (None: the packaged one).
    """
    from deployments.config import load_serving_config
    from models.inspection import Coverage, LocalInspector

    serving = load_serving_config(serving_config)
    service = serving.service
    return LocalInspector(
        store, service.versions, service.rules, Coverage.TYPE_ALL, runtimes=serving.runtimes
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """Inspect the test split through the served flow; write metrics and a report.

    The models, pinned versions and rule overrides are those the serving YAML
    (``--config``) makes the service use.
    """
    from models.evaluation.run import evaluate

    if args.url:
        return _eval_served(args)
    dataset, store = _load(args)
    inspector = evaluation_inspector(store, args.serving_config)
    _register_descriptions(inspector, args)
    records, metrics = evaluate(inspector, dataset, split=args.split, route=args.route)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.report:
        from models.evaluation.report import write_report

        evaluated = {r.category for r in records}
        histories, sweeps = _histories_and_sweeps(store, inspector.plan, evaluated)
        report = write_report(
            Path(args.report),
            dataset=dataset.name,
            records=records,
            metrics=metrics,
            histories=histories,
            sweeps=sweeps,
            heatmaps=_heatmaps(inspector, records),
        )
        (Path(args.report) / "records.json").write_text(
            json.dumps([r.to_dict() for r in records], indent=1) + "\n"
        )
        print(f"report: {report}", file=sys.stderr)
    print_json(metrics)
    return 0


def _eval_served(args: argparse.Namespace) -> int:
    """``eval --url``: the split judged by a running service over HTTP."""
    from cluster.served_eval import evaluate_served
    from deployments.client import HttpClient
    from models.data import load_dataset

    dataset = load_dataset(args.dataset, dataset_root(args))
    client = HttpClient(args.url, api_key=args.api_key)
    metrics = evaluate_served(client, dataset, split=args.split, categories=args.category)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print_json(metrics)
    return 0 if metrics["failed"] == 0 else 1


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dataset", required=True, choices=dataset_choices())
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
        "--mlflow-uri",
        help="MLflow tracking store the runs are logged to (default: sqlite:///STORAGE/mlflow.db "
        "for a local --storage; none: not logged); `inspectray dashboards` shows it",
    )
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register train, tune and eval on the main parser."""
    add = add_command
    train = add(commands, "train", cmd_train)
    train.add_argument("stage", choices=[*STAGES, ALL])
    _common(train)
    _training_options(train)
    train.add_argument("--epochs", type=int, default=8, help="maximum epochs (early stopping)")
    train.add_argument(
        "--with-reviews",
        metavar="DIR",
        help="add the reviewed parts of `inspectray reviews export --out DIR` to the "
        "training split; the retrained models are promoted only where they beat "
        "production on the held-out test split",
    )
    train.add_argument(
        "--pool-categories",
        action="store_true",
        help="one detector and one classifier learn from every trained category's images "
        "and serve each (product types that look alike, such as ELPV's mono and poly cells)",
    )
    train.add_argument(
        "--balance-classes",
        action="store_true",
        help="the detector and the classifier see each image of a rare class "
        "round(sqrt(n_max / n)) times an "
        "epoch (ELPV's 1/3 and 2/3 levels; else a rare defect type)",
    )

    tune = add(commands, "tune", cmd_tune)
    tune.add_argument("stage", choices=SWEEPABLE)
    _common(tune)
    _training_options(tune)
    tune.add_argument("--num-samples", type=int, required=True, help="trials per category")
    tune.add_argument("--max-epochs", type=int, default=4, help="ASHA's maximum epochs per trial")

    refit = add(commands, "refit-fusion", cmd_refit_fusion)
    _common(refit)
    refit.add_argument("--category", help="one product category (default: every reranked one)")
    export = add(commands, "export-runtime", cmd_export_runtime)
    _common(export)
    export.add_argument("--category", help="one product category (default: all)")
    prototypes = add(commands, "refit-prototypes", cmd_refit_prototypes)
    _common(prototypes)
    prototypes.add_argument("--category", help="one product category (default: all)")
    boxes = add(commands, "refit-box-threshold", cmd_refit_box_threshold)
    _common(boxes)
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
        "--config",
        dest="serving_config",
        help="serving YAML whose pinned versions and rule overrides to evaluate "
        "(default: deployments/serving.yaml)",
    )
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
    evaluate.add_argument(
        "--url",
        help="judge through this running service's HTTP API instead (image AUROC, "
        "accuracy and defect-type top-1 of its answers)",
    )
    evaluate.add_argument("--api-key", help="with --url: the X-API-Key to send")
    evaluate.add_argument(
        "--category", action="append", help="with --url: only this category (repeatable)"
    )
