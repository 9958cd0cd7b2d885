import torch
import torch.nn.functional as F

from models.anomaly_detector import AnomalyDetector, AnomalyDetectorConfig
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


def test_a_detectors_fitted_head_weighs_defects_by_pos_weight():
    config = AnomalyDetectorConfig(input_size=32, head="fitted")
    detector = AnomalyDetector(config, pretrained=False).eval()
    width = detector.head[-1].in_features
    features = torch.randn(200, width, generator=torch.Generator().manual_seed(0))
    targets = (features[:, 0] + 0.5 * features[:, 1] > 1.0).float()  # about one in six defective
    detector.fit_head(features, targets, pos_weight=1.0)
    plain = detector.head(features).squeeze(-1).detach()
    summary = detector.fit_head(features, targets, pos_weight=5.0)
    weighted = detector.head(features).squeeze(-1).detach()
    assert summary["images"] == 200 and summary["train_loss"] < 0.5
    # Weighting defects five times raises the defects' scores, and the goods' with them.
    defects = targets == 1
    assert weighted[defects].mean() > plain[defects].mean() + 0.5
    assert weighted[~defects].mean() > plain[~defects].mean()
    assert ((weighted > 0).float() == targets).float().mean() > 0.85  # it separates them
