"""The naive baseline the benchmark compares the DAG with.

One FastAPI/uvicorn process that, for every request and one request at a time,
runs every stage the category has: detector, verifier, classifier, localizer
and reranker, each on a batch of one, with no conditional skipping. It is how a
single-model web service is usually grown into a pipeline. Its verdict follows
the same decision rule as the DAG (the verifier's score counts only in the
band), so the two answer alike; only how they spend the machine differs.

    python -m loadtests.naive_server --registry registry --port 8100

``POST /v1/inspect`` takes the same multipart form as the DAG's API (``image``
file, ``category``); ``GET /healthz`` answers once every model is loaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from deployments import compute
from deployments.flow import DEFECTIVE, OK, LocalStageCalls, ServingPlan, load_plan
from deployments.imaging import ImageRejected, decode_image
from models.artifacts import ArtifactRegistry
from models.stages import CLASSIFIER, DETECTOR, LOCALIZER, RERANKER, ROUTER, VERIFIER


class NaivePipeline:
    """Every stage of a category, in sequence, on one image."""

    def __init__(self, registry_uri: str) -> None:
        registry = ArtifactRegistry(registry_uri)
        self.plan: ServingPlan = load_plan(registry)
        self.calls = LocalStageCalls(registry)
        self.texts = compute.TypeTexts()

    def load_all(self) -> None:
        """Load every model before the first request."""
        for models in self.plan.categories.values():
            for stage in (DETECTOR, VERIFIER, CLASSIFIER, RERANKER):
                if models.has(stage):
                    self.calls.model(stage, models.model_id(stage))
        if self.plan.router_id:
            self.calls.model(ROUTER, self.plan.router_id)
        if self.plan.localizer_id:
            self.calls.model(LOCALIZER, self.plan.localizer_id)

    def inspect(self, image: Image.Image, category: str | None) -> dict[str, Any]:
        """Run every stage; the verdict by the category's decision rule."""
        started = time.perf_counter()
        plan, calls = self.plan, self.calls
        if category is None:
            if plan.router_id is None:
                raise ValueError("send a category: no category router is trained")
            category = compute.route(calls.model(ROUTER, plan.router_id), [image])[0]["category"]
        if category not in plan.categories:
            raise ValueError(f"unknown category {category!r}; known: {sorted(plan.categories)}")
        models = plan.categories[category]
        stages = [DETECTOR]
        detector = calls.model(DETECTOR, models.model_id(DETECTOR))
        probability = compute.detect(detector, [image], [False])[0]["probability"]
        verifier_score = None
        if models.has(VERIFIER):
            score = compute.verify(calls.model(VERIFIER, models.model_id(VERIFIER)), [image])
            verifier_score = score[0]["score"]
            stages.append(VERIFIER)
        in_band = models.rule.needs_verifier(probability)
        decision = models.rule.decide(probability, verifier_score if in_band else None)
        scores = None
        defect_types: list[list[Any]] = []
        if models.has(CLASSIFIER):
            classified = compute.classify(
                calls.model(CLASSIFIER, models.model_id(CLASSIFIER)), [image]
            )[0]
            scores, defect_types = classified["defect_scores"], classified["ranked"]
            stages.append(CLASSIFIER)
        boxes: list[dict[str, Any]] = []
        if plan.localizer_id:
            located = compute.localize(calls.model(LOCALIZER, plan.localizer_id), [image])
            boxes = located[0]["boxes"]
            stages.append(LOCALIZER)
        if models.has(RERANKER):
            model_id = models.model_id(RERANKER)
            reranked = compute.rerank(
                calls.model(RERANKER, model_id), model_id, [image], [scores], [[]], self.texts
            )
            defect_types = reranked[0]["ranked"]
            stages.append(RERANKER)
        defective = decision.defective
        return {
            "category": category,
            "verdict": DEFECTIVE if defective else OK,
            "anomaly_score": float(decision.anomaly_score),
            "defect_types": [{"name": n, "score": s} for n, s in defect_types] if defective else [],
            "boxes": boxes if defective else [],
            "stages": stages,
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }


def create_app(registry_uri: str) -> FastAPI:
    """The baseline's web app (models load at startup)."""
    pipeline = NaivePipeline(registry_uri)
    loaded = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipeline.load_all()
        loaded["ready"] = True
        yield

    app = FastAPI(title="naive baseline", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ready": loaded["ready"]}, status_code=200 if loaded["ready"] else 503)

    # `async def` with the models run inline: the event loop serves one request at a
    # time, which is what makes this the naive baseline.
    @app.post("/v1/inspect")
    async def inspect(request: Request) -> JSONResponse:
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"detail": "the form has no file named 'image'"}, 422)
        category = form.get("category") or None
        try:
            decoded = decode_image(await upload.read(), upload.content_type)
            return JSONResponse(pipeline.inspect(decoded.image, category))
        except ImageRejected as error:
            return JSONResponse({"detail": error.detail}, error.status)
        except ValueError as error:
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
