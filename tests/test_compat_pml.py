"""fused_margin.compat.pml against pytorch-metric-learning itself: same W, same
values and gradients, and PML state dicts load both ways."""
import math

import pytest
import torch

from fused_margin.compat import pml as fpml

from conftest import device_for, fused_backends

losses = pytest.importorskip("pytorch_metric_learning.losses")

BACKENDS = [pytest.param("reference", id="reference")] + fused_backends("margin_cross_entropy")
N, D, C = 24, 8, 10

# (our class, PML's class, constructor keywords in PML's units)
CASES = {
    "arcface": (fpml.ArcFaceLoss, "ArcFaceLoss", dict(margin=28.6, scale=64)),
    "arcface-small": (fpml.ArcFaceLoss, "ArcFaceLoss", dict(margin=10.0, scale=8)),
    "cosface": (fpml.CosFaceLoss, "CosFaceLoss", dict(margin=0.35, scale=64)),
    "cosface-small": (fpml.CosFaceLoss, "CosFaceLoss", dict(margin=0.2, scale=10)),
    "normalized-softmax": (fpml.NormalizedSoftmaxLoss, "NormalizedSoftmaxLoss",
                           dict(temperature=0.05)),
    "normalized-softmax-t1": (fpml.NormalizedSoftmaxLoss, "NormalizedSoftmaxLoss",
                              dict(temperature=1.0)),
}


def _inputs(dtype, device):
    x = torch.randn(N, D, dtype=dtype)
    y = torch.randint(0, C, (N,))
    return x.to(device), y.to(device)


def _pair(name, dtype, backend):
    ours_cls, theirs_name, kw = CASES[name]
    theirs = getattr(losses, theirs_name)(num_classes=C, embedding_size=D, **kw)
    ours = ours_cls(num_classes=C, embedding_size=D, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())  # PML's checkpoint, as it is
    device = device_for(backend)
    return ours.to(device, dtype), theirs.to(device, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradients_equal_pml(name, backend):
    dtype = torch.float64
    ours, theirs = _pair(name, dtype, backend)
    x, y = _inputs(dtype, ours.W.device)
    if name.startswith("arcface"):
        # one row past pi - m: ArcFace's monotone fallback, which both use (not at
        # cos = -1 exactly: there ours clamps to -1 + 1e-6, PML to -1)
        w_y = ours.W.detach()[:, y[0]]
        x[0] = -w_y * 3 + 0.1 * w_y.norm() * torch.randn_like(w_y)
        cos0 = torch.nn.functional.cosine_similarity(x[0], w_y, dim=0)
        assert cos0 < math.cos(math.pi - ours.margin) and cos0 > -1 + 1e-3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = ours(xa, y), theirs(xb, y)
    la.backward()
    lb.backward()
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(la, lb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.W.grad, theirs.W.grad, **tol)
    assert ours.W.grad.shape == (D, C)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_pml(name):
    ours, theirs = _pair(name, torch.float32, "auto")
    x, y = _inputs(torch.float32, torch.device("cpu"))
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_get_logits_equal_pml(name):
    ours, theirs = _pair(name, torch.float64, "auto")
    x, _ = _inputs(torch.float64, torch.device("cpu"))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours.get_logits(xa), theirs.get_logits(xb)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_constructor_units_and_layout():
    arc = fpml.ArcFaceLoss(5, 3)
    assert arc.W.shape == (3, 5)
    assert math.isclose(arc.margin, math.radians(28.6)) and arc.scale == 64
    assert fpml.CosFaceLoss(5, 3).margin == 0.35
    assert math.isclose(fpml.NormalizedSoftmaxLoss(5, 3, temperature=0.1)._scale(), 10.0)
    theirs = losses.ArcFaceLoss(num_classes=5, embedding_size=3)
    assert set(arc.state_dict()) == set(theirs.state_dict()) == {"W"}
    theirs.load_state_dict(arc.state_dict())  # and back


def test_unsupported_options_raise():
    with pytest.raises(TypeError, match="does not support"):
        fpml.ArcFaceLoss(5, 3, reducer=object())
    with pytest.raises(TypeError, match="not an argument"):
        fpml.CosFaceLoss(5, 3, margn=0.1)
    loss = fpml.ArcFaceLoss(5, 3)
    with pytest.raises(NotImplementedError):
        loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), indices_tuple=(None,) * 3)


def test_embeddings_dtype_moves_w_like_pml():
    loss = fpml.CosFaceLoss(5, 3)
    out = loss(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert loss.W.dtype == torch.float64 and out.dtype == torch.float64


@pytest.mark.parametrize("backend", [p for p in fused_backends("margin_cross_entropy")
                                     if p.id == "triton"])
def test_triton_reads_w_through_its_strides(backend):
    """PML's W [D, C] goes to the kernels as W.t(): the Triton forward makes no
    [C, D] copy of it (the C++ kernels do, once per forward: see
    bench/bench_compat_layout.py)."""
    from conftest import AllocationRecorder

    n, d, c = 6, 8, 37
    loss_fn = fpml.ArcFaceLoss(c, d, backend=backend)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, c, (n,))
    with AllocationRecorder() as rec:
        loss = loss_fn(x, y)
    # of that shape only the W.t() view itself, and the interpreter's set_ of the
    # kernel arguments (no GPU run makes it): no clone, contiguous, copy or empty
    made = {a.op for a in rec.allocs if a.shape in ((c, d), (d, c))}
    assert made <= {"aten.t", "aten.set_"}, made
    loss.backward()
    assert loss_fn.W.grad.shape == (d, c)
