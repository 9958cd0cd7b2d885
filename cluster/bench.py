"""``inspectray bench``: the DAG beside a naive server and the hardware ceiling.

In one run on one machine, with the same models and the same traffic: the
detectors alone (the ceiling), the naive baseline and the DAG on the local
cluster, each under the same Locust users (:mod:`loadtests.bench` has the
parts). Prints JSON (``ceiling_rps``, ``dag_rps``, ``naive_rps``,
``dag_p50_ms``, ``dag_p99_ms``, ``naive_p99_ms``, ``dag_error_rate``,
``dag_over_naive``, ``dag_over_ceiling``, and more) and writes a report with
plots (``docs/benchmarks.md`` by default).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from cluster.local import LocalCluster, has_models
from loadtests.bench import (
    BenchSettings,
    NaiveServer,
    figures,
    loads,
    machine,
    measure_ceiling,
    ratio,
)
from loadtests.report import write_report
from loadtests.runs import LoadResult, run_locust
from loadtests.traffic import Traffic, build_traffic, served_categories, write_traffic
from models.artifacts import ArtifactRegistry


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every part; returns the JSON summary (and writes the report)."""
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
            naive, naive_sweep = loads("naive", url, settings, traffic_file, out)
        result |= figures("naive", naive)

    dag_cluster = cluster()
    try:
        dag_cluster.start()
        result["dag_ready_s"] = round(dag_cluster.timings["ready_s"], 1)
        dag, dag_sweep = loads("dag", dag_cluster.url, settings, traffic_file, out)
        result |= figures("dag", dag) | {
            "dag_over_naive": ratio(dag.rps, naive.rps if naive else None),
            "dag_over_ceiling": ratio(dag.rps, ceiling["rps"] if ceiling else None),
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
            result |= {"half_peak_target_rps": round(rate, 2)} | figures("half_peak", half)
            result["half_peak_by_verdict"] = half.by_verdict
        runs = [("dag", r) for r in dag_sweep] + [("naive", r) for r in naive_sweep]
        if half is not None:
            runs.append(("dag-half-peak", half))
        result["runs"] = [{"server": name} | r.summary() for name, r in runs]
        result["failed_requests"] = sum(r.failed for _, r in runs)
        result["bench_s"] = round(time.perf_counter() - began, 1)
        if settings.report is not None:
            write_report(result, dag, naive, half, dag_sweep, naive_sweep, settings.report)
            result["report"] = str(settings.report)
    finally:
        dag_cluster.stop()
    return result
