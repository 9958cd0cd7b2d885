"""A quick set of models, so an empty registry can serve within minutes.

``inspectray serve`` runs this when its registry has no model: it generates a
small synthetic dataset, takes a share of the packaged ELPV images, and trains
on the running Ray cluster, at a small input size and for a few epochs:

- the category router over every category (both datasets);
- per synthetic surface: detector, verifier (and decision rule), classifier,
  reranker; the DEIMv2 localizer over the synthetic boxes;
- per ELPV module type: detector and verifier (and decision rule).

These models are for trying the service, not for the line: train the real ones
with ``inspectray train all`` (see the README).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models.artifacts import ArtifactRegistry
from models.data import Dataset, load_dataset
from models.data.synthetic import generate
from models.stages import CLASSIFIER, DETECTOR, LOCALIZER, RERANKER, ROUTER, VERIFIER

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
        input_size: model input side.
        epochs: epochs of each stage but the detector.
        detector_epochs: epochs of the detectors, which decide the verdict.
        seed: dataset and training seed.
    """

    surfaces: Sequence[str] = QUICK_SURFACES
    images_per_class: int = 16
    image_size: int = 128
    elpv_categories: Sequence[str] | None = None
    elpv_train: int = 96
    input_size: int = 96  # the localizer's 100 queries need 189 proposals: 96 px gives them
    epochs: int = 2
    detector_epochs: int = 5
    seed: int = 7


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


def quick_plan(synthetic: Dataset, elpv: Dataset) -> list[tuple[Dataset, str, str]]:
    """Every (dataset, stage, category) run of the quick set, in training order."""
    both = Dataset("quickstart", synthetic.samples + elpv.samples)
    runs: list[tuple[Dataset, str, str]] = [(both, ROUTER, both.categories[0])]
    for category in synthetic.categories:
        runs += [(synthetic, stage, category) for stage in (DETECTOR, VERIFIER, CLASSIFIER)]
        runs.append((synthetic, RERANKER, category))
    runs.append((synthetic, LOCALIZER, synthetic.categories[0]))
    for category in elpv.categories:
        runs += [(elpv, stage, category) for stage in (DETECTOR, VERIFIER)]
    return runs


def train_quick_set(
    registry: ArtifactRegistry,
    work_dir: Path,
    spec: QuickSet = QuickSet(),
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the data and train the quick set into ``registry`` (Ray must be up).

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
    runs = quick_plan(synthetic, elpv)
    trained = []
    bar = tqdm(
        runs, desc="training the quick set", unit="model", disable=not progress, file=sys.stderr
    )
    for dataset, stage, category in bar:
        bar.set_postfix_str(f"{stage} {category}")
        epochs = spec.detector_epochs if stage == DETECTOR else spec.epochs
        stage_settings = replace(settings, epochs=epochs, patience=epochs)
        summary = train_stage(registry, dataset, stage, category, stage_settings)
        trained.append({"stage": stage, "category": category, "version": summary.get("version")})
    bar.close()
    return {"seconds": round(time.perf_counter() - started, 1), "trained": trained}
