"""The driver's plain parts: the loop config, the schedule, the optimizer, the search space."""

import math
import os

import pytest
import torch
from ray import tune

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
from tune.loop import build_optimizer, improved, warmup_cosine
from tune.ray_env import (
    SERVE_INGRESS_ENV,
    environment,
    serve_ingress_env,
    set_train_poll_env,
    state_api_env,
)
from tune.sweep import BATCH_SIZES, OPTIMIZERS, search_space
from tune.trainer import DEFAULT_LR, TrainSettings, loop_config


def test_loop_config_defaults_and_router_epoch_cap():
    settings = TrainSettings(epochs=12)
    config = loop_config({"stage": "detector"}, settings, threads=2)
    assert config["lr"] == DEFAULT_LR["detector"] and config["epochs"] == 12
    assert config["backbone_lr_scale"] < 1 and config["threads"] == 2
    assert loop_config({"stage": "router"}, settings, threads=1)["epochs"] == 4
    assert loop_config({"stage": "verifier"}, TrainSettings(lr=0.5), 1)["lr"] == 0.5


def test_backbone_learns_slower_than_the_head():
    model = AnomalyDetector(AnomalyDetectorConfig(input_size=32), pretrained=False)
    for name in ("adamw", "sgd"):
        optimizer = build_optimizer(
            model, {"lr": 1e-3, "backbone_lr_scale": 0.1, "optimizer": name, "weight_decay": 0}
        )
        head, backbone = optimizer.param_groups
        assert head["lr"] == pytest.approx(1e-3) and backbone["lr"] == pytest.approx(1e-4)
        assert {id(p) for p in head["params"]} == {id(p) for p in model.head_parameters()}
    with pytest.raises(ValueError, match="adamw or sgd"):
        build_optimizer(
            model, {"lr": 1, "backbone_lr_scale": 1, "optimizer": "lion", "weight_decay": 0}
        )


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) < factor(20) and factor(99) == pytest.approx(0.05, abs=0.01)
    scheduler_lrs = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(100):
        scheduler_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(scheduler_lrs) == pytest.approx(1.0) and min(scheduler_lrs) >= 0.05 - 1e-9


def test_early_stopping_prefers_the_metric_then_the_loss():
    best = {"val_auroc": 0.9, "val_loss": 0.5}
    assert improved({"val_auroc": 0.95, "val_loss": 0.9}, best, "val_auroc")
    assert not improved({"val_auroc": 0.85, "val_loss": 0.1}, best, "val_auroc")
    assert improved({"val_auroc": 0.9, "val_loss": 0.4}, best, "val_auroc")
    assert not improved({"val_auroc": 0.9, "val_loss": 0.6}, best, "val_auroc")
    assert improved({"val_auroc": 0.5, "val_loss": 1.0}, None, "val_auroc")
    assert improved(
        {"val_auroc": 0.5, "val_loss": 1.0}, {"val_auroc": math.nan, "val_loss": 1.0}, "val_auroc"
    )


def test_search_space_is_the_documented_one():
    space = search_space("detector")
    assert isinstance(space["lr"], tune.search.sample.Float)
    samples = [space["lr"].sample() for _ in range(200)]
    low, high = DEFAULT_LR["detector"] / 10, DEFAULT_LR["detector"] * 10
    assert all(low <= s <= high for s in samples)
    # Log-uniform: about half the draws fall below the geometric middle.
    below = sum(s < math.sqrt(low * high) for s in samples)
    assert 60 < below < 140
    assert space["batch_size"].categories == list(BATCH_SIZES) == [8, 16, 32]
    assert space["optimizer"].categories == list(OPTIMIZERS) == ["adamw", "sgd"]


def test_a_cluster_this_process_starts_polls_training_workers_often_unless_told_otherwise(
    monkeypatch,
):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    set_train_poll_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    set_train_poll_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"


def test_a_cluster_this_process_serves_on_takes_requests_through_haproxy_unless_told_otherwise(
    monkeypatch,
):
    for name in SERVE_INGRESS_ENV:
        monkeypatch.delenv(name, raising=False)
    assert serve_ingress_env() == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # Serve's own proxy, by choice
    assert serve_ingress_env() == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    # Applied for the cluster's start only: this process's environment is as it was after.
    with environment(serve_ingress_env()):
        assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ
    # A value overwritten for the block (the bench's Serve-proxy variant) comes back too.
    with environment({"RAY_SERVE_ENABLE_HA_PROXY": "1"}):
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_a_cluster_this_process_starts_tells_its_processes_where_its_state_api_is(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert state_api_env(8312) == {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8312"}
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265")  # the user's, kept
    assert state_api_env(8312) == {}
