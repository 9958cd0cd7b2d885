import torch
import torch.nn.functional as F

from models.heads import fit_linear


def test_a_fitted_linear_head_is_deterministic_and_its_l2_shrinks_the_weights():
    features = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    target = (features[:, 0] > 0).float()  # the first feature decides

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target)

    head, reached = fit_linear(features, 1, loss, l2=1e-3)
    again, reached_again = fit_linear(features, 1, loss, l2=1e-3)
    assert torch.equal(head.weight, again.weight) and reached == reached_again
    assert reached < 0.3  # below the 0.69 of a zero head
    assert head.weight[0, 0] > 3 * head.weight[0, 1:].abs().max()
    shrunk, reached_shrunk = fit_linear(features, 1, loss, l2=1.0)
    assert shrunk.weight.norm() < head.weight.norm() and reached_shrunk > reached
