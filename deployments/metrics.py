"""The service's own Prometheus metrics, exported through Ray's metrics endpoint.

Ray exports every metric of every process on each node's metrics port (the
``metrics`` URL ``inspectray serve`` prints; on Kubernetes the pods' port
``8080``), with ``ray_`` before its name and Serve's ``deployment``,
``replica`` and ``application`` labels added:

========================================  =========  ======================================
metric                                    type       labels
========================================  =========  ======================================
``ray_inspectray_inspections_total``      counter    category, verdict, decided_by
``ray_inspectray_refusals_total``         counter    status (the HTTP status refused with)
``ray_inspectray_cache_hits_total``       counter    category
``ray_inspectray_anomaly_score``          histogram  category
``ray_inspectray_latency_ms``             histogram  stage (``request``: the whole answer)
``ray_inspectray_in_flight``              gauge
``ray_inspectray_spooled_results``        gauge
``ray_inspectray_review_queue``           gauge
``ray_inspectray_drift_ks``               gauge      category
``ray_inspectray_defective_share``        gauge      category
``ray_inspectray_drifting``               gauge      category (1: drifting)
========================================  =========  ======================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray

from deployments.schemas import InspectionResult

# Latency buckets (ms) around the figures that matter on a line: 35 ms for one
# good part, the 85 ms window of a 2 MP camera on a 1 m/s belt, 170 ms for two.
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 35, 50, 85, 120, 170, 250, 500, 1000, 2500, 5000]
SCORE_BUCKETS = [round(0.05 * i, 2) for i in range(1, 20)]
PREFIX = "inspectray_"
# The names Prometheus sees (Ray puts ``ray_`` first; counters end in ``_total``,
# histograms come as ``_bucket``, ``_count`` and ``_sum``).
EXPORTED = {
    "ray_inspectray_inspections_total": "counter",
    "ray_inspectray_refusals_total": "counter",
    "ray_inspectray_cache_hits_total": "counter",
    "ray_inspectray_anomaly_score": "histogram",
    "ray_inspectray_latency_ms": "histogram",
    "ray_inspectray_in_flight": "gauge",
    "ray_inspectray_spooled_results": "gauge",
    "ray_inspectray_review_queue": "gauge",
    "ray_inspectray_drift_ks": "gauge",
    "ray_inspectray_defective_share": "gauge",
    "ray_inspectray_drifting": "gauge",
}


class InspectionMetrics:
    """The router's metrics (one set per replica process)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.inspections = metrics.Counter(
            f"{PREFIX}inspections",
            description="Inspections answered, by category, verdict and deciding stage.",
            tag_keys=("category", "verdict", "decided_by"),
        )
        self.refusals = metrics.Counter(
            f"{PREFIX}refusals",
            description="Inspections refused, by the HTTP status they were refused with.",
            tag_keys=("status",),
        )
        self.cache_hits = metrics.Counter(
            f"{PREFIX}cache_hits",
            description="Inspections answered from the result cache.",
            tag_keys=("category",),
        )
        self.scores = metrics.Histogram(
            f"{PREFIX}anomaly_score",
            description="Final anomaly scores (0.5 and above: defective), per category.",
            boundaries=SCORE_BUCKETS,
            tag_keys=("category",),
        )
        self.latency = metrics.Histogram(
            f"{PREFIX}latency_ms",
            description="Milliseconds per answer (stage=request) and per stage call.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("stage",),
        )
        self.in_flight = metrics.Gauge(
            f"{PREFIX}in_flight", description="Inspections the replica works on now."
        )
        self.spooled = metrics.Gauge(
            f"{PREFIX}spooled_results",
            description="Results waiting in the replica's spool for Redis to come back.",
        )
        self.review_queue = metrics.Gauge(
            f"{PREFIX}review_queue", description="Answers waiting for a person's review."
        )
        self.drift_ks = metrics.Gauge(
            f"{PREFIX}drift_ks",
            description="KS statistic of the recent ok parts' scores against validation's.",
            tag_keys=("category",),
        )
        self.defective_share = metrics.Gauge(
            f"{PREFIX}defective_share",
            description="Share of the recent parts judged defective.",
            tag_keys=("category",),
        )
        self.drifting = metrics.Gauge(
            f"{PREFIX}drifting",
            description="1 while the category's recent scores drift from validation's.",
            tag_keys=("category",),
        )

    @classmethod
    def in_ray(cls) -> InspectionMetrics | None:
        """The metrics when this process belongs to a Ray cluster (else nothing exports them)."""
        return cls() if ray.is_initialized() else None

    def answered(self, result: InspectionResult) -> None:
        """Count one answer: verdict, score, latency, and each stage's call."""
        category = result.category
        self.inspections.inc(
            1,
            {"category": category, "verdict": result.verdict, "decided_by": result.decided_by},
        )
        self.scores.observe(result.anomaly_score, {"category": category})
        self.latency.observe(result.latency_ms, {"stage": "request"})
        if result.cache_hit:
            self.cache_hits.inc(1, {"category": category})
        for run in result.trace:
            self.latency.observe(run.call_ms or run.latency_ms, {"stage": run.stage})

    def refused(self, status: int) -> None:
        """Count one refused inspection."""
        self.refusals.inc(1, {"status": str(status)})

    def service_state(
        self,
        in_flight: int,
        spooled: int,
        review_queue: int | None,
        drift: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Set the gauges: in flight, the spool, the review queue (None: unknown), drift."""
        self.in_flight.set(in_flight)
        self.spooled.set(spooled)
        if review_queue is not None:
            self.review_queue.set(review_queue)
        for category, status in drift.items():
            tags = {"category": category}
            if status.get("ks") is not None:
                self.drift_ks.set(status["ks"], tags)
            if status.get("defective_share") is not None:
                self.defective_share.set(status["defective_share"], tags)
            self.drifting.set(1.0 if status.get("drifting") else 0.0, tags)


__all__ = ["EXPORTED", "InspectionMetrics"]
