"""Image-level metrics, one per file (the anomalib habit), with ``image_`` / ``binary_`` names."""

from models.metrics.binary import (
    BinaryCounts,
    balanced_accuracy,
    binary_accuracy,
    binary_counts,
    binary_f1,
)
from models.metrics.image_auroc import image_auroc

__all__ = [
    "BinaryCounts",
    "balanced_accuracy",
    "binary_accuracy",
    "binary_counts",
    "binary_f1",
    "image_auroc",
]
