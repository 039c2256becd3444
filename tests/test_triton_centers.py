"""What is specific to the Triton centre losses (fused_margin/triton/centers.py):
loss and gradients to features and centers against the reference, every reduction,
float32 / bfloat16 / float64, C not a multiple of the centre tile, N = 0, a
non-contiguous input, and no N x C allocation.

Runs on the Triton interpreter where there is no GPU (conftest sets TRITON_INTERPRET)."""
import inspect

import pytest
import torch

from fused_margin import dispatch
from fused_margin.reference import feature_space as ref
from fused_margin.triton import centers as tc

from conftest import AllocationRecorder

_ok, _why = dispatch._status("triton")
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances, named once, by input dtype: outputs (float32 for 16-bit inputs, both
# sides computing in float32) and gradients (rounded back to the input dtype).
OUT_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-5, atol=1e-6),
           torch.float64: dict(rtol=1e-12, atol=1e-14)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-4),
            torch.float64: dict(rtol=1e-10, atol=1e-13)}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]

# (BLOCK_M, BLOCK_C, BLOCK_D, num_warps): several row blocks, centre tiles and D chunks
SMALL = (16, 16, 16, 4)
# (N, C, D): C = 37 is no multiple of 16 or 32; D = 19 no multiple of 16
SHAPES = [(29, 37, 19), (5, 3, 7)]


def inputs(n, c, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 31 + c * 7 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    centers = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return x.to(DEV), labels.to(DEV), centers.to(DEV)


def loss_and_grads(fn, x, labels, centers, reduction):
    """fn's loss and d(loss . w)/d(x, centers) for fixed random weights w."""
    xl = x.detach().clone().requires_grad_(True)
    cl = centers.detach().clone().requires_grad_(True)
    out = fn(xl, labels, cl, reduction)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gx, gc = torch.autograd.grad((out * w.to(out)).sum(), (xl, cl))
    return out.detach(), gx, gc


def compare(got, want, dtype):
    torch.testing.assert_close(got[0], want[0], **OUT_TOL[dtype])
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w.double(), **GRAD_TOL[dtype])


def test_signatures_match_reference():
    for name in ("center_loss", "contrastive_center_loss"):
        assert inspect.signature(getattr(tc, name)) == inspect.signature(getattr(ref, name))
        assert dispatch.OPS[name]["triton"] == f"fused_margin.triton.centers:{name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_center_loss(shape, reduction, dtype):
    x, y, c = inputs(*shape, dtype)
    got = loss_and_grads(lambda a, l, b, r: tc.center_loss(a, l, b, reduction=r), x, y, c,
                         reduction)
    want = loss_and_grads(lambda a, l, b, r: ref.center_loss(a, l, b, reduction=r), x, y, c,
                          reduction)
    compare(got, want, dtype)


@pytest.mark.parametrize("blocks", [None, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_contrastive_center_loss(shape, reduction, dtype, blocks):
    x, y, c = inputs(*shape, dtype)
    got = loss_and_grads(lambda a, l, b, r: tc.contrastive_center_with_blocks(
        a, l, b, delta=0.5, reduction=r, blocks=blocks), x, y, c, reduction)
    want = loss_and_grads(lambda a, l, b, r: ref.contrastive_center_loss(
        a, l, b, delta=0.5, reduction=r), x, y, c, reduction)
    compare(got, want, dtype)


def test_contrastive_single_class_is_own_over_delta():
    # C = 1: no other centre, the denominator is delta alone
    x, y, c = inputs(4, 1, 5, torch.float64)
    got = tc.contrastive_center_loss(x, y, c, delta=2.0, reduction="none")
    torch.testing.assert_close(got, 0.25 * ((x - c[0]) ** 2).sum(1), **OUT_TOL[torch.float64])


def test_far_from_origin_float32():
    # points far from the origin, close to their centres: the expansion's
    # cancellation stays within the reference's own (same expansion) error
    x, y, c = inputs(23, 11, 9, torch.float64)
    x, c = x + 100.0, c * 0.01 + 100.0
    exact = ref.contrastive_center_loss(x, y, c, reduction="none")
    err = {name: ((fn(x.float(), y, c.float(), reduction="none").double() - exact) / exact)
           .abs().max().item() for name, fn in (("triton", tc.contrastive_center_loss),
                                                ("reference", ref.contrastive_center_loss))}
    assert err["triton"] <= 2 * err["reference"] + 1e-4, err


def test_non_contiguous_inputs():
    # column-major features and centres, and labels a strided view (every other
    # entry of a longer tensor whose other entries are out of range): loss and
    # gradients as for packed inputs
    x, y, c = inputs(13, 9, 12, torch.float32)
    xt, ct = x.t().contiguous().t(), c.t().contiguous().t()
    yt = torch.stack([y, torch.full_like(y, 10 ** 6)], 1)[:, 0]
    assert not (xt.is_contiguous() or ct.is_contiguous() or yt.is_contiguous())
    for name in ("center_loss", "contrastive_center_loss"):
        got = loss_and_grads(lambda a, l, b, r: getattr(tc, name)(a, l, b, reduction=r),
                             xt, yt, ct, "none")
        want = loss_and_grads(lambda a, l, b, r: getattr(ref, name)(a, l, b, reduction=r),
                              x, y, c, "none")
        compare(got, want, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    x, y, c = inputs(0, 5, 4, torch.float32)
    for name, kw in (("center_loss", {}), ("contrastive_center_loss", {"delta": 1.0})):
        xl, cl = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        out = getattr(tc, name)(xl, y, cl, reduction=reduction, **kw)
        want = getattr(ref, name)(x, y, c, reduction=reduction, **kw)
        torch.testing.assert_close(out.detach(), want)
        gx, gc = torch.autograd.grad(out.sum(), (xl, cl))
        assert gx.shape == (0, 4) and torch.equal(gc, torch.zeros_like(c))


def test_no_n_by_c_allocation():
    n, c, d = 67, 53, 5  # N, C > D: an N x C tensor would be the largest thing made
    x, y, centers = inputs(n, c, d, torch.float32)
    xl, cl = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    with AllocationRecorder() as rec:
        loss = (tc.center_loss(xl, y, cl) + tc.contrastive_center_loss(xl, y, cl))
        loss.backward()
    assert max(rec.sizes) < n * c, [a for a in rec.allocs if a.numel >= n * c]
    assert max(rec.sizes) >= n * d  # the recorder saw the [N, D] gradients


def test_contrastive_center_gradients_finite_where_the_reference_is():
    # issue 15 item 9: the backward summed over the other classes as total - own, so
    # one overflowing row (an inf b_i or x_i term) made every centre's gradient NaN
    # where the reference's (and the cpu backend's) are finite
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    x[0, 0] = 1e19  # ||x_0 - c||^2 ~ 1e38: finite, but b_0 x_0 overflows
    for c, y in ((torch.randn(1, 3, generator=g), torch.zeros(5, dtype=torch.long)),
                 (torch.randn(3, 3, generator=g), torch.tensor([0, 1, 2, 0, 1]))):
        _check_finite_like_reference(x, c, y)


def _check_finite_like_reference(x, c, y):
    out = []
    for fn in (ref.contrastive_center_loss, tc.contrastive_center_loss):
        xx, cc = x.clone().to(DEV).requires_grad_(True), c.clone().to(DEV).requires_grad_(True)
        loss = fn(xx, y.to(DEV), cc, delta=1.0, reduction="sum")
        loss.backward()
        out.append((loss.detach().cpu(), xx.grad.cpu(), cc.grad.cpu()))
    (lr, xr, cr), (lt, xt, ct) = out
    assert torch.isfinite(lr) and torch.isfinite(xr).all() and torch.isfinite(cr).all()
    assert torch.isfinite(xt).all() and torch.isfinite(ct).all()
    torch.testing.assert_close(lt, lr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ct, cr, rtol=1e-3, atol=1e-3)
