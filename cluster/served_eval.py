"""``inspectray eval --url``: a dataset's split judged by a running service, over its API.

``inspectray eval`` without ``--url`` runs the inspection flow in-process; with it,
each image goes to the service as a camera's would (``POST /v1/inspect`` with its
category) and only the answers count: what the line would get, replicas,
runtimes, caches and all.

The figures, overall and per category: ``image_auroc`` of the answered
``anomaly_score``; ``binary_accuracy`` of the verdicts; ``type_top1``, the share of
true defects answered "defective" whose first defect type is right, and
``type_top1_strict``, the same over every true defect (a defect answered "ok"
counts as wrong), both None where no answer names a type; where the answers
carry a grade (a category trained on graded labels, such as ELPV's four levels),
``four_class_accuracy``, the share of images graded at their level; ``failed``
requests (none should fail).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from models.data import Dataset, Sample
from models.metrics import image_auroc


@dataclass(frozen=True)
class ServedAnswer:
    """What the service answered for one test image (``error`` when it did not)."""

    sample: Sample
    anomaly_score: float | None = None
    verdict: str | None = None
    defect_type: str | None = None
    grade: str | None = None
    error: str | None = None


def _figures(answers: Sequence[ServedAnswer]) -> dict[str, Any]:
    answered = [a for a in answers if a.error is None]
    truth = [a.sample.is_anomalous for a in answered]
    defects = [a for a in answered if a.sample.is_anomalous]
    typed = [a for a in defects if a.verdict == "defective" and a.defect_type is not None]
    right = sum(a.defect_type == a.sample.label for a in typed)
    graded = [a for a in answered if a.grade is not None]
    levels = (
        {"four_class_accuracy": sum(a.grade == a.sample.label for a in graded) / len(graded)}
        if graded
        else {}
    )
    return {
        "images": len(answers),
        "failed": len(answers) - len(answered),
        "image_auroc": (
            image_auroc(truth, [a.anomaly_score or 0.0 for a in answered])
            if 0 < sum(truth) < len(truth)
            else None
        ),
        "binary_accuracy": (
            sum((a.verdict == "defective") == a.sample.is_anomalous for a in answered)
            / len(answered)
            if answered
            else None
        ),
        # None where no answer named a type (a category without a classifier).
        "type_top1": right / len(typed) if typed else None,
        "type_top1_strict": right / len(defects) if typed else None,
        "typed_defects": len(typed),
    } | levels


def evaluate_served(
    client: Any,
    dataset: Dataset,
    split: str = "test",
    categories: Sequence[str] | None = None,
    concurrency: int = 4,
) -> dict[str, Any]:
    """Send a split's images to the service and score its answers.

    Args:
        client: a :class:`deployments.client.HttpClient` (anything with its ``inspect``).
        dataset: the data.
        split: the split to judge.
        categories: only these (default: every category of the dataset).
        concurrency: requests in flight at once.

    Returns:
        The overall figures (see the module docstring), ``per_category`` and
        ``seconds``.

    Raises:
        ValueError: no image of that split in those categories.
    """
    chosen = set(categories or dataset.categories)
    samples = [s for s in dataset.samples if s.split == split and s.category in chosen]
    if not samples:
        raise ValueError(f"no {split} images of {dataset.name!r} in {sorted(chosen)}")

    def judge(sample: Sample) -> ServedAnswer:
        try:
            found = client.inspect(
                sample.image_path.read_bytes(),
                category=sample.category,
                filename=sample.image_path.name,
            )
        except Exception as error:  # a failed request is a figure, not a crash
            return ServedAnswer(sample, error=f"{type(error).__name__}: {error}")
        top = found.defect_types[0].name if found.defect_types else None
        return ServedAnswer(sample, found.anomaly_score, found.verdict, top, found.grade)

    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        answers = list(pool.map(judge, samples))
    metrics: dict[str, Any] = {"dataset": dataset.name, "split": split, "served": True}
    metrics |= _figures(answers)
    metrics["per_category"] = {
        category: _figures([a for a in answers if a.sample.category == category])
        for category in sorted({s.category for s in samples})
    }
    metrics["errors"] = sorted({a.error for a in answers if a.error})[:10]
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics
