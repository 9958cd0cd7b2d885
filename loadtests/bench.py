"""The benchmark's parts: the hardware ceiling, the naive server, the Locust runs.

``inspectray bench`` (:mod:`cluster.bench`) runs them in one run on one machine,
with the same models and the same traffic:

1. the ceiling: the first-line models (anomaly detectors, memory banks) alone,
   batched, in this process, on decoded images of the mix (images/s at the best
   batch size and thread count);
2. the naive baseline (:mod:`loadtests.naive_server`) under Locust;
3. the DAG (``inspectray serve``'s local cluster) under Locust.

Both servers get the same users for the same time after the same warm-up, then
a sweep over user counts for the throughput curve; the DAG also gets a paced
run at half its peak throughput, where its p99 is set against the time a part
spends in a camera's view. Throughput, percentiles and error rates come from
every request's record, inside the measured window only.

Prints JSON (``ceiling_rps``, ``dag_rps``, ``naive_rps``, ``dag_p50_ms``,
``dag_p99_ms``, ``naive_p99_ms``, ``dag_error_rate``, ``dag_over_naive``,
``dag_over_ceiling``, and more) and writes a report with plots
(``docs/benchmarks.md`` by default). Exits 1 when any request failed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loadtests.runs import BenchError, LoadResult, run_locust
from loadtests.traffic import Traffic


@dataclass
class BenchSettings:
    """What to measure, and for how long.

    Attributes:
        registry: the models (every server uses the same ones).
        users: concurrent Locust users in the main runs.
        duration_s: length of each main run's measured window.
        warmup_s: requests before the window, not counted.
        sweep: user counts of the throughput curve.
        sweep_s: measured seconds of each sweep point.
        defective_share: the share of defective parts in the mix.
        config: the DAG's serving YAML (default: packaged).
        workdir: traffic, reports, the cluster's Redis.
        report: the Markdown report to write (None: none).
        port: the DAG's HTTP port; the naive server takes the next.
        skip: parts to leave out: ``ceiling``, ``naive``, ``sweep``, ``half-peak``,
            ``profile``, ``grpc``.
        profile_s: length of the run whose CPU is counted by process and activity.
        topologies: the served topologies to measure, each on the same traffic;
            the first one's figures are also the report's ``dag_*`` ones.
        images_per_class: synthetic traffic images per surface and class.
        image_size: synthetic traffic image side.
    """

    registry: str
    users: int = 16
    duration_s: float = 60.0
    warmup_s: float = 10.0
    sweep: Sequence[int] = (1, 4, 8, 16, 32)
    sweep_s: float = 15.0
    defective_share: float = 0.1
    config: str | None = None
    workdir: Path = Path(".inspectray/bench")
    report: Path | None = Path("docs/benchmarks.md")
    port: int = 8000
    skip: Sequence[str] = ()
    profile_s: float = 20.0
    topologies: Sequence[str] = ("fused", "split")
    images_per_class: int = 8
    image_size: int = 256


def measure_ceiling(
    registry_uri: str,
    traffic: Traffic,
    seconds: float = 30.0,
    batch_sizes: Sequence[int] = (1, 8, 16),
) -> dict[str, Any]:
    """The first-line models alone, batched, in this process: images/s at their best.

    A category's first line is what its decision rule reads for every part: its
    anomaly detector, its memory bank, or both (the quick set judges its
    generated surfaces by memory banks). Images are drawn from the mix and
    decoded beforehand (decoding is not the models' work); each batch is one
    category's, as the DAG batches them. Every batch size is tried with one
    thread and with every core, in torch and in ONNX Runtime (where any
    first-line model has an accepted export; one without runs in torch, as it
    is served, and the row names it): the ceiling is the fastest, so a served
    runtime's speed does not flatter the ratio.
    """
    import random

    import torch

    from deployments.imaging import decode_image
    from models.artifacts import ArtifactRegistry
    from models.inspection import compute, load_plan
    from models.inspection.plan import split_model_id
    from models.stages import DETECTOR, MEMORY_BANK, RUNTIMES, load_stage

    registry = ArtifactRegistry(registry_uri)
    plan = load_plan(registry)
    rng = random.Random(0)
    pools: dict[str, list[Any]] = {}
    for _ in range(64 * len(traffic.categories)):
        drawn = traffic.draw(rng)
        pools.setdefault(drawn.image.category, []).append(decode_image(drawn.body).image)

    runs = {DETECTOR: compute.detect, MEMORY_BANK: compute.score_patches}
    first_lines = {}
    for category in pools:
        models = plan.categories[category]
        used = {DETECTOR: models.rule.uses_detector, MEMORY_BANK: models.rule.uses_bank}
        first_lines[category] = [s for s in runs if models.has(s) and used[s]]
        if not first_lines[category]:
            raise ValueError(f"category {category!r} has no detector and no memory bank")
    loaded: dict[tuple[str, int], dict[str, list[tuple[str, Any]]] | None] = {}
    in_torch: dict[tuple[str, int], list[str]] = {}

    def first_line(runtime: str, threads: int) -> dict[str, list[tuple[str, Any]]] | None:
        """Each category's first-line models in ``runtime``, loaded once per thread count.

        None when none has such an export (the row would be torch's again).
        """
        if (runtime, threads) not in loaded:
            found: dict[str, list[tuple[str, Any]]] = {}
            for category, stages in first_lines.items():
                found[category] = []
                for stage in stages:
                    category_id, version = split_model_id(plan.categories[category].model_id(stage))
                    model = load_stage(
                        registry, category_id, stage, version, "cpu", runtime, threads
                    )
                    found[category].append((stage, model))
            torch_only = sorted(
                f"{stage} {category}"
                for category, models in found.items()
                for stage, model in models
                if not model.runtime
            )
            exported = runtime == "torch" or len(torch_only) < sum(map(len, found.values()))
            loaded[runtime, threads] = found if exported else None
            in_torch[runtime, threads] = torch_only if runtime != "torch" else []
        return loaded[runtime, threads]

    def judge(models: list[tuple[str, Any]], images: list[Any]) -> None:
        for stage, model in models:
            runs[stage](model, images, [False] * len(images))

    threads_before = torch.get_num_threads()
    settings = [
        (runtime, t, b)
        for runtime in RUNTIMES
        for t in sorted({1, os.cpu_count() or 1})
        for b in batch_sizes
    ]
    per_setting = max(seconds / len(settings), 1.0)
    tried = []
    try:
        for runtime, threads, batch in settings:
            torch.set_num_threads(threads)
            stages = first_line(runtime, threads)
            if stages is None:
                continue
            categories = sorted(pools)
            for category in categories:  # warm each model at this batch size
                judge(stages[category], pools[category][:batch])
            images, i = 0, 0
            started = time.perf_counter()
            while time.perf_counter() - started < per_setting:
                category = categories[i % len(categories)]
                pool = pools[category]
                offset = (i * batch) % max(len(pool) - batch, 1)
                chunk = pool[offset : offset + batch]
                judge(stages[category], chunk)
                images += len(chunk)
                i += 1
            rate = images / (time.perf_counter() - started)
            row = {"runtime": runtime, "threads": threads, "batch": batch}
            if in_torch[runtime, threads]:
                row["in_torch"] = in_torch[runtime, threads]
            tried.append(row | {"images_per_s": round(rate, 2)})
    finally:
        torch.set_num_threads(threads_before)
    best = max(tried, key=lambda t: t["images_per_s"])
    return {"rps": best["images_per_s"], "best": best, "tried": tried}


class NaiveServer:
    """The baseline server as a child process (``with NaiveServer(...) as url``)."""

    def __init__(self, registry_uri: str, port: int, log: Path) -> None:
        self.registry_uri, self.port, self.log = registry_uri, port, log
        self.process: subprocess.Popen | None = None
        self._out: IO[str] | None = None

    def __enter__(self) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = out = self.log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtests.naive_server",
                "--registry",
                self.registry_uri,
                "--port",
                str(self.port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the naive server exited ({self.log}):\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                pass
            time.sleep(0.5)
        raise BenchError(f"the naive server was not ready within 300 s ({self.log})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self._out is not None:
            self._out.close()


def figures(prefix: str, run: LoadResult) -> dict[str, Any]:
    """A run's headline figures, named ``<prefix>_rps``, ``<prefix>_p50_ms``, ..."""
    return {
        f"{prefix}_rps": round(run.rps, 2),
        f"{prefix}_p50_ms": round(run.p50_ms, 1),
        f"{prefix}_p95_ms": round(run.p95_ms, 1),
        f"{prefix}_p99_ms": round(run.p99_ms, 1),
        f"{prefix}_error_rate": round(run.error_rate, 5),
        f"{prefix}_accuracy": run.summary()["accuracy"],
    }


def loads(
    name: str,
    url: str,
    settings: BenchSettings,
    traffic_file: Path,
    out: Path,
) -> tuple[LoadResult, list[LoadResult]]:
    """The main run at ``settings.users``, then the sweep (main run reused at its users)."""
    print(f"bench: {name}, {settings.users} users, {settings.duration_s:g} s", file=sys.stderr)
    main = run_locust(
        url,
        traffic_file,
        settings.users,
        settings.duration_s,
        settings.warmup_s,
        out / f"{name}-u{settings.users}",
        settings.defective_share,
    )
    sweep = [main]
    if "sweep" not in settings.skip:
        for users in settings.sweep:
            if users == settings.users:
                continue
            print(f"bench: {name} sweep, {users} users", file=sys.stderr)
            sweep.append(
                run_locust(
                    url,
                    traffic_file,
                    users,
                    settings.sweep_s,
                    min(settings.warmup_s, 5.0),
                    out / f"{name}-u{users}",
                    settings.defective_share,
                )
            )
    return main, sorted(sweep, key=lambda r: r.users)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "gpu": _gpu(),
        "python": platform.python_version(),
    }


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no GPU stack: no GPU
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to three significant figures, None when either is missing."""
    return float(f"{a / b:.3g}") if a is not None and b else None
