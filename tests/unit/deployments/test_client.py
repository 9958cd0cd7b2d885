"""The clients' retry policy: what is retried, how long it waits."""

import pytest

from deployments.client import InspectionFailed, Retrying, RetryPolicy, retryable


def test_only_transient_failures_are_retried():
    assert retryable(InspectionFailed(503, "overloaded"))
    assert retryable(InspectionFailed(504, "slow"))
    assert retryable(InspectionFailed(408, "the proxy timed it out"))
    assert retryable(InspectionFailed(500, "Internal Server Error"))  # the router died
    assert retryable(InspectionFailed(0, "connection refused"))
    assert not retryable(InspectionFailed(415, "not an image"))
    assert not retryable(InspectionFailed(401, "no key"))
    assert not retryable(ValueError("a bug"))


def test_waits_grow_and_honour_retry_after():
    policy = RetryPolicy(attempts=5, backoff_s=0.1, max_backoff_s=1.0)
    waits = [policy.wait(i, None) for i in range(5)]
    assert 0.075 <= waits[0] <= 0.125 and 0.6 <= waits[3] <= 1.0 and waits[4] <= 1.0
    assert policy.wait(0, 0.7) == 0.7 and policy.wait(0, 30) == 1.0


def test_a_transient_failure_is_retried_until_it_succeeds_and_others_are_raised():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise InspectionFailed(503, "overloaded", retry_after=0.01)
        return "answer"

    retrying = Retrying(RetryPolicy(attempts=4))
    assert retrying.sync(flaky) == "answer" and len(calls) == 3
    assert retrying.because == {503: 2}  # two tries repeated, both for a 503
    calls.clear()

    def refused():
        calls.append(1)
        raise InspectionFailed(422, "corrupt")

    with pytest.raises(InspectionFailed):
        retrying.sync(refused)
    assert len(calls) == 1 and retrying.because == {503: 2}  # a refusal is not retried
    calls.clear()

    def down():
        calls.append(1)
        raise InspectionFailed(503, "overloaded")

    with pytest.raises(InspectionFailed):
        Retrying(RetryPolicy(attempts=2, backoff_s=0.001)).sync(down)
    assert len(calls) == 2  # gives up after its attempts


def test_a_serialized_answer_reads_back_with_its_computed_fields_derived():
    from deployments.client import read_answer
    from deployments.schemas import InspectionResult

    result = InspectionResult(
        request_id="r1",
        image_sha256="0" * 64,
        category="brushed_metal",
        category_routed=False,
        verdict="defective",
        anomaly_score=0.8,
        decided_by="detector",
        defect_types=[{"name": "scratch", "score": 1.0}],
        latency_ms=40.0,
    )
    answer = result.model_dump(mode="json")
    assert answer["prediction"] == "scratch" and answer["processing_time"] == 0.04
    assert read_answer(answer) == result
    with pytest.raises(InspectionFailed) as failed:
        read_answer({"error": {"status": 415, "detail": "not an image"}})
    assert failed.value.status == 415
