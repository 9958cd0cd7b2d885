"""The per-worker training loop, the same for every model family.

Runs on each Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``); the
driver is :mod:`tune.trainer`. Ray touch points are marked ``# Ray:``.

A family fitted without gradients (the memory bank) makes one pass instead
(:func:`fit_without_gradients`).

Per epoch: train (DDP through ``prepare_model`` / ``prepare_data_loader``; AMP on
GPU; linear warm-up then cosine decay; the backbone at a lower learning rate than
the head), validate on the whole validation set, decide on early stopping, and
report the metrics with a checkpoint. The checkpoint carries the optimizer, the
scheduler and the best weights so far, so a restarted worker group
(``FailureConfig``) resumes from the last finished epoch and ends where an
uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from models.training import build_family

CHECKPOINT_FILE = "checkpoint.pt"


def build_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) with two groups: backbone at ``backbone_lr_scale``."""
    lr = config["lr"]
    groups = [
        {"params": list(model.head_parameters()), "lr": lr},
        {"params": list(model.backbone_parameters()), "lr": lr * config["backbone_lr_scale"]},
    ]
    groups = [g for g in groups if g["params"]]
    name = config["optimizer"].lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(
            groups, momentum=0.9, nesterov=True, weight_decay=config["weight_decay"]
        )
    raise ValueError(f"optimizer must be adamw or sgd, got {config['optimizer']!r}")


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """Learning-rate factor: linear warm-up, then cosine decay to 5 %."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def improved(metrics: dict[str, float], best: dict[str, float] | None, monitor: str) -> bool:
    """Higher monitored metric wins; a tie (within 1e-4) goes to the lower validation loss."""
    if best is None:
        return True
    value, best_value = metrics[monitor], best[monitor]
    if math.isnan(best_value) or value > best_value + 1e-4:
        return True
    return abs(value - best_value) <= 1e-4 and metrics["val_loss"] < best["val_loss"]


def _to_device(target: Any, device: torch.device) -> Any:
    """A batch's targets on ``device``: a tensor, or one dict of tensors per image."""
    if isinstance(target, torch.Tensor):
        return target.to(device)
    return [{k: v.to(device) for k, v in item.items()} for item in target]


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, so every worker stops at the same epoch."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one family on this worker; see the module docstring.

    ``config`` keys: ``family`` (the :func:`models.training.build_family` spec),
    ``lr``, ``batch_size``, ``optimizer``, ``weight_decay``, ``backbone_lr_scale``,
    ``epochs``, ``warmup_epochs``, ``patience``, ``threads``, ``seed``.
    """
    context = ray.train.get_context()  # Ray: rank and world size
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(config.get("seed", 0))
    family = build_family(config["family"])
    if family.gradient_free:  # fitted in one pass, not trained
        fit_without_gradients(family, config, rank, world)
        return
    label = f"{family.stage}/{family.category}"

    model = family.build_model(pretrained=True)
    train_ds, val_ds = family.datasets(model)
    loss_fn = family.loss(train_ds)
    batch_size = int(config["batch_size"])
    collate = getattr(family, "collate", None)  # families with per-image box targets
    train_loader = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_ds) > batch_size,
        collate_fn=collate,
    )
    val_loader = DataLoader(val_ds, batch_size=16, collate_fn=collate)
    train_loader = ray.train.torch.prepare_data_loader(train_loader)  # Ray: DistributedSampler
    val_loader = ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False)
    device = ray.train.torch.get_device()  # Ray: this worker's device
    use_amp = device.type == "cuda"
    # Channels-last runs EfficientNet's depthwise convolutions faster on CPU and GPU.
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # Ray: device + DDP (gloo CPU / NCCL GPU)
    core = getattr(model, "module", model)

    optimizer = build_optimizer(core, config)
    epochs = int(config["epochs"])
    steps_per_epoch = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(epochs * steps_per_epoch, int(config["warmup_epochs"] * steps_per_epoch)),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state: dict[str, Any] = {"epoch": 0, "best": None, "best_state": None, "stale": 0}
    history: list[dict[str, float]] = []
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()  # Ray: set after a worker-group restart
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
        core.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in ("epoch", "best", "best_state", "stale")}
        history = saved["history"]
        resumed_from = state["epoch"]
        if rank == 0:
            print(f"[{label}] resumed from the checkpoint of epoch {resumed_from}", file=sys.stderr)

    for epoch in range(state["epoch"], epochs):
        started = time.perf_counter()
        # Each epoch's shuffle and dropout draw from a seed of its own, so a run
        # resumed from a checkpoint repeats the epochs the uninterrupted run would.
        torch.manual_seed(int(config.get("seed", 0)) * 1_000_003 + epoch)
        train_ds.set_epoch(epoch)
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        total, seen = 0.0, 0
        for images, target in train_loader:
            if images.ndim == 4:  # multi-view batches are laid out by their loss
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(model, images, _to_device(target, device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach()) * len(target)
            seen += len(target)
        train_seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "train_loss": total / max(1, seen)}
        metrics |= family.evaluate(core, val_loader)
        metrics |= {
            "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - started,
            "resumed_from": resumed_from,
            "world_size": world,
        }
        history.append(metrics)
        if family.keeps_last_epoch or improved(metrics, state["best"], family.monitor):
            state["best"], state["stale"] = dict(metrics), 0
            state["best_state"] = {
                k: v.detach().cpu().clone() for k, v in core.state_dict().items()
            }
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        stop = _broadcast_flag(state["stale"] >= int(config["patience"]))
        metrics["best_" + family.monitor] = state["best"][family.monitor]
        if rank == 0:
            print(
                f"[{label}] epoch {epoch + 1}/{epochs} loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} {family.monitor} "
                f"{metrics[family.monitor]:.4f} ({metrics['epoch_seconds']:.1f}s, {world} worker"
                f"{'s' if world > 1 else ''})" + (" early stop" if stop else ""),
                file=sys.stderr,  # the driver's stdout carries the command's JSON
                flush=True,
            )
        with tempfile.TemporaryDirectory() as folder:
            saved_checkpoint = None
            if rank == 0:  # one copy of the weights; the other ranks report metrics only
                payload = {
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    **state,
                }
                torch.save(payload, os.path.join(folder, CHECKPOINT_FILE))
                saved_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved_checkpoint)  # Ray: metrics + checkpoint
        if stop:
            break


def fit_without_gradients(family: Any, config: dict[str, Any], rank: int, world: int) -> None:
    """A gradient-free family's one pass (a memory bank, a fitted head): no epochs.

    Every worker describes its share of the training images (Ray's distributed
    sampler splits them); rank 0 gathers every description, fits the model,
    validates it and reports it with a checkpoint the driver reads as it reads
    a trained one. (One worker needs none of this: :func:`fit_in_one_pass`.)
    """
    started = time.perf_counter()
    device = ray.train.torch.get_device()  # Ray: this worker's device
    model = family.build_model(pretrained=True).to(device)
    train_ds, val_ds = family.datasets(model)
    loader = DataLoader(train_ds, batch_size=int(config["batch_size"]))
    loader = ray.train.torch.prepare_data_loader(loader)  # Ray: each worker its share
    features = _gather_rows(family.features(model, loader), device)
    metrics: dict[str, Any] = {"epoch": 1, "train_loss": 0.0, "world_size": world}
    saved_checkpoint = None
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            payload = _fitted(family, model, features, val_ds, started, world)
            metrics = payload["best"]
            torch.save(payload | {"epoch": 1, "stale": 0}, os.path.join(folder, CHECKPOINT_FILE))
            saved_checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved_checkpoint)  # Ray: metrics + checkpoint


def fit_in_one_pass(config: dict[str, Any]) -> dict[str, Any]:
    """A gradient-free family fitted by one process (a plain Ray task, not a worker group).

    Same ``config`` as :func:`train_loop_per_worker`; returns the payload a
    checkpoint of the worker group would hold (``best_state``, ``best``, ``history``).
    Starting a worker group costs about 20 s here, far more than fitting a small
    memory bank or patch classifier.
    """
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(config.get("seed", 0))
    family = build_family(config["family"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = family.build_model(pretrained=True).to(device)
    train_ds, val_ds = family.datasets(model)
    loader = DataLoader(train_ds, batch_size=int(config["batch_size"]))
    features = family.features(model, loader)
    return _fitted(family, model, features, val_ds, started, world=1)


def _fitted(
    family: Any,
    model: torch.nn.Module,
    features: torch.Tensor,
    val_ds: Any,
    started: float,
    world: int,
) -> dict[str, Any]:
    """Fit a gradient-free model on its training features, validate it, and say so."""
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"epoch": 1, "train_loss": 0.0, "world_size": world}
    val_loader = DataLoader(val_ds, batch_size=16)
    fitted = family.fit(model, features, val_loader)
    metrics |= {k: v for k, v in fitted.items() if isinstance(v, (int, float))}
    metrics |= family.evaluate(model, val_loader)
    metrics |= {
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - started,
        "resumed_from": 0,
    }
    rows = "patches" if "patches" in metrics else "images"
    print(
        f"[{family.stage}/{family.category}] fitted on {metrics.get(rows, 0)} {rows}; "
        f"{family.monitor} {metrics[family.monitor]:.4f} ({metrics['epoch_seconds']:.1f}s, "
        f"{world} worker{'s' if world > 1 else ''})",
        file=sys.stderr,
        flush=True,
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"model": state, "history": [metrics], "best": metrics, "best_state": state}


def _gather_rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every worker's rows ``(N_i, C)``, concatenated in rank order (on every worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=device))
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros(max(sizes), rows.shape[1], device=device)
    padded[: len(rows)] = rows.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n].cpu() for part, n in zip(parts, sizes, strict=True)])
