"""The serving contract: what callers send and what inspectray answers.

Every answer is an :class:`InspectionResult`, versioned by ``schema_version``; a
field is only ever added within a major version. The OpenAPI spec at ``/docs``
is generated from these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from deployments.imaging import encode_heatmap
from models.inspection.answers import Inspection

SCHEMA_VERSION = "1.0"
MAX_BATCH = 32  # images per /v1/inspect/batch request
COMPUTED_FIELDS = ("prediction", "confidence", "processing_time")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DefectTypeScore(_Schema):
    """One defect type with its score (the scores of an answer sum to 1)."""

    name: str = Field(description="The defect type, e.g. `scratch`.")
    score: float = Field(ge=0.0, le=1.0)
    description: str | None = Field(
        default=None, description="What the type looks like, from the defect catalog."
    )


class ReviewIn(_Schema):
    """A person's review of a queued answer."""

    verdict: Literal["ok", "defective"]
    defect_type: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_ -]*$",
        description="The defect's type (defective parts): a known one or a new name.",
    )
    note: str = Field(default="", max_length=500)


class ReviewedType(_Schema):
    """A defect type the service named, with its score."""

    name: str
    score: float


class Review(_Schema):
    """What a person said about an answer."""

    verdict: Literal["ok", "defective"]
    defect_type: str | None = None
    note: str = ""
    reviewer: str = Field(description="The API key's tenant (`anonymous` without keys).")
    reviewed_at: float = Field(description="Unix time of the review.")
    agrees: bool | None = Field(
        default=None, description="Whether the review says what the service said."
    )


class ReviewItem(_Schema):
    """An answer queued for review: what the service said, and the review once made."""

    id: str = Field(description="The answer's request id (also its id in the result stream).")
    reason: Literal["ambiguous", "unsure-type", "sampled"]
    queued_at: float
    category: str
    verdict: Literal["ok", "defective"]
    anomaly_score: float
    decided_by: str
    defect_types: list[ReviewedType] = Field(default_factory=list)
    model_versions: dict[str, str] = Field(default_factory=dict)
    image_sha256: str
    review: Review | None = None


class ReviewQueue(_Schema):
    """The waiting answers, oldest first."""

    pending: int = Field(description="How many answers wait in all.")
    items: list[ReviewItem]


class DefectBox(_Schema):
    """Where one defect is, in the pixels of the image sent."""

    defect_type: str
    score: float = Field(ge=0.0, le=1.0)
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in pixels.")


class StageTrace(_Schema):
    """One stage's part in an answer."""

    stage: str = Field(description="router, detector, verifier, classifier, localizer, reranker.")
    model_version: str
    latency_ms: float = Field(
        ge=0.0, description="The model's computing time (its share of the batch)."
    )
    output: dict[str, Any] = Field(default_factory=dict, description="What the stage said.")
    call_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="How long the router waited for the stage: computing, batching wait, "
        "queue and transfer.",
    )


class InspectionResult(_Schema):
    """The answer for one image.

    ``prediction``, ``confidence`` and ``processing_time`` keep the shape of the
    simple classification APIs (prediction, confidence, seconds) for callers that
    need no more.
    """

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    request_id: str = Field(description="Unique per answer; also the id in the result stream.")

    @model_validator(mode="before")
    @classmethod
    def _recompute(cls, data: Any) -> Any:
        """A serialized answer (cache, stream, client) reads back: computed fields are derived."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in COMPUTED_FIELDS}
        return data

    image_sha256: str
    category: str = Field(description="The product category (given, or routed).")
    category_routed: bool = Field(description="True when the category router chose it.")
    verdict: Literal["ok", "defective"]
    anomaly_score: float = Field(ge=0.0, le=1.0, description="Final score; higher is worse.")
    decided_by: Literal["detector", "memory-bank", "detector+memory-bank", "verifier"] = Field(
        description="What decided: the first-line score outside the ambiguous band (the "
        "detector's probability, the memory bank's score, or the two fused, as the "
        "category's rule says); verifier: the score was inside the band and the "
        "autoencoder's score was fused in."
    )
    grade: str | None = Field(
        default=None,
        description="The part's level, for a category trained on graded labels (a solar "
        "cell's defect probability: good, defect_p33, defect_p67, defect_p100): one of the "
        "levels of functional parts (good, defect_p33) for a part judged ok, of defective "
        "ones (defect_p67, defect_p100) for a defective part; null elsewhere.",
    )
    defect_types: list[DefectTypeScore] = Field(
        default_factory=list, description="Ranked defect types, best first (defective parts)."
    )
    boxes: list[DefectBox] = Field(
        default_factory=list, description="Located defects, when boxes were asked for."
    )
    heatmap_png: str | None = Field(
        default=None,
        description="Base64 PNG (grayscale, at the image's size) of where the part looks "
        "anomalous, when an explanation was asked for (see heatmap_source).",
    )
    heatmap_source: Literal["memory-bank", "grad-cam"] | None = Field(
        default=None,
        description="memory-bank: the memory bank's anomaly map, each pixel's probability "
        "of a defect on the category's one scale; grad-cam: where the detector looked, "
        "normalised per image (a category without a memory bank).",
    )
    trace: list[StageTrace] = Field(default_factory=list)
    model_versions: dict[str, str] = Field(
        default_factory=dict, description="stage → version of every model that could run."
    )
    cache_hit: bool = False
    latency_ms: float = Field(
        ge=0.0, description="Time from the request's bytes to the answer in the router."
    )
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Where the router's time went: decode (decoding, checks, hash), "
        "cache_lookup (the result cache), inspect (the stages, see the trace).",
    )

    @classmethod
    def from_inspection(
        cls,
        inspection: Inspection,
        *,
        request_id: str,
        image_sha256: str,
        image_size: tuple[int, int],
        latency_ms: float,
        cache_hit: bool = False,
        timings_ms: dict[str, float] | None = None,
    ) -> InspectionResult:
        """The answer for a caller, from the flow's typed inspection.

        Args:
            inspection: the flow's answer.
            request_id: unique per answer.
            image_sha256: the hash of the image file sent.
            image_size: ``(width, height)`` of the image: the heatmap is drawn at it.
            latency_ms: time from request to answer.
            cache_hit: whether it came from the result cache.
            timings_ms: the router's time by phase.
        """
        heatmap = inspection.heatmap
        return cls(
            request_id=request_id,
            image_sha256=image_sha256,
            category=inspection.category,
            category_routed=inspection.routed is not None,
            verdict=inspection.verdict,
            anomaly_score=inspection.anomaly_score,
            decided_by=inspection.decided_by,  # type: ignore[arg-type]
            grade=inspection.grade,
            defect_types=[
                DefectTypeScore(
                    name=t.name, score=t.score, description=inspection.descriptions.get(t.name)
                )
                for t in inspection.defect_types
            ],
            boxes=[
                DefectBox(defect_type=b.defect_type, score=b.score, box=b.box)
                for b in inspection.boxes
            ],
            heatmap_png=encode_heatmap(heatmap, image_size) if heatmap is not None else None,
            heatmap_source=inspection.heatmap_source if heatmap is not None else None,  # type: ignore[arg-type]
            trace=[
                StageTrace(
                    stage=run.stage,
                    model_version=run.model_version,
                    latency_ms=run.latency_ms,
                    output=dict(run.output),
                    call_ms=run.call_ms,
                )
                for run in inspection.trace
            ],
            model_versions=dict(inspection.model_versions),
            cache_hit=cache_hit,
            latency_ms=latency_ms,
            timings_ms=dict(timings_ms or {}),
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prediction(self) -> str:
        """``ok``, or the top defect type of a defective part (``defective`` if untyped)."""
        if self.verdict == "ok":
            return "ok"
        return self.defect_types[0].name if self.defect_types else "defective"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def confidence(self) -> float:
        """How sure the verdict is: the anomaly score, or one minus it for good parts."""
        return self.anomaly_score if self.verdict == "defective" else 1.0 - self.anomaly_score

    @computed_field  # type: ignore[prop-decorator]
    @property
    def processing_time(self) -> float:
        """Seconds from request to answer."""
        return self.latency_ms / 1000.0


class InspectRequest(_Schema):
    """A JSON inspection request (the multipart form takes the same fields)."""

    image_base64: str = Field(description="The image file (PNG, JPEG, BMP, TIFF), base64.")
    category: str | None = Field(default=None, description="Omit to let the router name it.")
    explain: bool = Field(
        default=False,
        description="Add the heatmap: the memory bank's anomaly map, or Grad-CAM without one.",
    )
    boxes: bool = Field(default=False, description="Locate the defects (the DEIMv2 localizer).")


class InspectBatchRequest(_Schema):
    """Several images in one request; each is judged on its own."""

    items: list[InspectRequest] = Field(min_length=1, max_length=MAX_BATCH)


class InspectionError(_Schema):
    """Why one image of a batch got no answer (the same status a single request gets)."""

    status: int
    detail: str


class BatchItem(_Schema):
    """One image's answer in a batch: a result or an error, in request order."""

    index: int
    result: InspectionResult | None = None
    error: InspectionError | None = None


class InspectBatchResult(_Schema):
    """The answers of a batch request."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    items: list[BatchItem]


class DefectTypeIn(_Schema):
    """A defect type described in words; the reranker ranks it at once."""

    name: str = Field(description="Lower-case letters, digits, `_` and `-`.")
    description: str = Field(description="One or two sentences saying what it looks like.")
    keywords: list[str] = Field(default_factory=list)
    contrast: str = Field(default="", description="What separates it from its look-alike.")


class DefectTypeOut(DefectTypeIn):
    """A defect type in a category's catalog."""

    source: Literal["trained", "registered"] = Field(
        description="trained: the reranker learnt it; registered: described at run time."
    )


class CategoryInfo(_Schema):
    """A product category the service inspects."""

    category: str
    model_versions: dict[str, str]
    decision_rule: dict[str, float]
    defect_types: list[DefectTypeOut]


class CategoriesResult(_Schema):
    """Every category, and whether images may come without one."""

    categories: list[CategoryInfo]
    router: bool = Field(description="True when a category router can name the category.")
    localizer: bool = Field(description="True when boxes can be asked for.")


class Problem(_Schema):
    """An error answer: the status and what was wrong."""

    detail: str
