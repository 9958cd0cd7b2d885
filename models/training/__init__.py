"""What each model family needs to be trained, in plain PyTorch.

A :class:`~models.training.base.TrainingFamily` builds its model, its datasets,
its loss and its validation metrics; the Ray Train loop in ``tune/`` runs any
family the same way (distribution, checkpoints, early stopping, warm-up). Every
stage that :data:`models.stages.STAGES` declares has one (:data:`FAMILIES`).
"""

from models.training import families, localizer_family, memory_bank_family  # noqa: F401 - they register
from models.training.base import FAMILIES, TrainingFamily, build_family

__all__ = ["FAMILIES", "TrainingFamily", "build_family"]
