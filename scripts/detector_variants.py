"""Score trained detectors on a dataset's test split, and the variants a run allows.

Each row is a way of using trained detectors, measured on the test split with a
threshold per category fitted on that category's validation images, the way the
decision rule fits it (the cut that maximises validation accuracy):

- every registry's served detector, on one view and on the mean of four flips
  (``test_flips``), at its input size and at each ``--sizes`` entry;
- ``--average CK[,CK...]``: the weights of Ray Train checkpoints (``checkpoint.pt``
  as the training loop writes it: ``model`` is that epoch's weights) averaged, in
  the first registry's architecture: the last epoch alone, or a mean of several;
- with two registries or more, their ensemble: the mean of their four-flip logits.

Each row gives test AUROC, binary accuracy (overall and per category) and, where
the dataset grades its defects (ELPV's four levels), the four-level accuracy of
three cuts on the score, fitted on validation per category.

    .venv/bin/python scripts/detector_variants.py --dataset elpv --registry R \
        [--registry R2 ...] [--average A.pt,B.pt] [--sizes 352] [--threads 2]

Prints one JSON object per row. The figures are the detector alone: the service
also applies the verifier band and, where trained, the memory bank
(``inspectray eval`` measures that).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from models.anomaly_detector import AnomalyDetector
from models.artifacts import ArtifactRegistry
from models.backbone import Preprocessing
from models.data import load_dataset
from models.decision import best_threshold
from models.stages import load_stage


@torch.no_grad()
def score(model: AnomalyDetector, samples: list, preprocessing: Preprocessing) -> np.ndarray:
    """Four-flip logits of every sample, in order."""
    transform = preprocessing.transform()
    out = []
    for start in range(0, len(samples), 16):
        batch = samples[start : start + 16]
        images = torch.stack([transform(Image.open(s.image_path).convert("RGB")) for s in batch])
        out.append(model.flip_logits(images.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def averaged_weights(paths: list[str]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' ``model`` weights (integer buffers: the last one's)."""
    states = [torch.load(p, map_location="cpu", weights_only=False)["model"] for p in paths]
    return {
        key: (sum(s[key].double() for s in states) / len(states)).to(states[0][key].dtype)
        if states[0][key].is_floating_point()
        else states[-1][key]
        for key in states[0]
    }


def four_level_cuts(scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Three increasing cuts maximising the accuracy of ``level = #cuts below``."""

    def accuracy(cuts: np.ndarray) -> float:
        return float((np.searchsorted(np.sort(cuts), scores, side="right") == levels).mean())

    candidates = np.unique(scores)
    cuts = np.quantile(scores, [0.6, 0.75, 0.85])
    for _ in range(5):  # coordinate ascent; converges in two or three rounds
        for j in range(3):
            trials = [np.r_[cuts[:j], x, cuts[j + 1 :]] for x in candidates]
            cuts = np.sort(max(trials, key=accuracy))
    return cuts


def measure(name: str, logits: np.ndarray, meta: dict[str, np.ndarray]) -> dict:
    """Test metrics of one score per sample (higher: more anomalous)."""
    truth, split, category = meta["truth"], meta["split"], meta["category"]
    row: dict = {"variant": name}
    hits, graded_hits = 0, 0
    test = split == "test"
    prob = 1.0 / (1.0 + np.exp(-logits))
    for cat in np.unique(category):
        val, tst = (split == "val") & (category == cat), test & (category == cat)
        threshold = best_threshold(prob[val], truth[val], 0.5)
        right = (prob[tst] >= threshold) == truth[tst]
        row[f"accuracy_{cat}"] = round(float(right.mean()), 4)
        hits += int(right.sum())
        if "level" in meta:
            cuts = four_level_cuts(logits[val], meta["level"][val])
            graded = np.searchsorted(cuts, logits[tst], side="right") == meta["level"][tst]
            graded_hits += int(graded.sum())
    row["accuracy"] = round(hits / int(test.sum()), 4)
    row["auroc"] = round(float(roc_auc_score(truth[test], logits[test])), 4)
    if "level" in meta:
        row["four_level_accuracy"] = round(graded_hits / int(test.sum()), 4)
    return row


def main() -> None:
    """Parse the arguments, score every variant, print a JSON row each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--registry", action="append", required=True)
    parser.add_argument("--average", action="append", default=[], help="CK[,CK...]")
    parser.add_argument("--sizes", default="", help="extra input sizes, e.g. 352")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = load_dataset(args.dataset, args.root)
    samples = [s for s in dataset.samples if s.split in ("val", "test")]
    categories = sorted({s.category for s in samples})
    meta = {
        "truth": np.array([s.is_anomalous for s in samples]),
        "split": np.array([s.split for s in samples]),
        "category": np.array([s.category for s in samples]),
    }
    if all(s.severity is not None for s in samples):
        meta["level"] = np.rint(np.array([s.severity for s in samples]) * 3).astype(int)

    def each_category(models: dict[str, torch.nn.Module], size: int | None) -> np.ndarray:
        logits = np.zeros((len(samples), 4), dtype=np.float32)
        for cat, model in models.items():
            rows = [i for i, s in enumerate(samples) if s.category == cat]
            pre = model.preprocessing
            if size is not None:
                pre = Preprocessing(input_size=size, resize=size, autocontrast=pre.autocontrast)
            logits[rows] = score(model, [samples[i] for i in rows], pre)
        return logits

    served = []
    for uri in args.registry:
        registry = ArtifactRegistry(uri)
        models = {c: load_stage(registry, c, "detector").model for c in categories}
        logits = each_category(models, None)
        served.append(logits)
        print(json.dumps(measure(f"{uri}: one view", logits[:, 0], meta)), flush=True)
        print(json.dumps(measure(f"{uri}: four flips", logits.mean(1), meta)), flush=True)
        for size in [int(x) for x in args.sizes.split(",") if x]:
            resized = each_category(models, size)
            name = f"{uri}: four flips at {size} px"
            print(json.dumps(measure(name, resized.mean(1), meta)), flush=True)
            both = (logits.mean(1) + resized.mean(1)) / 2
            name = f"{uri}: four flips, mean of its own size and {size} px"
            print(json.dumps(measure(name, both, meta)), flush=True)
    for group in args.average:
        paths = group.split(",")
        weights = averaged_weights(paths)
        registry = ArtifactRegistry(args.registry[0])
        models = {}
        for cat in categories:
            model = load_stage(registry, cat, "detector").model
            model.load_state_dict(weights)
            models[cat] = model
        logits = each_category(models, None)
        name = f"mean of {len(paths)} checkpoints ({', '.join(Path(p).stem for p in paths)})"
        print(json.dumps(measure(name + ": four flips", logits.mean(1), meta)), flush=True)
    if len(served) > 1:
        ensemble = np.mean([logits.mean(1) for logits in served], axis=0)
        print(json.dumps(measure("ensemble of the registries: four flips", ensemble, meta)))


if __name__ == "__main__":
    main()
