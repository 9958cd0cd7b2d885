"""Latency of one request at a time through the whole DAG, per image.

    python -m loadtests.latency --url http://127.0.0.1:8000 -n 200
        --image good=part_ok.png:brushed_metal --image bad=part_nok.png:brushed_metal

Each image is sent ``-n`` times, one request at a time, with four fresh bytes
appended after the image data so that no answer comes from the result cache;
prints JSON with p50, p90, p99 and mean client-side milliseconds per image and
the verdicts seen. Fails (exit 1) when any request failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from deployments.client import HttpClient, InspectionFailed, RetryPolicy


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {
        "p50_ms": round(float(np.percentile(array, 50)), 1),
        "p90_ms": round(float(np.percentile(array, 90)), 1),
        "p99_ms": round(float(np.percentile(array, 99)), 1),
        "mean_ms": round(statistics.fmean(values), 1),
    }


def measure(
    client: HttpClient,
    image: bytes,
    category: str | None,
    n: int,
    warmup: int = 5,
    **options: bool,
) -> dict[str, Any]:
    """Send one image ``n`` times in sequence; client-side and server-side latencies."""
    client_ms: list[float] = []
    server_ms: list[float] = []
    verdicts: dict[str, int] = {}
    stages: dict[str, int] = {}
    failed = 0
    for i in range(warmup + n):
        # PNG, JPEG, BMP and TIFF decoders ignore trailing bytes; the hash changes.
        data = image + i.to_bytes(4, "big")
        started = time.perf_counter()
        try:
            result = client.inspect(data, category=category, **options)
        except InspectionFailed as error:
            failed += 1
            print(f"request failed: {error}", file=sys.stderr)
            continue
        elapsed = (time.perf_counter() - started) * 1000.0
        if i < warmup:
            continue
        assert not result.cache_hit
        client_ms.append(elapsed)
        server_ms.append(result.latency_ms)
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
        path = ">".join(t.stage for t in result.trace)
        stages[path] = stages.get(path, 0) + 1
    return {
        "n": len(client_ms),
        "failed": failed,
        "client": _percentiles(client_ms) if client_ms else None,
        "router": _percentiles(server_ms) if server_ms else None,
        "verdicts": verdicts,
        "stage_paths": stages,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure each image, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--image", action="append", required=True, help="NAME=PATH[:CATEGORY] (repeat)"
    )
    parser.add_argument("-n", type=int, default=200, help="requests per image")
    parser.add_argument("--api-key")
    parser.add_argument("--explain", action="store_true", help="ask for heatmaps")
    parser.add_argument("--boxes", action="store_true", help="ask for boxes")
    args = parser.parse_args(argv)
    client = HttpClient(args.url, api_key=args.api_key, retry=RetryPolicy(attempts=1))
    report: dict[str, Any] = {
        "url": args.url,
        "requests_per_image": args.n,
        "explain": args.explain,
        "boxes": args.boxes,
        "images": {},
    }
    failed = 0
    for spec in args.image:
        name, _, rest = spec.partition("=")
        path, _, category = rest.partition(":")
        measured = measure(
            client,
            Path(path).read_bytes(),
            category or None,
            args.n,
            explain=args.explain,
            boxes=args.boxes,
        )
        report["images"][name] = {"path": path, "category": category or None, **measured}
        failed += measured["failed"]
    client.close()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
