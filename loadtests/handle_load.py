r"""Load by DeploymentHandle: callers inside the Ray cluster, as another service would be.

    python -m loadtests.handle_load --traffic .inspectray/bench/traffic/traffic.json \\
        --users 8 --duration 60 --out .inspectray/handle-load

Connects to the running cluster (``RAY_ADDRESS``, else ``auto``), takes the
``inspectray`` app's handle and runs ``--users`` callers for ``--duration``
seconds, each sending the next inspection as soon as the last one answered,
drawn from the traffic mix. Writes ``OUT_stats.csv`` (per ground-truth label
and in all: requests, failures, percentiles, requests/s) and
``OUT_requests.jsonl`` (every request), prints the summary as JSON, and exits 1
when any request failed. Retries are off by default so that a failure shows;
``--retries N`` gives the callers ``deployments.client``'s retry policy.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deployments.client import HandleClient, InspectionFailed, RetryPolicy
from loadtests.traffic import Traffic


async def _caller(
    client: HandleClient,
    traffic: Traffic,
    rng: random.Random,
    stop_at: float,
    records: list[dict[str, Any]],
) -> None:
    while time.monotonic() < stop_at:
        drawn = traffic.draw(rng)
        started = time.perf_counter()
        record = drawn.fields()
        try:
            result = await client.inspect_async(drawn.body, category=drawn.image.category)
            record |= {"ok": True, "status": 200, "verdict": result.verdict}
        except InspectionFailed as error:
            record |= {"ok": False, "status": error.status, "error": error.detail[:200]}
        except Exception as error:  # a lost replica the policy gave up on, a Ray error
            record |= {"ok": False, "status": 0, "error": f"{type(error).__name__}: {error}"}
        record |= {"end": time.time(), "ms": (time.perf_counter() - started) * 1000.0}
        records.append(record)


async def run(
    traffic: Traffic, users: int, duration_s: float, retry: RetryPolicy
) -> list[dict[str, Any]]:
    """Run the callers; every request's record."""
    client = HandleClient(retry=retry)
    records: list[dict[str, Any]] = []
    stop_at = time.monotonic() + duration_s
    await asyncio.gather(
        *(_caller(client, traffic, random.Random(seed), stop_at, records) for seed in range(users))
    )
    return records


def stats(records: Sequence[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    """Per label and aggregated: requests, failures, p50/p95/p99 ms, requests/s."""
    rows = []
    groups = {
        "good": [r for r in records if not r["defective"]],
        "defective": [r for r in records if r["defective"]],
        "Aggregated": list(records),
    }
    for name, group in groups.items():
        latencies = [r["ms"] for r in group if r["ok"]]

        def pct(q: float, values: list[float] = latencies) -> float | None:
            return round(float(np.percentile(values, q)), 1) if values else None

        rows.append(
            {
                "name": name,
                "requests": len(group),
                "failures": sum(not r["ok"] for r in group),
                "p50_ms": pct(50),
                "p95_ms": pct(95),
                "p99_ms": pct(99),
                "requests_per_s": round(sum(r["ok"] for r in group) / seconds, 2),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the handle load; exit 1 when any request failed."""
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traffic", required=True, help="traffic file (loadtests.traffic)")
    parser.add_argument("--users", type=int, default=8, help="concurrent callers (8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (30)")
    parser.add_argument("--defective-share", type=float, help="default: the traffic file's")
    parser.add_argument("--retries", type=int, default=0, help="retries per request (0)")
    parser.add_argument("--out", default="handle-load", help="prefix of the CSV and JSONL")
    args = parser.parse_args(argv)
    if args.users < 1 or args.duration <= 0 or args.retries < 0:
        parser.error("--users must be at least 1, --duration positive, --retries >= 0")
    traffic = Traffic.from_file(args.traffic, args.defective_share)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    try:
        records = asyncio.run(
            run(traffic, args.users, args.duration, RetryPolicy(attempts=args.retries + 1))
        )
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = stats(records, args.duration)
    with open(f"{out}_stats.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{out}_requests.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    total = rows[-1]
    print(json.dumps({"users": args.users, "duration_s": args.duration} | total))
    if total["failures"]:
        errors = {r.get("error") for r in records if not r["ok"]}
        shown = sorted(map(str, errors))[:5]
        print(f"{total['failures']} requests failed: {shown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
