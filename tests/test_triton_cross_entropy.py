"""Triton WCE and CRWWCE (fused_margin.triton.cross_entropy) against the reference:
losses and logit gradients for every reduction, ignored rows, empty batches, class
counts spanning several (partial) tiles, confident logits, low precision, and the
reference fallback when a weight needs a gradient. CUDA tensors where there is a GPU,
CPU tensors under TRITON_INTERPRET=1 otherwise (conftest.py)."""
import pytest
import torch

import fused_margin as fm
from fused_margin.triton import cross_entropy as tce

from conftest import AllocationRecorder, device_for

# the interpreter's numpy evaluates both sides of tl.where (log 0 for K = 1, inf * 0)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = device_for("triton")
TRI = dict(backend="triton")
REF = dict(backend="reference")
REDUCTIONS = ("none", "mean", "sum")
LOSSES = ("wce", "crwwce")
# Tolerances, named once, by logits dtype: the loss is float32 for bfloat16 logits;
# bfloat16 gradients are rounded once more (the kernel stores them in bfloat16)
TOL = {torch.float32: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-5, atol=1e-6)),
       torch.float64: dict(loss=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-12)),
       torch.bfloat16: dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-2, atol=1e-3))}


def call(name, z, y, w, fp, **kw):
    if name == "wce":
        return fm.weighted_cross_entropy(z, y, w, **kw)
    return fm.crwwce_loss(z, y, w, fp, **kw)


def problem(n, k, dtype, scale=3.0, ignore=(2,)):
    z = (scale * torch.randn(n, k, dtype=torch.float64)).to(dtype).to(DEV)
    y = torch.randint(0, k, (n,)).to(DEV)
    for i in ignore:
        if i < n:
            y[i] = -100
    w = (torch.rand(k, dtype=torch.float64) + 0.5).to(DEV)
    fp = torch.rand(k, k, dtype=torch.float64).to(DEV)
    return z, y, w, fp


def check(name, z, y, w, fp, reduction, tol, **kw):
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    got = call(name, z1, y, w, fp, reduction=reduction, **kw, **TRI)
    want = call(name, z2, y, w, fp, reduction=reduction, **kw, **REF)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol["loss"])
    u = torch.randn(got.shape, dtype=got.dtype, device=DEV)
    (got * u).sum().backward()
    (want * u).sum().backward()
    assert torch.isfinite(z1.grad.float()).all()
    torch.testing.assert_close(z1.grad, z2.grad, **tol["grad"])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_matches_reference(name, reduction, dtype):
    z, y, w, fp = problem(13, 7, dtype)
    check(name, z, y, w, fp, reduction, TOL[dtype])


@pytest.mark.parametrize("k", (1, 2, 37))
@pytest.mark.parametrize("name", LOSSES)
def test_several_partial_tiles(name, k, monkeypatch):
    # 16-wide tiles: K = 37 spans three, the last partial; the arg-max moves between tiles
    monkeypatch.setattr(tce, "MAX_BLOCK_K", 16)
    z, y, w, fp = problem(9, k, torch.float32)
    if k > 16:
        z[0, 3], z[1, 20], z[3, 36] = 9.0, 9.0, 9.0
        z[4, 5] = z[4, 30] = 8.0                     # a tie across tiles: the first wins
    check(name, z, y, w, fp, "none", TOL[torch.float32])


@pytest.mark.parametrize("name", LOSSES)
def test_confident_logits(name):
    # +-50 logits: h_top rounds to 1 in float32; log(1 - h_top) and the gradient stay finite
    z, y, w, fp = problem(8, 5, torch.float32, ignore=())
    z = 50.0 * torch.sign(z)
    z[0] = -50.0
    z[0, 2] = 50.0
    y[0] = 1
    check(name, z, y, w, fp, "sum", dict(loss=dict(rtol=1e-5, atol=1e-4),
                                         grad=dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("case", ("empty", "all_ignored"))
@pytest.mark.parametrize("name", LOSSES)
def test_empty_and_all_ignored(name, case):
    n = 0 if case == "empty" else 4
    z, y, w, fp = problem(n, 5, torch.float32, ignore=range(n))
    for reduction in REDUCTIONS:
        z1 = z.clone().requires_grad_()
        out = call(name, z1, y, w, fp, reduction=reduction, **TRI)
        assert torch.all(out == 0)
        out.sum().backward()
        assert z1.grad is not None and torch.all(z1.grad == 0)


@pytest.mark.parametrize("name", LOSSES)
def test_custom_ignore_index(name):
    z, y, w, fp = problem(6, 4, torch.float32, ignore=())
    y[1] = 3
    check(name, z, y, w, fp, "mean", TOL[torch.float32], ignore_index=3)


@pytest.mark.parametrize("name", LOSSES)
def test_weight_gradients_fall_back_to_reference(name):
    z, y, w, fp = problem(7, 5, torch.float32)
    w1, fp1 = w.clone().requires_grad_(), fp.clone().requires_grad_()
    w2, fp2 = w.clone().requires_grad_(), fp.clone().requires_grad_()
    call(name, z, y, w1, fp1, **TRI).backward()
    call(name, z, y, w2, fp2, **REF).backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    if name == "crwwce":
        torch.testing.assert_close(fp1.grad, fp2.grad)


def test_no_grad_writes_no_gradient():
    z, y, w, fp = problem(5, 6, torch.float32)
    with torch.no_grad():
        _, g = tce._launch(z, y, w.float(), fp.float(), -100, need_grad=False)
    assert g.shape == (5,)                           # the loss buffer stands in for it


@pytest.mark.parametrize("name", LOSSES)
def test_no_n_by_k_temporaries(name):
    # bfloat16 logits: the only [N, K] tensor is the gradient written by the forward,
    # bfloat16 (no float32 copy of the logits), which backward scales in place (mul_)
    n, k = 12, 33
    z, y, w, fp = problem(n, k, torch.bfloat16)
    z = z.requires_grad_()
    w, fp = w.float(), fp.float()
    with AllocationRecorder() as rec:
        out = (tce.weighted_cross_entropy(z, y, w) if name == "wce"
               else tce.crwwce_loss(z, y, w, fp))
        out.backward()
    big = {a.op for a in rec.allocs if a.numel >= n * k and a.shape != (k, k)}
    # set_ / detach / alias: the interpreter's views of kernel arguments, no storage
    assert big - {"aten.set_", "aten.detach", "aten.alias"} == {"aten.empty_like", "aten.mul_"}, big
    assert z.grad.dtype == torch.bfloat16
