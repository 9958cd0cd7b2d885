"""Linear heads fitted in one pass on a frozen backbone's features.

A stage's head (the category router's, a supervised detector's) is either trained
by the training loop's optimizer over epochs of augmented images, or fitted in one
pass: the training images' pooled features, computed once, fit a linear layer by
L-BFGS in seconds (:func:`fit_linear`). A fitted head needs no epochs and no
augmentation; it judges less well than a head trained with the backbone's later
blocks, and is ready in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TRAINED, FITTED = "trained", "fitted"
HEADS = (TRAINED, FITTED)


def fit_linear(
    features: torch.Tensor,
    outputs: int,
    data_loss: Callable[[torch.Tensor], torch.Tensor],
    l2: float,
    steps: int = 200,
) -> tuple[nn.Linear, float]:
    """A linear layer ``(N, F) -> (N, outputs)`` fitted to ``features`` by L-BFGS.

    It minimises ``data_loss(logits)`` plus ``l2`` times the squared weights (which
    keeps the logits finite where the classes separate), from zero weights, so the
    fit is deterministic.

    Returns:
        The layer and the ``data_loss`` it reaches.
    """
    features = features.float()
    head = nn.Linear(features.shape[1], outputs)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data_loss(head(features)) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    with torch.no_grad():
        return head, float(data_loss(head(features)))
