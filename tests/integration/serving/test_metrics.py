"""What the service tells Prometheus and /healthz: counts of known traffic, and drift."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Mapping

import httpx
import pytest
from PIL import ImageEnhance

from cluster.quickstart import quick_datasets
from deployments.imaging import encode_png
from models.data import read_image
from tests.integration.serving.conftest import MODULE, QUICK, SURFACE

pytestmark = pytest.mark.slow

SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every series of a Prometheus text page: (name, labels, value)."""
    page = httpx.get(url, timeout=30)
    page.raise_for_status()
    found = []
    for line in page.text.splitlines():
        match = SERIES.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL.findall(match["labels"] or ""))
            found.append((match["name"], labels, float(match["value"])))
    return found


def _total(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's series whose labels include ``labels``."""
    return sum(
        value
        for series, have, value in _scrape(url)
        if series == name and all(have.get(k) == v for k, v in labels.items())
    )


def _settled(read: Callable[[], Mapping[str, float]], timeout_s: float = 60) -> dict[str, float]:
    """Figures once two reads 6 s apart agree (Ray exports metrics every few seconds)."""
    deadline = time.monotonic() + timeout_s
    last = dict(read())
    while time.monotonic() < deadline:
        time.sleep(6)
        now = dict(read())
        if now == last:
            return now
        last = now
    raise AssertionError(f"the metrics never settled: {last}")


def _inspect(serving, data: bytes, category: str) -> httpx.Response:
    return httpx.post(
        f"{serving.url}/v1/inspect",
        files={"image": ("part.png", data, "image/png")},
        data={"category": category},
        timeout=120,
    )


def test_prometheus_metrics_count_known_traffic(serving, inspection_images):
    url = serving.urls()["metrics"]
    assert url and url.endswith("/metrics")
    good = inspection_images["synthetic_good"].read_bytes()
    defective = inspection_images["synthetic_defective"].read_bytes()
    names = {
        "ok": ("ray_inspectray_inspections_total", {"category": SURFACE, "verdict": "ok"}),
        "defective": (
            "ray_inspectray_inspections_total",
            {"category": SURFACE, "verdict": "defective"},
        ),
        "hits": ("ray_inspectray_cache_hits_total", {"category": SURFACE}),
        "refused": ("ray_inspectray_refusals_total", {}),
        "scored": ("ray_inspectray_anomaly_score_count", {"category": SURFACE}),
        "answers": ("ray_inspectray_latency_ms_count", {"stage": "request"}),
    }

    def read() -> dict[str, float]:
        return {key: _total(url, name, **labels) for key, (name, labels) in names.items()}

    before = _settled(read)
    # Known traffic: the good part three times and the defective one twice (each
    # after its first from the cache), and a file that is no image.
    for data in (good, good, good, defective, defective):
        assert _inspect(serving, data, SURFACE).status_code == 200
    refused = _inspect(serving, b"no image at all", SURFACE)
    assert refused.status_code in (400, 415, 422)
    deadline = time.monotonic() + 60  # exported every few seconds
    while read()["answers"] - before["answers"] < 5 or read()["refused"] == before["refused"]:
        assert time.monotonic() < deadline, (before, read())
        time.sleep(2)
    after = _settled(read)
    change = {key: after[key] - before[key] for key in names}
    print("metrics scrape, change over the known traffic:", change)
    assert change == {
        "ok": 3,
        "defective": 2,
        "hits": 3,
        "refused": 1,
        "scored": 5,
        "answers": 5,
    }, (before, after)
    refusals = [
        labels["status"]
        for name, labels, value in _scrape(url)
        if name == "ray_inspectray_refusals_total" and value > 0
    ]
    assert str(refused.status_code) in refusals
    stages = {
        labels["stage"]
        for name, labels, value in _scrape(url)
        if name == "ray_inspectray_latency_ms_count" and value > 0
    }
    assert {"request", "detector"} <= stages, stages
    gauges = {name for name, _, _ in _scrape(url)}
    assert {"ray_inspectray_in_flight", "ray_inspectray_spooled_results"} <= gauges


def _drift(serving) -> dict:
    return httpx.get(f"{serving.url}/healthz", timeout=30).json()["drift"][MODULE]


def test_drift_drill_darkened_parts_raise_the_flag_normal_ones_leave_it_down(serving):
    """Normal test cells leave the module type's drift flag down; darkened ones raise it.

    The trained quick set keeps 11 good validation cells of the type, too few for
    the KS statistic: the share judged defective raises the flag.
    """
    _, elpv = quick_datasets(serving.workdir, QUICK)
    test = list(elpv.select(MODULE, "test"))  # grouped by label: draw a line's mix
    random.Random(0).shuffle(test)
    normal, darkened = test[:60], test[60:180]
    assert len(darkened) == 120
    serving.deploy(service={"drift": {"window": 120, "min_parts": 50}})  # fresh windows
    for sample in normal:
        assert _inspect(serving, sample.image_path.read_bytes(), MODULE).status_code == 200
    status = _drift(serving)
    print("drift drill, normal cells:", status)
    assert status["parts"] == 60 and not status["drifting"], status
    for sample in darkened:  # the line's lamp at 30 % of its light
        image = ImageEnhance.Brightness(read_image(sample.image_path).convert("RGB")).enhance(0.3)
        assert _inspect(serving, encode_png(image), MODULE).status_code == 200
    status = _drift(serving)
    print("drift drill, darkened cells:", status)
    assert status["parts"] == 120 and status["drifting"], status
    assert status["defective_share"] > 0.9 and "judged defective" in status["reason"]
    url = serving.urls()["metrics"]
    deadline = time.monotonic() + 60
    while _total(url, "ray_inspectray_drifting", category=MODULE) < 1:
        assert time.monotonic() < deadline, "the drift gauge never rose"
        time.sleep(2)
    serving.deploy(service={"drift": {"window": 400, "min_parts": 50}})
