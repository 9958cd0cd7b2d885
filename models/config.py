"""inspectray's configuration: pydantic models, one YAML format, environment overrides.

One file configures everything; every section has defaults, so an empty file (or
none) is valid. Precedence, lowest to highest: defaults → YAML file →
``INSPECTRAY__SECTION__KEY`` variables → the named variables below.

Named environment variables:
    ``INSPECTRAY_CONFIG``    path of the YAML file when none is given explicitly.
    ``INSPECTRAY_REGISTRY``  ``registry.uri`` (a folder or any fsspec URL, e.g. ``s3://bucket/reg``).
    ``REDIS_URL``            ``redis.url``.

Example YAML::

    registry:
      uri: s3://factory-models/inspectray
    redis:
      url: redis://redis.inspectray:6379/0
    data:
      root: /mnt/datasets
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "INSPECTRAY__"
NAMED_ENV = {
    "INSPECTRAY_REGISTRY": ("registry", "uri"),
    "REDIS_URL": ("redis", "url"),
}


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names each bad key."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryConfig(_Section):
    """Where trained artifacts live."""

    uri: str = Field(
        default="registry",
        description="Local folder or fsspec URL (s3://, gs://, memory://) of the registry.",
        min_length=1,
    )


class RedisConfig(_Section):
    """The Redis that holds the result cache, result stream, taxonomy and API keys."""

    url: str = Field(default="redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL.")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class DataConfig(_Section):
    """Where datasets are read from and generated into."""

    root: Path = Field(default=Path("data"), description="Folder for generated and user datasets.")


class SynthConfig(_Section):
    """Defaults of ``inspectray data synth``."""

    images_per_class: int = Field(default=40, ge=4)
    seed: int = 0
    size: int = Field(default=256, ge=64, le=2048)


class InspectrayConfig(_Section):
    """The whole configuration."""

    registry: RegistryConfig = RegistryConfig()
    redis: RedisConfig = RedisConfig()
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()


def format_errors(error: ValidationError, origin: str) -> str:
    """One line per invalid key, by its dotted name, under a line naming the source."""
    lines = [f"invalid configuration ({origin}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def _set_path(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from environment variables (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX):
            keys = tuple(k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k)
            if keys:
                _set_path(tree, keys, yaml.safe_load(value) if value else value)
    for name, keys in NAMED_ENV.items():
        if env.get(name):
            _set_path(tree, keys, env[name])
    return tree


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys, merged section by section."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty one).

    Raises:
        ConfigError: a missing file, invalid YAML, or YAML that is not a mapping.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{what} not found: {path}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from error
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections")
    return loaded or {}


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> InspectrayConfig:
    """Load, merge and validate the configuration.

    Args:
        path: YAML file; default ``$INSPECTRAY_CONFIG`` if set, else none (defaults).
        env: environment to read overrides from; default ``os.environ``.

    Raises:
        ConfigError: unreadable file, YAML that is not a mapping, or invalid
            values; the message names the file and every bad key.
    """
    env = os.environ if env is None else env
    path = path or env.get("INSPECTRAY_CONFIG") or None
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        data = read_yaml(path, "configuration file")
    overrides = env_overrides(env)
    if overrides:
        origin += " + environment"
    try:
        return InspectrayConfig.model_validate(merge(data, overrides))
    except ValidationError as error:
        raise ConfigError(format_errors(error, origin)) from error
