"""One fused router replica's work, in this process: CPU per inspection, no Ray, no HTTP.

The router's own code, as a fused replica runs it (decode and checks, the Redis
lookup, every stage batched across the inspections in flight, the answer, the
stream and the cache), driven by concurrent callers on the bench's traffic. It
prints the process's CPU time per inspection, so a change to that code can be
measured in seconds, side by side, before a full ``inspectray bench``:

    python -m loadtests.replica --registry registry --redis-url redis://127.0.0.1:6379/0

Without ``--redis-url`` the replica runs without Redis (no cache, no stream).
Wrap it in ``py-spy record -f raw`` to see where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.traffic import DEFAULT_DEFECTIVE_SHARE, Traffic, build_traffic, served_categories

WARMUP_REQUESTS = 20


@dataclass(frozen=True)
class ReplicaRun:
    """What one run measured.

    Attributes:
        requests: inspections answered (after the warm-up).
        users: concurrent callers.
        inspections_per_s: answered per wall-clock second.
        cpu_ms_per_inspection: this process's CPU time (every thread) per answer.
        defective: answers judged defective.
    """

    requests: int
    users: int
    inspections_per_s: float
    cpu_ms_per_inspection: float
    defective: int


def measure(
    registry_uri: str,
    traffic: Traffic,
    requests: int = 1000,
    users: int = 16,
    redis_url: str | None = None,
    seed: int = 0,
) -> ReplicaRun:
    """Drive one fused router with ``users`` concurrent callers; time ``requests`` answers.

    Each request is a drawn image with four random bytes after it, as the load
    tests send, so no answer comes from the cache.
    """
    from deployments.app import router_user_config
    from deployments.config import load_serving_config
    from deployments.router import RouterCore

    if requests < 1 or users < 1:
        raise ValueError(f"need at least one request and one user, got {requests}, {users}")
    serving = load_serving_config(None, None)
    core = RouterCore({}, registry_uri, redis_url, "cpu", dict(serving.runtimes))
    core.reconfigure(router_user_config(serving))
    rng = random.Random(seed)
    drawn = [traffic.draw(rng) for _ in range(requests + WARMUP_REQUESTS)]
    bodies = [(traffic.data(d.image) + os.urandom(4), d.image.category) for d in drawn]

    async def run() -> ReplicaRun:
        for data, category in bodies[:WARMUP_REQUESTS]:  # every model warm
            await core.inspect_bytes(data, category, content_type="image/png")
        queue = bodies[WARMUP_REQUESTS:]
        verdicts: list[str] = []

        async def user() -> None:
            while queue:
                data, category = queue.pop()
                result = await core.inspect_bytes(data, category, content_type="image/png")
                verdicts.append(result.verdict)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user() for _ in range(users)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return ReplicaRun(
            requests=len(verdicts),
            users=users,
            inspections_per_s=round(len(verdicts) / wall, 2),
            cpu_ms_per_inspection=round(cpu * 1000.0 / len(verdicts), 3),
            defective=verdicts.count("defective"),
        )

    try:
        return asyncio.run(run())
    finally:
        core.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Measure one fused router replica's CPU per inspection."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--registry", required=True, help="registry folder or URL")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--users", type=int, default=16, help="concurrent callers")
    parser.add_argument("--redis-url", default=None, help="a Redis to use (default: none)")
    parser.add_argument("--traffic-dir", type=Path, default=Path(".inspectray/traffic"))
    parser.add_argument("--defective-share", type=float, default=DEFAULT_DEFECTIVE_SHARE)
    args = parser.parse_args(argv)
    images = build_traffic(served_categories(args.registry), args.traffic_dir)
    traffic = Traffic(images, args.defective_share)
    found: dict[str, Any] = asdict(
        measure(args.registry, traffic, args.requests, args.users, args.redis_url)
    )
    print(" ".join(f"{key}={value}" for key, value in found.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
