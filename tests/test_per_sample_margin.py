"""Per-sample margins (issue 19, part 1): m of length N, with its gradient."""
from __future__ import annotations

import warnings

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch

from conftest import AllocationRecorder

CPU_OK = dispatch._status("cpu")[0]
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
KINDS = ("arcface", "cosface", "sphereface", "ldam", "elm")


def inputs(kind, n=7, d=5, c=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[2] = -100
    lo, span = (1.0, 2.5) if kind == "sphereface" else (0.05, 0.6)
    m = lo + span * torch.rand(n, generator=g, dtype=dtype)
    cw = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, w, y, m, cw


def leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_is_the_row_by_row_scalar_loss(kind):
    x, w, y, m, _ = inputs(kind)
    got = fm.margin_cross_entropy(x, w, y, kind=kind, s=10.0, m=m, reduction="none",
                                  backend="reference")
    for i in range(x.shape[0]):
        one = fm.margin_cross_entropy(x[i:i + 1], w, y[i:i + 1], kind=kind, s=10.0,
                                      m=float(m[i]), reduction="none", backend="reference")
        torch.testing.assert_close(got[i:i + 1], one)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_reference(kind):
    x, w, y, m, _ = inputs(kind, n=5, d=4, c=4)
    x, w, m = leaves(x, w, m)
    assert torch.autograd.gradcheck(
        lambda a, b, mm: fm.margin_cross_entropy(a, b, y, kind=kind, s=6.0, m=mm,
                                                 backend="reference"), (x, w, m))


@needs_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_cpu_matches_reference_with_margin_gradient(kind, reduction, fused, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", fused)
    x, w, y, m, cw = inputs(kind)
    out = {}
    for backend in ("reference", "cpu"):
        a, b, mm = leaves(x, w, m)
        loss = fm.margin_cross_entropy(a, b, y, kind=kind, s=10.0, m=mm, class_weight=cw,
                                       reduction=reduction, backend=backend)
        u = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        out[backend] = (loss,) + torch.autograd.grad((loss * u).sum(), (a, b, mm))
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r, rtol=1e-9, atol=1e-11)


@needs_cpu
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_cpu_margin_only_gradient_and_float32(kind):
    x, w, y, m, _ = inputs(kind, dtype=torch.float32)
    out = {}
    for backend in ("reference", "cpu"):
        mm = m.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy(x, w, y, kind=kind, s=10.0, m=mm, backend=backend)
        out[backend] = (loss, torch.autograd.grad(loss, mm)[0])
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("kind", ["arcface", "elm"])
def test_from_cosine_per_sample(kind):
    x, w, y, m, _ = inputs(kind)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    out = {}
    for backend in ("reference", "cpu"):
        cc, mm = leaves(cos, m)
        loss = fm.margin_cross_entropy_from_cosine(cc, y, kind=kind, s=10.0, m=mm,
                                                   backend=backend)
        out[backend] = (loss,) + torch.autograd.grad(loss, (cc, mm))
        with torch.no_grad():  # the kernel path (no margin gradient wanted)
            out[backend + "_ng"] = fm.margin_cross_entropy_from_cosine(
                cos, y, kind=kind, s=10.0, m=m, reduction="none", backend=backend)
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r)
    torch.testing.assert_close(out["cpu_ng"], out["reference_ng"])


@needs_cpu
@pytest.mark.parametrize("grad_m", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_and_smoothed_per_sample(grad_m, smoothing):
    x, w, y, m, _ = inputs("cosface")
    out = {}
    for backend in ("reference", "cpu"):
        a, b, mm = leaves(x, w, m)
        mm.requires_grad_(grad_m)
        loss = fm.margin_cross_entropy(a, b, y, kind="cosface", s=2.0, m=mm, normalize=False,
                                       label_smoothing=smoothing, backend=backend)
        out[backend] = (loss,) + torch.autograd.grad(loss, (a, b) + ((mm,) if grad_m else ()))
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r)


def test_n_equal_c_margin_per():
    x, w, y, m, _ = inputs("cosface", n=6, c=6)
    per_class = fm.margin_cross_entropy(x, w, y, kind="cosface", s=10.0, m=m,
                                        reduction="none", backend="reference")
    m_of_label = torch.where(y >= 0, m[y.clamp(min=0)], torch.zeros_like(m))
    per_sample = fm.margin_cross_entropy(x, w, y, kind="cosface", s=10.0, m=m,
                                         margin_per="sample", reduction="none",
                                         backend="reference")
    torch.testing.assert_close(per_class, fm.margin_cross_entropy(
        x, w, y, kind="cosface", s=10.0, m=m_of_label, margin_per="sample", reduction="none",
        backend="reference"))
    assert not torch.allclose(per_class, per_sample)


def test_argument_checks():
    x, w, y, m, _ = inputs("arcface")  # n=7, c=6
    with pytest.raises(ValueError, match="per class .6. or per sample .7."):
        fm.margin_cross_entropy(x, w, y, m=m[:5])
    with pytest.raises(ValueError, match="margin_per"):
        fm.margin_cross_entropy(x, w, y, m=m, margin_per="row")
    with pytest.raises(ValueError, match="per-sample margin tensor"):
        fm.margin_cross_entropy(x, w, y, kind="combined", m=m)
    with pytest.raises(ValueError, match="per-sample margin tensor"):
        fm.margin_cross_entropy(x, w, y, kind="normface", m=m)
    with pytest.raises(ValueError, match="per class .6. or per sample .7."):
        fm.margin_cross_entropy(x, w, y, m=torch.full((6,), 0.2, dtype=m.dtype),
                                margin_per="sample")
    with pytest.raises(ValueError, match="finite"):
        fm.margin_cross_entropy(x, w, y, m=torch.full_like(m, float("nan")))
    with pytest.raises(ValueError, match="arcface margins"):
        fm.margin_cross_entropy(x, w, y, m=torch.full_like(m, 2.0))
    with pytest.raises(ValueError, match="sphereface"):
        fm.margin_cross_entropy(x, w, y, kind="sphereface", m=torch.full_like(m, -1.0))


@needs_cpu
def test_cpu_no_n_by_c_with_margin_gradient(monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "ROW_BLOCK", 16)
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 16)
    n, d, c = 128, 8, 96
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c, d, generator=g, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    m = (0.2 + 0.3 * torch.rand(n, generator=g)).requires_grad_(True)
    for fused in (True, False):
        monkeypatch.setattr(cpu, "FUSED", fused)
        with AllocationRecorder() as rec:
            loss = fm.margin_cross_entropy(x, w, y, m=m, backend="cpu")
            loss.backward()
        assert max(rec.sizes) < n * c
        assert m.grad is not None and bool(torch.isfinite(m.grad).all())
        m.grad = None


@pytest.mark.skipif(not dispatch._status("triton")[0], reason="triton unavailable")
def test_triton_serves_per_sample_by_the_reference():
    x, w, y, m, _ = inputs("arcface", dtype=torch.float32)
    dispatch._warned.discard(("margin_cross_entropy", "triton", "per-sample margins"))
    with pytest.warns(RuntimeWarning, match="pending"):
        got = fm.margin_cross_entropy(x, w, y, m=m, backend="triton")
    torch.testing.assert_close(got, fm.margin_cross_entropy(x, w, y, m=m, backend="reference"))
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        fm.margin_cross_entropy(x, w, y, m=m, backend="triton")
