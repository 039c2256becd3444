"""Cost-sensitive losses (WCE, CRWWCE, Sinkhorn, Wasserstein): the reference
against float64 loops written here and against POT's Sinkhorn, gradcheck,
ignore_index, empty batches, very confident logits, zero marginals, early
stopping, low precision, non-contiguous views, bad input and the nn module."""
import math

import numpy as np
import ot
import pytest
import torch

import fused_margin as fm
from fused_margin import nn as fnn
from fused_margin.reference import cost_sensitive as cs

from conftest import device_for, fused_backends

REDUCTIONS = ("mean", "sum", "none")
REF = dict(backend="reference")
LOW_DTYPES = (torch.float16, torch.bfloat16)

# Tolerances, named once. EXACT: float64 reference vs the float64 loops here.
# POT: float64 plans vs POT's (converged, or the same iterates). LOW: float16/
# bfloat16 inputs vs float32 inputs, relative to the rounding of the inputs.
# F32_TINY_EPS: float32 plans at eps=1e-3 (potentials ~ C/eps = 1e4) vs float64.
EXACT = dict(rtol=1e-9, atol=1e-11)
POT = dict(rtol=1e-7, atol=1e-10)
LOW = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}
F32_TINY_EPS = dict(rtol=0, atol=1e-4)
# DECOUPLED: implicit gradients of a decoupled plan vs the reference's unrolled
# ones, in the parts both define (float64, converged to tol 1e-12)
DECOUPLED = dict(rtol=1e-6, atol=1e-9)

# (N, K): odd class counts
SHAPES = [(5, 7), (3, 13), (1, 2)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


def make_logits(n, k, dtype=torch.float64, scale=2.0, requires_grad=False):
    z = (scale * torch.randn(n, k, dtype=torch.float64)).to(dtype)
    return z.requires_grad_(requires_grad)


def make_labels(n, k, ignore=()):
    y = torch.randint(0, k, (n,))
    for i in ignore:
        y[i] = -100
    return y


def simplex(n, k, dtype=torch.float64, floor=0.05):
    p = torch.rand(n, k, dtype=torch.float64) + floor
    return (p / p.sum(1, keepdim=True)).to(dtype)


def make_cost(n, k, per_sample, scale=1.0, dtype=torch.float64):
    shape = (n, k, k) if per_sample else (k, k)
    return (scale * torch.rand(*shape, dtype=torch.float64)).to(dtype)


# ------------------------------------------------------ loop implementations

def _lse(values):
    m = max(values)
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


def _row(z, n):
    return [float(v) for v in z[n].detach()]


def _reduce(terms, reduction, count):
    if reduction == "none":
        return torch.tensor(terms, dtype=torch.float64)
    total = math.fsum(terms)
    if reduction == "sum":
        return torch.tensor(total, dtype=torch.float64)
    return torch.tensor(total / count if count else 0.0, dtype=torch.float64)


def loop_wce(z, y, w, reduction, ignore_index=-100):
    terms, count = [], 0
    for n in range(z.shape[0]):
        t = int(y[n])
        if t == ignore_index:
            terms.append(0.0)
            continue
        row = _row(z, n)
        terms.append(-float(w[t]) * (row[t] - _lse(row)))
        count += 1
    return _reduce(terms, reduction, count)


def loop_crwwce(z, y, fn, fp, reduction, ignore_index=-100):
    """log(1 - h_k) as log(sum_{j != k} e^{z_j}) - log(sum_j e^{z_j})."""
    terms, count = [], 0
    k = z.shape[1]
    for n in range(z.shape[0]):
        t = int(y[n])
        if t == ignore_index:
            terms.append(0.0)
            continue
        row = _row(z, n)
        lse = _lse(row)
        s = float(fn[t]) * (row[t] - lse)
        for c in range(k):
            if c != t:
                others = [row[j] for j in range(k) if j != c]
                s += float(fp[c, t]) * (_lse(others) - lse)
        terms.append(-s)
        count += 1
    return _reduce(terms, reduction, count)


def loop_wasserstein_labels(z, y, cost, entropic, eps, reduction, ignore_index=-100):
    terms, count = [], 0
    for n in range(z.shape[0]):
        t = int(y[n])
        if t == ignore_index:
            terms.append(0.0)
            continue
        row = _row(z, n)
        lse = _lse(row)
        c = cost[n] if cost.dim() == 3 else cost
        s = 0.0
        for i in range(z.shape[1]):
            h = math.exp(row[i] - lse)
            s += h * float(c[i, t])
            if entropic:
                s += eps * h * ((row[i] - lse) - 1)
        terms.append(s)
        count += 1
    return _reduce(terms, reduction, count)


def pot_plans(a, b, cost, eps, **kw):
    """ot.sinkhorn per sample, float64 numpy -> [N, K, K] tensor."""
    out = []
    for n in range(a.shape[0]):
        c = cost[n] if cost.dim() == 3 else cost
        out.append(ot.sinkhorn(a[n].double().numpy(), b[n].double().numpy(),
                               c.double().numpy(), reg=eps, **kw))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, a.shape[1], a.shape[1],
                                                                   dtype=torch.float64)


def pot_log_iterates(a, b, cost, eps, n_iter):
    """POT's log-domain Sinkhorn after exactly n_iter iterations, on the
    transposed problem: POT updates its column potential first and its row
    potential last, fused_margin updates rows (a) first and columns (b) last,
    so fused_margin's plan for (a, b, C) is POT's for (b, a, C^T), transposed."""
    out = []
    for n in range(a.shape[0]):
        c = cost[n] if cost.dim() == 3 else cost
        p = ot.sinkhorn(b[n].numpy(), a[n].numpy(), c.T.numpy(), reg=eps, method="sinkhorn_log",
                        numItermax=n_iter, stopThr=0.0, warn=False)
        out.append(p.T)
    return torch.from_numpy(np.stack(out))


def row_error(t, a):
    return (t.sum(2) - a).abs().sum(1).max()


# ------------------------------------------------------------------- WCE

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_wce_matches_loops(shape, reduction):
    n, k = shape
    z = make_logits(n, k)
    y = make_labels(n, k, ignore=(0,) if n > 1 else ())
    w = torch.rand(k, dtype=torch.float64) * 3
    got = fm.weighted_cross_entropy(z, y, w, reduction=reduction, **REF)
    torch.testing.assert_close(got, loop_wce(z, y, w, reduction), **EXACT)


def test_wce_mean_divides_by_count_not_weights():
    """The paper's 1/N, unlike cross_entropy(weight=w), which divides by sum w_t."""
    z, y = make_logits(9, 5), make_labels(9, 5, ignore=(2, 4))
    w = torch.rand(5, dtype=torch.float64) + 0.5
    got = fm.weighted_cross_entropy(z, y, w, **REF)
    total = torch.nn.functional.cross_entropy(z, y, weight=w, reduction="sum")
    torch.testing.assert_close(got, total / 7, **EXACT)
    ce_mean = torch.nn.functional.cross_entropy(z, y, weight=w)
    assert not torch.allclose(got, ce_mean)
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(fm.weighted_cross_entropy(z, y, ones, **REF),
                               torch.nn.functional.cross_entropy(z, y), **EXACT)


# ---------------------------------------------------------------- CRWWCE

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_crwwce_matches_loops(shape, reduction):
    n, k = shape
    z = make_logits(n, k)
    y = make_labels(n, k, ignore=(1,) if n > 1 else ())
    fn_w = torch.rand(k, dtype=torch.float64) * 4
    fp_w = torch.rand(k, k, dtype=torch.float64) * 2
    got = fm.crwwce_loss(z, y, fn_w, fp_w, reduction=reduction, **REF)
    torch.testing.assert_close(got, loop_crwwce(z, y, fn_w, fp_w, reduction), **EXACT)


def test_crwwce_single_class_is_plain_weighted_ce():
    z = make_logits(4, 1)
    y = torch.zeros(4, dtype=torch.long)
    got = fm.crwwce_loss(z, y, torch.tensor([2.0], dtype=torch.float64),
                         torch.ones(1, 1, dtype=torch.float64), **REF)
    torch.testing.assert_close(got, torch.zeros((), dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_crwwce_very_confident_logits(dtype):
    """h_k -> 1 for a wrong class: log(1 - h_k) = -100 + log(K - 1), not -inf."""
    k = 7
    z = torch.full((4, k), -50.0, dtype=torch.float64)
    z[0, 2] = z[1, 2] = z[2, 5] = z[3, 0] = 50.0
    y = torch.tensor([2, 4, 1, 0])          # confident and right, or confident and wrong
    fn_w = torch.linspace(1, 3, k, dtype=torch.float64)
    fp_w = torch.rand(k, k, dtype=torch.float64) + 0.5
    zz = z.to(dtype).requires_grad_(True)
    got = fm.crwwce_loss(zz, y, fn_w.to(dtype), fp_w.to(dtype), reduction="none", **REF)
    assert torch.isfinite(got).all()
    got.sum().backward()
    assert torch.isfinite(zz.grad).all()
    want = loop_crwwce(z, y, fn_w, fp_w, "none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-9,
                               atol=1e-5 if dtype == torch.float32 else 1e-9)


# -------------------------------------------------------------- Sinkhorn

@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("eps,scale,n_iter", [(0.1, 1.0, 300), (0.1, 10.0, 2000)],
                         ids=("eps0.1-cost1", "eps0.1-cost10"))
@pytest.mark.parametrize("k", (7, 13))
def test_sinkhorn_matches_pot(k, eps, scale, n_iter, per_sample):
    n = 3
    a, b = simplex(n, k), simplex(n, k)
    cost = make_cost(n, k, per_sample, scale)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, **REF)
    want = pot_plans(a, b, cost, eps, numItermax=100000, stopThr=1e-14)
    assert got.shape == (n, k, k) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, **POT)
    torch.testing.assert_close(got.sum(2), a, **POT)   # rows follow a
    torch.testing.assert_close(got.sum(1), b, **POT)   # columns follow b


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("k", (7, 13))
def test_sinkhorn_tiny_eps_iterates_match_pot_log(k, per_sample):
    """eps = 1e-3 with costs ~10 (C/eps ~ 1e4, where exp(-C/eps) underflows):
    far from converged after 150 iterations, but every iterate equals POT's
    log-domain one, columns are exact, nothing is NaN, and float32 agrees."""
    n, eps, n_iter = 3, 1e-3, 150
    a, b = simplex(n, k), simplex(n, k)
    cost = make_cost(n, k, per_sample, 10.0)
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, **REF)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, pot_log_iterates(a, b, cost, eps, n_iter), **POT)
    torch.testing.assert_close(got.sum(1), b, **POT)
    got32 = fm.sinkhorn(a.float(), b.float(), cost.float(), eps=eps, n_iter=n_iter, **REF)
    assert got32.dtype == torch.float32 and torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), got, **F32_TINY_EPS)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_sinkhorn_tiny_eps_converged_is_the_exact_plan(dtype):
    """With a = b and a zero-diagonal cost the optimal plan diag(a) is reached;
    at eps = 1e-3 the entropic plan is the exact (ot.emd) one."""
    n, k = 4, 7
    a = simplex(n, k)
    cost = 10 * (1 - torch.eye(k, dtype=torch.float64)) * (1 + torch.rand(k, k,
                                                                          dtype=torch.float64))
    got = fm.sinkhorn(a.to(dtype), a.to(dtype), cost.to(dtype), eps=1e-3, n_iter=50, **REF)
    want = torch.stack([torch.from_numpy(ot.emd(a[i].numpy(), a[i].numpy(), cost.numpy()))
                        for i in range(n)])
    torch.testing.assert_close(got.double(), want, rtol=0,
                               atol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")   # POT's log(0)
def test_sinkhorn_zeros_in_marginals():
    n, k = 3, 7
    a, b = simplex(n, k), simplex(n, k)
    a[0, [1, 4]] = 0
    b[0, [0, 4, 6]] = 0
    a[2, 3] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost = make_cost(n, k, False, 1.0)
    aa, bb, cc = (t.clone().requires_grad_(True) for t in (a, b, cost))
    got = fm.sinkhorn(aa, bb, cc, eps=0.1, n_iter=400, **REF)
    assert torch.isfinite(got).all()
    assert (got[0, [1, 4], :] == 0).all() and (got[2, 3, :] == 0).all()
    assert (got[0, :, [0, 4, 6]] == 0).all()
    # POT's default method divides by a; its log-domain one takes zeros
    torch.testing.assert_close(got, pot_plans(a, b, cost, 0.1, method="sinkhorn_log",
                                              numItermax=100000, stopThr=1e-14), **POT)
    (got * torch.randn_like(got)).sum().backward()
    for t in (aa, bb, cc):
        assert torch.isfinite(t.grad).all()


def test_sinkhorn_empty_marginal_gives_zero_plan():
    n, k = 3, 5
    a, b = simplex(n, k), simplex(n, k)
    a[1] = 0
    b[2] = 0
    aa = a.clone().requires_grad_(True)
    cost = make_cost(n, k, False)
    got = fm.sinkhorn(aa, b, cost, eps=0.1, n_iter=50, **REF)
    assert (got[1] == 0).all() and (got[2] == 0).all() and torch.isfinite(got).all()
    # the other samples do not notice
    torch.testing.assert_close(got[:1], fm.sinkhorn(a[:1], b[:1], cost, eps=0.1, n_iter=50,
                                                    **REF), **EXACT)
    got.sum().backward()
    assert torch.isfinite(aa.grad).all()


@pytest.mark.parametrize("tol", (1e-4, 1e-9))
def test_sinkhorn_tol_stops_early_at_a_check(tol):
    """With tol the loop ends at the first multiple of 10 iterations whose row
    error is below tol: the plan is that iterate, and within ~tol of convergence."""
    n, k, eps = 4, 7, 0.05
    a, b = simplex(n, k), simplex(n, k)
    cost = make_cost(n, k, True, 2.0)
    stop = None
    for m in range(10, 3000, 10):
        t_m = fm.sinkhorn(a, b, cost, eps=eps, n_iter=m, **REF)
        if float(row_error(t_m, a)) < tol:
            stop = m
            break
    assert stop is not None and stop < 3000
    got = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, tol=tol, **REF)
    assert torch.equal(got, t_m)
    converged = fm.sinkhorn(a, b, cost, eps=eps, n_iter=5000, **REF)
    torch.testing.assert_close(got, converged, rtol=0, atol=10 * tol)


# ----------------------------------------------------------- Wasserstein

@pytest.mark.parametrize("entropic", (False, True))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_wasserstein_labels_closed_form(shape, reduction, per_sample, entropic):
    n, k = shape
    z = make_logits(n, k)
    y = make_labels(n, k, ignore=(n - 1,) if n > 1 else ())
    cost = make_cost(n, k, per_sample, 10.0)
    got = fm.wasserstein_loss(z, y, cost, eps=0.1, entropic=entropic, reduction=reduction, **REF)
    want = loop_wasserstein_labels(z, y, cost, entropic, 0.1, reduction)
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("entropic", (False, True))
@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_wasserstein_distribution_target_matches_pot(per_sample, entropic):
    n, k, eps = 4, 7, 0.1
    z = make_logits(n, k)
    target = simplex(n, k)
    target[1, [0, 3]] = 0
    target = target / target.sum(1, keepdim=True)
    cost = make_cost(n, k, per_sample, 1.0)
    got = fm.wasserstein_loss(z, target, cost, eps=eps, n_iter=500, entropic=entropic,
                              reduction="none", **REF)
    h = torch.softmax(z, dim=1)
    t = pot_plans(h, target, cost, eps, numItermax=100000, stopThr=1e-14)
    cc = cost if per_sample else cost.expand(n, k, k)
    want = (t * cc).sum((1, 2))
    if entropic:
        logt = torch.where(t > 0, t.log(), torch.zeros_like(t))
        want = want + eps * torch.where(t > 0, t * (logt - 1), torch.zeros_like(t)).sum((1, 2))
    torch.testing.assert_close(got, want, **POT)
    mean = fm.wasserstein_loss(z, target, cost, eps=eps, n_iter=500, entropic=entropic, **REF)
    torch.testing.assert_close(mean, want.mean(), **POT)


@pytest.mark.parametrize("entropic", (False, True))
def test_wasserstein_one_hot_distribution_equals_labels(entropic):
    """A one-hot target through Sinkhorn reaches the closed form in two iterations."""
    n, k = 5, 7
    z, y = make_logits(n, k), make_labels(n, k)
    cost = make_cost(n, k, False, 10.0)
    one_hot = torch.nn.functional.one_hot(y, k).double()
    kw = dict(eps=0.1, entropic=entropic, reduction="none", **REF)
    torch.testing.assert_close(fm.wasserstein_loss(z, one_hot, cost, n_iter=3, **kw),
                               fm.wasserstein_loss(z, y, cost, **kw), **EXACT)


def test_implicit_solve_branches_agree(monkeypatch):
    """The fused backends' shared implicit solve (cs.fixed_point_grads): its
    adjoint solves H [p; q] = [rows; columns of Gamma * T], zero off the support,
    and the Cholesky fast path and the pseudo-inverse fallback give the same
    solution (same gauge), so a sample does not change answer between them."""
    n, k = 4, 6
    a, b = simplex(n, k), simplex(n, k)
    a[0, 2] = 0
    b[1, [0, 5]] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    b[3] = 0                                               # an empty sample
    plan = fm.sinkhorn(a, b, make_cost(n, k, True), eps=0.3, n_iter=2000, tol=1e-13, **REF)
    gamma = torch.randn(n, k, k, dtype=torch.float64)
    fast = cs.fixed_point_grads(plan, gamma, 0.3)
    gt = gamma * plan
    rows, cols = plan.sum(2), plan.sum(1)
    p, q = fast[0], fast[1]
    torch.testing.assert_close(rows * p + (plan @ q[:, :, None]).squeeze(2), gt.sum(2), **EXACT)
    torch.testing.assert_close((plan.transpose(1, 2) @ p[:, :, None]).squeeze(2) + cols * q,
                               gt.sum(1), **EXACT)
    assert (p[rows == 0] == 0).all() and (q[cols == 0] == 0).all() and (p[3] == 0).all()
    monkeypatch.setattr(cs, "FAST_MIN_EIG", float("inf"))   # every sample to the fallback
    for got, want in zip(cs.fixed_point_grads(plan, gamma, 0.3), fast):
        torch.testing.assert_close(got, want, **EXACT)


def _decoupled_problem(dev):
    """Three samples, per-sample costs, float64: 0 an ordinary one; 1 target ==
    prediction with a zero-diagonal cost (the plan is diag(h), every other entry
    underflows at eps = 1e-2); 2 two blocks of classes with cross costs of 10 and
    a target with the prediction's block masses (the plan splits into two blocks)."""
    n, k = 3, 6
    z = make_logits(n, k)
    h = torch.softmax(z, 1)
    cost = make_cost(n, k, True, 0.5)
    cost[1] = (1 - torch.eye(k, dtype=torch.float64)) * (1 + torch.rand(k, k, dtype=torch.float64))
    blk = torch.tensor([0, 0, 0, 1, 1, 1])
    same = blk[:, None] == blk[None, :]
    cost[2] = torch.where(same, cost[2], torch.full_like(cost[2], 10.0))
    target = simplex(n, k)
    target[1] = h[1]
    for b in (0, 1):
        m = blk == b
        target[2, m] = target[2, m] / target[2, m].sum() * h[2, m].sum()
    return z.to(dev), target.to(dev), cost.to(dev), blk.to(dev)


def _block_centred(x, blk):
    """x minus its mean over each block of classes (the per-block constants a
    decoupled plan leaves undetermined)."""
    out = x.clone()
    for b in blk.unique():
        m = blk == b
        out[:, m] = x[:, m] - x[:, m].mean(1, keepdim=True)
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's exp(-inf) paths
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("wasserstein_loss"))
def test_wasserstein_decoupled_plan_gradients(backend):
    """entropic=False on plans that decouple into blocks (the dual Hessian is
    singular): no backend fails, and one such sample leaves the others' gradients
    alone. The fused backends solve the implicit system by a pseudo-inverse that
    moves no mass between blocks; the reference differentiates the iterations.
    Both agree on everything the plan determines: the cost gradient, and the
    logit / target gradients up to a constant per block."""
    dev = device_for(backend)
    z0, t0, c0, blk = _decoupled_problem(dev)
    kw = dict(eps=1e-2, n_iter=3000, tol=1e-12, entropic=False, reduction="none")
    up = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64, device=dev)
    grads = {}
    for be in ("reference", backend):
        z, t, c = (x.clone().requires_grad_(True) for x in (z0, t0, c0))
        per = fm.wasserstein_loss(z, t, c, backend=be, **kw)
        grads[be] = (per.detach(),) + torch.autograd.grad((per * up).sum(), (z, t, c))
    (loss, gz, gt, gc), (rloss, rz, rt, rc) = grads[backend], grads["reference"]
    for g in (gz, gt, gc):
        assert torch.isfinite(g).all()
    torch.testing.assert_close(loss, rloss, **DECOUPLED)
    assert float(loss[1]) < 1e-30                      # diag(h): nothing moves
    h = torch.softmax(z0, 1)
    # sample 0: an ordinary plan, the gradients of the converged iteration
    torch.testing.assert_close(gz[0], rz[0], **DECOUPLED)
    torch.testing.assert_close(gt[0] - gt[0].mean(), rt[0] - rt[0].mean(), **DECOUPLED)
    # sample 1: a minimum in the marginals, whose gradients vanish (to underflow);
    # d/dC is the plan diag(h) itself
    for g in (gz[1], gt[1], rz[1]):
        assert float(g.abs().max()) < 1e-30
    torch.testing.assert_close(gc[1], up[1] * torch.diag(h[1]), rtol=1e-12, atol=1e-30)
    # sample 2: two blocks
    torch.testing.assert_close(gc, rc, **DECOUPLED)
    torch.testing.assert_close(_block_centred(gt[2:], blk), _block_centred(rt[2:], blk),
                               **DECOUPLED)
    torch.testing.assert_close(_block_centred(gz[2:] / h[2:], blk),
                               _block_centred(rz[2:] / h[2:], blk), **DECOUPLED)
    if backend != "reference":     # the pseudo-inverse's gauge: each block keeps its mass
        for b in (0, 1):
            assert abs(float(gz[2, blk == b].sum())) < 1e-12


# -------------------------------------------------------------- gradcheck

def _gc(fn, *inputs, fast_mode=False):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_wce_crwwce(reduction):
    n, k = 3, 4
    z = make_logits(n, k, requires_grad=True)
    y = torch.tensor([0, 3, -100])
    w = (torch.rand(k, dtype=torch.float64) + 0.5).requires_grad_(True)
    fp_w = (torch.rand(k, k, dtype=torch.float64) + 0.5).requires_grad_(True)
    _gc(lambda z, w: fm.weighted_cross_entropy(z, y, w, reduction=reduction, **REF), z, w)
    _gc(lambda z, w, fp_w: fm.crwwce_loss(z, y, w, fp_w, reduction=reduction, **REF),
        z, w, fp_w)


@pytest.mark.parametrize("per_sample", (False, True), ids=("shared", "per_sample"))
def test_gradcheck_sinkhorn(per_sample):
    # marginals through a softmax: finite differences must stay on the simplex
    # (unequal masses are rejected), and only the tangent part is defined
    n, k = 3, 4
    u = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    cost = make_cost(n, k, per_sample).requires_grad_(True)
    # fast mode (random projections of the Jacobian): the plans have N K^2 outputs
    _gc(lambda u, v, c: fm.sinkhorn(u.softmax(1), v.softmax(1), c, eps=0.5, n_iter=15, **REF),
        u, v, cost, fast_mode=True)


@pytest.mark.parametrize("entropic", (False, True))
def test_gradcheck_wasserstein(entropic):
    n, k = 3, 4
    z = make_logits(n, k, requires_grad=True)
    cost = make_cost(n, k, False).requires_grad_(True)
    y = torch.tensor([1, -100, 3])
    _gc(lambda z, c: fm.wasserstein_loss(z, y, c, eps=0.1, entropic=entropic, **REF), z, cost)
    u = torch.randn(n, k, dtype=torch.float64, requires_grad=True)   # target = softmax(u)
    _gc(lambda z, u, c: fm.wasserstein_loss(z, u.softmax(1), c, eps=0.5, n_iter=15,
                                            entropic=entropic, **REF), z, u, cost)


# ------------------------------------------------- ignore_index and empty

def _all_losses(z, y, k, ignore_index=-100, reduction="mean"):
    w = torch.rand(k, dtype=z.dtype).requires_grad_(True)
    fp_w = torch.rand(k, k, dtype=z.dtype).requires_grad_(True)
    cost = torch.rand(k, k, dtype=z.dtype).requires_grad_(True)
    kw = dict(ignore_index=ignore_index, reduction=reduction, **REF)
    return {
        "wce": (fm.weighted_cross_entropy(z, y, w, **kw), (w,)),
        "crwwce": (fm.crwwce_loss(z, y, w, fp_w, **kw), (w, fp_w)),
        "wasserstein": (fm.wasserstein_loss(z, y, cost, **kw), (cost,)),
    }


def test_custom_ignore_index():
    n, k = 6, 5
    z = make_logits(n, k)
    y = torch.tensor([0, 7, 2, 7, 4, 1])
    w = torch.rand(k, dtype=torch.float64)
    fp_w = torch.rand(k, k, dtype=torch.float64)
    cost = torch.rand(k, k, dtype=torch.float64)
    keep = y != 7
    for reduction in REDUCTIONS:
        kw = dict(ignore_index=7, reduction=reduction, **REF)
        got = fm.weighted_cross_entropy(z, y, w, **kw)
        sub = fm.weighted_cross_entropy(z[keep], y[keep], w, reduction=reduction, **REF)
        got2 = fm.crwwce_loss(z, y, w, fp_w, **kw)
        sub2 = fm.crwwce_loss(z[keep], y[keep], w, fp_w, reduction=reduction, **REF)
        got3 = fm.wasserstein_loss(z, y, cost, **kw)
        sub3 = fm.wasserstein_loss(z[keep], y[keep], cost, reduction=reduction, **REF)
        if reduction == "none":
            for g in (got, got2, got3):
                assert (g[~keep] == 0).all()
            got, got2, got3 = got[keep], got2[keep], got3[keep]
        for g, s in ((got, sub), (got2, sub2), (got3, sub3)):
            torch.testing.assert_close(g, s, **EXACT)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("case", ("empty", "all_ignored"))
def test_no_samples_is_zero_with_zero_grads(case, reduction):
    k = 5
    n = 0 if case == "empty" else 3
    z = make_logits(n, k, requires_grad=True)
    y = torch.full((n,), -100, dtype=torch.long)
    for name, (loss, params) in _all_losses(z, y, k, reduction=reduction).items():
        assert loss.shape == () and float(loss.detach()) == 0.0, name
        grads = torch.autograd.grad(loss, (z,) + params, allow_unused=True)
        for g, p in zip(grads, (z,) + params):
            g = torch.zeros_like(p) if g is None else g
            assert g.shape == p.shape and (g == 0).all(), name


def test_empty_batch_sinkhorn_and_distributions():
    k = 5
    a = torch.zeros(0, k, dtype=torch.float64, requires_grad=True)
    plans = fm.sinkhorn(a, torch.zeros(0, k, dtype=torch.float64), torch.rand(k, k,
                        dtype=torch.float64), tol=1e-6, **REF)
    assert plans.shape == (0, k, k)
    z = make_logits(0, k, requires_grad=True)
    cost = torch.rand(0, k, k, dtype=torch.float64, requires_grad=True)
    loss = fm.wasserstein_loss(z, torch.zeros(0, k, dtype=torch.float64), cost, **REF)
    assert loss.shape == () and float(loss.detach()) == 0.0
    gz, gc = torch.autograd.grad(loss, (z, cost))
    assert gz.shape == (0, k) and gc.shape == (0, k, k)
    none = fm.wasserstein_loss(z, torch.zeros(0, dtype=torch.long), cost, reduction="none", **REF)
    assert none.shape == (0,)


# --------------------------------------------------- precision and layout

@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_close_to_float32(dtype):
    n, k = 9, 7
    z32 = make_logits(n, k, torch.float32)
    y = make_labels(n, k, ignore=(3,))
    w, fp_w = torch.rand(k) + 0.5, torch.rand(k, k) + 0.5
    cost, target = torch.rand(k, k) * 2, simplex(n, k, torch.float32)
    a, b = simplex(n, k, torch.float32), simplex(n, k, torch.float32)

    def run(cast):
        zz = z32.to(cast)
        return {
            "wce": fm.weighted_cross_entropy(zz, y, w.to(cast), **REF),
            "crwwce": fm.crwwce_loss(zz, y, w.to(cast), fp_w.to(cast), **REF),
            "ws_labels": fm.wasserstein_loss(zz, y, cost.to(cast), entropic=True, **REF),
            "ws_dist": fm.wasserstein_loss(zz, target.to(cast), cost.to(cast), **REF),
            "sinkhorn": fm.sinkhorn(a.to(cast), b.to(cast), cost.to(cast), **REF),
        }

    low, ref = run(dtype), run(torch.float32)
    for name in low:
        want_dtype = dtype if name == "sinkhorn" else torch.float32
        assert low[name].dtype == want_dtype, name
        assert torch.isfinite(low[name]).all(), name
        torch.testing.assert_close(low[name].float(), ref[name], **LOW[dtype], msg=name)


def test_non_contiguous_inputs():
    n, k = 6, 7
    z = make_logits(k, 2 * n).t()[::2]                  # transposed, every other row
    y_full = make_labels(2 * n, k)
    y = y_full[::2]
    cost = make_cost(1, k, False, 3.0).t()
    w = torch.rand(2 * k, dtype=torch.float64)[::2]
    fp_w = torch.rand(k, k, dtype=torch.float64).t()
    a = simplex(n, k).t().contiguous().t()             # rows sum to 1, column-major
    b = simplex(2 * n, k)[1::2]
    target = simplex(2 * n, k)[::2]
    assert not any(t.is_contiguous() for t in (z, y, cost, w, fp_w, a, b, target))
    c = lambda t: t.contiguous()  # noqa: E731
    pairs = [
        (fm.weighted_cross_entropy(z, y, w, **REF), fm.weighted_cross_entropy(c(z), c(y), c(w),
                                                                               **REF)),
        (fm.crwwce_loss(z, y, w, fp_w, **REF), fm.crwwce_loss(c(z), c(y), c(w), c(fp_w), **REF)),
        (fm.sinkhorn(a / 1, b, cost, **REF), fm.sinkhorn(c(a), c(b), c(cost), **REF)),
        (fm.wasserstein_loss(z, y, cost, **REF), fm.wasserstein_loss(c(z), c(y), c(cost), **REF)),
        (fm.wasserstein_loss(z, target, cost, **REF),
         fm.wasserstein_loss(c(z), c(target), c(cost), **REF)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, **EXACT)


def test_auto_backend_runs():
    n, k = 4, 5
    z, y = make_logits(n, k), make_labels(n, k)
    w, cost = torch.rand(k, dtype=torch.float64), torch.rand(k, k, dtype=torch.float64)
    a, b = simplex(n, k), simplex(n, k)
    torch.testing.assert_close(fm.weighted_cross_entropy(z, y, w, backend="auto"),
                               fm.weighted_cross_entropy(z, y, w, **REF), **EXACT)
    torch.testing.assert_close(fm.crwwce_loss(z, y, w, cost, backend="auto"),
                               fm.crwwce_loss(z, y, w, cost, **REF), **EXACT)
    torch.testing.assert_close(fm.sinkhorn(a, b, cost, backend="auto"),
                               fm.sinkhorn(a, b, cost, **REF), **EXACT)
    torch.testing.assert_close(fm.wasserstein_loss(z, b, cost, backend="auto"),
                               fm.wasserstein_loss(z, b, cost, **REF), **EXACT)


# ---------------------------------------------------------------- bad input

def _bad_calls():
    n, k = 4, 5
    z, y = make_logits(n, k), make_labels(n, k)
    w, cost = torch.rand(k, dtype=torch.float64), torch.rand(k, k, dtype=torch.float64)
    a, b = simplex(n, k), simplex(n, k)
    y_bad = y.clone()
    y_bad[2] = 9
    neg = a.clone()
    neg[1, 2] = -0.25
    heavy = a.clone()
    heavy[2] *= 1 + 1e-4                               # 100 x the float64 tolerance
    half_mass = b.clone()
    half_mass[3] /= 2
    return [
        ("9", lambda: fm.weighted_cross_entropy(z, y_bad, w, **REF)),
        ("9", lambda: fm.crwwce_loss(z, y_bad, w, cost, **REF)),
        ("9", lambda: fm.wasserstein_loss(z, y_bad, cost, **REF)),
        ("class_weight", lambda: fm.weighted_cross_entropy(z, y, w[:-1], **REF)),
        ("fp_weight", lambda: fm.crwwce_loss(z, y, w, cost[:, :-1], **REF)),
        ("b", lambda: fm.sinkhorn(a, b[:, :-1], cost, **REF)),
        ("b", lambda: fm.sinkhorn(a, b[:-1], cost, **REF)),
        ("cost", lambda: fm.sinkhorn(a, b, cost[:, :-1], **REF)),
        ("cost", lambda: fm.sinkhorn(a, b, cost.expand(n + 1, k, k), **REF)),
        ("non-negative", lambda: fm.sinkhorn(neg, b, cost, **REF)),
        ("non-negative", lambda: fm.sinkhorn(a, neg, cost, **REF)),
        ("non-negative", lambda: fm.wasserstein_loss(z, neg, cost, **REF)),
        ("equal mass.*sample 2", lambda: fm.sinkhorn(heavy, b, cost, **REF)),
        ("equal mass.*sample 3", lambda: fm.sinkhorn(a, half_mass, cost, backend="auto")),
        ("sum to 1.*row 3", lambda: fm.wasserstein_loss(z, half_mass, cost, **REF)),
        ("sum to 1.*row 2", lambda: fm.wasserstein_loss(z, heavy, cost, backend="auto")),
        ("eps", lambda: fm.sinkhorn(a, b, cost, eps=0.0, **REF)),
        ("n_iter", lambda: fm.sinkhorn(a, b, cost, n_iter=0, **REF)),
        ("tol", lambda: fm.sinkhorn(a, b, cost, tol=-1.0, **REF)),
        ("finite", lambda: fm.sinkhorn(a, b, cost.clone().fill_(float("nan")), **REF)),
        ("reduction", lambda: fm.wasserstein_loss(z, y, cost, reduction="avg", **REF)),
        ("backend", lambda: fm.sinkhorn(a, b, cost, backend="cuda")),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_calls())))
def test_bad_input_raises_value_error(idx):
    match, call = _bad_calls()[idx]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_marginal_mass_tolerance_is_relative(dtype):
    """Equal masses to the dtype's rounding pass (float32 rows normalised in float32,
    small total masses, an all-zero marginal); a mass gap above the tolerance raises."""
    n, k = 4, 6
    rtol = {torch.float32: 1e-4, torch.float64: 1e-6}[dtype]
    a, b = simplex(n, k, dtype), simplex(n, k, dtype)
    cost = make_cost(n, k, False, dtype=dtype)
    kw = dict(eps=0.1, n_iter=2, **REF)
    fm.sinkhorn(a, b, cost, **kw)
    fm.sinkhorn(1e-3 * a, 1e-3 * b, cost, **kw)          # relative, not absolute
    fm.sinkhorn(a * (1 + rtol / 4), b, cost, **kw)
    b_empty = b.clone()
    b_empty[1] = 0
    fm.sinkhorn(a, b_empty, cost, **kw)
    fm.wasserstein_loss(make_logits(n, k, dtype), b_empty, cost, **kw)
    with pytest.raises(ValueError, match="equal mass"):
        fm.sinkhorn(1e-3 * a * (1 + 4 * rtol), 1e-3 * b, cost, **kw)
    with pytest.raises(ValueError, match="sum to 1"):
        fm.wasserstein_loss(make_logits(n, k, dtype), b * (1 + 4 * rtol), cost, **kw)


def test_bad_label_dtype_raises_type_error():
    z = make_logits(3, 4)
    with pytest.raises(TypeError, match="int64"):
        fm.weighted_cross_entropy(z, torch.tensor([0, 1, 2], dtype=torch.int32),
                                  torch.ones(4, dtype=torch.float64), **REF)


# ---------------------------------------------------------------- nn module

@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_wasserstein_module_computes_in_float32_for_half_logits(dtype):
    """The float32 cost buffer reaches the loss unrounded, as in a direct call
    (a cost whose entries are not representable in half precision)."""
    n, k = 4, 5
    cost = torch.rand(k, k) * 3 + 1e-3
    assert not torch.equal(cost.to(dtype).float(), cost)
    mod = fnn.WassersteinLoss(cost, eps=0.1, n_iter=50, backend="reference")
    z = make_logits(n, k, torch.float32).to(dtype)
    target = simplex(n, k, torch.float32)
    labels = make_labels(n, k)
    for tgt in (target, labels):
        got = mod(z, tgt)
        assert got.dtype == torch.float32
        assert torch.equal(got, fm.wasserstein_loss(z, tgt, cost, n_iter=50, **REF))
        assert not torch.equal(got, fm.wasserstein_loss(z, tgt, cost.to(dtype), n_iter=50, **REF))


def test_wasserstein_module_ignore_index():
    n, k = 5, 4
    mod = fnn.WassersteinLoss(torch.rand(k, k, dtype=torch.float64), ignore_index=7,
                              reduction="none", backend="reference")
    z = make_logits(n, k)
    y = torch.tensor([0, 7, 3, 7, 1])
    got = mod(z, y)
    assert (got[y == 7] == 0).all()
    keep = y != 7
    torch.testing.assert_close(got[keep], fm.wasserstein_loss(z[keep], y[keep], mod.cost,
                                                              reduction="none", **REF), **EXACT)
    with pytest.raises(ValueError, match="7"):
        fnn.WassersteinLoss(mod.cost, backend="reference")(z, y)   # default -100: 7 is bad


def test_wasserstein_module_cost_is_a_buffer():
    k = 5
    cost = torch.rand(k, k)
    mod = fnn.WassersteinLoss(cost, eps=0.1, n_iter=50, backend="reference")
    assert "cost" in dict(mod.named_buffers()) and not list(mod.parameters())
    assert torch.equal(mod.state_dict()["cost"], cost)
    cost.fill_(0)                                         # the module holds its own copy
    assert mod.cost.abs().sum() > 0
    mod64 = mod.to(torch.float64)
    assert mod64.cost.dtype == torch.float64
    z, y = make_logits(4, k), make_labels(4, k)
    torch.testing.assert_close(mod64(z, y), fm.wasserstein_loss(z, y, mod64.cost, **REF),
                               **EXACT)
    target = simplex(4, k)
    torch.testing.assert_close(mod64(z, target), fm.wasserstein_loss(z, target, mod64.cost,
                                                                     n_iter=50, **REF), **EXACT)
    fresh = fnn.WassersteinLoss(torch.zeros(k, k, dtype=torch.float64))
    fresh.load_state_dict(mod64.state_dict())
    assert torch.equal(fresh.cost, mod64.cost)
