"""One Locust run against a server, and its figures measured inside a window.

:func:`run_locust` drives the users of :mod:`loadtests.locustfile` headless and
:func:`analyse` turns every request's record into throughput, percentiles,
accuracy and error counts; the benchmark and the load tests use both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.traffic import DEFECTIVE_SHARE_ENV, REQUEST_LOG_ENV, TRAFFIC_ENV, USER_RPS_ENV

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class BenchError(RuntimeError):
    """A part of the benchmark could not run (says which)."""


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
    breakdown: dict[str, Any] = field(default_factory=dict)
    verdicts: dict[str, dict[str, int]] = field(default_factory=dict)

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
            "breakdown": self.breakdown,
        }


def server_side(answer: dict[str, Any]) -> dict[str, Any]:
    """The server's own timings in an answer: its latency, its phases, each stage's.

    What a request's record keeps of them for :func:`latency_breakdown`.
    """
    if "latency_ms" not in answer:
        return {}
    return {
        "server_ms": answer["latency_ms"],
        "timings": answer.get("timings_ms", {}),
        "stages": {
            t["stage"]: [t["latency_ms"], t.get("call_ms", 0.0)] for t in answer.get("trace", [])
        },
    }


def latency_breakdown(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where an answered request's time went, as milliseconds averaged over requests.

    From each answer's own figures (``latency_ms``, ``timings_ms``, the trace's
    ``latency_ms`` and ``call_ms`` per stage): the client's latency splits into
    the time outside the router (HTTP client, proxy, network, the answer's
    serialization, the stream write) and the router's, which splits into its
    phases; each stage's call splits into the model's computing time and the
    wait around it (batching, queues, transfer between processes).
    """
    answered = [r for r in records if r["ok"] and r.get("server_ms") is not None]
    if not answered:
        return {}
    n = len(answered)

    def mean(values: Sequence[float]) -> float:
        return round(float(np.mean(values)), 2) if values else 0.0

    phases = sorted({key for r in answered for key in r.get("timings", {})})
    stages = sorted({stage for r in answered for stage in r.get("stages", {})})
    result: dict[str, Any] = {
        "requests": n,
        "client_ms": mean([r["ms"] for r in answered]),
        "outside_router_ms": mean([r["ms"] - r["server_ms"] for r in answered]),
        "router_ms": mean([r["server_ms"] for r in answered]),
        "router_phases_ms": {
            phase: mean([r.get("timings", {}).get(phase, 0.0) for r in answered])
            for phase in phases
        },
        "model_ms": mean([sum(m for m, _ in r["stages"].values()) for r in answered]),
        "stage_wait_ms": mean([sum(c - m for m, c in r["stages"].values()) for r in answered]),
        "stages": {},
    }
    for stage in stages:
        ran = [r["stages"][stage] for r in answered if stage in r["stages"]]
        result["stages"][stage] = {
            "share": round(len(ran) / n, 3),
            "model_ms": mean([m for m, _ in ran]),
            "call_ms": mean([c for _, c in ran]),
            "wait_ms": mean([c - m for m, c in ran]),
        }
    return result


def verdicts_by_image(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Image → verdict → how many answers said it (answered requests that name an image)."""
    found: dict[str, dict[str, int]] = {}
    for r in records:
        if r["ok"] and r.get("image") and r.get("verdict"):
            counts = found.setdefault(r["image"], {})
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return found


def verdict_parity(runs: Mapping[str, Sequence[LoadResult]]) -> dict[str, Any]:
    """Whether servers gave every image the same verdict, over all their runs.

    Args:
        runs: server name → its runs on the same traffic.

    Returns:
        ``images`` (answered by every server), ``differing`` (how many got more
        than one verdict, by any server or between servers) and up to ten
        ``examples`` (image → server → verdict counts).
    """
    per_server: dict[str, dict[str, dict[str, int]]] = {}
    for server, results in runs.items():
        merged: dict[str, dict[str, int]] = {}
        for result in results:
            for image, counts in result.verdicts.items():
                into = merged.setdefault(image, {})
                for verdict, n in counts.items():
                    into[verdict] = into.get(verdict, 0) + n
        per_server[server] = merged
    common = set.intersection(*(set(v) for v in per_server.values())) if per_server else set()
    differing = sorted(
        image
        for image in common
        if len({v for server in per_server.values() for v in server[image]}) > 1
    )
    return {
        "servers": sorted(per_server),
        "images": len(common),
        "differing": len(differing),
        "examples": {i: {s: per_server[s][i] for s in per_server} for i in differing[:10]},
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
        breakdown=latency_breakdown(inside),
        verdicts=verdicts_by_image(records),
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
