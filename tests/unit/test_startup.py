"""What a process loads before it starts working.

Every training worker imports the training loop, every replica the flow, and
every command the command line; seconds of imports there are paid per run, per
replica start and per command. Each check runs a fresh interpreter.
"""

import subprocess
import sys

import pytest

from tests.unit.test_layering import ROOT


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    "command", [["train", "--help"], ["config", "show"], ["data", "show", "--dataset", "elpv"]]
)
def test_commands_that_need_no_model_answer_without_loading_torch(command):
    code = (
        "import contextlib, io\n"
        "from cluster.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    assert main({command!r}) == 0"
    )
    assert _loaded(code, ("torch", "ray", "timm")) == []


@pytest.mark.parametrize("module", ["tune.loop", "deployments.app"])
def test_clip_and_the_box_detector_library_load_only_where_those_stages_are_built(module):
    assert _loaded(f"import {module}", ("open_clip", "transformers")) == []
