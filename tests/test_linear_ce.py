"""margin_cross_entropy's linear mode (normalize=False), bias and label_smoothing
(issue 18): plain linear cross-entropy equals torch.nn.functional.cross_entropy
(x @ W.T + b, ...) for every reduction, class weights, ignore_index and label
smoothing; M-Softmax's lowered target; label smoothing on every kind (cpu vs the
reference); gradcheck; no N x C buffer on the cpu backend; the Triton backend's
reference fallback; nn.LinearCrossEntropy / nn.MSoftmax."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin import dispatch

from conftest import AllocationRecorder, NativeAllocationRecorder

CPU_OK = dispatch._status("cpu")[0]
BACKENDS = ["reference"] + ([pytest.param("cpu")] if CPU_OK else
                            [pytest.param("cpu", marks=pytest.mark.skip("no C++ extension"))])
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=5e-3, atol=1e-3)}
KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm", "arcgrad")


def inputs(n=23, d=6, c=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[n // 2] = y[-1] = -100
    cw = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, y, cw


def grads(out, leaves):
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return torch.autograd.grad((out * u.to(out)).sum(), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_bias,use_weight,eps", list(itertools.product(
    (False, True), (False, True), (0.0, 0.3))))
def test_linear_equals_torch_cross_entropy(backend, reduction, use_bias, use_weight, eps):
    x, w, b, y, cw = inputs()
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    bias = b if use_bias else None
    weight = cw if use_weight else None
    want = F.cross_entropy(x @ w.T + (b if use_bias else 0), y, weight=weight, ignore_index=-100,
                           label_smoothing=eps, reduction=reduction)
    got = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=bias,
                                  class_weight=weight, ignore_index=-100, label_smoothing=eps,
                                  reduction=reduction, backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    use = leaves if use_bias else leaves[:2]
    for g, h in zip(grads(got, use), grads(want, use)):
        torch.testing.assert_close(g, h, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_low_precision(backend, dtype):
    x, w, b, y, cw = inputs(dtype=dtype)
    got = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=b,
                                  label_smoothing=0.1, backend=backend)
    assert got.dtype == torch.float32
    want = F.cross_entropy(x.float() @ w.float().T + b.float(), y, label_smoothing=0.1)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cosface", "ldam"])
def test_msoftmax_lowers_the_target(backend, kind):
    x, w, b, y, cw = inputs()
    s = 2.0
    m = torch.rand(11, dtype=torch.float64) * 0.5 if kind == "ldam" else 0.35
    valid = y != -100
    yy = torch.where(valid, y, 0)
    z = s * (x @ w.T + b)
    mm = m[yy] if isinstance(m, torch.Tensor) else torch.full((23,), m, dtype=torch.float64)
    z = z - (s * mm * valid)[:, None] * F.one_hot(yy, 11)
    want = F.cross_entropy(z, y, weight=cw, label_smoothing=0.2)
    got = fm.margin_cross_entropy(x, w, y, kind=kind, s=s, m=m, normalize=False, bias=b,
                                  class_weight=cw, label_smoothing=0.2, backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_label_smoothing_every_kind_cpu_matches_reference(kind, reduction, fused, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", fused)
    x, w, b, y, cw = inputs()
    kw = dict(kind=kind, s=4.0, m=0.3, class_weight=cw, label_smoothing=0.2, reduction=reduction)
    if kind == "sphereface":
        kw["m"] = 1.35
    if kind == "combined":
        kw.update(m1=1.0, m2=0.3, m3=0.1)
    if kind == "ldam":
        kw["m"] = torch.rand(11, dtype=torch.float64) * 0.4
    out = {}
    for backend in ("reference", "cpu"):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy(xl, wl, y, backend=backend, **kw)
        out[backend] = [loss.detach()] + list(grads(loss, (xl, wl)))
    for a, c in zip(out["cpu"], out["reference"]):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


def test_label_smoothing_definition_on_margined_logits():
    # the reference: F.cross_entropy's smoothing on the arcface logits themselves
    x, w, b, y, cw = inputs()
    from fused_margin.reference import angular as ref
    logits = ref.margin_logits(ref.cosine(x, w), y, kind="arcface", s=8.0, m=0.4)
    want = F.cross_entropy(logits, y, weight=cw, label_smoothing=0.25)
    got = fm.margin_cross_entropy(x, w, y, kind="arcface", s=8.0, m=0.4, class_weight=cw,
                                  label_smoothing=0.25, backend="reference")
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_linear(backend):
    x, w, b, y, cw = inputs(n=6, d=3, c=4)
    y[3] = 2  # one ignored row left (the last)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]

    def fn(a, ww, bb):
        return fm.margin_cross_entropy(a, ww, y, kind="cosface", s=1.5, m=0.3, normalize=False,
                                       bias=bb, class_weight=cw[:4], label_smoothing=0.15,
                                       reduction="none", backend=backend)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    x, w, b, y, cw = inputs(n=4)
    b.requires_grad_(True)
    y = torch.full((4,), -100)
    loss = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=b,
                                   label_smoothing=0.1, backend=backend)
    assert float(loss.detach()) == 0.0
    (gb,) = torch.autograd.grad(loss, (b,))
    assert float(gb.abs().sum()) == 0.0
    e = fm.margin_cross_entropy(x[:0], w, y[:0], kind="normface", s=1.0, normalize=False,
                                bias=b, backend=backend)
    assert float(e.detach()) == 0.0


def test_argument_checks():
    x, w, b, y, cw = inputs()
    for kind in ("arcface", "sphereface", "combined", "elm", "arcgrad"):
        with pytest.raises(ValueError, match="normalize=False"):
            fm.margin_cross_entropy(x, w, y, kind=kind, normalize=False)
    with pytest.raises(ValueError, match="bias"):
        fm.margin_cross_entropy(x, w, y, kind="normface", bias=b)
    with pytest.raises(ValueError):
        fm.margin_cross_entropy(x, w, y, kind="normface", normalize=False, bias=b[:3])
    with pytest.raises(ValueError):
        fm.margin_cross_entropy(x, w, y, label_smoothing=1.5)


# ------------------------------------------------------------------ memory (cpu)

@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
@pytest.mark.parametrize("mode", ["fused", "tiled", "no_grad"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_linear_no_n_by_c(mode, reduction, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", mode == "fused")
    monkeypatch.setattr(cpu, "ROW_BLOCK", None)
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 4096)
    monkeypatch.setattr(cpu, "ROW_SCRATCH_BYTES", 4096)
    n, d, c = 256, 8, 64
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
    b, y = torch.randn(c, generator=g), torch.randint(0, c, (n,), generator=g)
    grad = mode != "no_grad"
    for t in (x, w, b):
        t.requires_grad_(grad)
    with NativeAllocationRecorder() as rec, AllocationRecorder() as rec2:
        with torch.set_grad_enabled(grad):
            loss = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False,
                                           bias=b, label_smoothing=0.1, reduction=reduction,
                                           backend="cpu")
        if grad:
            loss.backward(torch.ones_like(loss))
    assert any("linear_ce" in op for op in rec2.ops)
    assert 16 * c * 4 in rec.bytes  # the capped scratch, seen by the recorder
    assert max(rec.bytes) < n * c * 4
    assert max(rec2.sizes) < n * c


# ------------------------------------------------------------------ triton fallback

@pytest.mark.skipif(not dispatch._status("triton")[0], reason="triton unavailable")
def test_triton_serves_linear_mode_by_the_reference():
    x, w, b, y, cw = inputs()
    dispatch._warned.discard(("margin_cross_entropy", "triton",
                              "normalize=False / bias / label_smoothing"))
    with pytest.warns(RuntimeWarning, match="pending"):
        got = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=b,
                                      backend="triton")
    torch.testing.assert_close(got, F.cross_entropy(x @ w.T + b, y))
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        fm.margin_cross_entropy(x, w, y, kind="arcface", label_smoothing=0.1, backend="triton")


# ------------------------------------------------------------------ modules

def test_linear_cross_entropy_module():
    torch.manual_seed(0)
    mod = fm.nn.LinearCrossEntropy(6, 11)
    assert mod.bias is None  # bias off by default, as torch's LinearCrossEntropyLoss
    x, _, _, y, _ = inputs(dtype=torch.float32)
    torch.testing.assert_close(mod(x, y), F.cross_entropy(x @ mod.weight.T, y))
    mb = fm.nn.LinearCrossEntropy(6, 11, bias=True, label_smoothing=0.1)
    torch.testing.assert_close(mb(x, y), F.cross_entropy(F.linear(x, mb.weight, mb.bias), y,
                                                         label_smoothing=0.1))
    mb(x, y).backward()
    assert mb.bias.grad is not None and mb.weight.grad is not None
    torch.testing.assert_close(mb.logits(x), F.linear(x, mb.weight, mb.bias))
    ms = fm.nn.MSoftmax(6, 11, m=0.5)
    z = (x @ ms.weight.T).detach()
    valid = y != -100
    z = z - 0.5 * F.one_hot(torch.where(valid, y, 0), 11) * valid[:, None]
    torch.testing.assert_close(ms(x, y), F.cross_entropy(z, y))


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
def test_cpu_signature_matches_reference():
    import inspect

    from fused_margin.cpu import angular as cpu
    from fused_margin.reference import angular as ref
    assert inspect.signature(cpu.margin_cross_entropy) == inspect.signature(ref.margin_cross_entropy)
