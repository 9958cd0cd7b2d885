"""The serving YAML: packaged defaults, a user's file merged over them, clear errors."""

import pytest

from deployments.app import deployment_options
from deployments.config import DEPLOYMENTS, load_serving_config
from models.config import ConfigError
from models.stages import DEPLOYED_STAGES


def test_the_packaged_defaults_cover_every_deployment():
    config = load_serving_config()
    assert set(config.deployments) == set(DEPLOYMENTS)
    detector = config.deployments["detector"]
    assert detector.user_config() == {
        "torch_threads": 1,
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.01,
    }
    options = deployment_options(detector, detector.user_config())
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["max_queued_requests"] == 128 and options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_cpus": 0.425, "num_gpus": 0}
    assert options["logging_config"] == {"enable_access_log": False}
    router = config.deployments["router"]
    assert deployment_options(router, {})["logging_config"] == {"enable_access_log": True}


def test_a_users_file_changes_only_its_keys(tmp_path):
    path = tmp_path / "serving.yaml"
    path.write_text(
        "deployments:\n  detector:\n    batch: {max_batch_size: 24}\n"
        "service:\n  request_timeout_s: 5\n"
    )
    config = load_serving_config(path)
    assert config.deployments["detector"].batch.max_batch_size == 24
    assert config.deployments["detector"].batch.batch_wait_timeout_s == 0.01
    assert config.service.request_timeout_s == 5 and config.service.max_in_flight == 64


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("deployments:\n  detector:\n    batchsize: 3\n", "deployments.detector.batchsize"),
        ("deployments:\n  ranker: {}\n", "deployments.ranker"),
        (
            "deployments:\n  router:\n    autoscaling: {min_replicas: 3, max_replicas: 1}\n",
            "min_replicas 3 > max_replicas 1",
        ),
        ("service:\n  auth: sometimes\n", "service.auth"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_bad_keys_are_named(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_serving_config(path)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_serving_config(tmp_path / "nope.yaml")


def test_the_topology_chooses_the_deployments_and_a_wrong_one_is_refused(tmp_path):
    fused = load_serving_config()
    assert fused.topology == "fused"
    assert fused.deployed() == ("router",) and fused.front() == "router"
    split = load_serving_config(overrides={"topology": "split"})
    assert split.deployed() == ("router", *DEPLOYED_STAGES) and split.front() == "detector"
    path = tmp_path / "serving.yaml"
    path.write_text("topology: merged\n")
    with pytest.raises(ConfigError, match="topology"):
        load_serving_config(path)
