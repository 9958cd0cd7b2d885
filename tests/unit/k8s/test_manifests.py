"""Every manifest in k8s/ validated offline.

The Ray kinds against the OpenAPI v3 schema inside KubeRay's CRDs (v1.7.0,
``../shared/k8s-schemas/`` or ``$INSPECTRAY_K8S_SCHEMAS``), strictly: a field
the schema does not name is an error, as it would be silently pruned by the
API server. The core kinds with kubernetes-validate (strict). The embedded
``serveConfigV2`` with Serve's own config schema, and against what
``inspectray k8s render`` generates.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.k8s import K8S, TARGETS, render_all
from tune.ray_env import SERVE_INGRESS_ENV

KUBERNETES_VERSION = "1.37.0"
# Where the KubeRay CRDs are: $INSPECTRAY_K8S_SCHEMAS, or a `shared/k8s-schemas`
# beside the checkout, or the workplace's copy.
_CANDIDATES = [
    Path(os.environ["INSPECTRAY_K8S_SCHEMAS"])
    if os.environ.get("INSPECTRAY_K8S_SCHEMAS")
    else None,
    Path(__file__).resolve().parents[3].parent / "shared" / "k8s-schemas",
    Path("/work/shared/k8s-schemas"),
]
SCHEMAS = next(
    (p for p in _CANDIDATES if p is not None and (p / "ray.io_rayservices.yaml").exists()),
    _CANDIDATES[1],
)
CRDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
PATCHES = {"overlays/gpu/serve-config.yaml"}  # partial documents kustomize merges


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        name = str(path.relative_to(K8S))
        if path.name == "kustomization.yaml" or name in PATCHES or path.name == "serving.yaml":
            continue
        for i, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document:
                found.append((f"{name}#{i}", document))
    return found


DOCUMENTS = _documents()


def _crd_schema(kind: str) -> dict[str, Any]:
    path = SCHEMAS / CRDS[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    crd = yaml.safe_load(path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Keys the schema does not name (the API server would drop them silently)."""
    problems = []
    if isinstance(value, dict) and schema.get("type") == "object":
        named = schema.get("properties")
        if named is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key, item in value.items():
                if key not in named:
                    problems.append(f"{where}.{key}")
                else:
                    problems += unknown_fields(item, named[key], f"{where}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                problems += unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return problems


def validate_ray(document: dict[str, Any]) -> list[str]:
    """Schema errors and unknown fields of a RayCluster, RayJob or RayService."""
    schema = _crd_schema(document["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]
    body = {k: v for k, v in document.items() if k not in ("apiVersion", "kind", "metadata")}
    return errors + [f"unknown field {f}" for f in unknown_fields(body, schema)]


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
# The Prometheus Operator's PodMonitor (monitoring.coreos.com/v1), the fields
# this project uses, strictly: a misspelt field is an error here, not a silently
# ignored one there.
POD_MONITOR = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": _strict(
            {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
            ("name",),
        ),
        "spec": _strict(
            {
                "jobLabel": {"type": "string"},
                "namespaceSelector": _strict(
                    {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    }
                ),
                "selector": _strict({"matchLabels": _LABELS}, ("matchLabels",)),
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "relabelings": {
                                "type": "array",
                                "items": _strict(
                                    {
                                        "sourceLabels": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                        "targetLabel": {"type": "string"},
                                        "action": {"type": "string"},
                                    }
                                ),
                            },
                        },
                        ("port",),
                    ),
                },
            },
            ("selector", "podMetricsEndpoints"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def validate_pod_monitor(document: dict[str, Any]) -> list[str]:
    """Schema errors of a PodMonitor."""
    validator = jsonschema.Draft7Validator(POD_MONITOR)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def _pointer(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in path.strip("/").split("/")]


def apply_json6902(document: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """The ``remove``/``replace``/``add`` operations kustomize's patches use here."""
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node = document
        for part in parents:
            node = node[part]
        if operation["op"] == "remove":
            del node[last]
        elif operation["op"] == "replace":
            _ = node[last]  # replace needs the target to exist (KeyError/IndexError if not)
            node[last] = operation["value"]
        elif operation["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else last, operation["value"])
            else:
                node[last] = operation["value"]
        else:
            raise ValueError(f"unsupported patch op {operation['op']!r}")


def merge_patch(document: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic-merge patch of plain mappings (what serve-config.yaml is)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            merge_patch(document[key], value)
        else:
            document[key] = value


def build_overlay(folder: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl apply -k folder`` would send, built in Python."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        target = folder / resource
        if target.is_dir():
            documents += build_overlay(target)
        else:
            documents += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for patch in spec.get("patches", []):
        if "path" in patch:
            body = yaml.safe_load((folder / patch["path"]).read_text())
            [document] = [
                d
                for d in documents
                if d["kind"] == body["kind"] and d["metadata"]["name"] == body["metadata"]["name"]
            ]
            merge_patch(document, {k: v for k, v in body.items() if k != "metadata"})
        else:
            selector = patch["target"]
            for document in documents:
                if document["kind"] == selector["kind"] and (
                    document["metadata"]["name"]
                    == selector.get("name", document["metadata"]["name"])
                ):
                    apply_json6902(document, yaml.safe_load(patch["patch"]))
    return documents


OVERLAYS = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))


@pytest.mark.parametrize("folder", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_each_overlay_builds_valid_manifests(folder):
    documents = build_overlay(folder)
    service = next(d for d in documents if d["kind"] == "RayService")
    assert validate_ray(service) == []
    for document in documents:
        if document["kind"] not in CRDS:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    if folder.name == "cpu-only":
        assert set(groups) == {"cpu"} and groups["cpu"]["maxReplicas"] == 16
    if folder.name == "gpu":
        assert groups["gpu"]["minReplicas"] == 1
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        [detector] = [
            d for d in config["applications"][0]["deployments"] if d["name"] == "AnomalyDetector"
        ]
        assert detector["ray_actor_options"]["num_gpus"] == 0.25


@pytest.mark.parametrize("folder", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_every_serving_node_takes_requests_through_haproxy_as_a_local_cluster_does(folder):
    service = next(d for d in build_overlay(folder) if d["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {name: env.get(name) for name in SERVE_INGRESS_ENV} == SERVE_INGRESS_ENV


def test_there_are_manifests_of_every_kind():
    kinds = {document["kind"] for _, document in DOCUMENTS}
    assert kinds >= {"RayService", "RayJob", "RayCluster", "Secret", "Service", "StatefulSet"}


@pytest.mark.parametrize(("name", "document"), DOCUMENTS, ids=[n for n, _ in DOCUMENTS])
def test_each_manifest_is_valid(name, document):
    if document["kind"] in CRDS:
        assert document["apiVersion"] == "ray.io/v1"
        assert validate_ray(document) == []
    elif document["kind"] == "PodMonitor":
        assert validate_pod_monitor(document) == []
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validators_catch_mistakes():
    service = copy.deepcopy(next(d for _, d in DOCUMENTS if d["kind"] == "RayService"))
    service["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True  # a typo
    del service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    errors = validate_ray(service)
    assert any("enableInTreeAutoscalling" in e for e in errors)
    assert any("'template' is a required property" in e for e in errors)
    redis = copy.deepcopy(next(d for _, d in DOCUMENTS if d["kind"] == "StatefulSet"))
    redis["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(redis, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("manifest", "serving"), TARGETS, ids=[str(t[0].name) for t in TARGETS])
def test_the_serve_config_is_valid_for_serve(manifest, serving):
    document = yaml.safe_load(manifest.read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(document["spec"]["serveConfigV2"]))
    [app] = config.applications
    assert app.import_path == "deployments.app:build_app"
    names = {d.name for d in app.deployments}
    # The app is built on the cluster from its arguments: they name the topology.
    topology = app.args["overrides"]["topology"]
    if serving is None:  # the CPU cluster: the default, fused topology
        assert names == {"Router"} and topology == "fused"
    else:  # the GPU overlay: split, each stage on its share of a GPU
        assert names == {
            "Router",
            "AnomalyDetector",
            "MemoryBank",
            "AutoencoderVerifier",
            "DefectClassifier",
            "DefectLocalizer",
            "Reranker",
        }
        assert yaml.safe_load(serving.read_text())["topology"] == topology == "split"
    for deployment in app.deployments:
        assert deployment.autoscaling_config["max_replicas"] >= 1
        assert deployment.max_queued_requests > 0


def test_the_committed_serve_configs_are_what_the_code_generates():
    stale = [name for name, fresh in render_all(check=True).items() if not fresh]
    assert stale == [], f"run `inspectray k8s render`; stale: {stale}"
