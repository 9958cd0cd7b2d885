"""A fingerprint of the data a model was trained on, stored in its artifact.

Two trainings on the same files, labels and splits give the same fingerprint; a
changed, added or relabelled image changes it. Image bytes are hashed, not just
names, so a silently replaced file is caught.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from models.data.sample import Sample


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_samples(dataset: str, samples: Iterable[Sample]) -> dict:
    """Fingerprint a set of samples.

    Args:
        dataset: the dataset's name (recorded, and part of the hash).
        samples: the samples used (any order; the result does not depend on it).

    Returns:
        ``{"dataset", "n_samples", "sha256", "splits": {split: n}, "labels": {label: n},
        "categories": [...]}``.
    """
    samples = list(samples)
    rows = sorted(
        "\t".join(
            [
                s.sample_id,
                s.split,
                s.category,
                s.label,
                "" if s.crop is None else ",".join(map(str, s.crop)),
                _file_sha256(str(s.image_path)),
            ]
        )
        for s in samples
    )
    digest = hashlib.sha256(dataset.encode())
    for row in rows:
        digest.update(row.encode() + b"\n")
    return {
        "dataset": dataset,
        "n_samples": len(samples),
        "sha256": digest.hexdigest(),
        "splits": dict(sorted(Counter(s.split for s in samples).items())),
        "labels": dict(sorted(Counter(s.label for s in samples).items())),
        "categories": sorted({s.category for s in samples}),
    }
