from __future__ import annotations

from pathlib import Path

import pytest

from models.config import ConfigError, InspectrayConfig, env_overrides, load_config


def test_defaults_without_file_or_env() -> None:
    config = load_config(None, env={})
    assert config == InspectrayConfig()
    assert config.registry.uri == "registry"
    assert config.redis.url.startswith("redis://")


def test_yaml_file_sets_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("registry:\n  uri: s3://bucket/reg\ndata:\n  root: /mnt/data\n")
    config = load_config(path, env={})
    assert config.registry.uri == "s3://bucket/reg"
    assert config.data.root == Path("/mnt/data")
    assert config.redis == InspectrayConfig().redis  # untouched sections keep defaults


def test_named_environment_variables_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("registry:\n  uri: from-file\nredis:\n  url: redis://file:1/0\n")
    env = {"INSPECTRAY_REGISTRY": "memory://reg", "REDIS_URL": "redis://10.0.0.5:6380/1"}
    config = load_config(path, env=env)
    assert config.registry.uri == "memory://reg"
    assert config.redis.url == "redis://10.0.0.5:6380/1"


def test_generic_nested_overrides_are_typed() -> None:
    env = {"INSPECTRAY__SYNTH__SEED": "7", "INSPECTRAY__SYNTH__SIZE": "128"}
    assert env_overrides(env) == {"synth": {"seed": 7, "size": 128}}
    config = load_config(None, env=env)
    assert config.synth.seed == 7 and config.synth.size == 128


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  size: 128\n")
    assert load_config(None, env={"INSPECTRAY_CONFIG": str(path)}).synth.size == 128


def test_errors_name_every_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  size: 10\n  sead: 3\nredis:\n  url: http://x\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    message = str(error.value)
    assert str(path) in message
    for key in ("synth.size", "synth.sead", "redis.url"):
        assert key in message


def test_bad_env_override_names_key_and_origin() -> None:
    with pytest.raises(ConfigError, match=r"(?s)environment.*synth.images_per_class"):
        load_config(None, env={"INSPECTRAY__SYNTH__IMAGES_PER_CLASS": "many"})


@pytest.mark.parametrize(
    ("content", "match"),
    [("- a\n- b\n", "mapping"), ("registry: [unclosed\n", "not valid YAML")],
)
def test_malformed_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path, env={}) == InspectrayConfig()
