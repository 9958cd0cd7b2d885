"""Settings of the Ray clusters this process starts (a light module: no Ray import)."""

from __future__ import annotations

import os

# Ray Train's controller polls its workers every 2 s by default, and a run's start
# and its end each wait on polls: polled four times a second, a short run ends about
# 5 s sooner (README, "Training, sweeping and evaluating"). The polls are cheap
# actor calls; a missed one is tolerated for minutes as before.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def set_train_poll_env() -> None:
    """Before this process starts a Ray cluster: its training runs poll 4x a second.

    The Ray processes inherit this process's environment; a cluster started
    elsewhere (``RAY_ADDRESS``, KubeRay) keeps its own setting, and a value the
    user set wins.
    """
    for name, value in TRAIN_POLL_ENV.items():
        os.environ.setdefault(name, value)
