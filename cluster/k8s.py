"""The RayService's ``serveConfigV2``, generated from the app builder and the serving YAML.

``inspectray k8s render`` writes it into ``k8s/base/ray-service.yaml``;
``inspectray k8s render --check`` (and a test) fails when the committed manifest
differs from what the code would generate, so the manifest cannot drift from
``deployments/serving.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deployments.app import (
    DEPLOYMENT_NAMES,
    AppArgs,
    deployment_options,
    serve_config,
    user_config,
)
from deployments.config import GRPC_PORT, GRPC_SERVICER, load_serving_config

K8S = Path(__file__).resolve().parent.parent / "k8s"
# Each manifest whose serveConfigV2 is generated, with the serving YAML merged
# over the packaged one for it (None: the packaged one alone).
TARGETS: tuple[tuple[Path, Path | None], ...] = (
    (K8S / "base" / "ray-service.yaml", None),
    (K8S / "overlays" / "gpu" / "serve-config.yaml", K8S / "overlays" / "gpu" / "serving.yaml"),
)
# Where the cluster keeps things: the registry in object storage (the training
# RayJob writes it), Redis from the REDIS_URL the pods get from a Secret, the
# spool on each pod's volume.
CLUSTER_ARGS = AppArgs(
    registry="s3://inspectray-models/registry",
    redis_url=None,
    overrides={"service": {"spool_dir": "/home/ray/spool"}},
)


def serve_config_v2(serving_config: str | Path | None = None) -> str:
    """The ``serveConfigV2`` text: the app and every deployment's options.

    Args:
        serving_config: a serving YAML merged over the packaged one.
    """
    args = CLUSTER_ARGS.model_copy(
        update={"config": str(serving_config) if serving_config else None}
    )
    serving = load_serving_config(serving_config, args.overrides)
    # The app is built on the cluster from the packaged YAML and these arguments:
    # the topology and runtimes travel in them (the deployments' options below).
    layout = {"topology": serving.topology, "runtimes": dict(serving.runtimes)}
    args = args.model_copy(update={"overrides": args.overrides | layout})
    config = serve_config(args)
    config["grpc_options"] = {"port": GRPC_PORT, "grpc_servicer_functions": [GRPC_SERVICER]}
    application = config["applications"][0]
    application["args"] = args.model_dump(exclude_none=True, exclude={"config"})
    deployments = []
    for key in serving.deployed():  # the ingress and the topology's model deployments
        name = DEPLOYMENT_NAMES[key]
        options = deployment_options(serving.deployments[key], user_config(serving, key))
        deployments.append({"name": name, **_plain(options)})
    application["deployments"] = deployments
    return yaml.safe_dump(config, sort_keys=False, width=100)


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Serve's option names as the config file spells them, YAML-ready."""
    return {k: v for k, v in options.items() if v is not None}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded serve config) as ``|`` blocks: readable diffs."""


def _block(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _block)


def render_all(check: bool = False) -> dict[str, bool]:
    """Render (or, with ``check``, compare) every generated manifest.

    Returns:
        manifest path (relative to ``k8s/``) → whether it was already up to date.
    """
    return {
        str(manifest.relative_to(K8S)): render(manifest, serving, check)
        for manifest, serving in TARGETS
    }


def render(manifest: Path, serving_config: Path | None = None, check: bool = False) -> bool:
    """Write (or, with ``check``, compare) one manifest's ``serveConfigV2``.

    Returns:
        True when the manifest was already up to date.
    """
    text = manifest.read_text()
    document = yaml.safe_load(text)
    wanted = serve_config_v2(serving_config)
    current = document["spec"].get("serveConfigV2")
    if current == wanted:
        return True
    if check:
        return False
    document["spec"]["serveConfigV2"] = wanted
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    body = yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, width=100)
    manifest.write_text(header + body)
    return False
