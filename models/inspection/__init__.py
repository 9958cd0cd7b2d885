"""The one inspection flow: plan, typed stage answers, stage calls, and the flow itself.

Serving (through ``DeploymentHandle``s), evaluation and the naive baseline (in
this process) all inspect with :func:`~models.inspection.flow.inspect`.
"""

from models.inspection.answers import (
    DEFECTIVE,
    OK,
    TRACE_ORDER,
    Banked,
    Box,
    Classified,
    Detected,
    Inspection,
    Located,
    RankedType,
    Reranked,
    Routed,
    StageRun,
    Verified,
)
from models.inspection.flow import (
    Coverage,
    InspectionRefused,
    InspectionRequest,
    StageCalls,
    inspect,
)
from models.inspection.local import Batcher, LocalInspector, LocalStageCalls
from models.inspection.plan import CategoryModels, InspectionPlan, load_plan

__all__ = [
    "DEFECTIVE",
    "OK",
    "TRACE_ORDER",
    "Banked",
    "Batcher",
    "Box",
    "CategoryModels",
    "Classified",
    "Coverage",
    "Detected",
    "Inspection",
    "InspectionPlan",
    "InspectionRefused",
    "InspectionRequest",
    "LocalInspector",
    "LocalStageCalls",
    "Located",
    "RankedType",
    "Reranked",
    "Routed",
    "StageCalls",
    "StageRun",
    "Verified",
    "inspect",
    "load_plan",
]
