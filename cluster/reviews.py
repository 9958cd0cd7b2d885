"""``inspectray reviews``: the reviewed answers as a dataset the trainers read.

``inspectray reviews export --out DIR`` writes every reviewed image with the
reviewer's verdict and defect type in the COCO layout ``load_dataset("coco",
DIR)`` reads (image-level labels, no boxes)::

    DIR/images/<category>/<request id>.png
    DIR/annotations/reviews_train.json   product_category and defect_type per image
    DIR/reviews.json                     who reviewed what, and what the service said

A part reviewed ok is ``good``; a defective one carries the type the reviewer
named (a new name is a new type). ``inspectray train ... --with-reviews DIR``
adds them to a dataset's training split (:func:`reviewed_samples`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from PIL import Image

from deployments.store import RedisStore
from models.data.sample import GOOD, DataError, Sample


def review_label(item: dict[str, Any]) -> str:
    """The label a reviewed item trains with: ``good`` or the reviewer's defect type."""
    review = item["review"]
    return GOOD if review["verdict"] == "ok" else str(review["defect_type"])


def export_reviews(store: RedisStore, out: Path, category: str | None = None) -> dict[str, Any]:
    """Write the reviewed items (of ``category``, when given) as a COCO dataset.

    Raises:
        DataError: ``out`` holds files already, or nothing was reviewed yet.
        StoreUnavailable: Redis is down.
    """
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: export into a new folder")
    items = store.reviewed(category)
    if not items:
        raise DataError("no reviewed answers to export yet: review some in /ui first")
    images, records, labels = [], [], {}
    for number, item in enumerate(items, start=1):
        data = store.review_image(item["id"])
        if data is None:
            raise DataError(f"the image of review {item['id']} is missing from Redis")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        name = f"{item['category']}/{item['id']}.png"
        path = out / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        label = review_label(item)
        labels[label] = labels.get(label, 0) + 1
        images.append(
            {
                "id": number,
                "file_name": name,
                "width": width,
                "height": height,
                "product_category": item["category"],
                "defect_type": label,
            }
        )
        records.append(item)
    coco = {
        "info": {"description": "inspectray reviews", "date_created": time.strftime("%F %T")},
        "images": images,
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in enumerate(sorted(labels), start=1)],
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / "reviews_train.json").write_text(json.dumps(coco, indent=1))
    (out / "reviews.json").write_text(json.dumps(records, indent=1))
    return {"out": str(out), "images": len(images), "labels": labels}


def reviewed_samples(
    root: Path, categories: Collection[str]
) -> tuple[list[Sample], dict[str, int]]:
    """An export's reviewed parts of these categories, as training samples.

    Every review trains (none is kept for validation: the held-out split that
    judges the retrained models is the dataset's own).

    Returns:
        The samples (ids prefixed ``review:``), and how many reviews of other
        categories were left out, by category.

    Raises:
        DataError: the folder is not an export, or none of its reviews is of
            these categories.
    """
    from models.data import load_dataset

    if not (Path(root) / "annotations" / "reviews_train.json").is_file():
        raise DataError(f"{root} is not a review export: run `inspectray reviews export` first")
    reviews = load_dataset("coco", Path(root)).samples
    kept = [
        dataclasses.replace(s, split="train", sample_id=f"review:{s.sample_id}")
        for s in reviews
        if s.category in categories
    ]
    others: dict[str, int] = {}
    for s in reviews:
        if s.category not in categories:
            others[s.category] = others.get(s.category, 0) + 1
    if not kept:
        raise DataError(
            f"the reviews in {root} are of {sorted(others)}, none of {sorted(categories)}"
        )
    return kept, others
