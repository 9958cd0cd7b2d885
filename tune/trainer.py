"""The training driver: one Ray Train ``TorchTrainer`` per model family.

:func:`fit_family` runs :func:`tune.loop.train_loop_per_worker` on
``num_workers`` workers and returns the best weights; :func:`train_stage` trains
a stage for a category, calibrates it, stores it in the registry (promoted) and
refits the category's decision rule.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from models.artifacts import ArtifactRegistry, Manifest
from models.autoencoder_verifier import calibrate
from models.data import GOOD, DataError, Dataset, Sample
from models.data.fingerprint import fingerprint_samples
from models.data.tensors import ImageTensorDataset, predict_all
from models.grading import graded_levels
from models.reranker import fit_fusion_weight
from models.runtime import export_runtime
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    SHARED_CATEGORY,
    STAGES,
    TRAINING_KEYS,
    VERIFIER,
    LoadedStage,
    load_stage,
)
from models.training import FAMILIES, build_family
from models.training.decision import fit_decision, validation_scores
from tune.loop import CHECKPOINT_FILE, fit_in_one_pass, train_loop_per_worker
from tune.ray_env import environment, free_port, set_train_poll_env, state_api_env
from tune.tracking import record_training

# Learning rates that suit each family with AdamW (the head; the backbone gets less).
DEFAULT_LR = {stage: family.default_lr for stage, family in FAMILIES.items()}
MIN_CALIBRATION_GOODS = 8


@dataclass
class TrainSettings:
    """How to train: schedule, optimizer and the Ray resources.

    Attributes:
        epochs: maximum epochs (early stopping may end sooner).
        num_workers: Ray Train workers (data-parallel replicas).
        use_gpu: one GPU per worker.
        lr: the head's learning rate (default: per family).
        batch_size: images per step per worker.
        optimizer: ``adamw`` or ``sgd``.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        backbone_lr_scale: the backbone's learning rate relative to the head's.
        warmup_epochs: linear warm-up length.
        patience: epochs without improvement before stopping early.
        seed: seed of initialisation, augmentation and synthetic anomalies.
        storage_path: where Ray keeps checkpoints: a folder or a URL (``s3://...``).
        tracking_uri: the MLflow tracking store runs are logged to (default: an
            SQLite file in a local storage folder; ``none``: not logged). See
            :mod:`tune.tracking`.
        max_failures: worker-group restarts allowed (resuming from the last checkpoint).
        cpus_per_worker: CPU threads per worker (default: the machine's share).
        model_config: overrides of the family's model config.
        augment: training augmentation: ``d4`` (flips and right-angle turns) or
            ``flips`` for parts always imaged the same way up.
        pool_categories: the detector and classifier learn from the images of
            every category trained together, one model registered under each
            (each category's decision rule is still fitted on its own validation
            images): for product types that look alike, such as ELPV's mono and
            poly cells.
        balance_classes: the detector and the classifier see each image of a rare
            class (ELPV's ⅓ and ⅔ levels; else a rare defect type) more often in
            an epoch, by ``round(sqrt(n_max / n))``
            (:meth:`~models.training.base.TrainingFamily.balanced`).
    """

    epochs: int = 8
    num_workers: int = 1
    use_gpu: bool = False
    lr: float | None = None
    batch_size: int = 16
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 0.3
    warmup_epochs: float = 1.0
    patience: int = 3
    seed: int = 0
    storage_path: str = "runs"
    tracking_uri: str | None = None
    max_failures: int = 2
    cpus_per_worker: int | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    augment: str = "d4"
    pool_categories: bool = False
    balance_classes: bool = False


# The stages one model may learn for several categories (the verifier and the
# memory bank learn a category's own good parts, and calibrate on them).
POOLABLE = (DETECTOR, CLASSIFIER)


@dataclass
class FitResult:
    """What a training run produced."""

    best_state: dict[str, torch.Tensor]
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    checkpoint_path: str

    @classmethod
    def from_checkpoint(
        cls, checkpoint: ray.train.Checkpoint, seconds: float | None = None
    ) -> FitResult:
        """Read the payload the loop saved; ``seconds`` defaults to the epochs' sum."""
        with checkpoint.as_directory() as folder:
            payload = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
        history = payload["history"]
        return cls(
            best_state=payload["best_state"],
            best_metrics=payload["best"],
            history=history,
            seconds=seconds if seconds is not None else sum(h["epoch_seconds"] for h in history),
            checkpoint_path=checkpoint.path,
        )


def ensure_ray() -> None:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster for this process.

    A cluster it starts has its dashboard (the state API Ray Train's cleanup asks)
    on a free local port its processes are told of (:func:`state_api_env`).
    """
    if ray.is_initialized():
        return
    set_train_poll_env()
    address = os.environ.get("RAY_ADDRESS")
    if address is not None:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return
    port = free_port()
    with environment(state_api_env(port)):
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=True,
            configure_logging=False,
        )


def cpus_per_worker(settings: TrainSettings) -> int:
    """Threads for each worker: the cluster's CPUs shared among the workers."""
    if settings.cpus_per_worker:
        return settings.cpus_per_worker
    total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return max(1, total // max(1, settings.num_workers))


FREE_CPU_SETTLE_S = 3.0


def requested_cpus(settings: TrainSettings, threads: int) -> float:
    """The CPUs each worker of one training run asks Ray for.

    Its threads' worth, unless fewer are free: a service on the same cluster
    holds a share of a CPU for each replica although it mostly waits, and a
    run asking for every CPU would then wait for ever. It then asks for what is
    free and still runs ``threads`` threads. Nothing free (another run holds
    them): it asks for all and waits its turn. ``--cpus-per-worker`` asks exactly.
    """
    if settings.cpus_per_worker:
        return threads

    def free() -> float:
        return ray.available_resources().get("CPU", 0.0) / max(1, settings.num_workers)

    # The cluster's view lags: a run or probe that just ended may still show as
    # holding its CPUs for a moment, so the most seen over a short while counts.
    seen, settled = free(), time.monotonic() + FREE_CPU_SETTLE_S
    while seen < threads and time.monotonic() < settled:
        time.sleep(0.2)
        seen = max(seen, free())
    if seen >= threads or seen <= 0:
        return threads
    return float(math.floor(seen)) if seen >= 1 else max(0.01, round(seen, 2))


def storage_uri(path: str) -> str:
    """Ray wants absolute local paths; URLs pass through."""
    return path if "://" in path else str(Path(path).resolve())


def loop_config(spec: Mapping[str, Any], settings: TrainSettings, threads: int) -> dict[str, Any]:
    """The ``train_loop_config`` for one run."""
    return {
        "family": dict(spec),
        "lr": settings.lr or DEFAULT_LR[spec["stage"]],
        "batch_size": settings.batch_size,
        "optimizer": settings.optimizer,
        "weight_decay": settings.weight_decay,
        "backbone_lr_scale": settings.backbone_lr_scale,
        "epochs": min(settings.epochs, FAMILIES[spec["stage"]].max_epochs),
        "warmup_epochs": settings.warmup_epochs,
        "patience": settings.patience,
        "seed": settings.seed,
        "threads": threads,
    }


def make_trainer(
    spec: Mapping[str, Any],
    settings: TrainSettings,
    name: str,
    callbacks: Sequence[Any] = (),
    cpus: float | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for one family run (Ray Train's entry point).

    ``cpus``: the CPUs each worker asks for (default: one per thread).
    """
    threads = cpus_per_worker(settings)
    resources = {"CPU": threads if cpus is None else cpus}
    resources |= {"GPU": 1} if settings.use_gpu else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(spec, settings, threads),
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_uri(settings.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_family(spec: Mapping[str, Any], settings: TrainSettings, name: str) -> FitResult:
    """Train one family run on Ray and return its best weights and history.

    A gradient-free family (the memory bank, the patch classifier, the router
    with a fitted head) on one worker is fitted by one Ray task; everything else
    runs as a Ray Train worker group.
    """
    ensure_ray()
    started = time.perf_counter()
    if settings.num_workers == 1 and build_family(spec).gradient_free:
        return fit_as_task(spec, settings, name, started)
    cpus = requested_cpus(settings, cpus_per_worker(settings))
    result = make_trainer(spec, settings, name, cpus=cpus).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    return FitResult.from_checkpoint(result.checkpoint, time.perf_counter() - started)


def fit_as_task(
    spec: Mapping[str, Any], settings: TrainSettings, name: str, started: float
) -> FitResult:
    """A one-pass fit in one Ray task; its payload is kept under the run's folder too."""
    threads = cpus_per_worker(settings)
    task = ray.remote(fit_in_one_pass).options(
        num_cpus=requested_cpus(settings, threads),
        num_gpus=1 if settings.use_gpu else 0,
        name=name,
    )
    payload = ray.get(task.remote(loop_config(spec, settings, threads)))
    kept = ""
    if "://" not in settings.storage_path:  # a URL store keeps only worker groups' runs
        folder = Path(storage_uri(settings.storage_path)) / name / "checkpoint_000000"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(payload | {"epoch": 1, "stale": 0}, folder / CHECKPOINT_FILE)
        kept = str(folder)
    return FitResult(
        best_state=payload["best_state"],
        best_metrics=payload["best"],
        history=payload["history"],
        seconds=time.perf_counter() - started,
        checkpoint_path=kept,
    )


def family_spec(
    dataset: Dataset,
    stage: str,
    category: str,
    settings: TrainSettings,
    pooled_with: Sequence[str] = (),
) -> dict[str, Any]:
    """The family dict shipped to the workers: stage, samples, model config, seed.

    ``pooled_with``: other categories whose images the model also learns from.
    """
    if STAGES[stage].shared:  # one model for every category
        samples = list(dataset.samples)
        category = SHARED_CATEGORY
    else:
        learnt = {category, *pooled_with}
        samples = [s for s in dataset.samples if s.category in learnt]
        missing = sorted(learnt - {s.category for s in samples})
        if missing:
            raise ValueError(
                f"dataset {dataset.name!r} has no category {missing[0]!r}; "
                f"it has {dataset.categories}"
            )
    return {
        "stage": stage,
        "category": category,
        "samples": samples,
        "model_config": dict(settings.model_config),
        "seed": settings.seed,
        "augment": settings.augment,
        "pooled_with": list(pooled_with),
        "balance_classes": settings.balance_classes,
    }


def calibrate_verifier(model: torch.nn.Module, samples: Sequence[Sample]) -> dict[str, float]:
    """Fit the verifier's score calibration on the category's validation split."""
    val = [s for s in samples if s.split == "val"]
    scores, labels = validation_scores(model, val, lambda out: out.raw_score)
    good = list(scores[~labels])
    if len(good) < MIN_CALIBRATION_GOODS:
        # Too few held-out good parts (tiny datasets): add the training ones the
        # verifier learnt from, whose scores run slightly low, rather than fit a
        # spread on one or two values.
        train = [s for s in samples if s.split == "train" and s.label == GOOD]
        loader = torch.utils.data.DataLoader(
            ImageTensorDataset(train, [0.0] * len(train), model.preprocessing), batch_size=16
        )
        raw, _ = predict_all(model, loader, lambda m, x: m.predict(x).raw_score)
        good.extend(raw.tolist())
    return calibrate(model, good, scores, labels)


def train_stage(
    registry: ArtifactRegistry,
    dataset: Dataset,
    stage: str,
    category: str,
    settings: TrainSettings,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Train, calibrate, register and promote one stage of one category.

    Returns:
        A summary: artifact version, best validation metrics, time per epoch, and
        the refitted decision rule when there is one.
    """
    spec = family_spec(dataset, stage, category, settings)
    build_family(spec)  # bad data fails here, before Ray starts
    name = run_name or f"{dataset.name}-{spec['category']}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    fit = fit_family(spec, settings, name)
    summary = register_fit(registry, dataset, spec, settings, fit)
    summary["tracked"] = _record(settings, spec, name, summary, fit)
    return summary


def _record(
    settings: TrainSettings,
    spec: Mapping[str, Any],
    name: str,
    summary: Mapping[str, Any],
    fit: FitResult,
) -> dict[str, str]:
    """The run in TensorBoard and MLflow (:mod:`tune.tracking`)."""
    params = asdict(settings) | {
        "lr": settings.lr or DEFAULT_LR[spec["stage"]],
        "pooled_with": ",".join(spec.get("pooled_with", ())),
    }
    return record_training(
        settings.storage_path, settings.tracking_uri, name, summary, params, fit.history
    )


def train_pooled(
    registry: ArtifactRegistry,
    dataset: Dataset,
    stage: str,
    categories: Sequence[str],
    settings: TrainSettings,
) -> list[dict[str, Any]]:
    """Train one model of ``stage`` on the images of all of ``categories``.

    It is registered and promoted under each, and each category's decision rule
    is refitted on its own validation images (one summary per category).

    Raises:
        ValueError: a stage that learns a category's own good parts (verifier,
            memory bank) or one shared by every category anyway.
    """
    if stage not in POOLABLE:
        raise ValueError(f"the {stage} cannot be pooled across categories; these can: {POOLABLE}")
    first, *others = categories
    spec = family_spec(dataset, stage, first, settings, pooled_with=others)
    build_family(spec)
    name = f"{dataset.name}-{'+'.join(categories)}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    fit = fit_family(spec, settings, name)
    summaries = []
    for category in categories:
        pooled_with = [c for c in categories if c != category]
        own = spec | {"category": category, "pooled_with": pooled_with}
        summary = register_fit(registry, dataset, own, settings, fit)
        summary["tracked"] = _record(settings, own, f"{name}-{category}", summary, fit)
        summaries.append(summary)
    return summaries


def register_fit(
    registry: ArtifactRegistry,
    dataset: Dataset,
    spec: Mapping[str, Any],
    settings: TrainSettings,
    fit: FitResult,
    extra_metrics: Mapping[str, Any] | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Store a finished run's best weights as a new version of its stage, promoted or not."""
    family = build_family(spec)
    model = family.build_model(pretrained=False)
    model.load_state_dict(fit.best_state)
    model.eval()
    summary: dict[str, Any] = {}
    if spec["stage"] == VERIFIER:
        summary["calibration"] = calibrate_verifier(model, family.samples)
    if spec["stage"] == CLASSIFIER:
        # The best epoch's embedding, with prototypes from all its training images.
        summary["prototype_images"] = family.fit_prototypes(model)
    if spec["stage"] == RERANKER:
        summary["fusion"] = fit_fusion(registry, family, model)
    if spec["stage"] == LOCALIZER:
        summary["boxes"] = family.fit_score_threshold(model)
    epoch_seconds = [h["epoch_seconds"] for h in fit.history]
    hyperparameters = asdict(settings) | {"lr": settings.lr or DEFAULT_LR[spec["stage"]]}
    metrics = {
        **{k: v for k, v in fit.best_metrics.items() if isinstance(v, (int, float))},
        "epochs_run": len(fit.history),
        "seconds_total": fit.seconds,
        "seconds_per_epoch": sum(epoch_seconds) / max(1, len(epoch_seconds)),
        "history": fit.history,
        **({"fusion": summary["fusion"]} if "fusion" in summary else {}),
        **({"boxes": summary["boxes"]} if "boxes" in summary else {}),
        **(extra_metrics or {}),
    }
    manifest: Manifest = registry.save(
        spec["category"],
        spec["stage"],
        model.state_dict(),
        config=model.config.to_dict()
        | {"training": family.describe(), "hyperparameters": hyperparameters},
        preprocessing=model.preprocessing.to_dict(),
        data=fingerprint_samples(dataset.name, family.samples),
        metrics=metrics,
        promote=promote,
    )
    summary |= {
        "category": spec["category"],
        "stage": spec["stage"],
        "version": manifest.version,
        "best": {k: v for k, v in metrics.items() if k != "history"},
    }
    if STAGES[spec["stage"]].exportable:
        summary["runtime"] = export_checked(registry, manifest, model, family.samples)
    summary["promoted"] = promote
    if not promote:
        return summary
    scoring = {DETECTOR, MEMORY_BANK} & set(registry.stages(spec["category"]))
    # A graded category weighs its classifier's levels in its grading: refitted with it.
    own = [s for s in family.samples if s.category == spec["category"]]
    graded = graded_levels([(s.label, s.severity, s.is_anomalous) for s in own]) is not None
    refits = (DETECTOR, VERIFIER, MEMORY_BANK) + ((CLASSIFIER,) if graded else ())
    if spec["stage"] in refits and scoring:
        summary["decision"] = fit_decision(registry, family.samples, spec["category"])
    if spec["stage"] == CLASSIFIER and RERANKER in registry.stages(spec["category"]):
        summary["reranker_fusion"] = refit_fusion(registry, family.samples, spec["category"])
    return summary


def export_checked(
    registry: ArtifactRegistry,
    manifest: Manifest,
    model: torch.nn.Module,
    samples: Sequence[Sample],
    max_images: int = 256,
) -> dict[str, Any]:
    """Export a registered version to ONNX Runtime, checked on its validation images.

    Returns:
        The stored record's figures (``accepted``, ``max_abs_diff``, ``images``,
        ``ms_per_image``), or the error when the export itself failed (the
        version is then served in torch).
    """
    val = [s for s in samples if s.split == "val"][:max_images]
    images = ImageTensorDataset(val, [0.0] * len(val), model.preprocessing)
    # By index: the dataset wraps indices around (it repeats), so iterating never ends.
    inputs = torch.stack([images[i][0] for i in range(len(val))]) if val else torch.zeros(0)
    try:
        record = export_runtime(registry, manifest, model, inputs)
    except Exception as error:  # the exporter's own errors: serve this version in torch
        return {"accepted": False, "error": f"{type(error).__name__}: {error}"}
    keys = ("accepted", "max_abs_diff", "images", "ms_per_image")
    return {k: record[k] for k in keys}


def fit_fusion(registry: ArtifactRegistry, family: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Choose the reranker's fusion weight on validation; sets it in the model's config.

    The classifier is the category's production one; without it the reranker
    ranks alone (weight 0).
    """
    val = family.defective("val")
    if CLASSIFIER not in registry.stages(family.category):
        model.config = replace(model.config, fusion_weight=0.0)
        texts = model.type_embeddings(family.catalog)
        clip = _text_probabilities(model, texts, val, family.targets(val))
        truth = torch.tensor(family.targets(val))
        top1 = float((clip.argmax(1) == truth).float().mean())
        return {"fusion_weight": 0.0, "val_top1_clip": top1, "classifier_version": None}
    classifier = load_stage(registry, family.category, CLASSIFIER)
    weight, figures = _fusion_weight(model, classifier, val)
    model.config = replace(model.config, fusion_weight=weight)
    return figures


def _text_probabilities(
    model: torch.nn.Module, texts: torch.Tensor, samples: Sequence[Sample], targets: Sequence[int]
) -> torch.Tensor:
    """CLIP's probability of each described type for each image ``(B, N)``."""
    loader = torch.utils.data.DataLoader(
        ImageTensorDataset(samples, list(targets), model.preprocessing), batch_size=16
    )
    clip, _ = predict_all(model, loader, lambda m, x: m.text_probabilities(x, texts))
    return torch.from_numpy(clip)


def _fusion_weight(
    model: torch.nn.Module, classifier: LoadedStage, val: Sequence[Sample]
) -> tuple[float, dict[str, Any]]:
    """The weight that ranks ``val``'s defective parts best, and its figures.

    The types ranked are those the reranker has a description of and those the
    classifier knows: a type only one side knows is scored by that side alone
    (:func:`models.reranker.fuse_scores`), as serving scores it.
    """
    catalog = model.config.catalog()
    own = list(classifier.model.config.defect_types)
    names = [*catalog.names, *(t for t in own if t not in catalog.names)]
    rows = [s for s in val if s.label in names]
    if not rows:
        raise DataError(
            f"{classifier.manifest.category}: no defective validation part of a type the "
            f"reranker or the classifier knows ({names}) to fit the fusion weight on"
        )
    targets = [names.index(s.label) for s in rows]
    described = torch.arange(len(names)) < len(catalog.names)
    clip = _text_probabilities(model, model.type_embeddings(catalog), rows, targets)
    clip = torch.cat([clip, clip.new_zeros(len(rows), len(names) - clip.shape[1])], dim=1)
    loader = torch.utils.data.DataLoader(
        ImageTensorDataset(rows, targets, classifier.model.preprocessing), batch_size=16
    )
    scores, _ = predict_all(classifier.model, loader, lambda m, x: m.predict(x).scores)
    by_type = classifier.model.defect_scores(torch.from_numpy(scores), names)
    known = torch.tensor([name in own for name in names])
    weight, figures = fit_fusion_weight(
        by_type, clip, torch.tensor(targets), known=known, described=described
    )
    return weight, figures | {
        "classifier_version": classifier.manifest.version,
        "n_val": len(rows),
        "ranked_by_classifier_alone": [n for n, d in zip(names, described, strict=True) if not d],
        "ranked_by_clip_alone": [n for n, k in zip(names, known, strict=True) if not k],
    }


def resave(
    registry: ArtifactRegistry,
    loaded: LoadedStage,
    data: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> Manifest:
    """Store a refitted production model as a new promoted version of its stage.

    The training record and metrics of the version it came from are kept, with
    ``refitted_from`` naming that version.
    """
    manifest = loaded.manifest
    training = {k: manifest.config[k] for k in TRAINING_KEYS if k in manifest.config}
    return registry.save(
        manifest.category,
        manifest.stage,
        loaded.model.state_dict(),
        config=loaded.model.config.to_dict() | training,
        preprocessing=manifest.preprocessing,
        data=data,
        metrics=manifest.metrics | dict(metrics) | {"refitted_from": manifest.version},
        promote=True,
    )


def refit_prototypes(registry: ArtifactRegistry, dataset: Dataset, category: str) -> dict[str, Any]:
    """Refit the production classifier's prototypes and class priors on the training split.

    The embedding is unchanged; labelled images added since training move their
    class's prototype. A new version is stored and promoted, and the reranker's
    fusion weight refitted against it.
    """
    classifier = load_stage(registry, category, CLASSIFIER)
    manifest = classifier.manifest
    # A classifier pooled across categories keeps learning from all of them.
    pooled_with = manifest.config.get("training", {}).get("pooled_with", [])
    samples = [s for s in dataset.samples if s.category in {category, *pooled_with}]
    architecture = {k: v for k, v in manifest.config.items() if k not in TRAINING_KEYS}
    family = build_family(
        {
            "stage": CLASSIFIER,
            "category": category,
            "samples": samples,
            "model_config": architecture,
            "pooled_with": pooled_with,
        }
    )
    if family.classes != classifier.model.config.classes:
        raise DataError(
            f"{category}: the training split's classes {list(family.classes)} are not the "
            f"classifier's {list(classifier.model.config.classes)}; train a new classifier"
        )
    counts = family.fit_prototypes(classifier.model)
    saved = resave(registry, classifier, fingerprint_samples(dataset.name, samples), {})
    summary = {"version": saved.version, "prototype_images": counts}
    if RERANKER in registry.stages(category):
        summary["reranker_fusion"] = refit_fusion(registry, samples, category)
    return summary


def refit_box_threshold(registry: ArtifactRegistry, dataset: Dataset) -> dict[str, Any]:
    """Refit the production localizer's score threshold on the validation split.

    The weights are unchanged; a new version with the threshold of the best
    validation F1 at IoU 0.5 is stored and promoted.
    """
    localizer = load_stage(registry, SHARED_CATEGORY, LOCALIZER)
    manifest = localizer.manifest
    architecture = {k: v for k, v in manifest.config.items() if k not in TRAINING_KEYS}
    spec = {
        "stage": LOCALIZER,
        "category": SHARED_CATEGORY,
        "samples": list(dataset.samples),
        "model_config": architecture,
    }
    figures = build_family(spec).fit_score_threshold(localizer.model)
    saved = resave(
        registry, localizer, fingerprint_samples(dataset.name, dataset.samples), {"boxes": figures}
    )
    return {"version": saved.version, **figures}


def refit_fusion(
    registry: ArtifactRegistry, samples: Sequence[Sample], category: str
) -> dict[str, Any]:
    """Refit the production reranker's fusion weight (after a new classifier).

    The reranker's weights are unchanged; a new version with the new weight is
    stored and promoted, so the rule always matches the classifier in service.
    The classifier may know types the reranker has no description of (taught
    from reviews) or miss some it has (held out): each such type is ranked by the
    side that knows it.
    """
    reranker = load_stage(registry, category, RERANKER)
    classifier = load_stage(registry, category, CLASSIFIER)
    val = [s for s in samples if s.category == category and s.split == "val" and s.is_anomalous]
    weight, figures = _fusion_weight(reranker.model, classifier, val)
    reranker.model.config = replace(reranker.model.config, fusion_weight=weight)
    saved = resave(registry, reranker, reranker.manifest.data, {"fusion": figures})
    return {"version": saved.version, **figures}


def has_boxes(dataset: Dataset) -> bool:
    """Whether the training split has annotated boxes (a localizer can be trained)."""
    return any(s.boxes for s in dataset.samples if s.split == "train")


def has_labelled_defects(dataset: Dataset, category: str) -> bool:
    """Whether a category's training split has defects (a classifier can be trained)."""
    return any(
        s.is_anomalous for s in dataset.samples if s.category == category and s.split == "train"
    )
