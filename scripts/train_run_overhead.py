"""What a short training run costs beyond its epochs, at two worker-polling rates.

Ray Train's worker polling at Ray's default (every 2 s) and at inspectray's (4x a
second), side by side.

Each setting runs in its own Ray cluster (the controllers read the setting when
they start), alternating, ``--rounds`` times; each cluster fits a one-epoch
detector ``--fits`` times on a small generated surface. Prints JSON: the overhead
of every fit (its wall time less its epoch), the medians and their ratio.

    .venv/bin/python scripts/train_run_overhead.py [--rounds 2] [--fits 2]

Take it with nothing else running: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"ray_default": "2.0", "inspectray": None}  # None: what ensure_ray sets


def one_cluster(work: Path, fits: int) -> list[float]:
    """In this process: start Ray, fit ``fits`` one-epoch detectors, return their overheads."""
    import time

    from models.data import load_dataset
    from models.data.synthetic import generate
    from tune.trainer import TrainSettings, ensure_ray, family_spec, fit_family

    root = work / "synth"
    if not (root / "coco").is_dir():
        generate(root, images_per_class=6, seed=1, size=96, surfaces=("brushed_metal",))
    dataset = load_dataset("synthetic", root)
    settings = TrainSettings(
        epochs=1,
        batch_size=8,
        storage_path=str(work / "runs"),
        model_config={"input_size": 64},
        tracking_uri="none",
    )
    ensure_ray()
    spec = family_spec(dataset, "detector", "brushed_metal", settings)
    overheads = []
    for i in range(fits):
        began = time.perf_counter()
        fit = fit_family(spec, settings, f"overhead-{i}-{time.time_ns()}")
        overheads.append(time.perf_counter() - began - fit.history[0]["epoch_seconds"])
    return overheads


def main() -> int:
    """Run the clusters (or, with ``--child``, be one) and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fits", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_cluster(Path(args.child), args.fits)))
        return 0
    seen: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name, interval in SETTINGS.items():
                env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
                env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
                if interval is not None:
                    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
                command = [sys.executable, __file__, "--child", work, "--fits", str(args.fits)]
                done = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, check=True
                )
                seen[name] += json.loads(done.stdout.strip().splitlines()[-1])
    medians = {name: statistics.median(values) for name, values in seen.items()}
    print(
        json.dumps(
            {
                "overhead_s": {name: [round(v, 1) for v in seen[name]] for name in seen},
                "median_overhead_s": {name: round(v, 1) for name, v in medians.items()},
                "inspectray_over_ray_default": round(
                    medians["inspectray"] / medians["ray_default"], 2
                ),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
