"""The artifact registry: versioned, self-describing trained models.

Layout, on a local folder or any fsspec URL (``s3://``, ``gs://``, ``memory://``)::

    REGISTRY/<category>/<stage>/<version>/weights.safetensors
    REGISTRY/<category>/<stage>/<version>/manifest.json
    REGISTRY/<category>/<stage>/aliases/<alias>.json      e.g. production.json

Versions are ``v1``, ``v2``, ... per (category, stage). ``manifest.json`` is written
last and acts as the commit marker: a version folder without it is an unfinished
write and is invisible. The manifest carries everything needed to rebuild the
model without outside knowledge (the nanoGPT habit): the config that built it,
its preprocessing, a fingerprint of its training data, its metrics, the sha256
of the weights, and the library versions.

Weights are safetensors, never pickle. Loading verifies the sha256, so a
tampered weights file is refused rather than used.

A finished version may gain files beside its weights (an exported runtime and
its parity record, :mod:`models.runtime`): :meth:`ArtifactRegistry.write_extra`
and :meth:`~ArtifactRegistry.read_extra`; they never change the manifest.

A candidate (retrained on reviews, say) is built beside production without
serving: :class:`StagedRegistry` points the ``candidate`` alias where training
would point ``production``, and reads the candidate first, so the whole
candidate (its models and the decision rule fitted to them) can be judged
before :meth:`StagedRegistry.promote_staged` makes it production.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
PRODUCTION = "production"
CANDIDATE = "candidate"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished, tampered with or malformed."""


class WeightsInfo(BaseModel):
    """The weights file of an artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = WEIGHTS_FILE
    sha256: str
    n_tensors: int
    n_parameters: int


class Manifest(BaseModel):
    """Everything known about one trained artifact (``manifest.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    category: str
    stage: str
    version: str
    created_at: str
    config: dict[str, Any] = Field(description="The config that built the model.")
    preprocessing: dict[str, Any] = Field(description="How images become model input.")
    data: dict[str, Any] = Field(description="Fingerprint of the training data.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsInfo
    libraries: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its manifest and its weights (CPU tensors)."""

    manifest: Manifest
    state_dict: dict[str, torch.Tensor]


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ArtifactError(
            f"invalid {kind} {value!r}: use lowercase letters, digits, '_', '-', '.' (max 64)"
        )
    return value


def _libraries() -> dict[str, str]:
    import timm

    return {"torch": torch.__version__.split("+")[0], "timm": timm.__version__}


class ArtifactRegistry:
    """Read and write artifacts under one root URL.

    Args:
        uri: a local folder or an fsspec URL; created on first write.
        storage_options: passed to fsspec (credentials, endpoint, ...).
    """

    def __init__(self, uri: str, **storage_options: Any) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = "file" in protocols

    def __repr__(self) -> str:
        return f"ArtifactRegistry({self.uri!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- reading ---------------------------------------------------------------------

    def categories(self) -> list[str]:
        """Categories with at least one stage folder."""
        return self._children(self._path())

    def stages(self, category: str) -> list[str]:
        """Stages that have artifacts for ``category``."""
        return self._children(self._path(_check_name("category", category)))

    def versions(self, category: str, stage: str) -> list[str]:
        """Finished versions, oldest first."""
        base = self._path(_check_name("category", category), _check_name("stage", stage))
        found = [v for v in self._children(base) if _VERSION.match(v)]
        finished = [v for v in found if self.fs.exists(f"{base}/{v}/{MANIFEST_FILE}")]
        return sorted(finished, key=lambda v: int(v[1:]))

    def aliases(self, category: str, stage: str) -> dict[str, str]:
        """Alias name → version."""
        base = self._path(category, stage, "aliases")
        out = {}
        for name in self._children(base):
            if name.endswith(".json"):
                out[name[:-5]] = json.loads(self.fs.cat_file(f"{base}/{name}"))["version"]
        return out

    def resolve(self, category: str, stage: str, ref: str = PRODUCTION) -> str:
        """Turn a version (``v3``), an alias (``production``) or ``latest`` into a version.

        Raises:
            ArtifactError: nothing matches; the message lists what exists.
        """
        versions = self.versions(category, stage)
        if not versions:
            raise ArtifactError(f"no artifacts for {category}/{stage} in {self.uri}")
        if ref == "latest":
            return versions[-1]
        if _VERSION.match(ref):
            if ref not in versions:
                raise ArtifactError(f"{category}/{stage} has no version {ref}; it has {versions}")
            return ref
        aliases = self.aliases(category, stage)
        if ref not in aliases:
            raise ArtifactError(
                f"{category}/{stage} has no alias {ref!r}; aliases: {sorted(aliases)}, "
                f"versions: {versions}"
            )
        return aliases[ref]

    def manifest(self, category: str, stage: str, ref: str = PRODUCTION) -> Manifest:
        """The manifest of one artifact, without loading its weights."""
        version = self.resolve(category, stage, ref)
        path = self._path(category, stage, version, MANIFEST_FILE)
        try:
            return Manifest.model_validate_json(self.fs.cat_file(path))
        except ValidationError as error:
            raise ArtifactError(f"malformed manifest {path}: {error}") from error

    def load(self, category: str, stage: str, ref: str = PRODUCTION) -> Artifact:
        """Load an artifact's manifest and weights, verifying the weights' sha256.

        Raises:
            ArtifactError: missing, or the weights do not match the manifest.
        """
        manifest = self.manifest(category, stage, ref)
        path = self._path(category, stage, manifest.version, manifest.weights.file)
        blob = self.fs.cat_file(path)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != manifest.weights.sha256:
            raise ArtifactError(
                f"weights {path} do not match their manifest (sha256 {digest[:12]}... != "
                f"{manifest.weights.sha256[:12]}...): refusing a modified artifact"
            )
        try:
            state = load_safetensors(blob)
        except Exception as error:  # safetensors raises its own error types
            raise ArtifactError(f"{path} is not a valid safetensors file: {error}") from error
        return Artifact(manifest=manifest, state_dict=state)

    # -- writing ---------------------------------------------------------------------

    def save(
        self,
        category: str,
        stage: str,
        state_dict: Mapping[str, torch.Tensor],
        *,
        config: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
        data: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        promote: bool = False,
    ) -> Manifest:
        """Write a new version of ``category``/``stage``.

        Args:
            category: product category, e.g. ``solar_cell_mono``.
            stage: pipeline stage, e.g. ``detector``.
            state_dict: the model's tensors.
            config: the config that built the model (JSON-serializable).
            preprocessing: the preprocessing (``Preprocessing.to_dict()``).
            data: the training data fingerprint (``fingerprint_samples``).
            metrics: validation/test metrics.
            promote: also point the ``production`` alias at it.

        Returns:
            The written manifest (its ``version`` is the new version).
        """
        _check_name("category", category)
        _check_name("stage", stage)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        # safetensors refuses tensors that share storage (tied weights): store copies.
        seen: set[int] = set()
        for key, tensor in tensors.items():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen:
                tensors[key] = tensor.clone()
            seen.add(ptr)
        blob = save_safetensors(tensors)
        weights = WeightsInfo(
            sha256=hashlib.sha256(blob).hexdigest(),
            n_tensors=len(tensors),
            n_parameters=int(sum(t.numel() for t in tensors.values())),
        )
        version = self._claim_version(category, stage)
        base = self._path(category, stage, version)
        manifest = Manifest(
            category=category,
            stage=stage,
            version=version,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            config=json.loads(json.dumps(dict(config))),
            preprocessing=json.loads(json.dumps(dict(preprocessing))),
            data=json.loads(json.dumps(dict(data))),
            metrics=json.loads(json.dumps(dict(metrics or {}))),
            weights=weights,
            libraries=_libraries(),
        )
        self.fs.pipe_file(f"{base}/{WEIGHTS_FILE}", blob)
        # The manifest last: its presence marks the version as complete.
        self._write_json(f"{base}/{MANIFEST_FILE}", manifest.model_dump(mode="json"))
        if promote:
            self.promote(category, stage, version)
        return manifest

    def write_extra(self, manifest: Manifest, name: str, blob: bytes) -> None:
        """Store a file beside a finished version's weights (never its weights or manifest)."""
        if name in (WEIGHTS_FILE, MANIFEST_FILE) or not _NAME.match(name):
            raise ArtifactError(f"cannot write {name!r} beside an artifact")
        base = self._path(manifest.category, manifest.stage, manifest.version)
        self.fs.pipe_file(f"{base}/{name}", blob)

    def read_extra(self, manifest: Manifest, name: str) -> bytes | None:
        """A file stored beside a version's weights, or None when there is none."""
        path = self._path(manifest.category, manifest.stage, manifest.version, name)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

    def promote(self, category: str, stage: str, version: str, alias: str = PRODUCTION) -> None:
        """Point ``alias`` at an existing finished ``version``."""
        _check_name("alias", alias)
        if version not in self.versions(category, stage):
            raise ArtifactError(f"cannot promote {category}/{stage} {version}: no such version")
        self._write_json(
            self._path(category, stage, "aliases", f"{alias}.json"),
            {"version": version, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )

    def drop_alias(self, category: str, stage: str, alias: str) -> bool:
        """Remove ``alias`` (never ``production``); returns whether it existed."""
        if alias == PRODUCTION:
            raise ArtifactError("the production alias is moved by promoting, never dropped")
        path = self._path(category, stage, "aliases", f"{_check_name('alias', alias)}.json")
        if not self.fs.exists(path):
            return False
        self.fs.rm(path)
        return True

    # -- internals -------------------------------------------------------------------

    def _children(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        return sorted(n for n in names if not n.startswith("."))

    def _claim_version(self, category: str, stage: str) -> str:
        base = self._path(category, stage)
        self.fs.makedirs(base, exist_ok=True)
        existing = [int(m.group(1)) for n in self._children(base) if (m := _VERSION.match(n))]
        number = max(existing, default=0) + 1
        if self._local:
            # Local: mkdir is atomic, so concurrent writers never share a version.
            while True:
                try:
                    self.fs.mkdir(f"{base}/v{number}", create_parents=False)
                    return f"v{number}"
                except FileExistsError:
                    number += 1
        # Object stores have no atomic mkdir; folders appear when files are written.
        return f"v{number}"

    def _write_json(self, path: str, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True).encode()
        if self._local:
            # Local: write beside, then rename, so readers never see half a file.
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            # Object stores replace whole objects atomically.
            self.fs.pipe_file(path, data)


class StagedRegistry(ArtifactRegistry):
    """The registry as a candidate is built in: the same store, a different production.

    Promoting points the ``candidate`` alias instead of ``production``, and
    reading production reads the candidate where a stage has one. Training,
    refitting the decision rule and evaluating run unchanged against this view;
    the service, reading the registry itself, goes on serving production.

    Args:
        registry: the registry the candidate is built in.
    """

    def __init__(self, registry: ArtifactRegistry) -> None:
        super().__init__(registry.uri, **registry.storage_options)

    def __repr__(self) -> str:
        return f"StagedRegistry({self.uri!r})"

    def resolve(self, category: str, stage: str, ref: str = PRODUCTION) -> str:  # noqa: D102
        if ref == PRODUCTION and CANDIDATE in self.aliases(category, stage):
            ref = CANDIDATE
        return super().resolve(category, stage, ref)

    def promote(  # noqa: D102
        self, category: str, stage: str, version: str, alias: str = PRODUCTION
    ) -> None:
        super().promote(category, stage, version, CANDIDATE if alias == PRODUCTION else alias)

    def staged(self) -> dict[tuple[str, str], str]:
        """(category, stage) → version, for every stage with a candidate."""
        return {
            (category, stage): version
            for category in self.categories()
            for stage in self.stages(category)
            if (version := self.aliases(category, stage).get(CANDIDATE)) is not None
        }

    def promote_staged(
        self, categories: set[str], last: tuple[str, ...] = ()
    ) -> dict[str, dict[str, str]]:
        """Make these categories' candidates production, dropping their candidate alias.

        Args:
            categories: whose candidates to promote.
            last: stages promoted after the others (the decision rule fitted to
                the models), so a reader never sees a rule without its models.

        Returns:
            category → stage → the version now in production.
        """
        chosen = [(key, v) for key, v in self.staged().items() if key[0] in categories]
        chosen.sort(key=lambda item: item[0][1] in last)
        promoted: dict[str, dict[str, str]] = {}
        for (category, stage), version in chosen:
            ArtifactRegistry.promote(self, category, stage, version)
            self.drop_alias(category, stage, CANDIDATE)
            promoted.setdefault(category, {})[stage] = version
        return promoted

    def discard_staged(self, categories: set[str] | None = None) -> dict[str, dict[str, str]]:
        """Drop the candidate alias (of these categories; None: all); the versions stay.

        Returns:
            category → stage → the candidate version no longer staged.
        """
        dropped: dict[str, dict[str, str]] = {}
        for (category, stage), version in self.staged().items():
            if categories is None or category in categories:
                self.drop_alias(category, stage, CANDIDATE)
                dropped.setdefault(category, {})[stage] = version
        return dropped
