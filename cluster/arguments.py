"""What every command reads from its arguments and how it prints its answer.

Shared by :mod:`cluster.cli` and the command modules it registers, so none of
them imports another's private helpers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic and the registry load only when a command runs
    from models.artifacts import ArtifactRegistry
    from models.config import InspectrayConfig

Command = Callable[[argparse.Namespace], int]


def print_json(payload: Any) -> None:
    """A command's answer: indented JSON on stdout."""
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def settings(args: argparse.Namespace) -> InspectrayConfig:
    """The configuration in effect (``--config`` file, environment, defaults)."""
    from models.config import load_config

    return load_config(args.config)


def dataset_choices() -> list[str]:
    """The dataset names ``--dataset`` takes."""
    from models.data import DATASETS

    return list(DATASETS)


def dataset_root(args: argparse.Namespace) -> Path | None:
    """``--root``, else the synthetic dataset's configured folder, else None (packaged)."""
    if args.root:
        return Path(args.root)
    if args.dataset == "synthetic":
        return settings(args).data.root / "synthetic"
    return None


def registry(args: argparse.Namespace) -> ArtifactRegistry:
    """The registry ``--registry`` names, else the configured one."""
    from models.artifacts import ArtifactRegistry

    return ArtifactRegistry(args.registry or settings(args).registry.uri)


def add_command(
    subcommands: argparse._SubParsersAction, name: str, func: Command
) -> argparse.ArgumentParser:
    """A subcommand running ``func``; its help is the first line of ``func``'s docstring."""
    command = subcommands.add_parser(name, help=(func.__doc__ or "").splitlines()[0])
    command.set_defaults(func=func)
    return command
