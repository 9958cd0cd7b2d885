"""Fault drills: steady traffic through the retrying client while something breaks.

A drill keeps a few callers inspecting unique images over HTTP with the
client a line's services use (:class:`deployments.client.HttpClient`, its
retry policy included), breaks something (a replica, the Serve controller, a
node, Redis, a stage's speed), and then counts what it cost:

- requests sent, and those that failed after the client's retries;
- tries the client repeated (what callers without retries would have seen fail);
- results lost or duplicated: every answered ``request_id`` must be in the
  result stream exactly once;
- the time to recover, and the longest stretch without an answer.

The drills run under pytest's ``faults`` marker
(``tests/integration/faults``); each adds a :class:`FaultRow` to the report
that pytest prints at the end (and writes as JSON to ``$INSPECTRAY_FAULT_REPORT``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from deployments.client import HttpClient, InspectionFailed, RetryPolicy
from deployments.store import RedisStore

# What a line's service would configure to ride out a replica restart or a
# Redis failover: up to about 20 s of tries, Retry-After honoured.
DRILL_RETRY = RetryPolicy(attempts=8, backoff_s=0.25, max_backoff_s=5.0)


@dataclass(frozen=True)
class Answer:
    """One inspection as a caller saw it.

    Attributes:
        sent: ``time.monotonic()`` when the caller sent it.
        done: when it was answered (after any retries).
        status: 200, or the status of the last failure (0: no connection).
        request_id: the result's id (answered ones).
        detail: what the failure said.
    """

    sent: float
    done: float
    status: int
    request_id: str | None = None
    detail: str = ""


class SteadyTraffic:
    """Callers inspecting unique images in a loop until stopped (a context manager).

    Args:
        url: the service's base URL.
        image: an image file's bytes; each request appends 8 random bytes, so no
            answer comes from the result cache and every answer is a new result.
        category: the category to send.
        callers: threads, each with its own client.
        retry: the clients' retry policy.
        pause_s: each caller's pause between requests.
        timeout_s: per try.
        api_key: sent as ``X-API-Key``.
    """

    def __init__(
        self,
        url: str,
        image: bytes,
        category: str | None,
        callers: int = 3,
        retry: RetryPolicy = DRILL_RETRY,
        pause_s: float = 0.05,
        timeout_s: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        self.url, self.image, self.category = url, image, category
        self.pause_s = pause_s
        self.clients = [
            HttpClient(url, api_key=api_key, timeout_s=timeout_s, retry=retry)
            for _ in range(callers)
        ]
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _call(self, client: HttpClient) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                result = client.inspect(self.image + os.urandom(8), self.category)
                answer = Answer(sent, time.monotonic(), 200, result.request_id)
            except InspectionFailed as error:
                answer = Answer(sent, time.monotonic(), error.status, detail=error.detail[:200])
            with self._lock:
                self.answers.append(answer)
            self._stop.wait(self.pause_s)

    def __enter__(self) -> SteadyTraffic:
        """Start the callers."""
        for client in self.clients:
            thread = threading.Thread(target=self._call, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the callers; each finishes the request it is in."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        for client in self.clients:
            client.close()

    def wait_for_answers(self, n: int, timeout_s: float = 60.0) -> None:
        """Block until ``n`` more requests were answered (any status).

        Raises:
            TimeoutError: fewer came within ``timeout_s``.
        """
        wanted = len(self.answers) + n
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} answers in {timeout_s:.0f} s")
            time.sleep(0.05)

    @property
    def retried(self) -> Counter[int | str]:
        """Tries the callers repeated, by the status that failed them."""
        return sum((client.retried for client in self.clients), Counter())

    def failed(self) -> list[Answer]:
        """The requests that failed even after the retries."""
        return [a for a in self.answers if a.status != 200]

    def answered_ids(self) -> list[str]:
        """The ``request_id`` of every answered request."""
        return [a.request_id for a in self.answers if a.status == 200 and a.request_id]

    def first_answer_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first request sent after it that was answered."""
        done = [a.done for a in self.answers if a.status == 200 and a.sent >= moment]
        return min(done) - moment if done else None

    def longest_silence(self, since: float | None = None) -> float:
        """The longest time between two answered requests (from ``since``): the outage."""
        times = sorted(a.done for a in self.answers if a.status == 200)
        if since is not None:
            times = [since, *(t for t in times if t >= since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@dataclass
class StreamCheck:
    """Whether every answered result reached the stream exactly once.

    Attributes:
        answered: results the callers got.
        in_stream: stream entries read since the check began.
        lost: answered results missing from the stream.
        duplicated: results in the stream more than once.
    """

    answered: int
    in_stream: int
    lost: int
    duplicated: int


def stream_reader(store: RedisStore, group: str) -> None:
    """Start reading the stream from now on, as a consumer group (idempotent)."""
    store.ensure_group(group, start="$")


def check_stream(
    store: RedisStore,
    group: str,
    answered: Iterable[str],
    timeout_s: float = 60.0,
) -> StreamCheck:
    """Read ``group``'s entries until every answered id arrived (or ``timeout_s``).

    Results spooled while Redis was down arrive when the router replays them,
    so this waits for them rather than reading once.
    """
    wanted = set(answered)
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    while True:
        entries = store.read_group(group, "fault-drill", count=1000)
        seen.update(str(result.get("request_id")) for _, result in entries)
        if wanted <= set(seen) and not entries:
            break
        if time.monotonic() > deadline:
            break
        if not entries:
            time.sleep(0.25)
    return StreamCheck(
        answered=len(wanted),
        in_stream=sum(seen.values()),
        lost=len(wanted - set(seen)),
        duplicated=sum(n - 1 for n in seen.values() if n > 1),
    )


@dataclass
class FaultRow:
    """One line of the fault report.

    Attributes:
        fault: what was broken or sent.
        tries: how many times.
        requests: requests sent meanwhile (or the attack's requests).
        failed: requests that failed after the client's retries (for attacks:
            answers other than the expected clear 4xx, e.g. a 500).
        retried: tries the client repeated (failures callers without retries see);
            ``extra["retried_because"]`` gives their statuses.
        results_lost: answered results missing from the stream (or duplicated).
        recover_s: seconds until the service was whole again (the slowest try).
        outage_s: the longest time without an answer.
        extra: what else the drill measured.
    """

    fault: str
    tries: int
    requests: int
    failed: int
    retried: int = 0
    results_lost: int | None = None
    recover_s: float | None = None
    outage_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_traffic(
        cls,
        fault: str,
        tries: int,
        traffic: SteadyTraffic,
        broken_at: float,
        recover_s: float | None,
        stream: StreamCheck | None = None,
        **extra: Any,
    ) -> FaultRow:
        """A drill's row: what the traffic saw from ``broken_at`` (the first break) on."""
        return cls(
            fault,
            tries=tries,
            requests=len(traffic.answers),
            failed=len(traffic.failed()),
            retried=traffic.retried.total(),
            results_lost=None if stream is None else stream.lost + stream.duplicated,
            recover_s=recover_s,
            outage_s=traffic.longest_silence(broken_at),
            extra=({"retried_because": dict(traffic.retried)} if traffic.retried else {}) | extra,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, times rounded to 10 ms."""
        row = asdict(self)
        for key in ("recover_s", "outage_s"):
            if row[key] is not None:
                row[key] = round(row[key], 2)
        return row


def markdown_table(rows: Iterable[FaultRow]) -> str:
    """The report as a Markdown table."""
    lines = [
        "| fault or attack | tries | requests | failed | retried | results lost "
        "| time to recover | longest outage | also measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def seconds(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f} s"

    for row in rows:
        lost = "—" if row.results_lost is None else str(row.results_lost)
        lines.append(
            f"| {row.fault} | {row.tries} | {row.requests} | {row.failed} | {row.retried} "
            f"| {lost} | {seconds(row.recover_s)} | {seconds(row.outage_s)} "
            f"| {', '.join(f'{k} {v}' for k, v in row.extra.items())} |"
        )
    return "\n".join(lines)
