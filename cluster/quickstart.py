"""A quick set of models, so an empty registry can serve within minutes.

``inspectray serve`` runs this when its registry has no model: it generates a
small synthetic dataset, takes a share of the packaged ELPV images, and fits on
the running Ray cluster models that need little or no gradient training:

- the category router over every category (both datasets): its linear head fitted
  on the frozen backbone's features of their training images;
- per synthetic surface: a memory bank of its good patches (the detector; the
  decision rule is fitted on it) and a defect classifier whose embedding is
  fitted, not trained (``embedding: patch``: frozen patch features weighted by
  their distance to the good ones, one prototype per type);
- per ELPV module type: a detector whose head is fitted (a logistic regression on
  the frozen backbone's features of every training cell of its type, good and
  defective, at 224 px): ELPV labels its cells, and that head ranks them better
  than a memory bank of the good ones (test AUROC 0.89 and 0.88 against 0.81).

Nothing runs epochs of gradient training, so the set is ready in a few minutes
on a laptop. ``QuickSet(fitted=False)`` trains the older, slower set instead
(detector, verifier, classifier and reranker per surface, the DEIMv2 localizer,
detector and verifier per ELPV type, each for a few epochs at a small input):
the end-to-end tests use it to exercise every stage.

These models are for trying the service, not for the line: train the real ones
with ``inspectray train all`` (see the README).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactRegistry
from models.data import Dataset, load_dataset
from models.data.synthetic import generate
from models.heads import FITTED
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    STAGES,
    VERIFIER,
)

QUICK_SURFACES = ("brushed_metal", "painted_panel")


@dataclass(frozen=True)
class QuickSet:
    """What the quick set trains, and how small.

    Attributes:
        surfaces: synthetic surfaces (product categories) to generate.
        images_per_class: synthetic images per surface and class.
        image_size: side of the generated images.
        elpv_categories: ELPV module types to train (None: both).
        elpv_train: ELPV training images kept per category (the test split is whole).
        input_size: model input side of the trained stages.
        fitted_input_size: model input side of the fitted stages (memory banks, the
            router and the patch classifiers).
        cell_input_size: model input side of the ELPV detectors' fitted heads (a
            crack one or two pixels wide is lost at 128 px).
        max_bank: the most patches a memory bank keeps (bounds its fit and its
            serving cost).
        epochs: epochs of each trained stage but the detector.
        detector_epochs: epochs of the trained detectors, which decide the verdict.
        seed: dataset and training seed.
        fitted: fit memory banks and patch classifiers (True), or train the
            detector, verifier, classifier, reranker and localizer (False).
    """

    surfaces: Sequence[str] = QUICK_SURFACES
    images_per_class: int = 16
    image_size: int = 128
    elpv_categories: Sequence[str] | None = None
    elpv_train: int = 96
    input_size: int = 96  # the localizer's 100 queries need 189 proposals: 96 px gives them
    fitted_input_size: int = 128
    cell_input_size: int = 224
    max_bank: int = 2048
    epochs: int = 2
    detector_epochs: int = 5
    seed: int = 7
    fitted: bool = True


def quick_datasets(work_dir: Path, spec: QuickSet) -> tuple[Dataset, Dataset]:
    """The generated synthetic dataset and a stratified share of ELPV's train/val."""
    synth_root = work_dir / "quickstart-synth"
    if not (synth_root / "coco").is_dir():
        generate(
            synth_root,
            images_per_class=spec.images_per_class,
            seed=spec.seed,
            size=spec.image_size,
            surfaces=tuple(spec.surfaces),
            overwrite=True,
        )
    synthetic = load_dataset("synthetic", synth_root)
    elpv = load_dataset("elpv", None)
    rng = random.Random(spec.seed)
    kept = []
    for category in spec.elpv_categories or elpv.categories:
        for split, share in (("train", spec.elpv_train), ("val", max(spec.elpv_train // 3, 16))):
            samples = elpv.select(category, split)
            good = [s for s in samples if not s.is_anomalous]
            bad = [s for s in samples if s.is_anomalous]
            n_bad = min(len(bad), share // 2)
            kept += rng.sample(bad, n_bad) + rng.sample(good, min(len(good), share - n_bad))
        kept += elpv.select(category, "test")
    return synthetic, Dataset("elpv", tuple(kept))


def quick_plan(
    synthetic: Dataset, elpv: Dataset, fitted: bool = True
) -> list[tuple[Dataset, str, str]]:
    """Every (dataset, stage, category) run of the quick set, in training order.

    A fitted ELPV detector's head learns from every training cell of its type (a
    pass over them costs seconds), not only the router's share.
    """
    both = Dataset("quickstart", synthetic.samples + elpv.samples)
    runs: list[tuple[Dataset, str, str]] = [(both, ROUTER, both.categories[0])]
    if fitted:
        for category in synthetic.categories:
            runs += [(synthetic, MEMORY_BANK, category), (synthetic, CLASSIFIER, category)]
        every_cell = load_dataset("elpv", None)
        runs += [(every_cell, DETECTOR, category) for category in elpv.categories]
        return runs
    for category in synthetic.categories:
        runs += [(synthetic, stage, category) for stage in (DETECTOR, VERIFIER, CLASSIFIER)]
        runs.append((synthetic, RERANKER, category))
    runs.append((synthetic, LOCALIZER, synthetic.categories[0]))
    for category in elpv.categories:
        runs += [(elpv, stage, category) for stage in (DETECTOR, VERIFIER)]
    return runs


def stage_settings(settings: Any, spec: QuickSet, stage: str) -> Any:
    """The training settings of one quick-set run."""
    if spec.fitted and stage == MEMORY_BANK:
        config = {"input_size": spec.fitted_input_size, "max_bank": spec.max_bank}
        return replace(settings, model_config=config)
    if spec.fitted and stage == DETECTOR:  # only ELPV's: its cells are labelled
        config = {"input_size": spec.cell_input_size, "head": FITTED}
        return replace(settings, model_config=config)
    if spec.fitted and stage == CLASSIFIER:
        config = {"input_size": spec.fitted_input_size, "embedding": "patch"}
        return replace(settings, model_config=config)
    if stage == ROUTER:  # a linear head on frozen features: fitted, in either set
        config = {"input_size": spec.fitted_input_size, "head": FITTED}
        return replace(settings, model_config=config)
    epochs = spec.detector_epochs if stage == DETECTOR else spec.epochs
    return replace(settings, epochs=epochs, patience=epochs)


def train_quick_set(
    registry: ArtifactRegistry,
    work_dir: Path,
    spec: QuickSet = QuickSet(),
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate the data and train the quick set into ``registry`` (Ray must be up).

    ``say`` receives one line per model trained (its time and validation figure).

    Returns:
        ``{"seconds", "trained": [{"stage", "category", "version"}, ...]}``.
    """
    from tqdm import tqdm

    from tune.trainer import TrainSettings, train_stage

    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    synthetic, elpv = quick_datasets(work_dir, spec)
    settings = TrainSettings(
        epochs=spec.epochs,
        batch_size=16,
        patience=spec.epochs,
        seed=spec.seed,
        storage_path=str((work_dir / "runs").resolve()),
        model_config={"input_size": spec.input_size},
    )
    runs = quick_plan(synthetic, elpv, spec.fitted)
    trained = []
    bar = tqdm(
        runs,
        desc="training the quick set",
        unit="model",
        disable=None if progress else True,  # None: a bar on a terminal, none in a file
        file=sys.stderr,
    )
    for dataset, stage, category in bar:
        bar.set_postfix_str(f"{stage} {category}")
        began = time.perf_counter()
        summary = train_stage(
            registry, dataset, stage, category, stage_settings(settings, spec, stage)
        )
        seconds = round(time.perf_counter() - began, 1)
        trained.append(
            {
                "stage": stage,
                "category": category,
                "version": summary.get("version"),
                "seconds": seconds,
            }
        )
        if say is not None:
            figure = _figure(stage, summary)
            bar.clear()
            where = "every category" if STAGES[stage].shared else category
            say(f"  {stage} for {where}: {seconds:.0f} s" + (f", {figure}" if figure else ""))
            bar.refresh()
    bar.close()
    return {"seconds": round(time.perf_counter() - started, 1), "trained": trained}


def _figure(stage: str, summary: dict[str, Any]) -> str:
    """The run's monitored validation figure, as ``val_auroc 0.981``."""
    from models.training import FAMILIES

    monitor = FAMILIES[stage].monitor
    value = (summary.get("best") or {}).get(monitor)
    return f"{monitor} {value:.3f}" if isinstance(value, int | float) else ""
