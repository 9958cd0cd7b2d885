"""Fault drills on the live local cluster, with steady traffic through the retrying client.

Each drill breaks one thing while three callers keep inspecting, then checks
that no request failed after the client's retries and that every answered
result is in the stream exactly once, and adds its figures to the fault report.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve
from ray.util.state import list_actors

from cluster.multinode import wait_until
from deployments.app import APP_NAME, DEPLOYMENT_NAMES
from loadtests.faults import FaultRow, SteadyTraffic, check_stream, stream_reader
from tests.integration.faults.conftest import CATEGORY, FRONT

pytestmark = [pytest.mark.slow, pytest.mark.faults]
# The replicas the drills kill and slow: those every inspection meets.
FRONT_DEPLOYMENT = DEPLOYMENT_NAMES[FRONT]


def _replicas(deployment: str) -> list:
    return list_actors(
        filters=[
            ("class_name", "=", f"ServeReplica:{APP_NAME}:{deployment}"),
            ("state", "=", "ALIVE"),
        ]
    )


def _running(deployment: str) -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def _whole(victim_id: str) -> bool:
    alive = {a.actor_id for a in _replicas(FRONT_DEPLOYMENT)}
    return victim_id not in alive and _running(FRONT_DEPLOYMENT) == 2 and len(alive) == 2


def _survived(fault_report: list, row: FaultRow, traffic: SteadyTraffic, stream) -> None:
    """Report the row; no request failed, no result lost or doubled, no long silence."""
    fault_report.append(row)
    assert not traffic.failed(), traffic.failed()[:5]
    assert stream.lost == 0 and stream.duplicated == 0, stream
    assert row.outage_s < 10, row


def _kill_under_load(drill, part, store, group: str, kill, tries: int = 2):
    """Kill something ``tries`` times under traffic; ``kill()`` returns "whole again?".

    Returns:
        The traffic, the stream check, when the first kill came, the slowest recovery.
    """
    stream_reader(store, group)
    recoveries = []
    with SteadyTraffic(drill.url, part, CATEGORY) as traffic:
        traffic.wait_for_answers(20)
        first_kill = time.monotonic()
        for _ in range(tries):
            killed = time.monotonic()
            whole = kill()
            wait_until(whole, timeout_s=180)
            recoveries.append(time.monotonic() - killed)
            traffic.wait_for_answers(20)
    stream = check_stream(store, group, traffic.answered_ids())
    return traffic, stream, first_kill, max(recoveries)


def _busy_replica(deployment: str, timeout_s: float = 30.0):
    """A replica of ``deployment`` holding requests now: its state entry and actor handle.

    Serve sends a model's requests to the replicas that have it loaded, so under
    light traffic one replica may hold them all while another stays idle; killing
    the idle one would test nothing. Each replica actor counts its ongoing requests.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in _replicas(deployment):
            actor = ray.get_actor(entry.name, namespace="serve")
            if ray.get(actor.get_num_ongoing_requests.remote(), timeout=10) > 0:
                return entry, actor
        time.sleep(0.02)
    raise TimeoutError(f"no {deployment} replica held a request within {timeout_s:.0f} s")


def test_a_replica_killed_under_load_costs_no_request(drill, part, store, fault_report):
    def kill():
        # The actor, by its id (its name in Serve's namespace gives the handle).
        victim, actor = _busy_replica(FRONT_DEPLOYMENT)
        ray.kill(actor, no_restart=True)
        return lambda: _whole(victim.actor_id)

    # Each batch waits 0.3 s and the victim is a replica with requests in it, so
    # it always dies holding some: the router must answer those 503 and the
    # client must retry them elsewhere.
    drill.deploy(deployments={FRONT: {"fault_delay_s": 0.3}})
    try:
        traffic, stream, first_kill, recover_s = _kill_under_load(
            drill, part, store, "replica-drill", kill
        )
    finally:
        drill.deploy(deployments={FRONT: {}})
    row = FaultRow.from_traffic(
        f"{FRONT_DEPLOYMENT} replica killed (ray.kill by actor id) with requests in it",
        2,
        traffic,
        first_kill,
        recover_s,
        stream,
    )
    _survived(fault_report, row, traffic, stream)  # the other replica kept answering
    # Requests lost with the replica were retried, and none failed. Split: the router
    # answers them 503. Fused: the replica that died was a router, and the ingress
    # drops the connections it held (HAProxy: counted as status 0, a dropped
    # connection; Serve's proxy answers them 500), which the client retries (an
    # inspection is idempotent).
    assert traffic.retried, "the victim held requests: some must have been retried"
    lost = {0, 500, 503} if FRONT == "router" else {503}
    assert set(traffic.retried) <= lost, traffic.retried


def _controller_pid() -> int | None:
    alive = list_actors(filters=[("class_name", "=", "ServeController"), ("state", "=", "ALIVE")])
    return alive[0].pid if alive else None


def test_the_serve_controller_killed_under_load_costs_no_request(drill, part, store, fault_report):
    def kill():
        before = _controller_pid()
        controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        ray.kill(controller, no_restart=False)  # Ray restarts it, as after a crash

        def back() -> bool:  # a new controller process, and it reports the app running
            if _controller_pid() in (None, before):
                return False
            try:
                app = serve.status().applications.get(APP_NAME)
            except Exception:  # the controller is still restarting
                return False
            return app is not None and app.status == "RUNNING"

        return back

    traffic, stream, first_kill, recover_s = _kill_under_load(
        drill, part, store, "controller-drill", kill
    )
    row = FaultRow.from_traffic(
        "Serve controller killed under load", 2, traffic, first_kill, recover_s, stream
    )
    # The proxy and the replicas answer without the controller.
    _survived(fault_report, row, traffic, stream)


def test_redis_stopped_30_s_under_load_loses_no_result(drill, part, store, fault_report):
    stream_reader(store, "redis-drill")
    with SteadyTraffic(drill.url, part, CATEGORY) as traffic:
        traffic.wait_for_answers(20)
        drill.redis.stop()
        stopped = time.monotonic()
        try:
            time.sleep(29)
            # The router noticed: Redis down, the results meanwhile in its spool.
            during = httpx.get(f"{drill.url}/healthz", timeout=30).json()
            time.sleep(max(0.0, stopped + 30 - time.monotonic()))
            answered_while_down = sum(
                1 for a in traffic.answers if a.status == 200 and a.sent >= stopped
            )
        finally:
            drill.redis.start()
        restarted = time.monotonic()

        def replayed() -> bool:
            health = httpx.get(f"{drill.url}/healthz", timeout=30).json()
            return health["redis"] == "up" and health["spooled_results"] == 0

        recover_s = wait_until(replayed, timeout_s=120)
        traffic.wait_for_answers(20)
    stream = check_stream(store, "redis-drill", traffic.answered_ids())
    row = FaultRow.from_traffic(
        "Redis stopped 30 s under load, then started",
        1,
        traffic,
        stopped,
        recover_s,
        stream,
        answered_while_down=answered_while_down,
        spooled_while_down=during["spooled_results"],
        answered=stream.answered,
        results_in_stream=stream.in_stream,
        replayed_within_s_of_restart=round(time.monotonic() - restarted, 2),
    )
    _survived(fault_report, row, traffic, stream)
    assert answered_while_down >= 20, row  # the service answered throughout
    # The results reached the stream through the spool's replay, not around it.
    assert during["redis"] != "up" and during["spooled_results"] >= 20, during
    assert stream.in_stream == stream.answered, stream  # count and ids


def test_a_slow_stage_times_out_quickly_and_overload_is_refused(drill, part, fault_report):
    timeout_s, delay_s, max_in_flight, flood = 1.0, 4.0, 6, 24

    def send(client: httpx.Client, i: int) -> tuple[int, float, dict]:
        started = time.monotonic()
        answer = client.post(
            f"{drill.url}/v1/inspect",
            files={"image": ("part.png", part + i.to_bytes(8, "big"), "image/png")},
            data={"category": CATEGORY},
        )
        return answer.status_code, time.monotonic() - started, dict(answer.headers)

    def router_s(headers: dict) -> float:
        """The router's own time before it refused (its Server-Timing header)."""
        return float(headers["server-timing"].split("dur=")[1]) / 1000.0

    peak_in_flight = 0
    limits = httpx.Limits(max_connections=flood + 1)
    with httpx.Client(timeout=60, limits=limits) as client:
        try:
            drill.deploy(
                service={"request_timeout_s": timeout_s, "max_in_flight": max_in_flight},
                deployments={FRONT: {"fault_delay_s": delay_s}},
            )
            with ThreadPoolExecutor(flood) as pool:
                futures = [pool.submit(send, client, i) for i in range(flood)]
                while not all(f.done() for f in futures):
                    health = client.get(f"{drill.url}/healthz").json()
                    peak_in_flight = max(peak_in_flight, health["in_flight"])
                    time.sleep(0.05)
                answers = [f.result() for f in futures]
        finally:
            drill.deploy(service={}, deployments={FRONT: {}})

        def answers_again() -> bool:
            return send(client, 10_000 + int(time.monotonic() * 1000))[0] == 200

        recover_s = wait_until(answers_again, timeout_s=60, every_s=0.1)
    statuses = [status for status, _, _ in answers]
    timed_out = [(seconds, headers) for status, seconds, headers in answers if status == 504]
    refused = [(seconds, headers) for status, seconds, headers in answers if status == 503]
    fault_report.append(
        FaultRow(
            f"slow {FRONT_DEPLOYMENT} models ({delay_s:g} s injected per call), "
            f"{flood} concurrent requests",
            tries=1,
            requests=flood,
            failed=sum(1 for s in statuses if s not in (503, 504)),
            recover_s=recover_s,
            extra={
                "504": len(timed_out),
                "504_slowest_s": round(max((s for s, _ in timed_out), default=0), 2),
                "504_slowest_in_router_s": round(
                    max((router_s(h) for _, h in timed_out), default=0), 2
                ),
                "503": len(refused),
                "503_slowest_s": round(max((s for s, _ in refused), default=0), 2),
                "peak_in_flight": peak_in_flight,
                "max_in_flight": max_in_flight,
            },
        )
    )
    assert set(statuses) <= {503, 504}, statuses  # nobody waits for the slow stage
    assert timed_out and refused, statuses
    # The timeout fires on time: in the router (reading the form and decoding under
    # the flood included), within 0.75 s of it; at the caller, before the slow stage
    # would have answered. (The caller's clock also counts 24 client threads and the
    # HTTP proxy sharing two cores with the cluster: on a loaded day 2.5 s for a
    # 1.0 s timeout, of which the router spent 1.4 s.)
    assert max(router_s(h) for _, h in timed_out) < timeout_s + 0.75, timed_out
    assert max(s for s, _ in timed_out) < delay_s, timed_out
    # Overload is refused without waiting for the slow stage: most refusals in under
    # half its delay, none as late as it.
    refused_s = sorted(s for s, _ in refused)
    assert refused_s[len(refused_s) // 2] < delay_s / 2, refused
    assert refused_s[-1] < delay_s, refused
    assert all(int(h["retry-after"]) >= 1 for _, h in refused)
    assert 1 <= peak_in_flight <= max_in_flight  # the router's queue is bounded
