r"""Locust users against the HTTP API, with a line's traffic mix.

    INSPECTRAY_TRAFFIC=.inspectray/traffic/traffic.json \\
    locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 60s \\
        --host http://127.0.0.1:8000 --csv out/dag --html out/dag.html

Each user sends one inspection after another (a closed loop), drawing from the
traffic file: categories equally often, defective parts at
``INSPECTRAY_DEFECTIVE_SHARE`` (default: the file's, 10 %). Set
``INSPECTRAY_USER_RPS`` to pace each user to that many requests per second, the
users out of step (a steady load at a chosen rate). A request fails unless it answers 200 with a
verdict; Locust then exits 1, so a run with any failed request is a failed run.

``INSPECTRAY_REQUEST_LOG`` names a JSON-lines file that gets every request
(end time, milliseconds, success, image, category, ground truth, verdict, and the
server's own latency, phases and per-stage times), for analyses finer than
Locust's percentiles; ``inspectray bench`` reads it.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import gevent
from locust import FastHttpUser, events, task

from loadtests.runs import server_side
from loadtests.traffic import REQUEST_LOG_ENV, USER_RPS_ENV, Traffic, TrafficError, multipart

_traffic: Traffic | None = None
_records: list[dict[str, Any]] = []


def traffic() -> Traffic:
    """The traffic, read once per process."""
    global _traffic
    if _traffic is None:
        _traffic = Traffic.from_env()
    return _traffic


@events.init.add_listener
def _check_traffic(environment: Any, **_: Any) -> None:
    """A bad traffic file stops Locust at start (exit 2), not in every user."""
    try:
        traffic()
    except TrafficError as error:
        raise SystemExit(f"error: {error}") from error


@events.quitting.add_listener
def _write_log(environment: Any, **_: Any) -> None:
    path = os.environ.get(REQUEST_LOG_ENV)
    if path:
        with open(path, "w") as out:
            for record in _records:
                out.write(json.dumps(record) + "\n")


def _user_rps() -> float:
    return float(os.environ.get(USER_RPS_ENV) or 0)


class InspectionUser(FastHttpUser):
    """A camera station: posts part images to ``/v1/inspect`` with their category."""

    # The server's own limits decide; the client waits as long as a line would.
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        """Each user draws with its own random stream."""
        self.rng = random.Random()
        self.api_key = os.environ.get("INSPECTRAY_API_KEY")
        rate = _user_rps()
        self.period = 1.0 / rate if rate > 0 else 0.0
        if self.period:
            # Each paced user keeps its own schedule, at a random phase, as parts
            # arrive one by one on a belt: started together, users would send in
            # bursts of every user at once (Locust's constant_pacing keeps the
            # spawn-time phase).
            self.next_at = time.monotonic() + self.rng.uniform(0, self.period)
            gevent.sleep(self.next_at - time.monotonic())

    def wait_time(self) -> float:
        """No wait (closed loop), or until this user's next slot when paced."""
        if not self.period:
            return 0.0
        self.next_at += self.period
        return max(0.0, self.next_at - time.monotonic())

    @task
    def inspect(self) -> None:
        """One inspection; fails on any status but 200 or an answer without a verdict."""
        drawn = traffic().draw(self.rng)
        body, content_type = multipart({"category": drawn.image.category}, drawn.body)
        headers = {"Content-Type": content_type}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        started = time.perf_counter()
        verdict, server = None, {}
        with self.client.post(
            "/v1/inspect",
            data=body,
            headers=headers,
            name=f"/v1/inspect [{drawn.image.label}]",
            catch_response=True,
        ) as response:
            ok = response.status_code == 200
            if ok:
                try:
                    answer = response.json()
                    verdict = answer.get("verdict")
                    server = server_side(answer)
                except ValueError:
                    verdict = None
                ok = verdict is not None
                if not ok:
                    response.failure("200 without a verdict")
            else:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
        _records.append(
            {
                "end": time.time(),
                "ms": (time.perf_counter() - started) * 1000.0,
                "ok": ok,
                "status": response.status_code,
                **drawn.fields(),
                "verdict": verdict,
                **server,
            }
        )
