"""The fused topology's router: every stage in its own process, batched across requests."""

import asyncio
import time

import pytest

from deployments.imaging import encode_png
from deployments.router import RouterCore, _Problem
from deployments.schemas import DefectTypeScore
from models.inspection import LocalInspector
from models.stages import VERIFIER
from tests.tiny_models import PROBABILITIES


def _router(registry, **service) -> RouterCore:
    router = RouterCore({}, registry.uri, None, "cpu")  # no stage handles: fused
    router.reconfigure({"max_batch_size": 8, "auth": "off", **service})
    return router


def test_a_fused_router_answers_as_the_in_process_flow_and_batches(registry, images):
    router = _router(registry)
    categories = ["unsure" if i % 2 else "sure" for i in range(len(images))]

    async def all_at_once():
        ready, report = await router.readiness()
        # The stages' thread is busy for 1 s: the inspections queue their detector
        # calls meanwhile, and the next batch takes them together.
        busy = router.local.batcher.executor.submit(time.sleep, 1.0)
        answers = await asyncio.gather(
            *(
                router.inspect_bytes(encode_png(image), category)
                for image, category in zip(images, categories, strict=True)
            )
        )
        busy.result()
        return ready, report, answers

    ready, report, served = asyncio.run(all_at_once())
    assert ready and any(
        m.startswith("detector:sure@") for m in report["stages"]["router"]["models"]
    )
    local = LocalInspector(registry).inspect_images(images, categories)
    for mine, theirs in zip(served, local, strict=True):
        assert (mine.verdict, mine.decided_by) == (theirs.verdict, theirs.decided_by)
        assert mine.anomaly_score == pytest.approx(theirs.anomaly_score, abs=1e-5)
        detector = next(t for t in mine.trace if t.stage == "detector")
        assert detector.output["probability"] == pytest.approx(PROBABILITIES[mine.category], 1e-4)
        assert set(mine.timings_ms) >= {"decode", "inspect"}
    assert [VERIFIER in [t.stage for t in r.trace] for r in served] == [
        c == "unsure" for c in categories
    ]
    # One detector batch per category's model: all its images together.
    assert max(router.local.batcher.batch_sizes) == categories.count("sure") > 1


def test_a_slow_fused_router_answers_504_within_its_timeout(registry, images):
    router = _router(registry, fault_delay_s=2.0, request_timeout_s=0.5)

    async def one():
        return await router.inspect_bytes(encode_png(images[0]), "sure")

    with pytest.raises(_Problem) as refused:
        asyncio.run(one())
    assert refused.value.status == 504


def test_the_answers_a_person_should_see_are_named(registry, images):
    router = _router(registry, review={"sample_share": 0.0, "min_type_confidence": 0.5})
    [unsure, sure] = asyncio.run(_all(router, [(images[0], "unsure"), (images[1], "sure")]))
    assert unsure.decided_by == "verifier" and router._review_reason(unsure) == "ambiguous"
    assert router._review_reason(sure) is None  # decided outright, not sampled
    doubtful = sure.model_copy(
        update={"verdict": "defective", "defect_types": [DefectTypeScore(name="crack", score=0.3)]}
    )
    assert router._review_reason(doubtful) == "unsure-type"
    router.reconfigure({"auth": "off", "review": {"sample_share": 1.0}})
    assert router._review_reason(sure) == "sampled"


async def _all(router, parts):
    return [await router.inspect_bytes(encode_png(image), category) for image, category in parts]
