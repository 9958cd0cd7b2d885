"""The review queue in a real Redis, and its export as a dataset the trainers read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from cluster.redis_server import RedisServer
from cluster.reviews import export_reviews, reviewed_samples
from deployments.imaging import encode_png
from deployments.store import RedisStore
from models.data import Dataset, load_dataset
from models.data.sample import DataError, Sample


@pytest.fixture()
def store(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[RedisStore]:
    stale = list(redis_client.scan_iter("rv:*"))
    if stale:
        redis_client.delete(*stale)
    opened = RedisStore(redis_server.url, tmp_path / "spool", prefix="rv")
    yield opened
    opened.close()


def _item(n: int, category: str = "tile", verdict: str = "defective") -> dict:
    return {
        "id": f"req{n}",
        "reason": "ambiguous",
        "category": category,
        "verdict": verdict,
        "anomaly_score": 0.55,
        "defect_types": [{"name": "scratch", "score": 0.4}],
    }


def _png(shade: int, size: tuple[int, int] = (24, 16)) -> bytes:
    return encode_png(Image.new("RGB", size, (shade, shade, shade)))


def test_items_wait_oldest_first_and_the_oldest_leave_past_the_limit(store):
    for n in range(5):
        store.enqueue_review(_item(n, "tile" if n % 2 else "panel"), _png(n), max_pending=4)
    assert store.review_queue_length() == 4  # req0 left the queue, image and all
    assert store.review_image("req0") is None
    assert [i["id"] for i in store.pending_reviews()] == ["req1", "req2", "req3", "req4"]
    assert [i["id"] for i in store.pending_reviews(category="tile")] == ["req1", "req3"]
    assert [i["id"] for i in store.pending_reviews(limit=2)] == ["req1", "req2"]
    assert [i["id"] for i in store.pending_reviews(limit=2, newest=True)] == ["req4", "req3"]
    assert store.review_image("req2") == _png(2)


def test_a_review_leaves_the_queue_is_kept_and_can_be_corrected(store, redis_client):
    store.enqueue_review(_item(1), _png(10))
    review = {"verdict": "defective", "defect_type": "crack", "reviewer": "line-3"}
    item = store.record_review("req1", review)
    assert item["review"] == review and store.review_queue_length() == 0
    corrected = store.record_review("req1", review | {"defect_type": "dent"})
    assert [i["review"]["defect_type"] for i in store.reviewed()] == ["dent"]
    assert corrected["verdict"] == "defective"  # what the service said stays
    assert redis_client.xlen("rv:review:log") == 2  # both reviews in the audit trail
    with pytest.raises(KeyError):
        store.record_review("nope", review)


def test_the_export_is_a_coco_dataset_with_the_reviewers_labels(store, tmp_path):
    for n, (verdict, kind) in enumerate(
        [("ok", None), ("defective", "crack"), ("defective", "new dent")]
    ):
        store.enqueue_review(_item(n), _png(40 * n, (32 + n, 20)))
        review = {"verdict": verdict, "defect_type": kind, "reviewer": "qa"}
        store.record_review(f"req{n}", review)
    store.enqueue_review(_item(9), _png(99))  # not reviewed: not exported
    out = tmp_path / "reviews"
    summary = export_reviews(store, out)
    assert summary["images"] == 3
    assert summary["labels"] == {"good": 1, "crack": 1, "new dent": 1}
    dataset = load_dataset("coco", out)
    samples = sorted(dataset.samples, key=lambda s: s.image_path.name)
    assert [(s.category, s.label) for s in samples] == [
        ("tile", "good"),
        ("tile", "crack"),
        ("tile", "new dent"),
    ]
    with Image.open(samples[2].image_path) as image:
        assert image.size == (34, 20)
    with pytest.raises(DataError, match="not empty"):
        export_reviews(store, out)


def test_nothing_reviewed_is_said(store, tmp_path):
    with pytest.raises(DataError, match="no reviewed answers"):
        export_reviews(store, tmp_path / "empty")


def test_the_reviews_join_a_datasets_training_split(store, tmp_path):
    for n, (category, verdict, kind) in enumerate(
        [("tile", "ok", None), ("tile", "defective", "new dent"), ("panel", "ok", None)]
    ):
        store.enqueue_review(_item(n, category), _png(30 * n))
        store.record_review(f"req{n}", {"verdict": verdict, "defect_type": kind, "reviewer": "qa"})
    out = tmp_path / "reviews"
    export_reviews(store, out)
    base = tmp_path / "base.png"
    base.write_bytes(_png(200))
    dataset = Dataset("line", (Sample(base, "tile", "good", "test", sample_id="tile/1"),))

    samples, others = reviewed_samples(out, ["tile"])
    assert others == {"panel": 1}
    assert sorted((s.split, s.label) for s in samples) == [("train", "good"), ("train", "new dent")]
    merged = dataset.with_training(samples)
    assert [s.split for s in merged.samples] == ["test", "train", "train"]
    assert all(s.sample_id.startswith("review:") for s in merged.samples[1:])
    with pytest.raises(DataError, match="ids already"):
        merged.with_training(samples)
    with pytest.raises(DataError, match="only training samples"):
        dataset.with_training(dataset.samples)
    with pytest.raises(DataError, match="none of"):
        reviewed_samples(out, ["stone"])
    with pytest.raises(DataError, match="not a review export"):
        reviewed_samples(tmp_path, ["tile"])
