"""The fault drills' bookkeeping: outages from answers, the stream check, the report table."""

from __future__ import annotations

import json

from deployments.store import RedisStore
from loadtests.faults import (
    Answer,
    FaultRow,
    SteadyTraffic,
    check_stream,
    markdown_table,
    stream_reader,
)


def _traffic(answers: list[Answer]) -> SteadyTraffic:
    traffic = SteadyTraffic("http://127.0.0.1:9", b"", None, callers=0)
    traffic.answers = answers
    return traffic


def test_outage_and_first_answer_come_from_the_answered_requests():
    traffic = _traffic(
        [
            Answer(0.0, 0.1, 200, "a"),
            Answer(0.2, 0.3, 200, "b"),
            Answer(0.4, 2.0, 503, detail="lost"),  # failed: not an answer
            Answer(0.5, 3.3, 200, "c"),
            Answer(3.4, 3.5, 200, "d"),
        ]
    )
    assert traffic.answered_ids() == ["a", "b", "c", "d"]
    assert [a.status for a in traffic.failed()] == [503]
    assert abs(traffic.longest_silence() - 3.0) < 1e-9  # 0.3 -> 3.3
    assert abs(traffic.longest_silence(since=3.0) - 0.3) < 1e-9  # from 3.0 to 3.3
    assert abs(traffic.first_answer_after(0.45) - 2.85) < 1e-9  # sent 0.5, done 3.3
    assert traffic.first_answer_after(10.0) is None


def test_the_stream_check_finds_lost_and_duplicated_results(redis_server, redis_client, tmp_path):
    store = RedisStore(redis_server.url, tmp_path / "spool", prefix="drill")
    try:
        stream_reader(store, "audit")
        for request_id in ("r1", "r2", "r3"):
            store.publish({"request_id": request_id, "verdict": "ok"})
        # A second copy of r2, as a broken replay would write it.
        payload = json.dumps({"request_id": "r2", "verdict": "ok"})
        redis_client.xadd(store.stream, {"request_id": "r2", "result": payload})
        check = check_stream(store, "audit", ["r1", "r2", "r3", "r4"], timeout_s=1)
    finally:
        store.close()
    assert (check.answered, check.in_stream, check.lost, check.duplicated) == (4, 4, 1, 1)


def test_the_report_table_has_a_line_per_row():
    table = markdown_table(
        [
            FaultRow("replica killed", 2, 100, 0, retried=3, results_lost=0, recover_s=4.123),
            FaultRow("zero-byte image", 3, 3, 0, extra={"statuses": [422]}),
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == "| replica killed | 2 | 100 | 0 | 3 | 0 | 4.12 s | — |  |"
    assert lines[3].endswith("| — | — | — | statuses [422] |")
    assert FaultRow("x", 1, 1, 0, recover_s=1.23456).as_dict()["recover_s"] == 1.23
