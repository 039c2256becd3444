"""The cpu backend of the cost-sensitive family (csrc/sinkhorn.cpp) against the
reference and POT: Sinkhorn plans at any iteration count (float32/float64,
shared and per-sample costs, odd K, eps 0.1 and 1e-3, zero marginals, tol),
WCE / CRWWCE / Wasserstein losses and their gradients (gradcheck; the implicit
Wasserstein gradients against the reference's unrolled ones at convergence),
low precision, empty batches, ignore_index and non-contiguous inputs."""
import numpy as np
import ot
import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch

from conftest import NativeAllocationRecorder

pytestmark = pytest.mark.skipif(not dispatch._status("cpu")[0], reason=dispatch._status("cpu")[1])

CPU, REF = dict(backend="cpu"), dict(backend="reference")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64)
LOW_DTYPES = (torch.float16, torch.bfloat16)

# Tolerances, named once. PLAN: cpu plans vs the reference's in the same dtype
# (float32 at eps=1e-3 carries potentials ~C/eps = 1e4, whose float32 rounding
# is ~1e-3 in the exponent: both sides are that far from the float64 plan).
# LOSS: cpu losses and gradients vs the reference, same dtype. POT: float64 vs
# POT. CONVERGED: implicit gradients vs the reference's unrolled ones after
# enough iterations. LOW: half inputs vs float32 inputs.
PLAN = {(torch.float64, 0.1): dict(rtol=1e-9, atol=1e-13),
        (torch.float64, 1e-3): dict(rtol=1e-9, atol=1e-12),
        (torch.float32, 0.1): dict(rtol=1e-5, atol=1e-6),
        (torch.float32, 1e-3): dict(rtol=0, atol=1e-4)}
LOSS = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
POT = dict(rtol=1e-7, atol=1e-10)
# POT32: float32 plans at convergence vs POT in float64 on the same (rounded) inputs
POT32 = dict(rtol=1e-5, atol=1e-7)
CONVERGED = dict(rtol=1e-6, atol=1e-8)
LOW = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def simplex(n, k, dtype=torch.float64, floor=0.05):
    p = torch.rand(n, k, dtype=torch.float64) + floor
    return (p / p.sum(1, keepdim=True)).to(dtype)


def make_cost(n, k, per_sample, scale=1.0, dtype=torch.float64):
    shape = (n, k, k) if per_sample else (k, k)
    return (scale * torch.rand(*shape, dtype=torch.float64)).to(dtype)


def _unit_rows(x):
    """rows rescaled to sum 1 (all-zero rows stay zero)."""
    s = x.sum(1, keepdim=True)
    return torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), x)


def with_zeros(a, b):
    """zero entries in a and b, and one sample with an all-zero a."""
    a, b = a.clone(), b.clone()
    a[0, [1, 4]] = 0
    b[0, [0, 4]] = 0
    b[1, 2] = 0
    a[2] = 0
    return _unit_rows(a), _unit_rows(b)


# --------------------------------------------------------------- Sinkhorn

@pytest.mark.parametrize("n_iter", (1, 7, 60))
@pytest.mark.parametrize("eps,scale", [(0.1, 1.0), (1e-3, 10.0)], ids=("eps0.1", "eps1e-3"))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plans_match_reference(dtype, per_sample, eps, scale, n_iter):
    n, k = 5, 13
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    a, b, cost = a.to(dtype), b.to(dtype), make_cost(n, k, per_sample, scale, dtype)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, **CPU)
    want = fm.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, **REF)
    assert got.dtype == dtype and got.shape == (n, k, k) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **PLAN[(dtype, eps)])
    # exact zeros: rows with a_i = 0, columns with b_j = 0, the all-zero sample
    assert (got[0, [1, 4], :] == 0).all() and (got[0, :, [0, 4]] == 0).all()
    assert (got[1, :, 2] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("k", (7, 11))
def test_plans_match_pot(k, per_sample):
    """Converged at eps = 0.1 (POT's default method), and at eps = 1e-3 with
    costs ~10 the same unconverged iterate as POT's log-domain solver (on the
    transposed problem: POT updates columns first, fused_margin rows first)."""
    n = 3
    a, b = simplex(n, k), simplex(n, k)
    cost = make_cost(n, k, per_sample)
    got = fm.sinkhorn(a, b, cost, eps=0.1, n_iter=400, **CPU)
    for i in range(n):
        c = cost[i] if per_sample else cost
        want = ot.sinkhorn(a[i].numpy(), b[i].numpy(), c.numpy(), reg=0.1, numItermax=100000,
                           stopThr=1e-14)
        torch.testing.assert_close(got[i], torch.from_numpy(want), **POT)
    # float32 plans: the same converged plan to float32 rounding
    a32, b32, c32 = a.float(), _unit_rows(b.float()), cost.float()
    got32 = fm.sinkhorn(a32, b32, c32, eps=0.1, n_iter=400, **CPU)
    assert got32.dtype == torch.float32
    # POT on the float32 inputs in float64, rescaled to exactly equal masses (else
    # its float64 stopping rule never holds)
    a64, b64 = _unit_rows(a32.double()), _unit_rows(b32.double())
    for i in range(n):
        c = c32[i] if per_sample else c32
        want = ot.sinkhorn(a64[i].numpy(), b64[i].numpy(), c.double().numpy(), reg=0.1,
                           numItermax=100000, stopThr=1e-14)
        torch.testing.assert_close(got32[i].double(), torch.from_numpy(want), **POT32)
    cost = 10 * cost
    got = fm.sinkhorn(a, b, cost, eps=1e-3, n_iter=40, **CPU)
    for i in range(n):
        c = cost[i] if per_sample else cost
        want = ot.sinkhorn(b[i].numpy(), a[i].numpy(), c.T.numpy(), reg=1e-3,
                           method="sinkhorn_log", numItermax=40, stopThr=0.0, warn=False).T
        torch.testing.assert_close(got[i], torch.from_numpy(want), **POT)


@pytest.mark.parametrize("tol", (1e-4, 1e-9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tol_stops_where_the_reference_does(dtype, tol):
    n, k, eps = 4, 7, 0.05
    a, b = simplex(n, k, dtype), simplex(n, k, dtype)
    a[3] = 0                        # the dummy problem of an empty sample counts too
    cost = make_cost(n, k, True, 2.0, dtype)
    if dtype == torch.float32 and tol < 1e-6:
        tol = 1e-6
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol, **CPU)
    torch.testing.assert_close(got, fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol, **REF),
                               **PLAN[(dtype, 0.1)])
    # without the empty sample: the stop is the first multiple of 10 iterations
    # whose row error is < tol
    a, b, cost = a[:3], b[:3], cost[:3]
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol, **CPU)
    for m in range(10, 5000, 10):
        t_m = fm.sinkhorn(a, b, cost, eps=eps, n_iter=m, **CPU)
        if float((t_m.double().sum(2) - a.double()).abs().sum(1).max()) < tol:
            break
    assert m < 4990
    torch.testing.assert_close(got, t_m, **PLAN[(dtype, 0.1)])


def test_sinkhorn_with_gradients_differentiates_the_kernels_plans():
    """With inputs that need gradients the cpu backend differentiates the reference's
    unrolled iterations: its plans must be the kernel's (same iterate), and its
    gradient the derivative of the kernel's function, checked by central differences
    of the kernel itself (no-grad calls) along a direction of the inputs. Marginals go
    through a softmax so the differences stay on the simplex."""
    n, k, kw = 3, 5, dict(eps=0.5, n_iter=20, **CPU)
    u, v = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    cost = make_cost(n, k, True)
    weights = torch.randn(n, k, k, dtype=torch.float64)
    du, dv, dc = torch.randn_like(u), torch.randn_like(v), torch.randn_like(cost)

    def objective(u, v, c):
        return (fm.sinkhorn(u.softmax(1), v.softmax(1), c, **kw) * weights).sum()

    x = [t.clone().requires_grad_(True) for t in (u, v, cost)]
    plans = fm.sinkhorn(x[0].softmax(1), x[1].softmax(1), x[2], **kw)
    with torch.no_grad():
        kernel = fm.sinkhorn(u.softmax(1), v.softmax(1), cost, **kw)
    torch.testing.assert_close(plans.detach(), kernel, **PLAN[(torch.float64, 0.1)])
    grads = torch.autograd.grad((plans * weights).sum(), x)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, (du, dv, dc)))
    h = 1e-5
    with torch.no_grad():
        numeric = (float(objective(u + h * du, v + h * dv, cost + h * dc))
                   - float(objective(u - h * du, v - h * dv, cost - h * dc))) / (2 * h)
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


# -------------------------------------------------------------- WCE / CRWWCE

def _ce_inputs(n, k, dtype, scale=2.0):
    z = (scale * torch.randn(n, k, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, k, (n,))
    if n > 2:
        y[1] = -100
    w = (torch.rand(k, dtype=torch.float64) + 0.5).to(dtype)
    fp = (torch.rand(k, k, dtype=torch.float64) + 0.5).to(dtype)
    return z, y, w, fp


def _losses(z, y, w, fp, **kw):
    return {"wce": lambda zz: fm.weighted_cross_entropy(zz, y, w, **kw),
            "crwwce": lambda zz: fm.crwwce_loss(zz, y, w, fp, **kw)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(9, 7), (4, 13), (3, 1), (1, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_losses_and_grads_match_reference(dtype, shape, reduction):
    z, y, w, fp = _ce_inputs(*shape, dtype)
    for name, cpu_fn in _losses(z, y, w, fp, reduction=reduction, **CPU).items():
        ref_fn = _losses(z, y, w, fp, reduction=reduction, **REF)[name]
        zc, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        got, want = cpu_fn(zc), ref_fn(zr)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **LOSS[dtype], msg=name)
        up = torch.randn_like(got)
        (got * up).sum().backward()
        (want * up).sum().backward()
        torch.testing.assert_close(zc.grad, zr.grad, **LOSS[dtype], msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_crwwce_very_confident_logits(dtype):
    """log(1 - h) of a class with h -> 1 and its gradient stay finite and equal
    the reference's (arg-max on and off the target, ties)."""
    z = torch.tensor([[60.0, 0.0, -3.0, 1.0], [0.0, 95.0, 2.0, -40.0], [5.0, 5.0, 0.0, 1.0]],
                     dtype=dtype)
    y = torch.tensor([0, 2, 1])
    _, _, w, fp = _ce_inputs(3, 4, dtype)
    zc, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got = fm.crwwce_loss(zc, y, w, fp, reduction="sum", **CPU)
    want = fm.crwwce_loss(zr, y, w, fp, reduction="sum", **REF)
    torch.testing.assert_close(got, want, **LOSS[dtype])
    got.backward()
    want.backward()
    assert torch.isfinite(zc.grad).all()
    torch.testing.assert_close(zc.grad, zr.grad, **LOSS[dtype])


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_ce(reduction):
    """Weights by gradcheck; the logits by central differences against one
    backward per forward (the fused backward hands its buffer over, so gradcheck's
    repeated backward through one graph is refused: see the next test)."""
    z, y, w, fp = _ce_inputs(4, 5, torch.float64)
    w, fp = w.requires_grad_(True), fp.requires_grad_(True)
    kw = dict(reduction=reduction, **CPU)
    assert torch.autograd.gradcheck(lambda w: fm.weighted_cross_entropy(z, y, w, **kw), (w,))
    assert torch.autograd.gradcheck(lambda w, fp: fm.crwwce_loss(z, y, w, fp, **kw), (w, fp))
    for name in ("wce", "crwwce"):
        up = torch.rand(4 if reduction == "none" else (), dtype=torch.float64) + 0.5

        def objective(zz):
            return (_losses(zz, y, w.detach(), fp.detach(), **kw)[name](zz) * up).sum()

        zg = z.clone().requires_grad_(True)
        analytic, = torch.autograd.grad(objective(zg), zg)
        numeric = torch.zeros_like(z)
        h = 1e-6
        for idx in np.ndindex(*z.shape):
            zp, zm = z.clone(), z.clone()
            zp[idx] += h
            zm[idx] -= h
            numeric[idx] = (objective(zp) - objective(zm)) / (2 * h)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7, msg=name)


def test_ce_second_backward_through_retained_graph_is_refused():
    z, y, w, fp = _ce_inputs(4, 5, torch.float64)
    z.requires_grad_(True)
    for name, fn in _losses(z, y, w, fp, **CPU).items():
        loss = fn(z)
        g1, = torch.autograd.grad(loss, z, retain_graph=True)
        with pytest.raises(RuntimeError, match="retained graph"):
            torch.autograd.grad(loss, z)
        g2, = torch.autograd.grad(fn(z), z)               # a new forward is fine
        torch.testing.assert_close(g1, g2, rtol=0, atol=0, msg=name)


def test_weight_grads_without_logit_grads():
    z, y, w, fp = _ce_inputs(6, 5, torch.float64)
    grads = {}
    for be in ("cpu", "reference"):
        ww, ff = w.clone().requires_grad_(True), fp.clone().requires_grad_(True)
        loss = (fm.weighted_cross_entropy(z, y, ww, backend=be)
                + fm.crwwce_loss(z, y, ww, ff, reduction="sum", backend=be))
        grads[be] = torch.autograd.grad(loss, (ww, ff))
    for got, want in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(got, want, **LOSS[torch.float64])


def test_custom_ignore_index():
    z, y, w, fp = _ce_inputs(6, 5, torch.float64)
    y = torch.tensor([0, 7, 2, 7, 4, 1])
    for name, fn in _losses(z, y, w, fp, ignore_index=7, reduction="none", **CPU).items():
        got = fn(z)
        want = _losses(z, y, w, fp, ignore_index=7, reduction="none", **REF)[name](z)
        assert (got[y == 7] == 0).all()
        torch.testing.assert_close(got, want, **LOSS[torch.float64], msg=name)


# -------------------------------------------------------------- Wasserstein

@pytest.mark.parametrize("entropic", (False, True))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wasserstein_matches_reference(dtype, per_sample, entropic):
    n, k = 5, 7
    z = (2 * torch.randn(n, k, dtype=torch.float64)).to(dtype)
    target = simplex(n, k, dtype)
    target[0, [2, 5]] = 0
    target = _unit_rows(target)
    cost = make_cost(n, k, per_sample, 2.0, dtype)
    labels = torch.tensor([1, -100, 6, 0, 3])
    for reduction in REDUCTIONS:
        for tgt in (target, labels):
            kw = dict(eps=0.1, n_iter=30, entropic=entropic, reduction=reduction)
            got = fm.wasserstein_loss(z, tgt, cost, **kw, **CPU)
            want = fm.wasserstein_loss(z, tgt, cost, **kw, **REF)
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **LOSS[dtype])


@pytest.mark.parametrize("entropic", (False, True))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_wasserstein_implicit_grads_equal_unrolled_at_convergence(per_sample, entropic):
    """d/dlogits and d/dcost equal the reference's; d/dtarget its tangent part
    (the target is a probability vector: the normal part is not defined)."""
    n, k, eps = 4, 7, 0.2
    z0 = 2 * torch.randn(n, k, dtype=torch.float64)
    t0 = simplex(n, k)
    t0[1, 3] = 0
    t0 = t0 / t0.sum(1, keepdim=True)
    c0 = make_cost(n, k, per_sample)
    up = torch.rand(n, dtype=torch.float64)
    grads = {}
    for be in ("cpu", "reference"):
        z, t, c = (x.clone().requires_grad_(True) for x in (z0, t0, c0))
        per = fm.wasserstein_loss(z, t, c, eps=eps, n_iter=600, entropic=entropic,
                                  reduction="none", backend=be)
        grads[be] = torch.autograd.grad((per * up).sum(), (z, t, c))
    gz, gt, gc = grads["cpu"]
    rz, rt, rc = grads["reference"]
    torch.testing.assert_close(gz, rz, **CONVERGED)
    torch.testing.assert_close(gc, rc, **CONVERGED)
    sup = t0 > 0
    rt = torch.where(sup, rt, torch.zeros_like(rt))
    rt = torch.where(sup, rt - rt.sum(1, keepdim=True) / sup.sum(1, keepdim=True), rt)
    torch.testing.assert_close(gt, rt, **CONVERGED)


@pytest.mark.parametrize("entropic", (False, True))
def test_gradcheck_wasserstein_converged(entropic):
    """Finite differences of the converged loss in the logits, the target (as
    softmax(u): differences must stay on the simplex, where its tangent gradient
    is all that is defined) and the cost."""
    n, k = 3, 4
    z = (2 * torch.randn(n, k, dtype=torch.float64)).requires_grad_(True)
    u = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    cost = make_cost(n, k, False).requires_grad_(True)
    fn = lambda z, u, c: fm.wasserstein_loss(z, u.softmax(1), c, eps=0.5,  # noqa: E731
                                             n_iter=300, entropic=entropic, **CPU)
    assert torch.autograd.gradcheck(fn, (z, u, cost), atol=1e-6, rtol=1e-5)


# ------------------------------------------------ precision, empty, layout

@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_finite_and_close_to_float32(dtype):
    n, k = 9, 7
    z32 = 2 * torch.randn(n, k)
    y = torch.randint(0, k, (n,))
    y[3] = -100
    w, fp = torch.rand(k) + 0.5, torch.rand(k, k) + 0.5
    cost, target = torch.rand(k, k) * 2, simplex(n, k, torch.float32)
    a, b = simplex(n, k, torch.float32), simplex(n, k, torch.float32)

    def run(cast):
        zz = z32.to(cast).requires_grad_(True)
        out = {"wce": fm.weighted_cross_entropy(zz, y, w.to(cast), **CPU),
               "crwwce": fm.crwwce_loss(zz, y, w.to(cast), fp.to(cast), **CPU),
               "ws_dist": fm.wasserstein_loss(zz, target.to(cast), cost.to(cast), **CPU)}
        sum(out.values()).backward()
        out["grad"] = zz.grad
        out["sinkhorn"] = fm.sinkhorn(a.to(cast), b.to(cast), cost.to(cast), **CPU)
        return out

    low, ref = run(dtype), run(torch.float32)
    for name in low:
        want_dtype = dtype if name in ("sinkhorn", "grad") else torch.float32
        assert low[name].dtype == want_dtype, name
        assert torch.isfinite(low[name]).all(), name
        torch.testing.assert_close(low[name].float(), ref[name], **LOW[dtype], msg=name)


@pytest.mark.parametrize("name", ("wce", "crwwce"))
def test_ce_half_logits_one_n_by_k_buffer(name):
    """bfloat16 logits go to the kernel as they are (no float32 copy), and backward
    scales the forward's bfloat16 gradient buffer in place: forward + backward
    allocate one N x K buffer, in the logits' dtype."""
    n, k = 256, 33                      # N x K bf16 is larger than any K x K float32
    z, y, w, fp = _ce_inputs(n, k, torch.float32)
    z = z.to(torch.bfloat16).requires_grad_(True)
    with NativeAllocationRecorder() as rec:
        loss = _losses(z, y, w, fp, reduction="sum", **CPU)[name](z)
        loss.backward()
    big = [b for b in rec.bytes if b >= n * k * 2]
    assert big == [n * k * 2], rec.allocs
    assert z.grad.dtype == torch.bfloat16
    zr = z.detach().float().requires_grad_(True)
    _losses(zr, y, w, fp, reduction="sum", **REF)[name](zr).backward()
    torch.testing.assert_close(z.grad.float(), zr.grad, **LOW[torch.bfloat16])


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_empty_batch(reduction):
    k = 5
    z = torch.zeros(0, k, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    w, fp = torch.rand(k, dtype=torch.float64), torch.rand(k, k, dtype=torch.float64)
    cost = torch.rand(k, k, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(0, k, dtype=torch.float64)
    kw = dict(reduction=reduction, **CPU)
    for loss in (fm.weighted_cross_entropy(z, y, w, **kw), fm.crwwce_loss(z, y, w, fp, **kw),
                 fm.wasserstein_loss(z, target, cost, tol=1e-6, **kw)):
        assert loss.shape == ((0,) if reduction == "none" else ())
        gz, gc = torch.autograd.grad(loss.sum(), (z, cost), allow_unused=True)
        assert gz.shape == (0, k) and (gc is None or (gc == 0).all())
    plans = fm.sinkhorn(target, target, cost.detach(), tol=1e-6, **CPU)
    assert plans.shape == (0, k, k)


def test_all_ignored_mean_is_zero_with_zero_grads():
    z, _, w, fp = _ce_inputs(3, 5, torch.float64)
    z.requires_grad_(True)
    y = torch.full((3,), -100)
    for loss in (fm.weighted_cross_entropy(z, y, w, **CPU), fm.crwwce_loss(z, y, w, fp, **CPU)):
        assert float(loss.detach()) == 0.0
        assert (torch.autograd.grad(loss, z)[0] == 0).all()


def test_non_contiguous_inputs():
    n, k = 6, 7
    z = (2 * torch.randn(k, 2 * n, dtype=torch.float64)).t()[::2]
    y = torch.randint(0, k, (2 * n,))[::2]
    cost = make_cost(1, k, False, 3.0).t()
    w = (torch.rand(2 * k, dtype=torch.float64) + 0.5)[::2]
    fp = torch.rand(k, k, dtype=torch.float64).t()
    a = simplex(2 * n, k).t().contiguous().t()[::2]      # column-major rows of a simplex
    b = simplex(2 * n, k)[1::2]
    assert not any(t.is_contiguous() for t in (z, y, cost, w, fp, a, b))
    c = lambda t: t.contiguous()  # noqa: E731
    pairs = [
        (fm.weighted_cross_entropy(z, y, w, **CPU), fm.weighted_cross_entropy(c(z), c(y), c(w),
                                                                               **REF)),
        (fm.crwwce_loss(z, y, w, fp, **CPU), fm.crwwce_loss(c(z), c(y), c(w), c(fp), **REF)),
        (fm.sinkhorn(a, b, cost, **CPU), fm.sinkhorn(c(a), c(b), c(cost), **REF)),
        (fm.wasserstein_loss(z, b, cost, **CPU), fm.wasserstein_loss(c(z), c(b), c(cost), **REF)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, **LOSS[torch.float64])
