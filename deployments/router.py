"""The Router: the DAG's ingress, its HTTP API and its Python API.

It decodes and validates each image once, hashes it, looks the answer up in
the Redis cache, runs the inspection flow (:mod:`models.inspection.flow`) with
the stages reached through their ``DeploymentHandle``s (the category router runs
here), turns its answer into the :class:`~deployments.schemas.InspectionResult`,
caches it, appends it to the
result stream (spooling to disk while Redis is down) and answers.

HTTP (FastAPI, OpenAPI at ``/docs``): ``POST /v1/inspect``,
``POST /v1/inspect/batch``, ``GET /v1/categories``,
``POST /v1/categories/{category}/defect-types``, ``GET /healthz``,
``GET /readyz``, ``GET /ui``. In-cluster services call :meth:`Router.inspect`
by handle (:mod:`deployments.client`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures
# of the Serve ingress class at run time.
import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import INGRESS, ServiceSpec
from deployments.imaging import (
    DecodedImage,
    ImageLimits,
    ImageRejected,
    decode_base64,
    decode_image,
)
from deployments.metrics import InspectionMetrics
from deployments.protos import inspection_pb2
from deployments.schemas import (
    SCHEMA_VERSION,
    BatchItem,
    CategoriesResult,
    CategoryInfo,
    DefectTypeIn,
    DefectTypeOut,
    InspectBatchRequest,
    InspectBatchResult,
    InspectionError,
    InspectionResult,
    InspectRequest,
    Problem,
    ReviewIn,
    ReviewItem,
    ReviewQueue,
)
from deployments.stages import resolve_device
from deployments.store import ApiKey, AuthError, RedisStore, StoreUnavailable
from models.artifacts import ArtifactError, ArtifactRegistry
from models.descriptions import DefectDescription, DescriptionError
from models.drift import DriftLimits, DriftMonitor
from models.inspection import (
    Banked,
    Classified,
    Detected,
    InspectionPlan,
    InspectionRefused,
    InspectionRequest,
    LocalStageCalls,
    Located,
    Reranked,
    Routed,
    StageCalls,
    Verified,
    compute,
    inspect,
    load_plan,
)
from models.inspection.plan import split_model_id
from models.stages import (
    CLASSIFIER,
    DETECTOR,
    LOCALIZER,
    MEMORY_BANK,
    RERANKER,
    ROUTER,
    VERIFIER,
    LoadedStage,
    load_stage,
)

log = logging.getLogger("ray.serve")
API_KEY_HEADER = "X-API-Key"
# Sent by the review view when it shows a queued part: that look is not queued again.
REVIEWING_HEADER = "X-Inspectray-Reviewing"
# The gRPC status of each HTTP status the router answers with.
GRPC_STATUS = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
TRUE = ("1", "true", "yes", "on")
_ERRORS = {
    401: {"model": Problem, "description": "No API key, or an unknown one."},
    403: {"model": Problem, "description": "A revoked key, or a category the key may not use."},
    413: {"model": Problem, "description": "Too many bytes or pixels."},
    415: {"model": Problem, "description": "Not a PNG, JPEG, BMP or TIFF image."},
    422: {"model": Problem, "description": "A corrupt image, bad fields, or an unknown category."},
    429: {"model": Problem, "description": "The key's rate limit; see Retry-After."},
    503: {"model": Problem, "description": "Overloaded or a stage unavailable; see Retry-After."},
    504: {"model": Problem, "description": "Not answered within request_timeout_s."},
}
_NOT_FOUND = {"model": Problem, "description": "No such review item."}
_REVIEW_ERRORS = {
    **{status: _ERRORS[status] for status in (401, 403, 422, 429)},
    409: {"model": Problem, "description": "The service runs without Redis: no review queue."},
    503: {"model": Problem, "description": "Redis is down: the review queue is unavailable."},
}
_INSPECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "category": {"type": "string"},
                        "explain": {"type": "boolean", "default": False},
                        "boxes": {"type": "boolean", "default": False},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/InspectRequest"}},
        },
    }
}

_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InspectBatchRequest"}}
        },
    }
}

api = FastAPI(
    title="inspectray",
    version=SCHEMA_VERSION,
    description="Industrial visual inspection: is the part good, and if not, which defect, "
    "where and why. Send an image (multipart or base64 JSON); the answer is an "
    "InspectionResult. Send `X-API-Key` when keys are configured.",
)
_fastapi_openapi = api.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's spec plus the request bodies the routes read themselves.

    ``/v1/inspect`` and ``/v1/inspect/batch`` parse their bodies by hand (multipart
    or JSON), so FastAPI does not list ``InspectRequest`` and
    ``InspectBatchRequest``; the spec's ``$ref``s to them need them in components.
    """
    if api.openapi_schema is not None:
        return api.openapi_schema
    spec = _fastapi_openapi()
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (InspectRequest, InspectBatchRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    api.openapi_schema = spec
    return spec


api.openapi = _openapi  # type: ignore[method-assign]


class _Problem(Exception):
    """An HTTP error answer with optional headers (Retry-After)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else {}


class HandleStageCalls(StageCalls):
    """The flow's stage calls through the stage deployments' handles.

    The category router runs in the router's own replica (``category_router``).
    """

    def __init__(
        self,
        handles: Mapping[str, DeploymentHandle],
        category_router: Callable[[str], Awaitable[LoadedStage]],
    ) -> None:
        self.handles = handles
        self.category_router = category_router

    def _handle(self, stage: str, model_id: str) -> Any:
        return self.handles[stage].options(multiplexed_model_id=model_id).predict

    async def route(self, model_id: str, image: Image.Image, allowed: Collection[str]) -> Routed:
        """See :class:`~models.inspection.flow.StageCalls`."""
        stage = await self.category_router(model_id)
        return (await asyncio.to_thread(compute.route, stage, [image], allowed))[0]

    async def detect(self, model_id: str, image: Image.Image, explain: bool) -> Detected:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(DETECTOR, model_id).remote(image, explain)

    async def score_patches(self, model_id: str, image: Image.Image, with_map: bool) -> Banked:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(MEMORY_BANK, model_id).remote(image, with_map)

    async def verify(self, model_id: str, image: Image.Image) -> Verified:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(VERIFIER, model_id).remote(image)

    async def classify(self, model_id: str, image: Image.Image) -> Classified:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(CLASSIFIER, model_id).remote(image)

    async def localize(self, model_id: str, image: Image.Image) -> Located:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(LOCALIZER, model_id).remote(image)

    async def rerank(
        self,
        model_id: str,
        image: Image.Image,
        classifier_scores: Mapping[str, float] | None,
        registered: Sequence[Mapping[str, Any]],
    ) -> Reranked:
        """See :class:`~models.inspection.flow.StageCalls`."""
        return await self._handle(RERANKER, model_id).remote(
            image, classifier_scores, list(registered)
        )


class RouterCore:
    """The Router's logic; :class:`Router` adds the HTTP routes and Serve wiring."""

    def __init__(
        self,
        stages: Mapping[str, DeploymentHandle],
        registry_uri: str,
        redis_url: str | None = None,
        device: str = "cpu",
        runtimes: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = ArtifactRegistry(registry_uri)
        self.device = resolve_device(device)
        self.runtimes = dict(runtimes or {})  # stage → torch or onnxruntime
        self.service = ServiceSpec()
        self.plan: InspectionPlan = load_plan(self.registry)
        self.handles = dict(stages)  # stage → its deployment's handle (split)
        self.calls: StageCalls = HandleStageCalls(self.handles, self.category_router)
        self.local: LocalStageCalls | None = None
        self._failed: dict[str, str] = {}
        if not self.handles:
            # Fused: every stage in this replica. One thread computes the batches,
            # so the event loop stays free to take in requests meanwhile; every
            # production model is loaded now, and the replica is unhealthy while
            # one could not be.
            self.local = LocalStageCalls(
                self.registry,
                self.device,
                max_batch_size=self.service.max_batch_size,
                executor=ThreadPoolExecutor(1, thread_name_prefix="stages"),
                runtimes=self.runtimes,
            )
            self.calls = self.local
            for stage, model_id in self.plan.model_ids():
                try:
                    self.local.model(stage, model_id)
                except Exception as error:  # any failure makes the replica unhealthy
                    self._failed[f"{stage}:{model_id}"] = f"{type(error).__name__}: {error}"
                    log.error("could not load %s %s: %s", stage, model_id, error)
        self.redis_url = redis_url or None
        self.store: RedisStore | None = None
        self._memory_descriptions: dict[str, dict[str, dict[str, Any]]] = {}
        self._routers: dict[str, LoadedStage] = {}
        self._in_flight = 0
        self._maintenance: asyncio.Task | None = None
        self._configured = False  # the store opens with the first user_config
        self.metrics: InspectionMetrics | None = None  # created in the running replica
        self._queueing: set[asyncio.Task] = set()  # reviews being queued after their answer
        self.drift = self.fresh_drift_windows()

    # -- configuration -------------------------------------------------------------

    def fresh_drift_windows(self) -> DriftMonitor:
        """Fresh windows against the serving rules' references, under the configured limits."""
        references = {n: m.drift_reference for n, m in self.plan.categories.items()}
        return DriftMonitor(references, DriftLimits(**self.service.drift.model_dump()))

    def _open_store(self) -> None:
        self._configured = True
        if self.store is not None:
            self.store.close()
        self.store = None
        if self.redis_url:
            spool = Path(self.service.spool_dir).expanduser()
            self.store = RedisStore(
                self.redis_url,
                spool.resolve(),
                stream_maxlen=self.service.stream_maxlen,
                cache_ttl_s=self.service.cache_ttl_s,
            )
            self._publish_taxonomy()

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply the router's ``user_config``: timeouts, limits, pins, rules, auth."""
        previous = self.service
        self.service = ServiceSpec.model_validate(dict(config))
        torch.set_num_threads(self.service.torch_threads)
        if self.local is not None:
            self.local.batcher.max_batch_size = self.service.max_batch_size
            self.local.fault_delay_s = self.service.fault_delay_s
        if (previous.versions, previous.rules) != (self.service.versions, self.service.rules):
            self.plan = load_plan(self.registry, self.service.versions, self.service.rules)
            self.drift = self.fresh_drift_windows()
        elif previous.drift != self.service.drift:
            self.drift = self.fresh_drift_windows()
        settings = (self.service.spool_dir, self.service.stream_maxlen, self.service.cache_ttl_s)
        if not self._configured or settings != (
            previous.spool_dir,
            previous.stream_maxlen,
            previous.cache_ttl_s,
        ):
            self._open_store()

    def _publish_taxonomy(self) -> None:
        if self.store is None:
            return
        for name, models in self.plan.categories.items():
            with contextlib.suppress(StoreUnavailable):
                self.store.set_taxonomy(name, list(models.descriptions.values()))

    def refresh(self) -> bool:
        """Re-read the registry; returns whether the serving models changed."""
        plan = load_plan(self.registry, self.service.versions, self.service.rules)
        changed = plan.fingerprint != self.plan.fingerprint
        if changed:
            log.info("serving plan changed: %s", plan.versions(None))
            self.plan = plan
            self.drift = self.fresh_drift_windows()  # new models: new windows
            self._publish_taxonomy()
        return changed

    async def _maintain(self) -> None:
        """Every refresh_s: pick up promoted models; move spooled results to the stream."""
        while True:
            await asyncio.sleep(min(self.service.refresh_s, 2.0))
            try:
                store = self.store
                spooled = store.spooled() if store is not None else 0
                if spooled and await asyncio.to_thread(store.ping):
                    moved = await asyncio.to_thread(store.replay_spool)
                    log.info("replayed %d spooled results into the stream", moved)
                    spooled = store.spooled()
                if self.metrics is not None:
                    queued = None
                    if store is not None:
                        with contextlib.suppress(StoreUnavailable):
                            queued = await asyncio.to_thread(store.review_queue_length)
                    drift = self.drift.report(self.plan.categories)
                    self.metrics.service_state(self._in_flight, spooled, queued, drift)
                now = time.monotonic()
                if now - getattr(self, "_refreshed", 0.0) >= self.service.refresh_s:
                    self._refreshed = now
                    await asyncio.to_thread(self.refresh)
            except Exception:  # the loop must outlive any one failure
                log.exception("router maintenance failed")

    def _ensure_maintenance(self) -> None:
        if not self._configured:  # deployed without a user_config: the defaults
            self._open_store()
        if self._maintenance is None or self._maintenance.done():
            self.metrics = self.metrics or InspectionMetrics.in_ray()
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def category_router(self, model_id: str) -> LoadedStage:
        """The category router model (loaded in this replica on first use)."""
        if model_id not in self._routers:
            category, version = split_model_id(model_id)
            self._routers[model_id] = await asyncio.to_thread(
                load_stage,
                self.registry,
                category,
                ROUTER,
                version,
                self.device,
                self.runtimes.get(ROUTER, "torch"),
            )
        return self._routers[model_id]

    # -- access ----------------------------------------------------------------------

    def _auth_required(self) -> bool:
        if self.service.auth == "off" or self.store is None:
            return self.service.auth == "required"
        if self.service.auth == "required":
            return True
        return self.store.auth_configured()

    async def authorize(self, key: str | None, category: str | None) -> ApiKey | None:
        """Check the API key (when keys are configured) and its rate limit.

        Returns:
            What the key grants (its tenant), or None when no key is needed.

        Raises:
            _Problem: 401/403 for the key, 429 over its rate, 503 when keys
                cannot be checked.
        """
        try:
            return await self._authorize(key, category)
        except _Problem as problem:
            self._count_refusal(problem)
            raise

    def _count_refusal(self, problem: _Problem) -> None:
        if self.metrics is not None:
            self.metrics.refused(problem.status)

    async def _authorize(self, key: str | None, category: str | None) -> ApiKey | None:
        if not await asyncio.to_thread(self._auth_required):
            return None
        if self.store is None:
            raise _Problem(503, "API keys are required but no Redis is configured to hold them")
        try:
            found = await asyncio.to_thread(self.store.authenticate, key, category)
        except AuthError as error:
            raise _Problem(error.status, error.detail) from error
        except StoreUnavailable as error:
            raise _Problem(503, f"cannot check the API key: {error}", 5.0) from error
        allowed, retry_after = await asyncio.to_thread(self.store.allow, key, found.rate_per_minute)
        if not allowed:
            raise _Problem(
                429, f"rate limit of {found.rate_per_minute} requests a minute reached", retry_after
            )

    # -- inspection --------------------------------------------------------------------

    def decode(self, data: bytes, content_type: str | None = None) -> DecodedImage:
        """Decode and validate an image under the configured limits (raises _Problem)."""
        limits = ImageLimits(max_bytes=self.service.max_bytes, max_pixels=self.service.max_pixels)
        try:
            return decode_image(data, content_type, limits)
        except ImageRejected as error:
            raise _Problem(error.status, error.detail) from error

    async def _registered(self, category: str) -> list[dict[str, Any]]:
        if self.store is not None:
            return await asyncio.to_thread(self.store.descriptions, category)
        return sorted(self._memory_descriptions.get(category, {}).values(), key=lambda d: d["name"])

    async def inspect_decoded(
        self,
        decoded: DecodedImage,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
        decode_ms: float = 0.0,
        review: bool = True,
    ) -> InspectionResult:
        """Inspect a validated image: cache, flow, result, cache, stream.

        ``decode_ms``: the time its decoding took, counted in the answer's latency.
        Each answer is counted in the metrics and, unless it came from the cache,
        in its category's drift window and, when ``review`` and it calls for a
        person's look, queued for review (a reviewer's own look is not queued).

        Raises:
            _Problem: 422 refused; 503 overloaded, a replica lost or a model refused;
                504 too slow.
        """
        self._ensure_maintenance()
        try:
            result = await self._inspect_decoded(decoded, category, explain, boxes, decode_ms)
        except _Problem as problem:
            self._count_refusal(problem)
            raise
        if not result.cache_hit:
            self.drift.observe(result.category, result.anomaly_score)
            reason = self._review_reason(result) if review else None
            if reason is not None and self.store is not None:
                # Encoding the image and writing it wait for no one: the answer goes now.
                task = asyncio.get_running_loop().create_task(
                    self._queue_for_review(result, decoded, reason)
                )
                self._queueing.add(task)
                task.add_done_callback(self._queueing.discard)
        if self.metrics is not None:
            self.metrics.answered(result)
        return result

    def _review_reason(self, result: InspectionResult) -> str | None:
        """Why a person should look at this answer, or None."""
        review = self.service.review
        if result.decided_by == VERIFIER:
            return "ambiguous"
        if (
            result.verdict == "defective"
            and result.defect_types
            and result.defect_types[0].score < review.min_type_confidence
        ):
            return "unsure-type"
        if review.sample_share and random.random() < review.sample_share:
            return "sampled"
        return None

    async def _queue_for_review(
        self, result: InspectionResult, decoded: DecodedImage, reason: str
    ) -> None:
        """Queue the answer and its image; a Redis failure costs the review, not the answer."""
        item = {
            "id": result.request_id,
            "reason": reason,
            "queued_at": time.time(),
            "category": result.category,
            "verdict": result.verdict,
            "anomaly_score": result.anomaly_score,
            "decided_by": result.decided_by,
            "defect_types": [{"name": t.name, "score": t.score} for t in result.defect_types[:3]],
            "model_versions": dict(result.model_versions),
            "image_sha256": result.image_sha256,
        }
        store, limit = self.store, self.service.review.max_pending

        def queue() -> None:
            store.enqueue_review(item, decoded.png(), limit)

        try:
            await asyncio.to_thread(queue)
        except StoreUnavailable as error:
            log.warning("answer %s not queued for review: %s", result.request_id, error)

    async def _inspect_decoded(
        self,
        decoded: DecodedImage,
        category: str | None,
        explain: bool,
        boxes: bool,
        decode_ms: float,
    ) -> InspectionResult:
        if self._in_flight >= self.service.max_in_flight:
            raise _Problem(
                503,
                f"overloaded: {self._in_flight} inspections in flight "
                f"(max_in_flight {self.service.max_in_flight})",
                self.service.retry_after_s,
            )
        self._in_flight += 1
        started = time.perf_counter() - decode_ms / 1000.0
        timings = {"decode": decode_ms}
        try:
            result, cache = await asyncio.wait_for(
                self._answer(decoded, category, explain, boxes, started, timings),
                timeout=self.service.request_timeout_s,
            )
        except TimeoutError as error:
            raise _Problem(
                504,
                f"no answer within request_timeout_s={self.service.request_timeout_s:g} s",
                self.service.retry_after_s,
            ) from error
        except BackPressureError as error:
            raise _Problem(
                503, f"a stage is overloaded: {error}", self.service.retry_after_s
            ) from error
        except ArtifactError as error:
            # A promoted artifact that fails its checks (tampered weights, a pickle
            # in place of safetensors) is never loaded; the category waits for a
            # good version to be promoted. The caller is not told the registry's paths.
            log.error("refused a model: %s", getattr(error, "cause", None) or error)
            raise _Problem(
                503,
                "a promoted model failed its integrity check and was refused; "
                "promote a good version (the router's log names the artifact)",
                self.service.retry_after_s,
            ) from error
        except (RayActorError, DeploymentUnavailableError) as error:
            # A replica died mid-request (killed, OOM, its node lost): Serve starts
            # another; the inspection is idempotent, so the caller retries.
            raise _Problem(
                503,
                f"a stage replica was lost mid-request ({type(error).__name__}); retry",
                self.service.retry_after_s,
            ) from error
        except InspectionRefused as error:
            raise _Problem(422, str(error)) from error
        finally:
            self._in_flight -= 1
        if self.store is not None:
            # One round trip: the stream's exactly-once append and, for a new answer,
            # the cache entry (a cache hit comes with no key).
            mark = time.perf_counter()
            key, tag = cache if cache is not None else (None, "")
            await asyncio.to_thread(self.store.publish, result.model_dump(mode="json"), key, tag)
            result.timings_ms["publish"] = (time.perf_counter() - mark) * 1000.0
        return result

    async def _answer(
        self,
        decoded: DecodedImage,
        category: str | None,
        explain: bool,
        boxes: bool,
        started: float,
        timings: dict[str, float],
    ) -> tuple[InspectionResult, tuple[str, str] | None]:
        """The answer, and the key and tag to cache it under (None: not cached)."""
        plan = self.plan
        mark = time.perf_counter()
        if category is not None and category not in plan.categories:
            raise InspectionRefused(
                f"unknown category {category!r}; known: {sorted(plan.categories)}"
            )
        cache: tuple[str, str] | None = None
        registered = self._registered  # read by the flow, for defective parts only
        if self.store is not None and self.service.cache_ttl_s > 0:  # 0: no cache
            # Registered types change answers: an answer is cached under a tag of
            # those it could rank, and one cached under other types is a miss. One
            # round trip reads them and the cache; the flow reuses what was read.
            key = self.store.cache_key(
                decoded.sha256,
                category,
                {"explain": explain, "boxes": boxes},
                {"plan": plan.fingerprint},
            )
            names = [category] if category is not None else sorted(plan.categories)
            ranked = [n for n in names if n in plan.categories and plan.categories[n].has(RERANKER)]
            now, tag, cached = await asyncio.to_thread(self.store.lookup, key, ranked, _types_tag)
            cache = (key, tag)

            async def registered(name: str) -> list[dict[str, Any]]:
                return now[name] if name in now else await self._registered(name)

            timings["cache_lookup"] = (time.perf_counter() - mark) * 1000.0
            if cached is not None:
                hit = InspectionResult.model_validate(
                    cached
                    | {
                        "request_id": uuid.uuid4().hex,
                        "cache_hit": True,
                        "latency_ms": (time.perf_counter() - started) * 1000.0,
                        "timings_ms": timings,
                    }
                )
                return hit, None
        mark = time.perf_counter()
        request = InspectionRequest(decoded.image, category, explain, boxes)
        inspection = await inspect(request, plan, self.calls, registered)
        timings["inspect"] = (time.perf_counter() - mark) * 1000.0
        result = InspectionResult.from_inspection(
            inspection,
            request_id=uuid.uuid4().hex,
            image_sha256=decoded.sha256,
            image_size=decoded.image.size,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            timings_ms=timings,
        )
        return result, cache  # cached when it is published

    async def inspect_bytes(
        self,
        data: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
        content_type: str | None = None,
        review: bool = True,
    ) -> InspectionResult:
        """Decode then inspect (raises _Problem)."""
        started = time.perf_counter()
        try:
            decoded = await asyncio.to_thread(self.decode, data, content_type)
        except _Problem as problem:
            self._count_refusal(problem)
            raise
        decode_ms = (time.perf_counter() - started) * 1000.0
        return await self.inspect_decoded(decoded, category, explain, boxes, decode_ms, review)

    # -- catalog -----------------------------------------------------------------------

    async def categories(self) -> CategoriesResult:
        """Every category with its models, rule and defect catalog."""
        infos = []
        for name, models in sorted(self.plan.categories.items()):
            types = [
                DefectTypeOut(**_description_fields(d), source="trained")
                for d in models.descriptions.values()
            ]
            trained = {t.name for t in types}
            for d in await self._registered(name):
                if d["name"] not in trained:
                    types.append(DefectTypeOut(**_description_fields(d), source="registered"))
            infos.append(
                CategoryInfo(
                    category=name,
                    model_versions=self.plan.versions(name),
                    decision_rule=models.rule.to_dict(),
                    defect_types=types,
                )
            )
        return CategoriesResult(
            categories=infos,
            router=self.plan.router_id is not None,
            localizer=self.plan.localizer_id is not None,
        )

    async def register_defect_type(self, category: str, body: DefectTypeIn) -> DefectTypeOut:
        """Add a described defect type; the reranker ranks it from the next request.

        Raises:
            _Problem: 404 unknown category, 409 no reranker, 422 a bad
                description, 503 Redis down.
        """
        if category not in self.plan.categories:
            raise _Problem(404, f"unknown category {category!r}")
        try:  # a bad description is refused whatever the category has
            description = DefectDescription.from_dict(body.model_dump())
        except (DescriptionError, TypeError, ValueError) as error:
            raise _Problem(422, f"invalid defect type: {error}") from error
        if not self.plan.categories[category].has(RERANKER):
            raise _Problem(
                409, f"category {category!r} has no reranker: train one to rank described types"
            )
        record = description.to_dict()
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.register_description, category, record)
            except StoreUnavailable as error:
                raise _Problem(
                    503, f"the defect catalog is unavailable: {error}", self.service.retry_after_s
                ) from error
        else:
            self._memory_descriptions.setdefault(category, {})[description.name] = record
        return DefectTypeOut(**_description_fields(record), source="registered")

    # -- health ------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Liveness: the router answers; Redis and spool state, inspections in flight."""
        redis_state = "not configured"
        spooled = 0
        if self.store is not None:
            redis_state = "up" if await asyncio.to_thread(self.store.ping) else "down"
            spooled = await asyncio.to_thread(self.store.spooled)
        return {
            "status": "ok",
            "redis": redis_state,
            "spooled_results": spooled,
            "in_flight": self._in_flight,
            "max_in_flight": self.service.max_in_flight,
            "replica_pid": os.getpid(),
            "models": self.plan.versions(None),
            "drift": self.drift.report(sorted(self.plan.categories)),
        }

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every stage answers with its models loaded (fused: in this replica)."""
        stages: dict[str, Any] = {}
        ready = True
        if self.local is not None:
            stages[INGRESS] = {
                "stage": "every stage, in this replica",
                "device": self.device,
                "models": self.local.loaded(),
                "failed": dict(self._failed),
            }
            ready = not self._failed
        for name, handle in self.handles.items():
            try:
                answer = await asyncio.wait_for(handle.loaded.remote(), timeout=10)
                stages[name] = answer
                ready &= not answer["failed"]
            except Exception as error:  # a stage that does not answer is not ready
                stages[name] = {"error": f"{type(error).__name__}: {error}"}
                ready = False
        return ready, {"ready": ready, "categories": sorted(self.plan.categories), "stages": stages}

    def close(self) -> None:
        """Graceful shutdown: move what was spooled into the stream if Redis is up."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.store is not None:
            with contextlib.suppress(Exception):
                if self.store.spooled() and self.store.ping():
                    self.store.replay_spool()
            self.store.close()


def _types_tag(registered: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The cache tag of the registered types an answer could rank, by category."""
    catalog = [dict(d) | {"category": name} for name, items in registered.items() for d in items]
    return compute.catalog_key(catalog)


def _description_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": record["name"],
        "description": record["description"],
        "keywords": list(record.get("keywords", [])),
        "contrast": record.get("contrast", ""),
    }


def _problem_response(problem: _Problem, started: float | None = None) -> JSONResponse:
    """The Problem body, and with ``started`` (perf_counter) a ``Server-Timing`` header.

    The header gives the time this replica spent before refusing, which a caller's
    own clock cannot tell apart from its network and its own load.
    """
    headers = problem.headers()
    if started is not None:
        headers["Server-Timing"] = f"router;dur={(time.perf_counter() - started) * 1000.0:.1f}"
    return JSONResponse({"detail": problem.detail}, problem.status, headers=headers)


def _validation_message(error: ValidationError | RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "invalid request: " + "; ".join(parts)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI raises itself, in the API's Problem shape; an unparseable body is 422."""
    status = 422 if error.status_code == 400 else error.status_code
    return JSONResponse({"detail": str(error.detail)}, status, headers=error.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own body and parameter checks answer in the API's Problem shape."""
    return JSONResponse({"detail": _validation_message(error)}, 422)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return False
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _Problem(422, f"expected true or false, got {value!r}")


@serve.deployment
@serve.ingress(api)
class Router(RouterCore):
    """The ingress deployment: HTTP routes and the by-handle ``inspect`` method."""

    async def inspect(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """Inspect an image file for a caller in the same Ray cluster.

        Returns:
            The :class:`InspectionResult` as a JSON-ready dict, or ``{"error":
            {"status", "detail", "retry_after"}}`` for what HTTP answers with 4xx/5xx.
        """
        try:
            await self.authorize(api_key, category)
            result = await self.inspect_bytes(image, category, explain, boxes)
        except _Problem as problem:
            return {
                "error": {
                    "status": problem.status,
                    "detail": problem.detail,
                    "retry_after": problem.retry_after,
                }
            }
        return result.model_dump(mode="json")

    async def Inspect(
        self, request: inspection_pb2.InspectRequest, grpc_context: RayServegRPCContext
    ) -> inspection_pb2.InspectReply:
        """The gRPC ``Inspect`` (``deployments/protos/inspection.proto``), beside HTTP.

        A refused request ends with the gRPC status of its HTTP one and, in the
        trailing metadata, ``x-inspectray-status`` and ``retry-after``.
        """
        metadata = dict(grpc_context.invocation_metadata())
        category = request.category or None
        try:
            await self.authorize(metadata.get(API_KEY_HEADER.lower()), category)
            result = await self.inspect_bytes(
                request.image, category, request.explain, request.boxes
            )
        except _Problem as problem:
            grpc_context.set_code(GRPC_STATUS.get(problem.status, grpc.StatusCode.UNKNOWN))
            grpc_context.set_details(problem.detail)
            trailing = {"x-inspectray-status": str(problem.status)}
            trailing |= {k.lower(): v for k, v in problem.headers().items()}  # retry-after
            grpc_context.set_trailing_metadata(list(trailing.items()))
            return inspection_pb2.InspectReply()
        return inspection_pb2.InspectReply(
            request_id=result.request_id,
            category=result.category,
            verdict=result.verdict,
            anomaly_score=result.anomaly_score,
            decided_by=result.decided_by,
            defect_type=result.defect_types[0].name if result.defect_types else "",
            latency_ms=result.latency_ms,
            result_json=result.model_dump_json(),
            grade=result.grade or "",
        )

    async def check_health(self) -> None:
        """Keep the maintenance loop running; fail while a fused replica lacks a model."""
        self._ensure_maintenance()
        if self._failed:
            raise RuntimeError(f"models not loaded: {self._failed}")

    def __del__(self) -> None:
        self.close()

    @api.post(
        "/v1/inspect",
        response_model=InspectionResult,
        responses=_ERRORS,
        openapi_extra=_INSPECT_BODY,
        summary="Inspect one image",
    )
    async def http_inspect(self, request: Request) -> Any:
        """Multipart (`image` file + fields) or JSON (`InspectRequest`, image in base64)."""
        started = time.perf_counter()
        try:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                form = await request.form()  # unreadable: 422 from _http_error
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise _Problem(422, "the form has no file field named 'image'")
                data = await upload.read()
                category = form.get("category") or None
                explain, boxes = _flag(form.get("explain")), _flag(form.get("boxes"))
                image_type = upload.content_type
            elif content_type.startswith("application/json"):
                try:
                    body = InspectRequest.model_validate_json(await request.body())
                except ValidationError as error:
                    raise _Problem(422, _validation_message(error)) from error
                data = decode_base64(body.image_base64)
                category, explain, boxes = body.category, body.explain, body.boxes
                image_type = None
            else:
                sent = content_type or "no content type"
                raise _Problem(415, f"send multipart/form-data or application/json, not {sent}")
            await self.authorize(request.headers.get(API_KEY_HEADER), category)
            review = not _flag(request.headers.get(REVIEWING_HEADER))
            return await self.inspect_bytes(data, category, explain, boxes, image_type, review)
        except ImageRejected as error:
            return _problem_response(_Problem(error.status, error.detail), started)
        except _Problem as problem:
            return _problem_response(problem, started)

    @api.post(
        "/v1/inspect/batch",
        response_model=InspectBatchResult,
        responses=_ERRORS,
        openapi_extra=_BATCH_BODY,
        summary="Inspect several images; each gets a result or an error",
    )
    async def http_inspect_batch(self, request: Request) -> Any:
        """JSON `InspectBatchRequest`; answers `InspectBatchResult` in request order."""
        try:
            try:
                body = InspectBatchRequest.model_validate_json(await request.body())
            except ValidationError as error:
                raise _Problem(422, _validation_message(error)) from error
            key = request.headers.get(API_KEY_HEADER)
            for category in {item.category for item in body.items}:
                await self.authorize(key, category)
        except _Problem as problem:
            return _problem_response(problem)

        async def one(index: int, item: InspectRequest) -> BatchItem:
            try:
                data = decode_base64(item.image_base64)
                result = await self.inspect_bytes(data, item.category, item.explain, item.boxes)
                return BatchItem(index=index, result=result)
            except ImageRejected as error:
                return BatchItem(
                    index=index, error=InspectionError(status=error.status, detail=error.detail)
                )
            except _Problem as problem:
                return BatchItem(
                    index=index, error=InspectionError(status=problem.status, detail=problem.detail)
                )

        items = await asyncio.gather(*(one(i, item) for i, item in enumerate(body.items)))
        return InspectBatchResult(items=list(items))

    @api.get("/v1/categories", response_model=CategoriesResult, summary="Categories and models")
    async def http_categories(self, request: Request) -> Any:
        """Every category, its model versions, decision rule and defect catalog."""
        try:
            await self.authorize(request.headers.get(API_KEY_HEADER), None)
        except _Problem as problem:
            return _problem_response(problem)
        return await self.categories()

    @api.post(
        "/v1/categories/{category}/defect-types",
        response_model=DefectTypeOut,
        status_code=201,
        responses={404: {"model": Problem}, 409: {"model": Problem}, **_ERRORS},
        summary="Register a defect type described in words",
    )
    async def http_register(self, category: str, body: DefectTypeIn, request: Request) -> Any:
        """The reranker ranks the new type from the next request on, before any image of it."""
        try:
            await self.authorize(request.headers.get(API_KEY_HEADER), category)
            return await self.register_defect_type(category, body)
        except _Problem as problem:
            return _problem_response(problem)

    @api.get("/healthz", summary="Liveness")
    async def http_health(self) -> dict[str, Any]:
        """The router answers; Redis up or down, results waiting in the spool."""
        return await self.health()

    @api.get("/readyz", summary="Readiness")
    async def http_ready(self) -> JSONResponse:
        """200 when every stage answers with its models loaded, else 503."""
        ready, body = await self.readiness()
        return JSONResponse(body, 200 if ready else 503)

    @api.get(
        "/v1/reviews",
        response_model=ReviewQueue,
        responses=_REVIEW_ERRORS,
        summary="Answers waiting for a person's review",
    )
    async def http_reviews(
        self, request: Request, category: str | None = None, limit: int = 50, newest: bool = False
    ) -> Any:
        """The review queue, oldest (or ``newest``) first."""
        try:
            await self.authorize(request.headers.get(API_KEY_HEADER), category)
            store = self._review_store()
            pending = await asyncio.to_thread(store.review_queue_length)
            items = await asyncio.to_thread(
                store.pending_reviews, max(1, min(limit, 500)), category, newest
            )
        except _Problem as problem:
            return _problem_response(problem)
        except StoreUnavailable as error:
            return _problem_response(_Problem(503, f"the review queue is unavailable: {error}"))
        return {"pending": pending, "items": items}

    @api.get(
        "/v1/reviews/{review_id}/image",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            404: _NOT_FOUND,
            **_REVIEW_ERRORS,
        },
        summary="The image of a review item",
    )
    async def http_review_image(self, review_id: str, request: Request) -> Any:
        """The part's image as it was inspected (PNG)."""
        try:
            await self.authorize(request.headers.get(API_KEY_HEADER), None)
            image = await asyncio.to_thread(self._review_store().review_image, review_id)
        except _Problem as problem:
            return _problem_response(problem)
        except StoreUnavailable as error:
            return _problem_response(_Problem(503, f"the review queue is unavailable: {error}"))
        if image is None:
            return _problem_response(_Problem(404, f"no review item {review_id!r}"))
        return Response(image, media_type="image/png")

    @api.post(
        "/v1/reviews/{review_id}",
        response_model=ReviewItem,
        responses={404: _NOT_FOUND, **_REVIEW_ERRORS},
        summary="Confirm or correct an answer",
    )
    async def http_review(self, review_id: str, body: ReviewIn, request: Request) -> Any:
        """Record a person's verdict and defect type; the reviewer is the API key's tenant."""
        try:
            grant = await self.authorize(request.headers.get(API_KEY_HEADER), None)
            if body.verdict == "defective" and not body.defect_type:
                raise _Problem(422, "a defective part needs its defect_type (a new name is fine)")
            review = {
                "verdict": body.verdict,
                "defect_type": body.defect_type if body.verdict == "defective" else None,
                "note": body.note,
                "reviewer": grant.tenant if grant is not None else "anonymous",
                "reviewed_at": time.time(),
            }
            item = await asyncio.to_thread(self._review_store().record_review, review_id, review)
        except _Problem as problem:
            return _problem_response(problem)
        except KeyError:
            return _problem_response(_Problem(404, f"no review item {review_id!r}"))
        except StoreUnavailable as error:
            return _problem_response(_Problem(503, f"the review queue is unavailable: {error}"))
        top = item["defect_types"][0]["name"] if item.get("defect_types") else None
        item["review"]["agrees"] = item["verdict"] == body.verdict and (
            body.verdict == "ok" or top == body.defect_type
        )
        return item

    def _review_store(self) -> RedisStore:
        if self.store is None:
            raise _Problem(409, "the review queue needs Redis: this service runs without one")
        return self.store

    @api.get("/ui", response_class=HTMLResponse, summary="The operator page")
    async def http_ui(self) -> HTMLResponse:
        """Drop an image; see the verdict, heatmap, boxes, defect types and trace."""
        page = resources.files("deployments").joinpath("ui/index.html").read_text()
        return HTMLResponse(page)


__all__ = ["Router", "RouterCore", "api"]
