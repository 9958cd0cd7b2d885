"""``inspectray bench``: the DAG beside a naive server and the hardware ceiling.

In one run on one machine, with the same models and the same traffic: the
first-line models alone (the ceiling), the naive baseline and the DAG on the local
cluster, each under the same Locust users (:mod:`loadtests.bench` has the
parts). Prints JSON (``ceiling_rps``, ``dag_rps``, ``naive_rps``,
``dag_p50_ms``, ``dag_p99_ms``, ``naive_p99_ms``, ``dag_error_rate``,
``dag_over_naive``, ``dag_over_ceiling``, and more) and writes a report with
plots (``docs/benchmarks.md`` by default).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.local import LocalCluster, has_models
from cluster.quickstart import QuickSet
from loadtests.bench import (
    BenchSettings,
    NaiveServer,
    figures,
    loads,
    machine,
    measure_ceiling,
    ratio,
)
from loadtests.grpc_load import run_grpc
from loadtests.profile import CpuProfile
from loadtests.report import write_report
from loadtests.runs import LoadResult, run_locust, verdict_parity
from loadtests.traffic import Traffic, build_traffic, served_categories, write_traffic
from models.artifacts import ArtifactRegistry
from tune.ray_env import SERVE_INGRESS_ENV, environment

# A served variant: ``fused-serve-proxy`` is the fused topology with requests coming
# in through Serve's own Python proxy instead of HAProxy, measured on the same
# traffic to show what the ingress buys.
SERVE_PROXY = "-serve-proxy"


def served_topology(name: str) -> tuple[str, dict[str, str]]:
    """A measured name's topology, and the environment its cluster starts with."""
    if name.endswith(SERVE_PROXY):
        return name.removesuffix(SERVE_PROXY), {variable: "0" for variable in SERVE_INGRESS_ENV}
    return name, {}


def profile_run(url: str, settings: BenchSettings, traffic_file: Path, out: Path) -> dict[str, Any]:
    """A run at ``settings.users`` with CPU counted by process and sampled by activity."""
    seconds = settings.profile_s
    print(f"bench: profile, {settings.users} users, {seconds:g} s", file=sys.stderr)
    profile = CpuProfile(out / "profile", seconds)
    profile.start()
    try:
        run = run_locust(
            url, traffic_file, settings.users, seconds, 0.0, out / "profile" / "load",
            settings.defective_share,
        )  # fmt: skip
    finally:
        profile.stop()
    answered = run.requests - run.failed
    return {"requests": answered, "rps": round(answered / profile.wall_s, 2)} | {
        "roles": profile.report(answered)
    }


@dataclass
class TopologyRun:
    """One topology's runs: the main one, the sweep (with it), paced at half its peak."""

    topology: str
    main: LoadResult
    sweep: list[LoadResult]
    half: LoadResult | None
    figures: dict[str, Any]
    grpc: list[LoadResult]


def grpc_runs(
    cluster: LocalCluster, settings: BenchSettings, traffic: Traffic, out: Path
) -> list[LoadResult]:
    """The gRPC API under one camera client, then under ``settings.users`` of them."""
    runs = []
    for users in sorted({1, settings.users}):
        print(f"bench: grpc, {users} users, {settings.sweep_s:g} s", file=sys.stderr)
        runs.append(
            run_grpc(
                cluster.grpc_target,
                traffic,
                users,
                settings.sweep_s,
                min(settings.warmup_s, 5.0),
                out / f"grpc-u{users}.requests.jsonl",
            )
        )
    return runs


def measure_topology(
    topology: str,
    cluster: LocalCluster,
    settings: BenchSettings,
    traffic: Traffic,
    traffic_file: Path,
    out: Path,
    naive: LoadResult | None,
    ceiling: dict[str, Any] | None,
    grpc: bool = False,
) -> TopologyRun:
    """Serve ``topology`` on the local cluster and load it: main run, sweep, profile, half peak.

    Its figures are named ``<topology>_rps``, ``<topology>_p99_ms``, ...,
    ``<topology>_over_naive``, ``<topology>_over_ceiling``, ``<topology>_breakdown``
    (where an answered request's time went) and ``<topology>_cpu_profile``; with
    ``grpc``, also the gRPC API's runs (``<topology>_grpc``).
    """
    try:
        cluster.start()
        found: dict[str, Any] = {f"{topology}_ready_s": round(cluster.timings["ready_s"], 1)}
        main, sweep = loads(topology, cluster.url, settings, traffic_file, out)
        found |= figures(topology, main) | {
            f"{topology}_over_naive": ratio(main.rps, naive.rps if naive else None),
            f"{topology}_over_ceiling": ratio(main.rps, ceiling["rps"] if ceiling else None),
            f"{topology}_breakdown": main.breakdown,
        }
        if "profile" not in settings.skip:
            found[f"{topology}_cpu_profile"] = profile_run(
                cluster.url, settings, traffic_file, out / topology
            )
        grpc_results = grpc_runs(cluster, settings, traffic, out / topology) if grpc else []
        if grpc_results:
            found[f"{topology}_grpc"] = [r.summary() for r in grpc_results]
        peak = max(r.rps for r in sweep)
        found[f"{topology}_peak_rps"] = round(peak, 2)
        half = None
        if "half-peak" not in settings.skip:
            rate = peak / 2
            print(
                f"bench: {topology} paced at half its peak, {rate:.1f} requests/s", file=sys.stderr
            )
            half = run_locust(
                cluster.url,
                traffic_file,
                settings.users,
                settings.duration_s,
                settings.warmup_s,
                out / f"{topology}-half-peak",
                settings.defective_share,
                user_rps=rate / settings.users,
            )
            found |= {f"{topology}_half_peak_target_rps": round(rate, 2)}
            found |= figures(f"{topology}_half_peak", half)
            found[f"{topology}_half_peak_by_verdict"] = half.by_verdict
        return TopologyRun(topology, main, sweep, half, found, grpc_results)
    finally:
        cluster.stop()


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

    def cluster(topology: str | None = None) -> LocalCluster:
        return LocalCluster(
            registry,
            port=settings.port,
            config=settings.config,
            workdir=out / "cluster",
            serving_overrides={"topology": topology} if topology else None,
            # The trained set: the ceiling is its detector alone, the figures stay comparable.
            quick_set=QuickSet(fitted=False),
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
        print("bench: ceiling (the first-line models alone, batched)", file=sys.stderr)
        ceiling = measure_ceiling(registry_uri, traffic)
        result["ceiling_rps"] = ceiling["rps"]
        result["ceiling"] = ceiling

    naive = None
    naive_sweep: list[LoadResult] = []
    if "naive" not in settings.skip:
        with NaiveServer(registry_uri, settings.port + 1, out / "naive.log") as url:
            naive, naive_sweep = loads("naive", url, settings, traffic_file, out)
        result |= figures("naive", naive)

    measured: dict[str, TopologyRun] = {}
    for name in settings.topologies:
        topology, env = served_topology(name)
        with environment(env):
            measured[name] = measure_topology(
                name,
                cluster(topology),
                settings,
                traffic,
                traffic_file,
                out,
                naive,
                ceiling,
                grpc=name == settings.topologies[0] and "grpc" not in settings.skip,
            )
        result |= measured[name].figures
    dag = measured[settings.topologies[0]]  # the first topology listed heads the report
    result |= {
        key.replace(f"{dag.topology}_", "dag_", 1): value
        for key, value in dag.figures.items()
        if key.startswith(f"{dag.topology}_")
    }
    result["dag_topology"] = dag.topology
    if len(measured) > 1:
        first, second = settings.topologies[:2]
        result[f"{first}_over_{second}"] = ratio(
            measured[first].main.rps, measured[second].main.rps
        )
    result["verdict_parity"] = verdict_parity(
        {name: [run.main, *run.sweep, *filter(None, [run.half])] for name, run in measured.items()}
    )
    runs = [(name, r) for name, m in measured.items() for r in m.sweep]
    runs += [(f"{name}-half-peak", m.half) for name, m in measured.items() if m.half is not None]
    runs += [(f"{name}-grpc", r) for name, m in measured.items() for r in m.grpc]
    runs += [("naive", r) for r in naive_sweep]
    result["runs"] = [{"server": name} | r.summary() for name, r in runs]
    result["failed_requests"] = sum(r.failed for _, r in runs)
    result["bench_s"] = round(time.perf_counter() - began, 1)
    if settings.report is not None:
        write_report(result, dag.main, naive, dag.half, dag.sweep, naive_sweep, settings.report)
        result["report"] = str(settings.report)
    return result
