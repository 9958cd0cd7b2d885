"""What each model family needs to be trained, in plain PyTorch.

A :class:`~models.training.families.TrainingFamily` builds its model, its datasets,
its loss and its validation metrics; the Ray Train loop in ``tune/`` runs any family
the same way (distribution, checkpoints, early stopping, warm-up).
"""

from models.training.families import FAMILIES, TrainingFamily, build_family

__all__ = ["FAMILIES", "TrainingFamily", "build_family"]
