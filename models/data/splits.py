"""The one rule for holding out part of a split, shared by every loader.

Formats without a validation split (MVTec AD, COCO or MVTec Screws without a val
file) take a deterministic, stratified 10 % of train as val; ELPV, which ships no
split at all, uses the same rule for its 25 % test split and then its val split.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from models.data.sample import Sample

VAL_FRACTION = 0.1
SPLIT_SEED = 0


def _category_quota(n: int, fraction: float) -> int:
    # At least one held-out image wherever two exist, so every category gets a val
    # set; round half up (not Python's banker's rounding) so 5 % of 10 is 1, not 0.
    if n < 2:
        return 0
    return max(1, math.floor(fraction * n + 0.5))


def _stratum_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Share ``total`` between strata in proportion to their sizes (largest remainder).

    A stratum never gives up its last sample, so a label present in the source
    split stays present in it.
    """
    n = sum(sizes.values())
    exact = {key: total * size / n for key, size in sizes.items()}
    quota = {key: min(math.floor(share), max(sizes[key] - 1, 0)) for key, share in exact.items()}
    # Largest remainder first; ties broken by name so the result is deterministic.
    order = sorted(sizes, key=lambda key: (-(exact[key] - math.floor(exact[key])), key))
    left = total - sum(quota.values())
    while left > 0:
        takers = [key for key in order if quota[key] < sizes[key] - 1]
        if not takers:
            break
        for key in takers[:left]:
            quota[key] += 1
        left = total - sum(quota.values())
    return quota


def stratified_holdout(
    samples: Sequence[Sample], fraction: float, seed: int = SPLIT_SEED
) -> set[str]:
    """Choose a stratified, deterministic ``fraction`` of samples to hold out.

    Each product category holds out ``round(fraction * n)`` of its ``n`` samples
    (at least 1 when ``n >= 2``), shared between its labels in proportion to their
    counts, so every (category, label) stratum is within one sample of
    ``fraction`` of its size. The choice within a stratum depends only on the
    seed, the stratum and its sample ids, not on the input order or on other
    categories, so adding a category does not reshuffle the others.

    Args:
        samples: the candidates (``sample_id`` must be unique).
        fraction: share to hold out, in ``[0, 1)``.
        seed: random seed.

    Returns:
        The ``sample_id`` of every held-out sample.
    """
    ids: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        ids[sample.category][sample.label].append(sample.sample_id)
    chosen: set[str] = set()
    for category, by_label in ids.items():
        total = _category_quota(sum(len(v) for v in by_label.values()), fraction)
        quotas = _stratum_quotas({label: len(v) for label, v in by_label.items()}, total)
        for label, stratum_ids in by_label.items():
            if quotas[label] == 0:
                continue
            stratum_ids = sorted(stratum_ids)
            # crc32, not hash(): Python salts str hashes per process.
            key = zlib.crc32(f"{category}\0{label}".encode())
            rng = np.random.default_rng([seed, key])
            picks = rng.choice(len(stratum_ids), size=quotas[label], replace=False)
            chosen.update(stratum_ids[i] for i in picks)
    return chosen


def split_off_val(
    samples: Sequence[Sample], fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> list[Sample]:
    """Move a stratified ``fraction`` of the train samples to the val split.

    Args:
        samples: samples of any splits; only ``train`` ones are candidates.
        fraction: share of each category's train samples to move (default 10 %).
        seed: random seed (default 0).

    Returns:
        The same samples in the same order, some train ones relabelled ``val``.
    """
    val = stratified_holdout([s for s in samples if s.split == "train"], fraction, seed)
    return [dataclasses.replace(s, split="val") if s.sample_id in val else s for s in samples]
