"""Clients for other services: by DeploymentHandle inside the Ray cluster, over HTTP or gRPC.

Both return :class:`~deployments.schemas.InspectionResult` and raise
:class:`InspectionFailed` with the HTTP-style status for what the service
refused. An inspection is idempotent (same image, same answer), so both clients
retry what is worth retrying (503 overloaded or a replica lost, 504 and the
ingress's 408 timeouts, its 500 or a dropped connection when the router replica
died) with exponential backoff, honouring Retry-After.

In the cluster::

    client = HandleClient()                      # the "inspectray" app
    result = client.inspect(png_bytes, category="brushed_metal")
    result = await client.inspect_async(png_bytes)

Anywhere::

    client = HttpClient("http://inspectray:8000", api_key="...")
    result = client.inspect(Path("part.png").read_bytes(), explain=True)

    client = GrpcClient("inspectray:9000", api_key="...")   # a camera's open channel
    result = client.inspect(Path("part.png").read_bytes(), category="brushed_metal")
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from deployments.schemas import CategoriesResult, DefectTypeIn, DefectTypeOut, InspectionResult

APP_NAME = "inspectray"
# 408: the ingress timed the request out (Serve's request_timeout_s). 500: the service
# answers its own errors with 4xx, 503 or 504 (fuzzed: never 500), so a 500 is the
# ingress reporting that the router replica died under the request (a lost node).
RETRY_STATUSES = frozenset({408, 500, 502, 503, 504})
T = TypeVar("T")


class InspectionFailed(RuntimeError):
    """The service answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.retry_after = status, detail, retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to try, and how long to wait between tries.

    Attributes:
        attempts: tries in all (1: no retry).
        backoff_s: the first wait; doubled each time, with ±25 % jitter.
        max_backoff_s: the longest wait (a Retry-After is honoured up to this).
    """

    attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before try ``attempt + 1``."""
        if retry_after:
            return min(retry_after, self.max_backoff_s)
        jittered = self.backoff_s * 2**attempt * random.uniform(0.75, 1.25)
        return min(jittered, self.max_backoff_s)


def retryable(error: Exception) -> bool:
    """Whether a failure is transient: overload, slowness, a lost replica or connection."""
    if isinstance(error, InspectionFailed):
        return error.status in RETRY_STATUSES or error.status == 0
    # A lost replica or an unavailable deployment surfaces as a Ray error.
    name = type(error).__name__
    return name in {
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "DeploymentUnavailableError",
        "BackPressureError",
    }


class Retrying:
    """A client's retry loop, counting the tries it repeated by what failed them.

    ``because`` counts them by HTTP status (0: no connection) or, for a Ray
    error by handle, by the error's type name.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.because: Counter[int | str] = Counter()

    def _give_up(self, attempt: int, error: Exception) -> bool:
        if attempt + 1 == self.policy.attempts or not retryable(error):
            return True
        reason = error.status if isinstance(error, InspectionFailed) else type(error).__name__
        self.because[reason] += 1
        return False

    def sync(self, call: Callable[[], T]) -> T:
        """``call()``, tried again after transient failures."""
        for attempt in range(self.policy.attempts):
            try:
                return call()
            except Exception as error:
                if self._give_up(attempt, error):
                    raise
                time.sleep(self.policy.wait(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, tried again after transient failures."""
        for attempt in range(self.policy.attempts):
            try:
                return await call()
            except Exception as error:
                if self._give_up(attempt, error):
                    raise
                await asyncio.sleep(self.policy.wait(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")


def read_answer(answer: dict[str, Any]) -> InspectionResult:
    """A by-handle answer as an InspectionResult; its ``error`` as InspectionFailed."""
    if "error" in answer:
        error = answer["error"]
        raise InspectionFailed(error["status"], error["detail"], error.get("retry_after"))
    return InspectionResult.model_validate(answer)


class _RetryingClient:
    """What every client shares: its retry policy and the count of what it retried."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry = retry
        self._retrying = Retrying(retry)

    @property
    def retried(self) -> Counter[int | str]:
        """Tries this client repeated since it was made, by the status that failed them."""
        return self._retrying.because


class HandleClient(_RetryingClient):
    """Calls the Router by ``DeploymentHandle``, from a service in the same Ray cluster.

    Args:
        app_name: the Serve application's name.
        api_key: sent as when calling over HTTP, when keys are configured.
        retry: the retry policy.
    """

    def __init__(
        self,
        app_name: str = APP_NAME,
        api_key: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        super().__init__(retry)
        self.app_name = app_name
        self.api_key = api_key
        self._handle: Any = None

    @property
    def handle(self) -> Any:
        """The app's ingress handle (looked up once)."""
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    def _call(self, image: bytes, category: str | None, explain: bool, boxes: bool) -> Any:
        return self.handle.inspect.remote(image, category, explain, boxes, self.api_key)

    def inspect(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
        timeout_s: float = 60.0,
    ) -> InspectionResult:
        """Inspect an image file's bytes (blocking; not from inside an event loop)."""
        return self._retrying.sync(
            lambda: read_answer(
                self._call(image, category, explain, boxes).result(timeout_s=timeout_s)
            ),
        )

    async def inspect_async(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
    ) -> InspectionResult:
        """Inspect an image file's bytes (from async code, e.g. another deployment)."""

        async def once() -> InspectionResult:
            return read_answer(await self._call(image, category, explain, boxes))

        return await self._retrying.run(once)


class HttpClient(_RetryingClient):
    """Calls the HTTP API.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``X-API-Key``.
        timeout_s: per request.
        retry: the retry policy.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        super().__init__(retry)
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._async: httpx.AsyncClient | None = None
        self._headers, self._timeout = headers, timeout_s

    @staticmethod
    def _checked(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            retry_after = response.headers.get("Retry-After")
            raise InspectionFailed(
                response.status_code, str(detail), float(retry_after) if retry_after else None
            )
        return response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        def once() -> dict[str, Any]:
            try:
                return self._checked(self._client.request(method, path, **kwargs))
            except httpx.TransportError as error:
                raise InspectionFailed(0, f"{type(error).__name__}: {error}") from error

        return self._retrying.sync(once)

    @staticmethod
    def _form(category: str | None, explain: bool, boxes: bool) -> dict[str, str]:
        form = {"explain": str(explain).lower(), "boxes": str(boxes).lower()}
        if category:
            form["category"] = category
        return form

    def inspect(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
        filename: str = "image",
    ) -> InspectionResult:
        """Inspect an image file's bytes (multipart upload)."""
        answer = self._send(
            "POST",
            "/v1/inspect",
            files={"image": (filename, image, "application/octet-stream")},
            data=self._form(category, explain, boxes),
        )
        return read_answer(answer)

    async def inspect_async(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
    ) -> InspectionResult:
        """Inspect an image file's bytes from async code."""
        if self._async is None:
            self._async = httpx.AsyncClient(
                base_url=self.url, headers=self._headers, timeout=self._timeout
            )

        async def once() -> dict[str, Any]:
            try:
                response = await self._async.post(
                    "/v1/inspect",
                    files={"image": ("image", image, "application/octet-stream")},
                    data=self._form(category, explain, boxes),
                )
            except httpx.TransportError as error:
                raise InspectionFailed(0, f"{type(error).__name__}: {error}") from error
            return self._checked(response)

        return read_answer(await self._retrying.run(once))

    def inspect_batch(
        self, images: Sequence[bytes], category: str | None = None, explain: bool = False
    ) -> list[InspectionResult | InspectionFailed]:
        """Several images in one request; each gets a result or an InspectionFailed."""
        items = [
            {
                "image_base64": base64.b64encode(image).decode(),
                "category": category,
                "explain": explain,
            }
            for image in images
        ]
        answer = self._send("POST", "/v1/inspect/batch", json={"items": items})
        out: list[InspectionResult | InspectionFailed] = []
        for item in answer["items"]:
            if item.get("error"):
                out.append(InspectionFailed(item["error"]["status"], item["error"]["detail"]))
            else:
                out.append(read_answer(item["result"]))
        return out

    def categories(self) -> CategoriesResult:
        """Every category with its models and defect catalog."""
        return CategoriesResult.model_validate(self._send("GET", "/v1/categories"))

    def register_defect_type(self, category: str, defect_type: DefectTypeIn) -> DefectTypeOut:
        """Register a described defect type; ranked from the next request on."""
        answer = self._send(
            "POST", f"/v1/categories/{category}/defect-types", json=defect_type.model_dump()
        )
        return DefectTypeOut.model_validate(answer)

    def ready(self) -> bool:
        """Whether every stage answers with its models loaded."""
        try:
            return self._client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        """Close the connections."""
        self._client.close()


# A gRPC status the router never sets itself (a dropped channel, Serve's proxy):
# its HTTP-style status for InspectionFailed.
_GRPC_TRANSPORT = {"UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 0}


class GrpcClient(_RetryingClient):
    """Calls the gRPC API (``deployments/protos/inspection.proto``), for camera clients.

    One channel is kept open; the answer and the errors are those of
    :class:`HttpClient` (:class:`InspectionFailed` carries the HTTP status the
    same request would get, from the trailing metadata).

    Args:
        target: ``host:port`` of Serve's gRPC proxy, e.g. ``127.0.0.1:9000``.
        api_key: sent as metadata ``x-api-key``.
        timeout_s: per request.
        retry: the retry policy.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        import grpc

        from deployments.protos import inspection_pb2_grpc

        super().__init__(retry)
        self.target = target
        self._channel = grpc.insecure_channel(target)
        self._stub = inspection_pb2_grpc.InspectionStub(self._channel)
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._timeout = timeout_s

    def _once(self, request: Any) -> InspectionResult:
        import grpc

        try:
            reply = self._stub.Inspect(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            status = trailing.get("x-inspectray-status")
            code = error.code().name
            retry_after = trailing.get("retry-after")
            raise InspectionFailed(
                int(status) if status else _GRPC_TRANSPORT.get(code, 500),
                error.details() or code,
                float(retry_after) if retry_after else None,
            ) from error
        return InspectionResult.model_validate_json(reply.result_json)

    def inspect(
        self,
        image: bytes,
        category: str | None = None,
        explain: bool = False,
        boxes: bool = False,
    ) -> InspectionResult:
        """Inspect an image file's bytes."""
        from deployments.protos import inspection_pb2

        request = inspection_pb2.InspectRequest(
            image=image, category=category or "", explain=explain, boxes=boxes
        )
        return self._retrying.sync(lambda: self._once(request))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
