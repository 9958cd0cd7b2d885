"""``inspectray serve``, ``inspectray predict`` and ``inspectray keys``.

inspectray serve [--port P] [--host H] [--registry DIR] [--config FILE] [--redis-url URL]
                 [--json] [--verbose]
inspectray bench [--duration S] [--users U] [--registry DIR] [--report FILE]
inspectray predict IMAGE... [--url URL] [--category C] [--explain] [--boxes] [--api-key K]
inspectray keys add --tenant T [--category C ...] [--rate N] | revoke KEY
inspectray reviews export --out DIR [--category C]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cluster.arguments import add_command, print_json, settings

DEFAULT_URL = "http://127.0.0.1:8000"


def _url_lines(urls: dict[str, str | None]) -> str:
    """Where everything is, one per line, last on the console."""
    names = (
        ("api", "API (HTTP)"),
        ("ui", "inspection page"),
        ("docs", "API docs"),
        ("grpc", "API (gRPC)"),
        ("dashboard", "Ray dashboard"),
        ("metrics", "metrics (Prometheus)"),
        ("logs", "Ray's logs"),
    )
    width = max(len(label) for _, label in names)
    lines = [f"  {label:<{width}}  {urls[key]}" for key, label in names if urls.get(key)]
    return "\n".join(["inspectray is serving:", *lines, "Ctrl-C stops it."])


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray, Redis and the app on this machine; train a quick set when none exists."""
    from cluster.local import LocalCluster

    registry = args.registry or settings(args).registry.uri
    # With --json, stdout carries this command's JSON alone: everything else goes to stderr.
    sys.stdout.flush()
    summary_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    saved_stdout = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    cluster = LocalCluster(
        registry,
        port=args.port,
        host=args.host,
        config=args.serving_config,
        redis_url=args.redis_url,
        workdir=Path(args.workdir),
        grpc_port=args.grpc_port,
        verbose=args.verbose,
    )
    try:
        cluster.start()
        summary = {
            "urls": cluster.urls(),
            "seconds_to_ready": round(cluster.timings["ready_s"], 1),
            "timings": {k: round(v, 1) for k, v in cluster.timings.items()},
            "quick_set": cluster.trained,
        }
        written = Path(args.workdir) / "serve.json"
        written.write_text(json.dumps(summary, indent=2) + "\n")
        if args.json:
            json.dump(summary, summary_out, indent=2)
            summary_out.write("\n")
            summary_out.flush()
        print(_url_lines(cluster.urls()), file=sys.stderr, flush=True)
        if not args.exit_when_ready:
            cluster.wait_for_signal()
    finally:
        print("shutting down", file=sys.stderr)
        cluster.stop()
        sys.stdout.flush()
        os.dup2(saved_stdout, sys.stdout.fileno())
        os.close(saved_stdout)
        summary_out.close()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Inspect image files through a running service; one JSON result per image."""
    from deployments.client import HttpClient, InspectionFailed, RetryPolicy
    from models.data.sample import DataError

    for path in args.images:
        if not Path(path).is_file():
            raise DataError(f"image file not found: {path}")
    client = HttpClient(args.url, api_key=args.api_key, retry=RetryPolicy(attempts=3))
    results: list[dict[str, Any]] = []
    failed = 0
    try:
        for path in args.images:
            try:
                result = client.inspect(
                    Path(path).read_bytes(),
                    category=args.category,
                    explain=args.explain,
                    boxes=args.boxes,
                    filename=Path(path).name,
                )
                answer = result.model_dump(mode="json")
                if not args.explain:
                    answer.pop("heatmap_png", None)
                results.append({"image": str(path), "result": answer})
            except InspectionFailed as error:
                failed += 1
                results.append(
                    {"image": str(path), "error": {"status": error.status, "detail": error.detail}}
                )
    finally:
        client.close()
    print_json(results)
    return 1 if failed else 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    """Create an API key (printed once; only its hash is stored)."""
    store = _store(args)
    key = store.add_api_key(args.tenant, args.category or None, args.rate)
    print_json(
        {
            "tenant": args.tenant,
            "key": key,
            "categories": args.category or "all",
            "rate_per_minute": args.rate,
        }
    )
    return 0


def cmd_reviews_export(args: argparse.Namespace) -> int:
    """Write the reviewed answers as a dataset the trainers read (COCO, image labels)."""
    from cluster.reviews import export_reviews

    print_json(export_reviews(_store(args), Path(args.out), args.category))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke an API key."""
    revoked = _store(args).revoke_api_key(args.key)
    print_json({"revoked": revoked})
    return 0 if revoked else 1


def cmd_results_follow(args: argparse.Namespace) -> int:
    """Read the result stream as a consumer group: one JSON line per result, acknowledged.

    This is the pattern for downstream systems (MES, dashboards, archives): each
    group sees every result once; consumers of one group share the work; a result
    is acknowledged only after it was handled (here: printed), so a consumer that
    dies leaves it pending for another.
    """
    store = _store(args)
    store.ensure_group(args.group, start="0" if args.from_start else "$")
    handled = 0
    while args.count is None or handled < args.count:
        want = 100 if args.count is None else min(100, args.count - handled)
        entries = store.read_group(args.group, args.consumer, count=want, block_ms=args.block_ms)
        if not entries:
            if args.block_ms is None:
                break
            continue
        for _, result in entries:
            sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        store.ack(args.group, [entry_id for entry_id, _ in entries])
        handled += len(entries)
    store.close()
    return 0


def cmd_k8s_render(args: argparse.Namespace) -> int:
    """Regenerate the RayService's serveConfigV2 from the app builder and serving YAML."""
    from cluster.k8s import render_all

    up_to_date = render_all(check=args.check)
    print_json({"up_to_date": up_to_date, "checked_only": args.check})
    if args.check and not all(up_to_date.values()):
        stale = [name for name, ok in up_to_date.items() if not ok]
        print(f"stale: {stale}; run `inspectray k8s render`", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark the DAG beside a naive server and the detectors' ceiling; JSON + report."""
    from cluster.bench import run_bench
    from loadtests.bench import BenchSettings

    if args.users < 1 or args.duration <= 0 or args.warmup < 0:
        raise ValueError("--users must be at least 1, --duration positive, --warmup >= 0")
    bench = BenchSettings(
        registry=args.registry or settings(args).registry.uri,
        users=args.users,
        duration_s=args.duration,
        warmup_s=args.warmup,
        sweep=[int(u) for u in args.sweep.split(",") if u.strip()],
        sweep_s=args.sweep_duration,
        defective_share=args.defective_share,
        config=args.serving_config,
        workdir=Path(args.workdir) / "bench",
        report=None if args.report == "-" else Path(args.report),
        port=args.port,
        skip=args.skip or (),
        topologies=_topologies(args.topologies),
        profile_s=args.profile_duration,
    )
    # stdout carries this command's JSON alone: Ray's and Locust's logs go to stderr.
    sys.stdout.flush()
    summary_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    saved_stdout = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        result = run_bench(bench)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, sys.stdout.fileno())
        os.close(saved_stdout)
    json.dump(result, summary_out, indent=2)
    summary_out.write("\n")
    summary_out.close()
    return 1 if result["failed_requests"] else 0


def _store(args: argparse.Namespace) -> Any:
    from deployments.store import RedisStore

    url = args.redis_url or os.environ.get("REDIS_URL") or settings(args).redis.url
    return RedisStore(url, Path(args.workdir) / "spool", socket_timeout_s=5)


def _topologies(text: str) -> tuple[str, ...]:
    """``fused,split`` → its names, each a known topology (else a usage error).

    A name may end in ``-serve-proxy``: that topology behind Serve's own proxy.
    """
    from cluster.bench import SERVE_PROXY
    from deployments.config import TOPOLOGIES

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t.removesuffix(SERVE_PROXY) not in TOPOLOGIES]
    if not names or unknown:
        known = ", ".join(f"{t}, {t}{SERVE_PROXY}" for t in TOPOLOGIES)
        raise SystemExit(f"error: --topologies takes some of {known}; got {text!r}")
    return names


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the serving commands on the CLI's subparsers."""
    add = add_command
    serve = add(commands, "serve", cmd_serve)
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    serve.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (9000)")
    serve.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: all)")
    serve.add_argument("--registry", help="registry folder or URL (default: config)")
    serve.add_argument(
        "--config",
        dest="serving_config",
        help="serving YAML: replicas, batching, limits (default: deployments/serving.yaml)",
    )
    serve.add_argument("--redis-url", help="an existing Redis (default: REDIS_URL, else local)")
    serve.add_argument("--workdir", default=".inspectray", help="local Redis, quick-set data")
    serve.add_argument(
        "--exit-when-ready", action="store_true", help="print the URLs, then shut down (checks)"
    )
    serve.add_argument(
        "--json",
        action="store_true",
        help="print the URLs and timings as JSON on stdout (always in WORKDIR/serve.json)",
    )
    serve.add_argument(
        "--verbose",
        action="store_true",
        help="stream Ray's worker, replica and training logs to the console too",
    )

    bench = add(commands, "bench", cmd_bench)
    bench.add_argument("--registry", help="registry folder or URL (default: config)")
    bench.add_argument("--users", type=int, default=16, help="concurrent users (16)")
    bench.add_argument("--duration", type=float, default=60, help="measured seconds per run (60)")
    bench.add_argument("--warmup", type=float, default=10, help="unmeasured seconds first (10)")
    bench.add_argument("--sweep", default="1,4,8,16,32", help="user counts of the curve")
    bench.add_argument("--sweep-duration", type=float, default=15, help="seconds per point (15)")
    bench.add_argument("--defective-share", type=float, default=0.1, help="defective parts (0.1)")
    bench.add_argument("--config", dest="serving_config", help="the DAG's serving YAML")
    bench.add_argument("--report", default="docs/benchmarks.md", help="Markdown report (-: none)")
    bench.add_argument("--port", type=int, default=8000, help="the DAG's port; naive: next one")
    bench.add_argument("--workdir", default=".inspectray", help="traffic, reports, local Redis")
    bench.add_argument(
        "--profile-duration",
        type=float,
        default=20,
        help="seconds of the run whose CPU is counted by process and activity (20)",
    )
    bench.add_argument(
        "--topologies",
        default="fused,split",
        help="served topologies to measure on the same traffic, the first heads the report; "
        "NAME-serve-proxy: behind Serve's own proxy instead of HAProxy",
    )
    bench.add_argument(
        "--skip",
        nargs="+",
        choices=["ceiling", "naive", "sweep", "half-peak", "profile", "grpc"],
        help="parts to leave out",
    )

    predict = add(commands, "predict", cmd_predict)
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF)")
    predict.add_argument("--url", default=DEFAULT_URL, help=f"service URL ({DEFAULT_URL})")
    predict.add_argument("--category", help="product category (default: the router names it)")
    predict.add_argument("--explain", action="store_true", help="include the Grad-CAM heatmap")
    predict.add_argument("--boxes", action="store_true", help="locate the defects")
    predict.add_argument("--api-key", default=os.environ.get("INSPECTRAY_API_KEY"))

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    for name, func in (("add", cmd_keys_add), ("revoke", cmd_keys_revoke)):
        command = add(keys, name, func)
        command.add_argument("--redis-url", help="default: REDIS_URL or config")
        command.add_argument("--workdir", default=".inspectray")
    keys.choices["add"].add_argument("--tenant", required=True)
    keys.choices["add"].add_argument(
        "--category", action="append", help="allowed category (repeat; default: all)"
    )
    keys.choices["add"].add_argument("--rate", type=int, help="requests per minute (default: none)")
    keys.choices["revoke"].add_argument("key")

    reviews = commands.add_parser("reviews", help="the review queue").add_subparsers(
        dest="action", required=True
    )
    export = add(reviews, "export", cmd_reviews_export)
    export.add_argument("--out", required=True, help="a new folder for the dataset")
    export.add_argument("--category", help="one product category (default: all)")
    export.add_argument("--redis-url", help="default: REDIS_URL or config")
    export.add_argument("--workdir", default=".inspectray")

    results = commands.add_parser("results", help="the result stream").add_subparsers(
        dest="action", required=True
    )
    follow = add(results, "follow", cmd_results_follow)
    follow.add_argument("--group", required=True, help="consumer group (one per downstream system)")
    follow.add_argument("--consumer", default="consumer-1", help="this consumer's name")
    follow.add_argument("--count", type=int, help="stop after N results (default: follow)")
    follow.add_argument("--block-ms", type=int, help="wait this long for new results (default: no)")
    follow.add_argument(
        "--from-start", action="store_true", help="a new group starts at the oldest"
    )
    follow.add_argument("--redis-url", help="default: REDIS_URL or config")
    follow.add_argument("--workdir", default=".inspectray")

    k8s = commands.add_parser("k8s", help="KubeRay manifests").add_subparsers(
        dest="action", required=True
    )
    render = add(k8s, "render", cmd_k8s_render)
    render.add_argument("--check", action="store_true", help="fail if a manifest is stale")
