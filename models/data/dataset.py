"""A loaded dataset: samples grouped by product category and split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from models.data.sample import SPLITS, DataError, Sample


def dataset_folder(name: str, root: Path | str | None, hint: str = "") -> Path:
    """The folder a loader reads, checked once for every format.

    Args:
        name: the dataset's name, for the message.
        root: the folder the user gave (None: none given).
        hint: appended to the message, e.g. how to create the dataset.

    Raises:
        DataError: no folder given (asks for ``--root``), or it does not exist.
    """
    suffix = f" ({hint})" if hint else ""
    if root is None:
        raise DataError(f"the {name} dataset has no default location: pass --root FOLDER{suffix}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}{suffix}")
    return root


@dataclass(frozen=True)
class Dataset:
    """All samples of one dataset, in a deterministic order.

    Attributes:
        name: the dataset's registered name (``elpv``, ``synthetic``, ...).
        samples: every sample of every category and split.
    """

    name: str
    samples: tuple[Sample, ...]

    def __post_init__(self) -> None:
        bad = sorted({s.split for s in self.samples} - set(SPLITS))
        if bad:
            raise DataError(f"dataset {self.name!r} has unknown split(s) {bad}; expected {SPLITS}")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def without_labels(
        self, labels: Iterable[str], splits: Iterable[str] = ("train", "val")
    ) -> Dataset:
        """The dataset with these labels removed from these splits (held out of training).

        Raises:
            DataError: a label the dataset does not have.
        """
        labels, splits = set(labels), set(splits)
        unknown = sorted(labels - {s.label for s in self.samples})
        if unknown:
            raise DataError(f"dataset {self.name!r} has no label(s) {unknown}")
        kept = tuple(s for s in self.samples if not (s.label in labels and s.split in splits))
        return Dataset(self.name, kept)

    def with_training(self, samples: Iterable[Sample]) -> Dataset:
        """The dataset with these samples added to its training split.

        Raises:
            DataError: a sample is not in the training split, or its id is taken.
        """
        added = tuple(samples)
        wrong = sorted({s.split for s in added} - {"train"})
        if wrong:
            raise DataError(f"only training samples can be added to {self.name!r}, not {wrong}")
        taken = {s.sample_id for s in self.samples} & {s.sample_id for s in added}
        if taken:
            first = sorted(taken)[:3]
            raise DataError(f"{self.name!r} has samples with these ids already: {first}")
        return Dataset(self.name, self.samples + added)

    @property
    def categories(self) -> list[str]:
        """Product categories, sorted."""
        return sorted({s.category for s in self.samples})

    @property
    def labels(self) -> list[str]:
        """Every label that occurs (``good`` and defect types), sorted."""
        return sorted({s.label for s in self.samples})

    def select(self, category: str | None = None, split: str | None = None) -> list[Sample]:
        """Samples of one category and/or split, in dataset order.

        Raises:
            DataError: the category or split does not exist in this dataset.
        """
        if category is not None and category not in self.categories:
            raise DataError(
                f"dataset {self.name!r} has no category {category!r}; it has {self.categories}"
            )
        if split is not None and split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [
            s
            for s in self.samples
            if (category is None or s.category == category) and (split is None or s.split == split)
        ]

    def summary(self) -> dict:
        """Counts per category, split and label, as ``inspectray data show`` prints them.

        Returns:
            ``{"dataset": name, "categories": {CAT: {SPLIT: {LABEL: count}}}}``
            with categories, splits (train, val, test order) and labels sorted.
        """
        counts: dict[str, dict[str, Counter]] = {}
        for s in self.samples:
            counts.setdefault(s.category, {}).setdefault(s.split, Counter())[s.label] += 1
        return {
            "dataset": self.name,
            "categories": {
                cat: {
                    split: dict(sorted(counts[cat][split].items()))
                    for split in SPLITS
                    if split in counts[cat]
                }
                for cat in sorted(counts)
            },
        }
