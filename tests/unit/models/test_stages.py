"""The stage registry: each stage is declared once, and every list of stages reads it."""

import dataclasses
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster.cli import build_parser
from cluster.k8s import serve_config_v2
from deployments.app import DEPLOYMENT_NAMES
from deployments.config import DEPLOYMENTS, load_serving_config
from deployments.stages import STAGE_DEPLOYMENTS
from models.artifacts import ArtifactError
from models.stages import DEPLOYED_STAGES, SHARED_STAGES, STAGES, build_stage, stage
from models.training import FAMILIES


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_builds_its_model_and_has_a_training_family(name):
    declared = STAGES[name]
    assert dataclasses.is_dataclass(declared.config_type)
    assert FAMILIES[name].stage == name
    if declared.deployment:
        assert STAGE_DEPLOYMENTS[name].name == declared.deployment
        assert DEPLOYMENT_NAMES[name] == declared.deployment


def test_the_localizer_is_built_from_a_stored_config_by_its_stage_name():
    config = {
        "defect_types": ["crack"],
        "input_size": 64,
        "hidden_dim": 32,
        "decoder_layers": 2,
        "num_queries": 4,
        "num_denoising": 0,
        "training": {"family": "localizer"},
    }
    model = build_stage("localizer", config)
    assert isinstance(model, STAGES["localizer"].model_type)
    with pytest.raises(ArtifactError, match="unknown stage 'painter'"):
        stage("painter")


def test_the_command_line_the_serving_yaml_and_the_manifests_follow_the_registry():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    train_choices = commands["train"]._actions[1].choices
    assert list(train_choices) == [*STAGES, "all"]
    sweep_choices = commands["tune"]._actions[1].choices
    assert set(sweep_choices) == {n for n, s in STAGES.items() if s.sweepable}
    assert set(load_serving_config().deployments) == set(DEPLOYMENTS)
    assert set(DEPLOYMENTS) == {"router", *DEPLOYED_STAGES}
    rendered = yaml.safe_load(serve_config_v2())  # the default topology: fused
    assert [d["name"] for d in rendered["applications"][0]["deployments"]] == ["Router"]
    split = yaml.safe_dump({"topology": "split"})
    path = Path(tempfile.mkdtemp()) / "serving.yaml"
    path.write_text(split)
    rendered = yaml.safe_load(serve_config_v2(path))
    names = [d["name"] for d in rendered["applications"][0]["deployments"]]
    assert names == ["Router", *(STAGES[n].deployment for n in DEPLOYED_STAGES)]
    assert set(SHARED_STAGES) == {"router", "localizer"}
