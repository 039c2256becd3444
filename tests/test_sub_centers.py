"""Sub-centre ArcFace (issue 19, part 2): margin_cross_entropy(sub_centers=K) and
nn.SubCenterArcFace, against the reference and pytorch-metric-learning."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch

from conftest import AllocationRecorder

CPU_OK = dispatch._status("cpu")[0]
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm", "arcgrad")


def inputs(n=9, d=4, c=5, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c * k, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[3] = -100
    return x, w, y


def margin_of(kind, n, c):
    if kind in ("ldam", "elm"):
        return dict(m=torch.linspace(0.1, 0.4, c, dtype=torch.float64))
    if kind == "sphereface":
        return dict(m=1.5)
    if kind == "combined":
        return dict(m1=1.0, m2=0.3, m3=0.1)
    return {}


def test_reference_is_max_over_sub_centres_then_from_cosine():
    x, w, y = inputs()
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    best = cos.view(9, 5, 3).amax(2)
    torch.testing.assert_close(
        fm.margin_cross_entropy(x, w, y, s=10.0, sub_centers=3, backend="reference"),
        fm.margin_cross_entropy_from_cosine(best, y, s=10.0, backend="reference"))
    # K = 1 is the plain loss
    torch.testing.assert_close(
        fm.margin_cross_entropy(x, w, y, s=10.0, sub_centers=1),
        fm.margin_cross_entropy(x, w, y, s=10.0))


def test_gradcheck_reference_and_gradient_to_the_arg_max():
    x, w, y = inputs(n=5, c=3, k=2)
    x, w = x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: fm.margin_cross_entropy(a, b, y, s=6.0, sub_centers=2, backend="reference"),
        (x, w))
    fm.margin_cross_entropy(x, w, y, s=6.0, sub_centers=2, backend="reference").backward()
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    losers = torch.ones(3, 2, dtype=torch.bool)
    losers.view(-1)[cos.view(5, 3, 2).argmax(2).view(-1) + torch.arange(3).repeat(5) * 2] = False
    assert torch.all(w.grad.view(3, 2, -1)[losers] == 0)  # never the arg-max: no gradient


@needs_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_matches_reference(kind, reduction, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "ROW_BLOCK", 4)  # several row chunks
    x, w, y = inputs()
    cw = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    out = {}
    for backend in ("reference", "cpu"):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fm.margin_cross_entropy(a, b, y, kind=kind, s=8.0, sub_centers=3,
                                       class_weight=cw, reduction=reduction, backend=backend,
                                       **margin_of(kind, 9, 5))
        u = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        out[backend] = (loss,) + torch.autograd.grad((loss * u).sum(), (a, b))
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r, rtol=1e-9, atol=1e-11)


@needs_cpu
@pytest.mark.parametrize("kind", ["arcface", "cosface", "elm"])
def test_cpu_per_sample_margin_with_sub_centres(kind):
    x, w, y = inputs()
    m = torch.linspace(0.1, 0.5, 9, dtype=torch.float64)
    out = {}
    for backend in ("reference", "cpu"):
        a, b, mm = (t.clone().requires_grad_() for t in (x, w, m))
        loss = fm.margin_cross_entropy(a, b, y, kind=kind, s=8.0, m=mm, sub_centers=3,
                                       backend=backend)
        out[backend] = (loss,) + torch.autograd.grad(loss, (a, b, mm))
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r, rtol=1e-9, atol=1e-11)


@needs_cpu
def test_cpu_label_smoothing_served_by_reference():
    x, w, y = inputs()
    torch.testing.assert_close(
        fm.margin_cross_entropy(x, w, y, s=8.0, sub_centers=3, label_smoothing=0.1,
                                backend="cpu"),
        fm.margin_cross_entropy(x, w, y, s=8.0, sub_centers=3, label_smoothing=0.1,
                                backend="reference"))


@needs_cpu
def test_cpu_no_n_by_ck(monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "ROW_BLOCK", 8)
    n, d, c, k = 96, 8, 40, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    with AllocationRecorder() as rec:
        fm.margin_cross_entropy(x, w, y, sub_centers=k, backend="cpu").backward()
    assert max(rec.sizes) < n * c  # row chunks of 8 x C*K at most


def test_argument_checks():
    x, w, y = inputs()
    with pytest.raises(ValueError, match="multiple of 4"):
        fm.margin_cross_entropy(x, w, y, sub_centers=4)
    with pytest.raises(ValueError, match="sub_centers must be >= 1"):
        fm.margin_cross_entropy(x, w, y, sub_centers=0)
    with pytest.raises(ValueError, match="normalize=True"):
        fm.margin_cross_entropy(x, w, y, kind="cosface", sub_centers=3, normalize=False)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):  # labels index classes, not rows of W
        fm.margin_cross_entropy(x, w, torch.full_like(y, 7), sub_centers=3)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_OK else []))
def test_equals_pml_sub_center_arcface(backend):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    n, d, c, k = 40, 6, 4, 3
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    ours = fm.nn.SubCenterArcFace(d, c, sub_centers=k, m=math.radians(28.6),
                                  backend=backend).double()
    ref = pml.SubCenterArcFaceLoss(num_classes=c, embedding_size=d, margin=28.6, scale=64,
                                   sub_centers=k).double()
    ref.W.data = ours.weight.detach().T.clone()  # PML: W [D, C*K], column c*K + k
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    l1, l2 = ours(a, y), ref(b, y)
    torch.testing.assert_close(l1, l2)
    l1.backward(), l2.backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours.weight.grad, ref.W.grad.T)
    got, dom = ours.get_outliers(x, y, threshold=60)
    want, want_dom = ref.get_outliers(x, y, threshold=60)
    assert sorted(got.tolist()) == sorted(want.tolist()) and len(got) > 0
    torch.testing.assert_close(dom, want_dom.T)
    assert torch.equal(ours.get_outliers(x, y, threshold=60, return_dominant_centers=False), got)


def test_module_logits_state_and_repr():
    mod = fm.nn.SubCenterArcFace(4, 5, sub_centers=2)
    assert tuple(mod.weight.shape) == (10, 4) and list(mod.state_dict()) == ["weight"]
    x = torch.randn(3, 4)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(mod.weight).T
    torch.testing.assert_close(mod.logits(x), 64 * cos.view(3, 5, 2).amax(2))
    assert "sub_centers=2" in repr(mod)
    with pytest.raises(ValueError, match="sub_centers"):
        fm.nn.SubCenterArcFace(4, 5, sub_centers=0)


@pytest.mark.skipif(not dispatch._status("triton")[0], reason="triton unavailable")
def test_triton_serves_sub_centres_by_the_reference():
    x, w, y = inputs(dtype=torch.float32)
    dispatch._warned.discard(("margin_cross_entropy", "triton", "sub_centers"))
    with pytest.warns(RuntimeWarning, match="pending"):
        got = fm.margin_cross_entropy(x, w, y, sub_centers=3, backend="triton")
    torch.testing.assert_close(got, fm.margin_cross_entropy(x, w, y, sub_centers=3,
                                                            backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.margin_cross_entropy(x, w, y, sub_centers=3, backend="triton")
