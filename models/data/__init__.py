"""Datasets: one loader per on-disk format, one :class:`Sample` type for all.

``load_dataset(name, root)`` is the single entry point; ``DATASETS`` lists the
registered names.
"""

from models.data.dataset import Dataset
from models.data.registry import DATASETS, load_dataset
from models.data.sample import GOOD, SPLITS, Box, DataError, Sample, read_image

__all__ = [
    "DATASETS",
    "GOOD",
    "SPLITS",
    "Box",
    "DataError",
    "Dataset",
    "Sample",
    "load_dataset",
    "read_image",
]
