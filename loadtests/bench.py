"""``inspectray bench``: the DAG beside a naive server and the hardware ceiling.

In one run on one machine, with the same models and the same traffic:

1. the ceiling: the anomaly detectors alone, batched, in this process, on
   decoded images of the mix (images/s at the best batch size and thread count);
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

import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from loadtests.traffic import (
    DEFECTIVE_SHARE_ENV,
    REQUEST_LOG_ENV,
    TRAFFIC_ENV,
    USER_RPS_ENV,
    Traffic,
    build_traffic,
    served_categories,
    write_traffic,
)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# Seed 001's time window: 22.5 px/mm across the belt's direction, belt at 1 m/s;
# a part is in view for (sensor width / 22.5) mm, i.e. that many ms.
PX_PER_MM = 22.5
BELT_MM_PER_S = 1000.0
CAMERAS = (("2 MP (1920x1080)", 1920), ("5 MP (2592x1944)", 2592), ("8 MP (3840x2160)", 3840))


class BenchError(RuntimeError):
    """A part of the benchmark could not run (says which)."""


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
        skip: parts to leave out: ``ceiling``, ``naive``, ``sweep``, ``half-peak``.
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
    images_per_class: int = 8
    image_size: int = 256


@dataclass
class LoadResult:
    """One Locust run, measured inside its window."""

    users: int
    seconds: float
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    accuracy: float | None
    latencies_ms: list[float]
    locust_exit: int
    statuses: dict[str, int]
    by_verdict: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        """Failed requests over all requests of the run (warm-up included)."""
        return self.failed / max(self.requests, 1)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no latency list)."""
        return {
            "users": self.users,
            "rps": round(self.rps, 2),
            "p50_ms": round(self.p50_ms, 1),
            "p95_ms": round(self.p95_ms, 1),
            "p99_ms": round(self.p99_ms, 1),
            "requests": self.requests,
            "failed": self.failed,
            "error_rate": round(self.error_rate, 5),
            "accuracy": None if self.accuracy is None else round(self.accuracy, 4),
            "by_verdict": self.by_verdict,
        }


def analyse(
    records: Sequence[dict[str, Any]], users: int, warmup_s: float, seconds: float, exit_code: int
) -> LoadResult:
    """Throughput and percentiles of the requests that ended inside the window.

    The window starts ``warmup_s`` after the first answer and lasts ``seconds``;
    failures count over the whole run, warm-up included.
    """
    if not records:
        raise BenchError("the load generator recorded no request (is the server up?)")
    first = min(r["end"] for r in records)
    start, stop = first + warmup_s, first + warmup_s + seconds
    inside = [r for r in records if start <= r["end"] < stop]
    latencies = sorted(r["ms"] for r in inside if r["ok"])
    answered = [r for r in records if r["ok"]]
    judged = [r for r in answered if r.get("verdict") in ("ok", "defective")]
    correct = sum((r["verdict"] == "defective") == r["defective"] for r in judged)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1

    def pct(q: float, values: Sequence[float] = latencies) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    # ok parts take the detector (and the band's verifier); defective ones go on
    # through the classifier and reranker: their latencies are told apart.
    by_verdict = {}
    for verdict in ("ok", "defective"):
        values = [r["ms"] for r in inside if r["ok"] and r.get("verdict") == verdict]
        if values:
            by_verdict[verdict] = {
                "share": round(len(values) / max(len(latencies), 1), 3),
                "p50_ms": round(pct(50, values), 1),
                "p99_ms": round(pct(99, values), 1),
            }

    return LoadResult(
        users=users,
        seconds=seconds,
        requests=len(records),
        failed=sum(not r["ok"] for r in records),
        rps=sum(r["ok"] for r in inside) / seconds,
        p50_ms=pct(50),
        p95_ms=pct(95),
        p99_ms=pct(99),
        accuracy=correct / len(judged) if judged else None,
        latencies_ms=latencies,
        locust_exit=exit_code,
        statuses=statuses,
        by_verdict=by_verdict,
    )


def run_locust(
    url: str,
    traffic_file: Path,
    users: int,
    seconds: float,
    warmup_s: float,
    out_prefix: Path,
    defective_share: float,
    user_rps: float | None = None,
) -> LoadResult:
    """Run Locust headless against ``url``; CSV and HTML reports at ``out_prefix``."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    log = out_prefix.with_suffix(".requests.jsonl")
    log.unlink(missing_ok=True)
    env = os.environ | {
        TRAFFIC_ENV: str(traffic_file),
        DEFECTIVE_SHARE_ENV: str(defective_share),
        REQUEST_LOG_ENV: str(log),
        USER_RPS_ENV: str(user_rps or 0),
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(max(users, 1)),
        "--run-time",
        f"{round(warmup_s + seconds + 1)}s",
        "--stop-timeout",
        "60",
        "--host",
        url,
        "--csv",
        str(out_prefix),
        "--html",
        str(out_prefix.with_suffix(".html")),
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    done = subprocess.run(command, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if not log.is_file():
        raise BenchError(f"Locust wrote no request log (exit {done.returncode})")
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    return analyse(records, users, warmup_s, seconds, done.returncode)


def measure_ceiling(
    registry_uri: str,
    traffic: Traffic,
    seconds: float = 20.0,
    batch_sizes: Sequence[int] = (1, 8, 16),
) -> dict[str, Any]:
    """The detectors alone, batched, in this process: images/s at their best setting.

    Images are drawn from the mix and decoded beforehand (decoding is not the
    detector's work); each batch is one category's, as the DAG batches them.
    Every batch size is tried with one thread and with every core.
    """
    import random

    import torch

    from deployments import compute
    from deployments.flow import LocalStageCalls, load_plan
    from deployments.imaging import decode_image
    from models.artifacts import ArtifactRegistry
    from models.stages import DETECTOR

    registry = ArtifactRegistry(registry_uri)
    plan = load_plan(registry)
    calls = LocalStageCalls(registry)
    rng = random.Random(0)
    pools: dict[str, list[Any]] = {}
    for _ in range(64 * len(traffic.categories)):
        drawn = traffic.draw(rng)
        pools.setdefault(drawn.image.category, []).append(decode_image(drawn.body).image)
    stages = {c: calls.model(DETECTOR, plan.categories[c].model_id(DETECTOR)) for c in pools}
    threads_before = torch.get_num_threads()
    settings = [(t, b) for t in sorted({1, os.cpu_count() or 1}) for b in batch_sizes]
    per_setting = max(seconds / len(settings), 1.0)
    tried = []
    try:
        for threads, batch in settings:
            torch.set_num_threads(threads)
            categories = sorted(pools)
            for category in categories:  # warm each model at this batch size
                compute.detect(stages[category], pools[category][:batch], [False] * batch)
            images, i = 0, 0
            started = time.perf_counter()
            while time.perf_counter() - started < per_setting:
                category = categories[i % len(categories)]
                pool = pools[category]
                offset = (i * batch) % max(len(pool) - batch, 1)
                chunk = pool[offset : offset + batch]
                compute.detect(stages[category], chunk, [False] * len(chunk))
                images += len(chunk)
                i += 1
            rate = images / (time.perf_counter() - started)
            tried.append({"threads": threads, "batch": batch, "images_per_s": round(rate, 2)})
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


def _figures(prefix: str, run: LoadResult) -> dict[str, Any]:
    """A run's headline figures, named ``<prefix>_rps``, ``<prefix>_p50_ms``, ..."""
    return {
        f"{prefix}_rps": round(run.rps, 2),
        f"{prefix}_p50_ms": round(run.p50_ms, 1),
        f"{prefix}_p95_ms": round(run.p95_ms, 1),
        f"{prefix}_p99_ms": round(run.p99_ms, 1),
        f"{prefix}_error_rate": round(run.error_rate, 5),
        f"{prefix}_accuracy": run.summary()["accuracy"],
    }


def _loads(
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every part; returns the JSON summary (and writes the report)."""
    from cluster.local import LocalCluster, has_models
    from models.artifacts import ArtifactRegistry

    out = settings.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    registry = settings.registry
    began = time.perf_counter()
    result: dict[str, Any] = {
        "users": settings.users,
        "duration_s": settings.duration_s,
        "warmup_s": settings.warmup_s,
        "defective_share": settings.defective_share,
        "machine": machine(),
    }

    def cluster() -> LocalCluster:
        return LocalCluster(
            registry,
            port=settings.port,
            config=settings.config,
            workdir=out / "cluster",
        )

    if not has_models(ArtifactRegistry(cluster().registry_uri)):
        cluster().start().stop()  # trains the quick set into the empty registry
    # The ceiling and the naive server run before Ray starts, on an idle machine.
    registry_uri = cluster().registry_uri
    categories = served_categories(registry_uri)
    images = build_traffic(
        categories, out / "traffic", settings.images_per_class, settings.image_size
    )
    traffic_file = write_traffic(images, out / "traffic" / "traffic.json", settings.defective_share)
    traffic = Traffic(images, settings.defective_share)
    result["categories"] = traffic.categories
    result["traffic_images"] = len(images)

    ceiling = None
    if "ceiling" not in settings.skip:
        print("bench: ceiling (the detectors alone, batched)", file=sys.stderr)
        ceiling = measure_ceiling(registry_uri, traffic)
        result["ceiling_rps"] = ceiling["rps"]
        result["ceiling"] = ceiling

    naive = None
    naive_sweep: list[LoadResult] = []
    if "naive" not in settings.skip:
        with NaiveServer(registry_uri, settings.port + 1, out / "naive.log") as url:
            naive, naive_sweep = _loads("naive", url, settings, traffic_file, out)
        result |= _figures("naive", naive)

    dag_cluster = cluster()
    try:
        dag_cluster.start()
        result["dag_ready_s"] = round(dag_cluster.timings["ready_s"], 1)
        dag, dag_sweep = _loads("dag", dag_cluster.url, settings, traffic_file, out)
        result |= _figures("dag", dag) | {
            "dag_over_naive": _ratio(dag.rps, naive.rps if naive else None),
            "dag_over_ceiling": _ratio(dag.rps, ceiling["rps"] if ceiling else None),
        }
        peak = max(r.rps for r in dag_sweep)
        result["dag_peak_rps"] = round(peak, 2)
        half = None
        if "half-peak" not in settings.skip:
            rate = peak / 2
            print(f"bench: dag paced at half its peak, {rate:.1f} requests/s", file=sys.stderr)
            half = run_locust(
                dag_cluster.url,
                traffic_file,
                settings.users,
                settings.duration_s,
                settings.warmup_s,
                out / "dag-half-peak",
                settings.defective_share,
                user_rps=rate / settings.users,
            )
            result |= {"half_peak_target_rps": round(rate, 2)} | _figures("half_peak", half)
            result["half_peak_by_verdict"] = half.by_verdict
        runs = [("dag", r) for r in dag_sweep] + [("naive", r) for r in naive_sweep]
        if half is not None:
            runs.append(("dag-half-peak", half))
        result["runs"] = [{"server": name} | r.summary() for name, r in runs]
        result["failed_requests"] = sum(r.failed for _, r in runs)
        result["bench_s"] = round(time.perf_counter() - began, 1)
        if settings.report is not None:
            from loadtests.report import write_report

            write_report(result, dag, naive, half, dag_sweep, naive_sweep, settings.report)
            result["report"] = str(settings.report)
    finally:
        dag_cluster.stop()
    return result
