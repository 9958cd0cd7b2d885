"""Whether a retrained candidate beats production on the held-out split.

Each retrained stage is judged on the figures it changes, from ``inspectray
eval``'s metrics of the same split, inspected through the flow once with
production and once with the candidate:

- detector, memory bank, verifier: binary accuracy and image AUROC of the verdicts;
- classifier and reranker: defect-type top-1;
- router: the share of parts routed to their category.

A candidate is promoted when it is worse on none of its figures and better on
at least one; a tie keeps production (a retrained model that changes nothing
is not worth a new version in service).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from models.stages import CLASSIFIER, DETECTOR, MEMORY_BANK, RERANKER, ROUTER, VERIFIER

FIGURES: dict[str, tuple[str, ...]] = {
    DETECTOR: ("binary_accuracy", "image_auroc"),
    MEMORY_BANK: ("binary_accuracy", "image_auroc"),
    VERIFIER: ("binary_accuracy", "image_auroc"),
    CLASSIFIER: ("defect_type_top1",),
    RERANKER: ("defect_type_top1",),
    ROUTER: ("router_accuracy",),
}
TOLERANCE = 1e-9  # figures closer than this are equal


def judged_figures(stages: Collection[str]) -> tuple[str, ...]:
    """The figures that judge these retrained stages, in a fixed order.

    Raises:
        ValueError: a stage no held-out figure can judge (the localizer).
    """
    unjudged = sorted(set(stages) - set(FIGURES))
    if unjudged:
        raise ValueError(f"no held-out figure judges the {', '.join(unjudged)}")
    ordered = [f for stage in FIGURES if stage in stages for f in FIGURES[stage]]
    return tuple(dict.fromkeys(ordered))


@dataclass(frozen=True)
class Judgement:
    """Production against the candidate on one held-out split.

    Attributes:
        promoted: whether the candidate beats production.
        reason: why, in words.
        figures: figure → ``{"production": x, "candidate": y}``.
    """

    promoted: bool
    reason: str
    figures: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"promoted": self.promoted, "reason": self.reason, "figures": self.figures}


def judge(
    production: Mapping[str, Any], candidate: Mapping[str, Any], figures: Collection[str]
) -> Judgement:
    """Whether ``candidate``'s metrics beat ``production``'s on ``figures``.

    A figure either side lacks (no defect was typed, say) is shown and not judged.
    """
    table = {f: {"production": production.get(f), "candidate": candidate.get(f)} for f in figures}
    compared = {f: pair for f, pair in table.items() if None not in pair.values()}
    if not compared:
        return Judgement(False, f"the held-out split gives none of {sorted(figures)}", table)
    worse = [f for f, p in compared.items() if p["candidate"] < p["production"] - TOLERANCE]
    better = [f for f, p in compared.items() if p["candidate"] > p["production"] + TOLERANCE]
    if worse:
        return Judgement(False, f"worse on {', '.join(worse)}", table)
    if not better:
        return Judgement(False, f"no better on {', '.join(compared)}", table)
    return Judgement(True, f"better on {', '.join(better)}, worse on none", table)
