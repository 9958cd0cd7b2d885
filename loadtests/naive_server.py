"""The naive baseline the benchmark compares the DAG with.

One FastAPI/uvicorn process that, one request at a time, runs every stage the
category has (detector, verifier, classifier, localizer, reranker), each on a
batch of one, with no conditional skipping. It is how a single-model web
service is usually grown into a pipeline. It runs the same inspection flow as
the DAG (:mod:`models.inspection.flow`) with every stage forced on, so its
answers are the DAG's; only how it spends the machine differs.

    python -m loadtests.naive_server --registry registry --port 8100

``POST /v1/inspect`` takes the same multipart form as the DAG's API (``image``
file, ``category``); ``GET /healthz`` answers once every model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from deployments.imaging import ImageRejected, decode_image
from models.artifacts import ArtifactRegistry
from models.inspection import Coverage, Inspection, InspectionRequest, LocalInspector


def naive_answer(inspection: Inspection, latency_ms: float) -> dict[str, Any]:
    """The baseline's JSON answer: the served fields, and every stage that ran."""
    return {
        "category": inspection.category,
        "verdict": inspection.verdict,
        "anomaly_score": inspection.anomaly_score,
        "decided_by": inspection.decided_by,
        "grade": inspection.grade,
        "defect_types": [{"name": t.name, "score": t.score} for t in inspection.defect_types],
        "boxes": [
            {"defect_type": b.defect_type, "score": b.score, "box": list(b.box)}
            for b in inspection.boxes
        ],
        "stages": inspection.stages_run,
        "latency_ms": latency_ms,
    }


def create_app(registry_uri: str) -> FastAPI:
    """The baseline's web app (models load at startup)."""
    inspector = LocalInspector(
        ArtifactRegistry(registry_uri), coverage=Coverage.EVERY_STAGE, max_batch_size=1
    )
    one_at_a_time = asyncio.Lock()
    loaded = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inspector.load_all()
        loaded["ready"] = True
        yield

    app = FastAPI(title="naive baseline", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ready": loaded["ready"]}, status_code=200 if loaded["ready"] else 503)

    # The models run inline in the event loop, and the lock holds a request until
    # the one before it has its answer: one request at a time, which is what makes
    # this the naive baseline.
    @app.post("/v1/inspect")
    async def inspect(request: Request) -> JSONResponse:
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"detail": "the form has no file named 'image'"}, 422)
        category = form.get("category") or None
        try:
            decoded = decode_image(await upload.read(), upload.content_type)
            async with one_at_a_time:
                started = time.perf_counter()
                found = await inspector.inspect(InspectionRequest(decoded.image, category))
            return JSONResponse(naive_answer(found, (time.perf_counter() - started) * 1000.0))
        except ImageRejected as error:
            return JSONResponse({"detail": error.detail}, error.status)
        except ValueError as error:  # a category it does not know, no router
            return JSONResponse({"detail": str(error)}, 422)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the baseline with uvicorn (one process)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="registry folder or URL")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.registry), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
