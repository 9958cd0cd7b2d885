"""What evaluation knows about each test image after the pipeline has judged it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ImageRecord:
    """One test image, its ground truth and the pipeline's answer.

    Attributes:
        sample_id: the dataset's identifier of the image.
        image_path: the image file (for example images in the report).
        category: the product category the image belongs to (ground truth).
        label: ``good`` or the defect type (ground truth).
        is_anomalous: the binary ground truth (ELPV: defect probability >= 0.5).
        anomaly_score: the pipeline's final score in [0, 1]; higher is more anomalous.
        verdict: ``ok`` or ``defective``.
        decided_by: what decided: the first-line score (``detector``,
            ``memory-bank`` or ``detector+memory-bank``) or the ``verifier``.
        detector_probability: the anomaly detector's probability, when it ran.
        memory_bank_score: the memory bank's calibrated score, when it ran.
        first_score: the first-line score the category's threshold applies to.
        verifier_score: the verifier's calibrated score, when it was called.
        routed_category: the category the router predicted, when it was asked.
        defect_type: the top defect type (after reranking, when the reranker ran).
        classifier_defect_type: the classifier's own top defect type, when it ran.
        predicted_class: the classifier's most probable class (``good`` and
            graded levels included), when it ran.
        grade: the level the service answers, for a graded category
            (:mod:`models.grading`).
        embedding: the classifier's embedding of the image, when it ran.
    """

    sample_id: str
    image_path: str
    category: str
    label: str
    is_anomalous: bool
    anomaly_score: float
    verdict: str
    decided_by: str
    detector_probability: float | None
    memory_bank_score: float | None = None
    first_score: float | None = None
    verifier_score: float | None = None
    routed_category: str | None = None
    defect_type: str | None = None
    classifier_defect_type: str | None = None
    predicted_class: str | None = None
    grade: str | None = None
    embedding: tuple[float, ...] | None = None

    @property
    def predicted_anomalous(self) -> bool:
        """Whether the pipeline called the part defective."""
        return self.verdict == "defective"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)
