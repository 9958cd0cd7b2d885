"""Editing annotation files in place, for the loaders' bad-input tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rewrite_json(path: Path, edit: Callable[[Any], None]) -> None:
    """Load ``path``, let ``edit`` change the payload in place, write it back."""
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
