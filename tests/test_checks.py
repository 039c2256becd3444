"""fused_margin/checks.py: the input checks every public function and module runs
before any backend (issue 15 item 8: clear errors, never a bare OverflowError, a
TorchScript type message, a LinAlgError in backward or NaN from a scalar that
float32 cannot hold)."""
import pytest
import torch

import fused_margin as fm
from fused_margin import nn as fnn

F = fm.functional
# the checks run before dispatch: the reference and one fused backend are enough
BACKENDS = ["reference", "cpu"]


def _mce():
    return torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 4, 2])


def _dist():
    k = 3
    cost = torch.ones(k, k) - torch.eye(k)
    return torch.randn(4, k), torch.softmax(torch.randn(4, k), 1), cost


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,match", [
    (lambda be: F.margin_cross_entropy(*_mce(), ignore_index=2 ** 64, backend=be), "int64"),
    (lambda be: F.margin_cross_entropy(*_mce(), ignore_index=2 ** 63, backend=be), "int64"),
    (lambda be: F.margin_cross_entropy(*_mce(), ignore_index=-(2 ** 63) - 1, backend=be),
     "ignore_index must be >="),
    (lambda be: F.margin_cross_entropy_from_cosine(torch.rand(4, 5), _mce()[2],
                                                   ignore_index=2 ** 64, backend=be), "int64"),
    (lambda be: F.weighted_cross_entropy(torch.randn(4, 5), _mce()[2], torch.ones(5),
                                         ignore_index=2 ** 63, backend=be), "int64"),
    (lambda be: F.wasserstein_loss(torch.randn(4, 5), _mce()[2], torch.ones(5, 5),
                                   ignore_index=2 ** 64, backend=be), "int64"),
    (lambda be: F.knn_std(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]),
                          torch.randn(3, 3), n_neighbors=2 ** 63, backend=be), "int64"),
    (lambda be: F.sinkhorn(torch.full((2, 3), 1 / 3), torch.full((2, 3), 1 / 3),
                           torch.ones(3, 3), n_iter=2 ** 63, backend=be), "int64"),
    (lambda be: F.wasserstein_loss(*_dist(), eps=1e-50, backend=be), "eps = 1e-50 is too small"),
    (lambda be: F.sinkhorn(torch.full((2, 3), 1 / 3), torch.full((2, 3), 1 / 3),
                           torch.ones(3, 3), eps=1e-300, backend=be), "too small"),
    (lambda be: F.margin_cross_entropy(*_mce(), s=1e300, backend=be), "s = 1e\\+300 is too large"),
    (lambda be: F.margin_cross_entropy(*_mce(), s=10 ** 400, backend=be), "s must be finite"),
    (lambda be: F.soft_nearest_neighbor_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]),
                                             temperature=1e-300, backend=be), "too small"),
    (lambda be: F.triplet_margin_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]),
                                      margin=1e300, backend=be), "too large"),
])
def test_clear_errors(call, match, backend):
    with pytest.raises(ValueError, match=match):
        call(backend)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fnn.WassersteinLoss(cost=[[0.0, 1.0], [1.0, 0.0]]), TypeError, "torch.Tensor"),
    (lambda: fnn.WassersteinLoss(torch.ones(2, 3)), ValueError, "square"),
    (lambda: fnn.WassersteinLoss(torch.ones(2, 2), eps=-1.0), ValueError, "eps"),
    (lambda: fnn.WassersteinLoss(torch.ones(2, 2), n_iter=0), ValueError, "n_iter"),
    (lambda: fnn.WassersteinLoss(torch.ones(2, 2), reduction="avg"), ValueError, "reduction"),
    (lambda: fnn.ArcFace(4, 3, s=float("nan")), ValueError, "s must be finite"),
    (lambda: fnn.ArcFace(4, 3, m=3.0), ValueError, "pi/2"),
    (lambda: fnn.ArcFace(4, 3, backend="gpu"), ValueError, "backend"),
    (lambda: fnn.ArcFace(4, 3, reduction="avg"), ValueError, "reduction"),
    (lambda: fnn.MarginLoss(4, 3, kind="bogus"), ValueError, "kind"),
    (lambda: fnn.MarginLoss(4, 3, class_weight=torch.ones(2)), ValueError, "per class"),
    (lambda: fnn.MarginLoss(4, 3, ignore_index=2 ** 64), ValueError, "int64"),
    (lambda: fnn.MarginLoss(4.5, 3), TypeError, "in_features"),
    (lambda: fnn.MarginLoss(0, 3), ValueError, "in_features"),
    (lambda: fnn.SphereFace(4, 3, m=-1.0), ValueError, ">= 0"),
    (lambda: fnn.CombinedMargin(4, 3, m1=0.0), ValueError, "m1 > 0"),
    (lambda: fnn.CenterLoss(3, 4, reduction="avg"), ValueError, "reduction"),
    (lambda: fnn.CenterLoss(0, 4), ValueError, "num_classes"),
    (lambda: fnn.Sigma2R(3, 4, n_neighbors=0), ValueError, "n_neighbors"),
    (lambda: fnn.Sigma2R(3, 4, z=-1.0), ValueError, "z"),
    (lambda: fnn.TripletMarginLoss(mining="easy"), ValueError, "mining"),
    (lambda: fnn.TripletMarginLoss(distance="l1"), ValueError, "distance"),
    (lambda: fnn.TripletMarginLoss(margin=-1.0), ValueError, "margin"),
    (lambda: fnn.SoftNearestNeighborLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: fnn.SoftNearestNeighborLoss(temperature=1e-300), ValueError, "too small"),
])
def test_module_constructors_validate(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bounds_leave_ordinary_values_alone():
    x, W, y = _mce()
    assert torch.isfinite(F.margin_cross_entropy(x, W, y, s=1e30, kind="cosface", m=0.1,
                                                 backend="reference"))
    assert torch.isfinite(F.wasserstein_loss(*_dist(), eps=1e-30, backend="reference"))
