"""The monitoring manifests: the PodMonitor finds the Ray pods' metrics, the dashboard
draws only what the app exports."""

from __future__ import annotations

import copy
import json
import re

import yaml

from cluster.k8s import K8S
from deployments.metrics import EXPORTED
from tests.unit.k8s.test_manifests import OVERLAYS, build_overlay, validate_pod_monitor

MONITORING = K8S / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
POD_MONITOR = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())


def _ray_pods(service: dict) -> list[dict]:
    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(group, group["template"]) for group in groups]


def test_the_pod_monitor_selects_every_ray_pod_and_its_metrics_port():
    [endpoint] = POD_MONITOR["spec"]["podMetricsEndpoints"]
    # Labels that KubeRay puts on every Ray pod, and those the templates give.
    ours = {
        k: v
        for k, v in POD_MONITOR["spec"]["selector"]["matchLabels"].items()
        if not k.startswith("ray.io/")
    }
    assert ours, "the selector must name the service's own pods"
    for folder in [K8S / "base", *OVERLAYS]:
        service = next(d for d in build_overlay(folder) if d["kind"] == "RayService")
        for group, template in _ray_pods(service):
            labels = template.get("metadata", {}).get("labels", {})
            assert ours.items() <= labels.items(), (folder.name, labels)
            [container] = template["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert endpoint["port"] in ports, (folder.name, container["name"], ports)
            exported = int(group["rayStartParams"]["metrics-export-port"])
            assert ports[endpoint["port"]] == exported


def test_the_pod_monitor_schema_catches_mistakes():
    assert validate_pod_monitor(POD_MONITOR) == []
    wrong = copy.deepcopy(POD_MONITOR)
    wrong["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"  # a typo
    wrong["spec"]["selector"] = {}
    errors = validate_pod_monitor(wrong)
    assert any("intervall" in e for e in errors) and any("matchLabels" in e for e in errors)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_inspectray_\w+", expr))


def test_the_dashboard_draws_every_exported_metric_and_nothing_else():
    used: set[str] = set()
    for panel in DASHBOARD["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in _metric_names(target["expr"]):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                kind = EXPORTED.get(base)
                assert kind is not None, f"{panel['title']}: {name} is not exported"
                assert (kind == "histogram") == (base != name), f"{panel['title']}: {name}"
                used.add(base)
    assert used == set(EXPORTED), set(EXPORTED) - used
    # Panels do not overlap on Grafana's 24-column grid.
    cells = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


def test_the_dashboard_ships_as_a_config_map_grafana_loads():
    spec = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    [generated] = spec["configMapGenerator"]
    [entry] = generated["files"]
    key, source = entry.split("=")
    assert key.endswith(".json") and (MONITORING / source).exists()
    assert generated["options"]["labels"] == {"grafana_dashboard": "1"}
    assert spec["resources"] == ["podmonitor.yaml"]
