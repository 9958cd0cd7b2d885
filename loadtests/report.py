"""The benchmark's Markdown report and its plots (latency CDF, throughput against users)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.runs import LoadResult

# A part's time in a line camera's view: 22.5 px/mm across the belt's direction,
# belt at 1 m/s; a part is in view for (sensor width / 22.5) mm, i.e. that many ms.
PX_PER_MM = 22.5
BELT_MM_PER_S = 1000.0
CAMERAS = (("2 MP (1920x1080)", 1920), ("5 MP (2592x1944)", 2592), ("8 MP (3840x2160)", 3840))


def time_windows(p99_ms: float | None) -> list[dict[str, Any]]:
    """The time window of each camera on the line, and whether ``p99_ms`` fits in it."""
    rows = []
    for camera, width_px in CAMERAS:
        window_ms = width_px / PX_PER_MM / BELT_MM_PER_S * 1000.0
        rows.append(
            {
                "camera": camera,
                "field_of_view_mm": round(width_px / PX_PER_MM, 1),
                "window_ms": round(window_ms, 1),
                "fits": None if p99_ms is None else p99_ms <= window_ms,
            }
        )
    return rows


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and legend a plot, write it as SVG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def _plots(
    dag: LoadResult,
    naive: LoadResult | None,
    half: LoadResult | None,
    dag_sweep: Sequence[LoadResult],
    naive_sweep: Sequence[LoadResult],
    ceiling_rps: float | None,
    folder: Path,
) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "inspectray"  # the same figures give the same file
    plt.rcParams["svg.fonttype"] = "none"  # text as text: a small file
    cdf = folder / "latency-cdf.svg"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = [("DAG", dag, "tab:blue", "-")]
    if half is not None:
        curves.append(("DAG at half its peak", half, "tab:green", "--"))
    if naive is not None:
        curves.append(("naive server", naive, "tab:red", "-"))
    for name, run, color, style in curves:
        if run.latencies_ms:
            share = np.linspace(0.0, 1.0, 401)  # the CDF at 400 steps keeps the file small
            values = np.quantile(run.latencies_ms, share)
            label = f"{name} ({run.users} users, {run.rps:.1f} req/s)"
            ax.plot(values, share, style, color=color, label=label)
    window = CAMERAS[0][1] / PX_PER_MM / BELT_MM_PER_S * 1000.0
    ax.axvline(window, color="gray", linestyle=":", label=f"2 MP time window ({window:.0f} ms)")
    ax.set_xscale("log")
    _finish(fig, ax, cdf, "latency (ms, log scale)", "share of requests answered", "Latency CDF")

    curve = folder / "throughput-users.svg"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = (("DAG", dag_sweep, "tab:blue"), ("naive server", naive_sweep, "tab:red"))
    for name, runs, color in lines:
        if runs:
            ax.plot([r.users for r in runs], [r.rps for r in runs], "o-", color=color, label=name)
    if ceiling_rps:
        ax.axhline(
            ceiling_rps, color="black", linestyle="--", label="ceiling: first-line models alone"
        )
        ax.axhline(0.7 * ceiling_rps, color="gray", linestyle=":", label="70 % of the ceiling")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, curve, "concurrent users (log scale)", "inspections per second", "Throughput")
    return cdf, curve


def _table(rows: Sequence[Sequence[Any]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _topologies(result: dict[str, Any]) -> list[str]:
    return [key[: -len("_breakdown")] for key in result if key.endswith("_breakdown")]


def topology_sections(result: dict[str, Any]) -> list[str]:
    """Markdown: the topologies side by side, where their time goes, their verdicts."""
    names = [t for t in _topologies(result) if t != "dag"]
    if not names:
        return []
    lines = [
        "## Topologies side by side",
        "",
        "fused: every stage in each replica of the router (no hop between stages); "
        "split: one deployment per model stage (two to four hops). Requests come in "
        "through HAProxy straight to a router replica; a name ending in -serve-proxy: "
        "through Serve's own Python proxy instead.",
        "",
    ]
    rows: list[list[Any]] = [
        ["topology", "requests/s", "p50 ms", "p99 ms", "over naive", "over ceiling",
         "peak requests/s", "half peak: p99 ms (ok parts)", "1 user: p50 ms"]
    ]  # fmt: skip
    for name in names:
        one_user = [r for r in result.get("runs", []) if r["server"] == name and r["users"] == 1]
        ok = result.get(f"{name}_half_peak_by_verdict", {}).get("ok", {})
        rows.append(
            [
                name,
                result.get(f"{name}_rps"),
                result.get(f"{name}_p50_ms"),
                result.get(f"{name}_p99_ms"),
                result.get(f"{name}_over_naive"),
                result.get(f"{name}_over_ceiling"),
                result.get(f"{name}_peak_rps"),
                f"{result.get(f'{name}_half_peak_p99_ms', '—')} ({ok.get('p99_ms', '—')})",
                one_user[0]["p50_ms"] if one_user else "—",
            ]
        )
    lines += [_table(rows), ""]
    for name in names:
        grpc = result.get(f"{name}_grpc")
        if grpc:
            runs = "; ".join(
                f"{r['users']} user(s): {r['rps']} requests/s, p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, {r['failed']} failed"
                for r in grpc
            )
            lines += [f"The gRPC API ({name}, camera clients with a channel open): {runs}.", ""]
    parity = result.get("verdict_parity")
    if parity:
        lines += [
            f"Verdicts: {parity['images']} images answered by {', '.join(parity['servers'])}; "
            f"**{parity['differing']}** got more than one verdict.",
            "",
        ]
    lines += ["## Where the time goes", ""]
    lines += [
        "From each answer's own timings, averaged over the main run's requests: the "
        "client's latency is the time outside the router (Locust, the ingress, the "
        "hop to the router, the answer's way back) plus the router's; the router's "
        "splits into decoding the image (checks and hash), the cache lookup and the "
        "stages; each stage's call into the model's computing time and the wait "
        "around it (batching, queues, the hop to its replica and back).",
        "",
    ]
    for name in names:
        b = result.get(f"{name}_breakdown") or {}
        if not b:
            continue
        phases = ", ".join(f"{k} {v} ms" for k, v in b["router_phases_ms"].items())
        lines += [
            f"**{name}** ({b['requests']} requests): client {b['client_ms']} ms = outside "
            f"the router {b['outside_router_ms']} ms + router {b['router_ms']} ms ({phases}); "
            f"models {b['model_ms']} ms, waiting on stages {b['stage_wait_ms']} ms.",
            "",
        ]
        stage_rows: list[list[Any]] = [
            ["stage", "share of requests", "model ms", "call ms", "wait ms"]
        ]
        for stage, f in b["stages"].items():
            stage_rows.append([stage, f["share"], f["model_ms"], f["call_ms"], f["wait_ms"]])
        lines += [_table(stage_rows), ""]
        profile = result.get(f"{name}_cpu_profile")
        if profile:
            lines += [
                f"CPU per answered request by process ({profile['rps']} requests/s while "
                "sampled); inside the serving processes, by what py-spy saw them doing:",
                "",
            ]
            cpu_rows: list[list[Any]] = [["process", "processes", "CPU ms/request", "by activity"]]
            for role, row in profile["roles"].items():
                activity = ", ".join(
                    f"{k} {v}" for k, v in list(row.get("by_activity_ms", {}).items())[:5]
                )
                cpu_rows.append([role, row["processes"], row["cpu_ms_per_request"], activity])
            lines += [_table(cpu_rows), ""]
    return lines


def write_report(
    result: dict[str, Any],
    dag: LoadResult,
    naive: LoadResult | None,
    half: LoadResult | None,
    dag_sweep: Sequence[LoadResult],
    naive_sweep: Sequence[LoadResult],
    path: Path,
) -> Path:
    """Write the Markdown report and its two SVG plots (beside it, in ``benchmarks/``)."""
    folder = path.parent / path.stem
    cdf, curve = _plots(dag, naive, half, dag_sweep, naive_sweep, result.get("ceiling_rps"), folder)
    m = result["machine"]
    gpu = m["gpu"] or "no GPU"
    lines = [
        "# Benchmarks",
        "",
        "Written by `inspectray bench`; every figure below is from one run on one machine:",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}.",
        f"Categories {', '.join(result['categories'])}; {result['traffic_images']} images the "
        f"models did not train on, {result['defective_share']:.0%} defective parts, "
        "categories equally often; every request a new image hash (no cache hits).",
        f"Each run: {result['warmup_s']:g} s of warm-up, then {result['duration_s']:g} s measured.",
        "",
        "## The DAG beside the naive server and the ceiling",
        "",
    ]
    rows: list[list[Any]] = [
        ["", "requests/s", "p50 ms", "p95 ms", "p99 ms", "failed", "verdict accuracy"]
    ]
    if "ceiling_rps" in result:
        best = result["ceiling"]["best"]
        rows.append(
            [
                f"ceiling: first-line models alone, {best.get('runtime', 'torch')}"
                + (f" ({', '.join(best['in_torch'])} in torch)" if best.get("in_torch") else "")
                + f", batch {best['batch']}, {best['threads']} thread(s)",
                f"{result['ceiling_rps']:.1f}",
                "—",
                "—",
                "—",
                "—",
                "—",
            ]
        )
    for name, run in (("DAG", dag), ("naive server", naive)):
        if run is not None:
            s = run.summary()
            rows.append(
                [
                    f"{name}, {run.users} users",
                    f"{run.rps:.1f}",
                    _ms(run.p50_ms),
                    _ms(run.p95_ms),
                    _ms(run.p99_ms),
                    f"{run.failed} of {run.requests}",
                    "—" if s["accuracy"] is None else f"{s['accuracy']:.3f}",
                ]
            )
    lines += [_table(rows), ""]
    ratios = [
        f"- DAG over naive: **{result.get('dag_over_naive')}** (same users, same time)",
        f"- DAG over ceiling: **{result.get('dag_over_ceiling')}**",
        f"- DAG peak over the sweep: {result.get('dag_peak_rps')} requests/s",
    ]
    lines += [*ratios, ""]
    lines += topology_sections(result)
    if half is not None:
        lines += [
            "## Latency at half the peak throughput, against a part's time in view",
            "",
            f"Paced at {result['dag_half_peak_target_rps']:.1f} requests/s (half the DAG's peak), "
            f"{half.users} users: {half.rps:.1f} requests/s answered, p50 {half.p50_ms:.1f} ms, "
            f"**p99 {half.p99_ms:.1f} ms**, {half.failed} failed.",
            "",
            "A part's time in view: the camera's width across the belt at 22.5 px/mm "
            "(a 6 mm nut over 135 px), the belt at 1 m/s; a part is in view for "
            "(width / 22.5) ms.",
            "",
        ]
        window_rows: list[list[Any]] = [
            ["camera", "field of view", "time window", "measured p99", "fits"]
        ]
        for row in time_windows(half.p99_ms):
            window_rows.append(
                [
                    row["camera"],
                    f"{row['field_of_view_mm']} mm",
                    f"{row['window_ms']} ms",
                    f"{half.p99_ms:.1f} ms",
                    "yes" if row["fits"] else "**no**",
                ]
            )
        lines += [_table(window_rows), ""]
        if half.by_verdict:
            lines += [
                "By the path a request took (ok parts: detector, and the verifier in the "
                "band; defective parts: then the classifier and the reranker):",
                "",
            ]
            path_rows: list[list[Any]] = [["verdict", "share", "p50 ms", "p99 ms", "fits 2 MP"]]
            window = time_windows(None)[0]["window_ms"]
            for verdict, figures in half.by_verdict.items():
                path_rows.append(
                    [
                        verdict,
                        f"{figures['share']:.1%}",
                        figures["p50_ms"],
                        figures["p99_ms"],
                        "yes" if figures["p99_ms"] <= window else "**no**",
                    ]
                )
            lines += [_table(path_rows), ""]
    lines += [
        "## Plots",
        "",
        f"![latency CDF]({folder.name}/{cdf.name})",
        "",
        f"![throughput against users]({folder.name}/{curve.name})",
        "",
        "## Every run",
        "",
    ]
    run_rows: list[list[Any]] = [
        ["server", "users", "requests/s", "p50 ms", "p95 ms", "p99 ms", "requests", "failed"]
    ]
    for run in result["runs"]:
        run_rows.append(
            [
                run["server"],
                run["users"],
                run["rps"],
                run["p50_ms"],
                run["p95_ms"],
                run["p99_ms"],
                run["requests"],
                run["failed"],
            ]
        )
    lines += [_table(run_rows), ""]
    summary = {k: v for k, v in result.items() if k not in ("runs", "ceiling", "report")}
    lines += ["## The JSON", "", "```json", json.dumps(summary, indent=2), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
