"""gRPC load: camera clients that keep a channel open, each sending one part after another.

Locust speaks HTTP; this drives the gRPC API (``deployments/protos/inspection.proto``)
with the same traffic (:class:`~loadtests.traffic.Traffic`: categories equally
often, defective parts at their share, every image made new) from ``users``
threads, each with its own :class:`~deployments.client.GrpcClient` (no retries:
a failed request counts as failed), and keeps the same record per request as
the Locust runs, so :func:`~loadtests.runs.analyse` reads both alike.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from deployments.client import GrpcClient, InspectionFailed, RetryPolicy
from loadtests.runs import LoadResult, analyse, server_side
from loadtests.traffic import Traffic


def run_grpc(
    target: str,
    traffic: Traffic,
    users: int,
    seconds: float,
    warmup_s: float,
    log: Path | None = None,
) -> LoadResult:
    """``users`` closed-loop gRPC callers for ``warmup_s + seconds``; the measured window.

    Args:
        target: ``host:port`` of the gRPC proxy.
        traffic: what to send.
        users: concurrent callers (threads, a channel each).
        seconds: the measured window.
        warmup_s: unmeasured seconds first.
        log: a JSON-lines file for every request's record.
    """
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + warmup_s + seconds

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        client = GrpcClient(target, retry=RetryPolicy(attempts=1))
        try:
            while time.monotonic() < stop_at:
                drawn = traffic.draw(rng)
                started = time.perf_counter()
                record = drawn.fields()
                try:
                    answer = client.inspect(drawn.body, drawn.image.category)
                    summary = answer.model_dump(mode="json")
                    record |= {"ok": True, "status": 200, "verdict": answer.verdict}
                    record |= server_side(summary)
                except InspectionFailed as error:
                    record |= {"ok": False, "status": error.status, "verdict": None}
                record |= {"end": time.time(), "ms": (time.perf_counter() - started) * 1000.0}
                with lock:
                    records.append(record)
        finally:
            client.close()

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    failed = sum(1 for r in records if not r["ok"])
    return analyse(records, users, warmup_s, seconds, 1 if failed else 0)
