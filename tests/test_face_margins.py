"""MagFace and ElasticFace modules over the fused kernel's per-sample margins (issue 19)."""
from __future__ import annotations

import math

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch

CPU_OK = dispatch._status("cpu")[0]
BACKENDS = ["reference"] + (["cpu"] if CPU_OK else [])


def data(n=8, d=4, c=5, scale=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=g)
    y[0] = -100
    return x, y


def arcface_logits(x, w, y, m):
    """The target logit cos(theta + m_i) with insightface's fallback, eagerly."""
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    cy = cos.gather(1, y[:, None])[:, 0].clamp(-1 + 1e-6, 1 - 1e-6)
    t = torch.where(cy > torch.cos(math.pi - m), torch.cos(torch.acos(cy) + m),
                    cy - m * torch.sin(m))
    return cos.scatter(1, y[:, None], t[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_magface_is_its_equation(backend):
    x, y = data()
    mod = fm.nn.MagFace(4, 5, backend=backend).double()
    a = x.norm(dim=1).clamp(10, 110)
    m = (0.8 - 0.45) / (110 - 10) * (a - 10) + 0.45
    v = y != -100
    z = 64 * arcface_logits(x[v], mod.weight, y[v], m[v])
    want = torch.nn.functional.cross_entropy(z, y[v]) + 35 * (1 / a[v] + a[v] / 110 ** 2).mean()
    torch.testing.assert_close(mod(x, y), want)


def test_magface_gradient_flows_through_the_magnitude():
    x, y = data(n=5, c=3, scale=2.0)
    mod = fm.nn.MagFace(4, 3, s=8.0, l_a=0.5, u_a=6.0, backend="reference").double()
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: mod(a, y), (x,))
    g_full, = torch.autograd.grad(mod(x, y), x)
    # the same loss with the margin held fixed has another gradient
    a = mod.magnitude(x).detach()
    fixed = fm.margin_cross_entropy(x, mod.weight, y, s=8.0, m=mod.margin(a),
                                    margin_per="sample", backend="reference") \
        + mod.lambda_g * (1 / mod.magnitude(x) + mod.magnitude(x) / 36)[y != -100].mean()
    g_fixed, = torch.autograd.grad(fixed, x)
    assert not torch.allclose(g_full, g_fixed)


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
def test_magface_cpu_matches_reference():
    x, y = data()
    out = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        mod = fm.nn.MagFace(4, 5, backend=backend).double()
        xx = x.clone().requires_grad_()
        loss = mod(xx, y)
        out[backend] = (loss,) + torch.autograd.grad(loss, (xx, mod.weight))
    for r, c in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(c, r)


@pytest.mark.parametrize("variant,kind", [("arc", "arcface"), ("cos", "cosface")])
@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_draws_and_equals_the_per_sample_loss(variant, kind, plus):
    x, y = data(n=10)
    mods = [fm.nn.ElasticFace(4, 5, variant=variant, plus=plus,
                              generator=torch.Generator().manual_seed(7)).double()
            for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    m, std = {("arc", False): (0.5, 0.05), ("arc", True): (0.5, 0.0175),
              ("cos", False): (0.35, 0.05), ("cos", True): (0.35, 0.02)}[(variant, plus)]
    assert (mods[0].m, mods[0].std, mods[0].kind) == (m, std, kind)
    l0 = mods[0](x, y)
    torch.testing.assert_close(l0, mods[1](x, y))  # same generator seed, same draws
    g = torch.Generator().manual_seed(7)
    draws = mods[1].draw_margins(x, y)  # the next draw of mods[1]'s generator ...
    again = fm.nn.ElasticFace(4, 5, variant=variant, plus=plus, generator=g).double()
    again.load_state_dict(mods[0].state_dict())
    first = again.draw_margins(x, y)  # ... differs from its first
    assert not torch.equal(first, draws)
    torch.testing.assert_close(l0, fm.margin_cross_entropy(
        x, mods[0].weight, y, kind=kind, s=64.0, m=first, margin_per="sample"))
    if plus:  # the closest sample to its centre gets the smallest margin
        v = y != -100
        cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(mods[0].weight).T
        cy = cos.gather(1, y.clamp(min=0)[:, None])[:, 0]
        order = torch.argsort(cy[v], descending=True)
        assert torch.all(torch.diff(first[v][order]) >= 0)
    mods[0].eval()  # eval: the mean margin, deterministic
    torch.testing.assert_close(mods[0](x, y), fm.margin_cross_entropy(
        x, mods[0].weight, y, kind=kind, s=64.0, m=m))


def test_elasticface_arguments():
    with pytest.raises(ValueError, match="variant"):
        fm.nn.ElasticFace(4, 5, variant="sphere")
    with pytest.raises(ValueError, match="std"):
        fm.nn.ElasticFace(4, 5, std=-1.0)
    with pytest.raises(ValueError, match="l_a < u_a"):
        fm.nn.MagFace(4, 5, l_a=10, u_a=5)
    mod = fm.nn.ElasticFace(4, 5, m=0.4, std=0.0)
    x, y = data()
    torch.testing.assert_close(mod.draw_margins(x, y), torch.full((8,), 0.4, dtype=x.dtype))
    assert "variant='arc'" in repr(mod) and "lambda_g=35" in repr(fm.nn.MagFace(4, 5))


# ------------------------------------------------------------------ AdaFace

def adaface_target(cy, r, m):
    theta = torch.acos(cy.clamp(-1 + 1e-6, 1 - 1e-6))
    return torch.cos(torch.clip(theta - m * r, 1e-3, math.pi - 1e-3)) - (m * r + m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaface_kind_is_its_equation(backend):
    x, y = data(n=9)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    r = torch.rand(9, generator=g, dtype=torch.float64) * 2 - 1
    x[1] = w[y[1]] * 3  # theta = 0: the clip at eps
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    v = y != -100
    cy = cos[v].gather(1, y[v][:, None])[:, 0]
    z = 10 * cos[v].scatter(1, y[v][:, None], adaface_target(cy, r[v], 0.4)[:, None])
    got = fm.margin_cross_entropy(x, w, y, kind="adaface", s=10.0, m=r, m2=0.4,
                                  margin_per="sample", backend=backend)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(z, y[v]))


def test_adaface_gradcheck_reference():
    x, y = data(n=5, c=3, scale=1.0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    r = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, rr: fm.margin_cross_entropy(a, b, y, kind="adaface", s=6.0, m=rr, m2=0.4,
                                                 backend="reference"), (x, w, r))


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
@pytest.mark.parametrize("fused", [True, False])
def test_adaface_kind_cpu_matches_reference(fused, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", fused)
    x, y = data(n=9)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    r = torch.rand(9, generator=g, dtype=torch.float64) * 2 - 1
    x[1] = w[y[1]] * 3
    out = {}
    for backend in ("reference", "cpu"):
        a, b, rr = (t.clone().requires_grad_() for t in (x, w, r))
        loss = fm.margin_cross_entropy(a, b, y, kind="adaface", s=10.0, m=rr, m2=0.4,
                                       reduction="sum", backend=backend)
        out[backend] = (loss,) + torch.autograd.grad(loss, (a, b, rr))
    for p, q in zip(out["reference"], out["cpu"]):
        torch.testing.assert_close(q, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaface_module_statistics(backend):
    x, y = data(n=10, scale=5.0)
    mod = fm.nn.AdaFace(4, 5, backend=backend).double()
    assert set(mod.state_dict()) == {"weight", "batch_mean", "batch_std"}
    a = x.norm(dim=1).clamp(0.001, 100)
    v = y != -100
    mu = 0.99 * 20 + 0.01 * a[v].mean()
    sd = 0.99 * 100 + 0.01 * a[v].std()
    r = ((a - mu) / (sd + 1e-3) * 0.333).clamp(-1, 1)
    want = fm.margin_cross_entropy(x, mod.weight, y, kind="adaface", s=64.0, m=r, m2=0.4,
                                   margin_per="sample", backend="reference")
    torch.testing.assert_close(mod(x, y), want)
    torch.testing.assert_close(mod.batch_mean, mu.to(mod.batch_mean.dtype))
    torch.testing.assert_close(mod.batch_std, sd.to(mod.batch_std.dtype))
    mod.eval()
    before = mod.state_dict()["batch_mean"].clone()
    mod(x, y)
    assert torch.equal(mod.batch_mean, before)  # eval: statistics frozen
    clone = fm.nn.AdaFace(4, 5).double()
    clone.load_state_dict(mod.state_dict())
    clone.eval()
    torch.testing.assert_close(clone(x, y), mod(x, y))


def test_adaface_checks():
    x, y = data()
    w = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="per-class"):
        fm.margin_cross_entropy(x, w, y, kind="adaface", m=torch.zeros(5, dtype=x.dtype))
    with pytest.raises(ValueError, match="t_alpha"):
        fm.nn.AdaFace(4, 5, t_alpha=0.0)


# ------------------------------------------------------------------ CurricularFace

def curricular_eager(x, w, y, t, s=64.0, m=0.5):
    """The official head's logits, written out (all rows labelled)."""
    cos = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T)
    cy = cos.gather(1, y[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
    ctm = cy * math.cos(m) - torch.sqrt(1 - cy * cy) * math.sin(m)
    final = torch.where(cy > math.cos(math.pi - m), ctm, cy - m * math.sin(m))
    hard = cos > ctm.detach()
    out = torch.where(hard, cos * (t + cos), cos).scatter(1, y[:, None], final)
    return torch.nn.functional.cross_entropy(s * out, y)


def test_curricularface_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (12,), generator=g)
    mod = fm.nn.CurricularFace(4, 5, backend="reference").double()
    assert set(mod.state_dict()) == {"weight", "t"}
    cy = (torch.nn.functional.normalize(x) * torch.nn.functional.normalize(mod.weight)[y]).sum(1)
    t = 0.01 * cy.mean()
    a = x.clone().requires_grad_()
    loss = mod(a, y)
    torch.testing.assert_close(mod.t, t.to(mod.t.dtype).detach())
    b = x.clone().requires_grad_()
    want = curricular_eager(b, mod.weight, y, t.detach())
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, a)[0], torch.autograd.grad(want, b)[0])
    mod.eval()
    before = mod.t.clone()
    mod(x, y)
    assert torch.equal(mod.t, before)
    with pytest.raises(NotImplementedError, match="hard-negative"):
        fm.nn.CurricularFace(4, 5, backend="cpu")(x.float(), y)


def test_curricular_gradcheck_reference():
    from fused_margin.reference.angular import curricular_cross_entropy
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, -100, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: curricular_cross_entropy(a, b, y, 0.3, s=6.0, m=0.5), (x, w))
