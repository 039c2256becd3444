"""Triton Sinkhorn and Wasserstein loss (fused_margin.triton.sinkhorn) against the
reference (every iterate, zero marginals, empty samples, tol), POT at convergence
(float64 and float32 plans), the fixed-point (Sinkhorn), envelope-theorem
(entropic Wasserstein) and implicit (entropic=False) gradients against the
reference's autograd at convergence and finite differences, the streaming
kernel, empty batches and low precision. CUDA tensors where there is a GPU, CPU
tensors under TRITON_INTERPRET=1 otherwise (conftest.py)."""
import numpy as np
import ot
import pytest
import torch

import fused_margin as fm
from fused_margin.reference import cost_sensitive as ref
from fused_margin.triton import sinkhorn as tsk

from conftest import device_for, fused_backends

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # POT's log(0)

BACKENDS = [p for p in fused_backends("sinkhorn") if p.id == "triton"]
DEV = device_for("triton")
TRI = dict(backend="triton")

# Tolerances, named once. ITER: triton vs reference after the same iterations, by
# compute dtype (eps = 0.1, potentials ~ 10). TINY_EPS: the same at eps = 1e-3 with
# costs ~ 10, where float32 log-plans ~ 1e4 carry ~1e-3 absolute rounding. POT:
# float64 plans at convergence. GRAD: envelope gradients vs the reference's
# autograd at convergence (entropic, where they are the same derivative).
ITER = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-13)}
TINY_EPS = {torch.float32: dict(rtol=0, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-12)}
POT = dict(rtol=1e-7, atol=1e-10)
POT32 = dict(rtol=1e-5, atol=1e-7)       # float32 plans at convergence vs POT in float64
GRAD = dict(rtol=1e-7, atol=1e-9)
FD = dict(rtol=1e-6, atol=1e-8)          # float64 gradients vs central differences
DTYPES = (torch.float32, torch.float64)


def simplex(n, k, dtype=torch.float64, floor=0.05):
    p = torch.rand(n, k, dtype=torch.float64) + floor
    return (p / p.sum(1, keepdim=True)).to(dtype).to(DEV)


def make_cost(n, k, per_sample, scale=1.0, dtype=torch.float64):
    shape = (n, k, k) if per_sample else (k, k)
    return (scale * torch.rand(*shape, dtype=torch.float64)).to(dtype).to(DEV)


def with_zeros(a, b):
    """Zero entries in sample 0 of both marginals and in sample 2 of a."""
    a, b = a.clone(), b.clone()
    a[0, [1, 4]] = 0
    b[0, [0, 4, 6]] = 0
    a[2, 3] = 0
    return a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def pot_plans(a, b, cost, eps):
    out = []
    for n in range(a.shape[0]):
        c = cost[n] if cost.dim() == 3 else cost
        out.append(ot.sinkhorn(a[n].cpu().double().numpy(), b[n].cpu().double().numpy(),
                               c.cpu().double().numpy(), reg=eps, method="sinkhorn_log",
                               numItermax=100000, stopThr=1e-14))
    return torch.from_numpy(np.stack(out)).to(DEV)


def row_error(t, a):
    return (t.sum(2) - a).abs().sum(1).max()


def centred(x, support):
    x = torch.where(support, x, torch.zeros_like(x))
    mean = x.sum(1, keepdim=True) / support.sum(1, keepdim=True)
    return torch.where(support, x - mean, torch.zeros_like(x))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ------------------------------------------------------------- Sinkhorn plans

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("eps,scale,n_iter", [(0.1, 1.0, 23), (1e-3, 10.0, 150)],
                         ids=("eps0.1", "eps1e-3-cost10"))
@pytest.mark.parametrize("k", (7, 13))
def test_sinkhorn_iterates_match_reference(backend, k, eps, scale, n_iter, per_sample, dtype):
    """Same update order as the reference: equal after any number of iterations,
    not only at the fixed point; zero marginal entries give exact zeros."""
    n = 5
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    a, b = a.to(dtype), b.to(dtype)
    cost = make_cost(n, k, per_sample, scale, dtype)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, backend=backend)
    want = ref.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, tol=None)
    assert got.shape == (n, k, k) and got.dtype == dtype and torch.isfinite(got).all()
    tol = ITER[dtype] if eps == 0.1 else TINY_EPS[dtype]
    torch.testing.assert_close(got, want, **tol)
    assert (got[0, [1, 4], :] == 0).all() and (got[2, 3, :] == 0).all()
    assert (got[0, :, [0, 4, 6]] == 0).all()
    torch.testing.assert_close(got.sum(1).double(), b.double(), **tol)   # columns are exact


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("k", (7, 13))
def test_sinkhorn_converged_matches_pot(backend, k, per_sample):
    n, eps = 5, 0.1
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    cost = make_cost(n, k, per_sample)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=1e-14, backend=backend)
    torch.testing.assert_close(got, pot_plans(a, b, cost, eps), **POT)
    torch.testing.assert_close(got.sum(2), a, **POT)


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_sinkhorn_float32_converged_matches_pot(backend, per_sample):
    n, k, eps = 3, 7, 0.1
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    a32, b32 = a.float(), b.float()
    cost = make_cost(n, k, per_sample, dtype=torch.float32)
    got = fm.sinkhorn(a32, b32, cost, eps=eps, n_iter=400, tol=1e-6, backend=backend)
    assert got.dtype == torch.float32
    # POT in float64 on the rounded inputs, rescaled to exactly equal masses
    a64, b64 = a32.double(), b32.double()
    a64, b64 = a64 / a64.sum(1, keepdim=True), b64 / b64.sum(1, keepdim=True)
    torch.testing.assert_close(got.double(), pot_plans(a64, b64, cost.double(), eps), **POT32)


@pytest.mark.parametrize("tol", (1e-3, 1e-7))
def test_sinkhorn_tol_stops_where_the_reference_stops(backend, tol):
    """The global max row error is checked on the host every 10 iterations, as in
    the reference: the plan is the reference's iterate at the same stop."""
    n, k, eps = 5, 7, 0.1
    a, b = simplex(n, k), simplex(n, k)
    cost = make_cost(n, k, True, 2.0)
    stop = next(m for m in range(10, 5000, 10)
                if float(row_error(ref.sinkhorn(a, b, cost, eps=eps, n_iter=m, tol=None), a)) < tol)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol, backend=backend)
    torch.testing.assert_close(got, ref.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol),
                               **ITER[torch.float64])
    at_stop = ref.sinkhorn(a, b, cost, eps=eps, n_iter=stop, tol=None)
    torch.testing.assert_close(got, at_stop, **ITER[torch.float64])
    if stop > 10:   # and not the iterate 10 before it
        before = ref.sinkhorn(a, b, cost, eps=eps, n_iter=stop - 10, tol=None)
        assert (got - before).abs().max() > 1e-12


def test_sinkhorn_empty_marginal_gives_zero_plan(backend):
    n, k = 4, 7
    a, b = simplex(n, k), simplex(n, k)
    a[1] = 0
    b[2] = 0
    cost = make_cost(n, k, False)
    got = fm.sinkhorn(a, b, cost, eps=0.1, n_iter=30, backend=backend)
    assert (got[1] == 0).all() and (got[2] == 0).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.sinkhorn(a, b, cost, eps=0.1, n_iter=30, tol=None),
                               **ITER[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_streaming_kernel_matches_reference(backend, per_sample, dtype):
    """The kernel for K above TILE_MAX_K on a GPU, forced here with 4-row tiles so
    the online column log-sum-exp crosses tiles, including all -inf ones."""
    n, k, n_iter = 3, 13, 9
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    a[2, :4] = 0                                   # a whole first row tile of zeros
    a, b = (a / a.sum(1, keepdim=True)).to(dtype), b.to(dtype)
    cost = make_cost(n, k, per_sample, 1.0, dtype)
    blocks = tsk.Blocks(k, n, stream=True, block_i=4)
    got, _ = tsk.Solved(a, b, cost, 0.1, n_iter, 1e-30, blocks=blocks).plan_and_loss(True, False)
    want = ref.sinkhorn(a, b, cost, eps=0.1, n_iter=n_iter, tol=None)
    torch.testing.assert_close(got, want, **ITER[dtype])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_sinkhorn_low_precision_computes_in_float32(backend, dtype):
    n, k = 5, 7
    a, b, cost = simplex(n, k, dtype), simplex(n, k, dtype), make_cost(n, k, False, 1.0, dtype)
    got = fm.sinkhorn(a, b, cost, eps=0.1, n_iter=20, backend=backend)
    assert got.dtype == dtype
    want = ref.sinkhorn(a, b, cost, eps=0.1, n_iter=20, tol=None)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_sinkhorn_fixed_point_gradients(backend, per_sample):
    """The implicit-function gradients equal the reference's autograd through the
    iterations at convergence: the cost exactly, a and b up to a constant on their
    supports (mass-changing directions); zero marginal entries get 0."""
    n, k = 5, 7
    a, b = with_zeros(simplex(n, k), simplex(n, k))
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    cost = make_cost(n, k, per_sample).requires_grad_(True)
    weights = torch.randn(n, k, k, dtype=torch.float64, device=DEV)
    kw = dict(eps=0.1, n_iter=5000, tol=1e-13)
    got = torch.autograd.grad((fm.sinkhorn(a, b, cost, backend=backend, **kw) * weights).sum(),
                              (a, b, cost))
    want = torch.autograd.grad((ref.sinkhorn(a, b, cost, **kw) * weights).sum(), (a, b, cost))
    torch.testing.assert_close(got[2], want[2], **GRAD)
    for g, w, m in ((got[0], want[0], a), (got[1], want[1], b)):
        sup = m.detach() > 0
        assert (g[~sup] == 0).all()
        torch.testing.assert_close(centred(g, sup), centred(w, sup), **GRAD)


def test_sinkhorn_k_limit(backend):
    k = tsk.MAX_K + 1
    with pytest.raises(ValueError, match="at most"):
        fm.sinkhorn(simplex(1, k), simplex(1, k), make_cost(1, k, False), n_iter=1,
                    backend=backend)


# -------------------------------------------------------------- Wasserstein

@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_wasserstein_entropic_loss_and_gradients(backend, per_sample, reduction):
    """At convergence the envelope gradients are the reference's autograd ones:
    logits and cost exactly, the target up to a constant on its support (only
    directions inside the simplex are defined); zero target entries get 0."""
    n, k, eps = 5, 7, 0.1
    z = (2 * torch.randn(n, k, dtype=torch.float64)).to(DEV).requires_grad_(True)
    t = simplex(n, k)
    t[1, [0, 3]] = 0
    t = (t / t.sum(1, keepdim=True)).requires_grad_(True)
    cost = make_cost(n, k, per_sample).requires_grad_(True)
    kw = dict(eps=eps, n_iter=5000, tol=1e-13, entropic=True, reduction=reduction)
    got = fm.wasserstein_loss(z, t, cost, backend=backend, **kw)
    want = ref.wasserstein_loss(z, t, cost, **kw)
    torch.testing.assert_close(got, want, **POT)
    w = torch.rand_like(got) + 0.5
    gz, gt, gc = torch.autograd.grad((got * w).sum(), (z, t, cost))
    rz, rt, rc = torch.autograd.grad((want * w).sum(), (z, t, cost))
    torch.testing.assert_close(gz, rz, **GRAD)
    torch.testing.assert_close(gc, rc, **GRAD)
    sup = t.detach() > 0
    torch.testing.assert_close(gt, centred(gt, sup), **GRAD)
    torch.testing.assert_close(gt, centred(rt, sup), **GRAD)


def test_wasserstein_non_entropic_gradients(backend):
    """entropic=False: the gradient of <T, C> itself (implicit differentiation of the
    fixed point, the cpu backend's helper), not the entropic value's: equal to the
    reference's autograd at convergence and to central differences of the triton
    loss, for the logits, the target (along a tangent of the simplex) and the cost."""
    n, k, eps = 3, 5, 0.2
    z0 = (2 * torch.randn(n, k, dtype=torch.float64)).to(DEV)
    t0 = simplex(n, k)
    c0 = make_cost(n, k, True)
    kw = dict(eps=eps, n_iter=5000, tol=1e-13, entropic=False, reduction="sum")
    z, t, c = (x.clone().requires_grad_(True) for x in (z0, t0, c0))
    got = fm.wasserstein_loss(z, t, c, backend=backend, **kw)
    want = ref.wasserstein_loss(z, t, c, **kw)
    torch.testing.assert_close(got, want, **POT)
    gz, gt, gc = torch.autograd.grad(got, (z, t, c))
    rz, rt, rc = torch.autograd.grad(want, (z, t, c))
    torch.testing.assert_close(gz, rz, **GRAD)
    torch.testing.assert_close(gc, rc, **GRAD)
    sup = torch.ones_like(t0, dtype=torch.bool)
    torch.testing.assert_close(gt, centred(rt, sup), **GRAD)
    # the entropic value's gradient differs (by O(eps)): this is not it
    ez, = torch.autograd.grad(fm.wasserstein_loss(z, t, c, backend=backend,
                                                  **dict(kw, entropic=True)), z)
    assert (ez - gz).abs().max() > 1e-3
    # central differences of the triton loss along random directions
    dz, dc = torch.randn_like(z0), torch.randn_like(c0)
    dt = centred(torch.randn_like(t0), sup)           # rows stay on the simplex
    step = 1e-5
    with torch.no_grad():
        for g, d, (x0, i) in ((gz, dz, (z0, 0)), (gt, dt, (t0, 1)), (gc, dc, (c0, 2))):
            args = [z0, t0, c0]
            hi, lo = list(args), list(args)
            hi[i], lo[i] = x0 + step * d, x0 - step * d
            numeric = (fm.wasserstein_loss(*hi, backend=backend, **kw)
                       - fm.wasserstein_loss(*lo, backend=backend, **kw)) / (2 * step)
            torch.testing.assert_close((g * d).sum(), numeric, **FD)


@pytest.mark.parametrize("entropic", (False, True))
def test_wasserstein_labels_is_the_closed_form(backend, entropic):
    n, k = 5, 7
    z = (2 * torch.randn(n, k, dtype=torch.float64)).to(DEV).requires_grad_(True)
    y = torch.randint(0, k, (n,)).to(DEV)
    y[3] = -100
    cost = make_cost(n, k, False, 10.0)
    kw = dict(eps=0.1, entropic=entropic)
    got = fm.wasserstein_loss(z, y, cost, backend=backend, **kw)
    want = ref.wasserstein_loss(z, y, cost, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    one_hot = torch.nn.functional.one_hot(y.clamp_min(0), k).double()
    dist = fm.wasserstein_loss(z, one_hot, cost, n_iter=3, reduction="none", backend=backend,
                               **kw)
    torch.testing.assert_close(dist[[0, 1, 2, 4]], ref.wasserstein_loss(
        z, y, cost, reduction="none", **kw)[[0, 1, 2, 4]], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_wasserstein_float32_and_half_logits(backend, dtype):
    n, k = 5, 13
    z = (2 * torch.randn(n, k)).to(dtype).to(DEV).requires_grad_(True)
    t, cost = simplex(n, k, torch.float32), make_cost(n, k, False, 1.0, torch.float32)
    kw = dict(eps=0.1, n_iter=50, entropic=True)
    got = fm.wasserstein_loss(z, t, cost, backend=backend, **kw)
    want = ref.wasserstein_loss(z, t, cost, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gz, = torch.autograd.grad(got, z)
    assert gz.dtype == dtype and torch.isfinite(gz).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's log(0) paths
def test_ce_backward_hands_its_buffer_over_once(backend):
    """WCE / CRWWCE (triton.cross_entropy): the gradient formed in the forward is
    scaled in place by backward, which therefore runs once per forward: a second
    backward through a retained graph raises instead of answering with a scaled
    buffer; a new forward gives the same gradient."""
    n, k = 4, 5
    z = torch.randn(n, k, dtype=torch.float64, device=DEV, requires_grad=True)
    y = torch.randint(0, k, (n,)).to(DEV)
    w = torch.rand(k, dtype=torch.float64, device=DEV) + 0.5
    fp = torch.rand(k, k, dtype=torch.float64, device=DEV) + 0.5
    for fn in (lambda: fm.weighted_cross_entropy(z, y, w, **TRI),
               lambda: fm.crwwce_loss(z, y, w, fp, **TRI)):
        loss = fn()
        g1, = torch.autograd.grad(3 * loss, z, retain_graph=True)
        with pytest.raises(RuntimeError, match="retained graph"):
            torch.autograd.grad(loss, z)
        g2, = torch.autograd.grad(fn(), z)
        torch.testing.assert_close(g1, 3 * g2, rtol=1e-12, atol=0)


def test_empty_batch(backend):
    k = 5
    plans = fm.sinkhorn(simplex(0, k), simplex(0, k), make_cost(0, k, False), tol=1e-6,
                        backend=backend)
    assert plans.shape == (0, k, k)
    z = torch.zeros(0, k, dtype=torch.float64, device=DEV, requires_grad=True)
    cost = make_cost(0, k, True).requires_grad_(True)
    shared = make_cost(0, k, False).requires_grad_(True)
    for c in (cost, shared):
        loss = fm.wasserstein_loss(z, simplex(0, k), c, backend=backend)
        assert loss.shape == () and float(loss.detach()) == 0.0
        gz, gc = torch.autograd.grad(loss, (z, c))
        assert gz.shape == (0, k) and gc.shape == c.shape and (gc == 0).all()
    none = fm.wasserstein_loss(z, simplex(0, k), cost, reduction="none", backend=backend)
    assert none.shape == (0,)


def test_wasserstein_empty_target_sample_is_zero(backend):
    n, k = 3, 7
    z = torch.randn(n, k, dtype=torch.float64, device=DEV, requires_grad=True)
    t = simplex(n, k)
    t[1] = 0
    cost = make_cost(n, k, False).requires_grad_(True)
    per = fm.wasserstein_loss(z, t, cost, n_iter=30, entropic=True, reduction="none",
                              backend=backend)
    torch.testing.assert_close(per, ref.wasserstein_loss(z, t, cost, n_iter=30, entropic=True,
                                                         reduction="none"), **ITER[torch.float64])
    assert float(per[1].detach()) == 0.0
    gz, = torch.autograd.grad(per.sum(), z)
    assert (gz[1] == 0).all() and torch.isfinite(gz).all()


@pytest.mark.parametrize("n,k", [(3, 1), (1, 2), (4, 3)], ids=("3x1", "1x2", "4x3"))
def test_tiny_shapes_and_non_contiguous_inputs(backend, n, k):
    a = simplex(n, k).t().contiguous().t()             # rows sum to 1, column-major
    b = simplex(2 * n, k)[1::2]
    cost = make_cost(1, k, False, 3.0).t()
    if n > 1 and k > 1:
        assert not any(t.is_contiguous() for t in (a, b, cost))
    got = fm.sinkhorn(a, b, cost, eps=0.1, n_iter=17, backend=backend)
    torch.testing.assert_close(got, ref.sinkhorn(a.contiguous(), b.contiguous(),
                                                 cost.contiguous(), eps=0.1, n_iter=17, tol=None),
                               **ITER[torch.float64])
