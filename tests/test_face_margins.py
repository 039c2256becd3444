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
