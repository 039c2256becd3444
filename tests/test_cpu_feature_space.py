"""The C++ CPU kernels of the feature-space losses (csrc/feature_space.cpp):
gradcheck, tiling, ties, tiny classes, what is allocated (no N x N for soft NN,
no N^3 for triplet mining), low precision and the C++ shape checks. The broad
comparison with the reference is test_feature_space.test_fused_matches_reference."""
import math

import pytest
import torch
import fused_margin as fm
from fused_margin import dispatch

from conftest import NativeAllocationRecorder

ok, why = dispatch._status("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=why)
if ok:
    from fused_margin.cpu import feature_space as cpu

MININGS = ("semihard", "hard", "all")
DISTANCES = ("l2", "squared_l2", "cosine")
REDUCTIONS = ("mean", "sum", "none")
CPU, REF = dict(backend="cpu"), dict(backend="reference")

# Tolerances, named once: the kernels against the reference in each dtype.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}
LOW = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}

# label patterns: singletons and pairs, one class, two samples, one sample
LABELS = {
    "sizes_1_2_4": [0, 1, 1, 2, 0, 0, 3, 0],
    "pairs": [0, 0, 1, 1, 2, 2],
    "one_class": [0, 0, 0, 0],
    "two": [1, 1],
    "split_two": [0, 1],
    "one": [0],
    "empty": [],
}


def _ops(op_kw):
    """name -> fn(x, y, c, w_k, **backend) for every cpu op, with arguments."""
    fns = {
        "snn": lambda x, y, c, w, **b: fm.soft_nearest_neighbor_loss(x, y, temperature=0.7,
                                                                     **op_kw, **b),
        "center": lambda x, y, c, w, **b: fm.center_loss(x, y, c, **op_kw, **b),
        "contrastive": lambda x, y, c, w, **b: fm.contrastive_center_loss(x, y, c, delta=0.5,
                                                                          **op_kw, **b),
        "sigma2r": lambda x, y, c, w, **b: fm.sigma2r_loss(x, y, c, w, n_neighbors=2, z=2.0,
                                                           eps=0.1, **op_kw, **b),
    }
    for m in MININGS:
        for d in DISTANCES:
            fns[f"triplet_{m}_{d}"] = (lambda m, d: lambda x, y, c, w, **b: fm.triplet_margin_loss(
                x, y, margin=0.7, mining=m, distance=d, **op_kw, **b))(m, d)
    return fns


def _inputs(labels, d=3, c=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    cen = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    w_k = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.tensor(labels, dtype=torch.long), cen, w_k


def _run(fn, x, y, c, w, backend):
    leaves = [t.clone().requires_grad_(True) for t in (x, c, w)]
    out = fn(leaves[0], y, leaves[1], leaves[2], backend=backend)
    outs = list(out) if isinstance(out, tuple) else [out]
    total = sum(o.sum() for o in outs)
    if total.requires_grad:
        total.backward()
    return outs, [t.grad for t in leaves]


def _assert_same(fn, x, y, c, w, tol):
    (ro, rg), (fo, fg) = _run(fn, x, y, c, w, "reference"), _run(fn, x, y, c, w, "cpu")
    for r, f in zip(ro, fo):
        assert f.dtype == r.dtype and f.shape == r.shape
        torch.testing.assert_close(f, r, **tol)
    for r, f in zip(rg, fg):
        if r is None or f is None:
            assert (r is None or r.abs().sum() == 0) and (f is None or f.abs().sum() == 0)
        else:
            torch.testing.assert_close(f, r, **tol)


# ------------------------------------------------------- against the reference

@pytest.mark.parametrize("pattern", list(LABELS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_small_classes_match_reference(pattern, reduction):
    x, y, c, w = _inputs(LABELS[pattern])
    for name, fn in _ops(dict(reduction=reduction)).items():
        _assert_same(fn, x, y, c, w, TOL[torch.float64])


def test_knn_std_small_classes_match_reference():
    for pattern, labels in LABELS.items():
        x, y, c, w = _inputs(labels)
        for k in (1, 2, 9):
            fn = lambda a, yy, b, ww, **bk: fm.knn_std(a, yy, b, n_neighbors=k, **bk)  # noqa: E731
            _assert_same(fn, x, y, c, w, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 5, 256])
def test_row_tiling(monkeypatch, dtype, block):
    # the distance rows are swept `block` at a time; N = 23 is not a multiple
    monkeypatch.setattr(cpu, "FS_ROW_BLOCK", block)
    monkeypatch.setattr(cpu, "FS_CENTER_BLOCK", max(1, block // 2))
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (23,), generator=g).tolist()
    x, y, c, w = _inputs(labels, d=6, c=5, dtype=dtype, seed=2)
    for reduction in ("mean", "none"):
        for name, fn in _ops(dict(reduction=reduction)).items():
            _assert_same(fn, x, y, c, w, TOL[dtype])


# ------------------------------------------------------------------ gradcheck

def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# per-term backward ("none") for every op; the scalar-only path of "all" mining
GRADCHECK = [(name, "none") for name in _ops({})] + [
    (f"triplet_all_{d}", "mean") for d in DISTANCES] + [("snn", "mean")]


@pytest.mark.parametrize("name,reduction", GRADCHECK, ids=[f"{n}-{r}" for n, r in GRADCHECK])
def test_gradcheck(name, reduction):
    x, y, c, w = _inputs(LABELS["sizes_1_2_4"] + [2, 3, 3], d=3, c=4)
    fn = _ops(dict(reduction=reduction))[name]
    x.requires_grad_(True)
    if name.startswith(("triplet", "snn")):
        _gc(lambda a: fn(a, y, c, w, **CPU), x)
    elif name == "sigma2r":
        _gc(lambda a, b, ww: fn(a, y, b, ww, **CPU), x, c.requires_grad_(True),
            w.requires_grad_(True))
    else:
        _gc(lambda a, b: fn(a, y, b, w, **CPU), x, c.requires_grad_(True))


def test_gradcheck_knn_std():
    x, y, c, _ = _inputs(LABELS["sizes_1_2_4"] + [2, 3, 3], d=4, c=4)
    x.requires_grad_(True)
    c.requires_grad_(True)
    _gc(lambda a, b: fm.knn_std(a, y, b, n_neighbors=2, **CPU), x, c)


# ------------------------------------------------------------------------ ties

def test_semihard_choice_and_ties():
    # the reference docstring example, then equal negatives: anchor 0 at 0, its
    # positive at 1; negatives 2 and 3 both at distance 2 (the closest farther):
    # only the lower index, 2, gets a gradient
    x = torch.tensor([[0.0], [5.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    got = fm.triplet_margin_loss(x, y, margin=3.5, mining="semihard", reduction="none", **CPU)
    torch.testing.assert_close(got, torch.tensor([6.5, 4.5, 0.5, 2.5], dtype=torch.float64))
    x = torch.tensor([[0.0], [1.0], [2.0], [-2.0], [9.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1])
    per = fm.triplet_margin_loss(x, y, margin=3.0, mining="semihard", reduction="none", **CPU)
    (gx,) = torch.autograd.grad(per[0], x)
    assert per[0].item() == pytest.approx(1 - 2 + 3.0)
    assert gx[2].item() != 0 and gx[3].item() == 0 and gx[4].item() == 0
    # no negative farther than d_ap = 20: the farthest one, the lower index of the
    # two at distance 9
    x = torch.tensor([[0.0], [20.0], [9.0], [-9.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    per = fm.triplet_margin_loss(x, y, margin=1.0, mining="semihard", reduction="none", **CPU)
    (gx,) = torch.autograd.grad(per[0], x)
    assert per[0].item() == pytest.approx(20 - 9 + 1.0)
    assert gx[2].item() != 0 and gx[3].item() == 0


def test_hard_ties_pick_lower_index():
    x = torch.tensor([[0.0], [0.5], [1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    per = fm.triplet_margin_loss(x, y, margin=2.0, mining="hard", reduction="none", **CPU)
    (gx,) = torch.autograd.grad(per[0], x)
    assert gx[2].item() != 0 and gx[3].item() == 0


def test_all_mining_boundary_terms():
    # integer distances with margin 1: terms exactly 0 are neither counted nor
    # differentiated, in both backends
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 0])
    for reduction in REDUCTIONS:
        fn = lambda a, yy, b, w, **bk: fm.triplet_margin_loss(  # noqa: E731
            a, yy, margin=1.0, mining="all", distance="l2", reduction=reduction, **bk)
        _assert_same(fn, x, y, x[:1], x[:1, 0], TOL[torch.float64])


def test_knn_ties_broken_by_index():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [5.0, 5.0]],
                     dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 1])
    c = torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    sx, sc = fm.knn_std(x, y, c, n_neighbors=1, **CPU)
    (gx,) = torch.autograd.grad(sx[0], x)
    assert gx[1].abs().sum() > 0 and gx[2].abs().sum() == 0 and gx[3].abs().sum() == 0
    sx, sc = fm.knn_std(x, y, c, n_neighbors=2, **CPU)
    (gx,) = torch.autograd.grad(sc[0], x)
    assert gx[1].abs().sum() > 0 and gx[2].abs().sum() == 0 and gx[3].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snn_large_distances_finite(dtype):
    # exp(-lse_all) overflows at the (excluded) diagonal if it is not masked
    x = torch.tensor([[0.0], [50.0], [60.0], [61.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    per = fm.soft_nearest_neighbor_loss(x, y, reduction="none", **CPU)
    assert per[1].item() == pytest.approx(2400.0, rel=1e-6)
    per.sum().backward()
    assert torch.isfinite(x.grad).all()
    want = x.detach().clone().requires_grad_(True)
    fm.soft_nearest_neighbor_loss(want, y, reduction="none", **REF).sum().backward()
    torch.testing.assert_close(x.grad, want.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_points_no_nan(dtype):
    x = torch.randn(1, 4, dtype=dtype).repeat(6, 1)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    c = x[:3].clone()
    w = torch.zeros(3, dtype=dtype)
    for name, fn in _ops(dict(reduction="mean")).items():
        outs, grads = _run(fn, x, y, c, w, "cpu")
        assert all(torch.isfinite(o).all() for o in outs), name
        assert all(g is None or torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("distance", DISTANCES)
def test_nan_row_same_nan_terms_as_reference(distance):
    # per-term NaN pattern: the kernels' clamps, relus and arg-extrema keep a NaN
    # where the reference's do (the mean of any of them is then NaN)
    x, y, c, w = _inputs(LABELS["sizes_1_2_4"] + [2, 3, 3, 1], d=3, c=4)
    x[2, 1] = float("nan")
    fns = [lambda **b: fm.soft_nearest_neighbor_loss(x, y, reduction="none", **b)]
    fns += [(lambda m: lambda **b: fm.triplet_margin_loss(x, y, mining=m, distance=distance,
                                                          reduction="none", **b))(m)
            for m in MININGS]
    for fn in fns:
        got, want = fn(**CPU), fn(**REF)
        assert torch.isnan(want).any()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        keep = ~torch.isnan(want)
        torch.testing.assert_close(got[keep], want[keep], **TOL[torch.float64])


# ------------------------------------------------------------------ allocations
# NativeAllocationRecorder sees every ATen allocation, also the scratch a C++ op
# takes inside itself (per-thread GEMM blocks, accumulators), in bytes.

def _largest_bytes(fn):
    with NativeAllocationRecorder() as rec:
        fn().backward()
    assert rec.bytes, "nothing recorded"
    return max(rec.bytes)


def test_native_recorder_sees_kernel_scratch(monkeypatch):
    # the recorder can fail the tests below: it sees the reference's N x N, and a
    # row block as large as the batch makes the kernel's own scratch N/threads x N
    n, d = 400, 8
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, 5, (n,))
    assert _largest_bytes(lambda: fm.soft_nearest_neighbor_loss(x, y, **REF)) >= 4 * n * n
    monkeypatch.setattr(cpu, "FS_ROW_BLOCK", 4096)
    rows = min(n, max(8, -(-n // torch.get_num_threads())))
    assert _largest_bytes(lambda: fm.soft_nearest_neighbor_loss(x, y, **CPU)) >= 4 * rows * n


def test_snn_allocates_no_n_by_n(monkeypatch):
    monkeypatch.setattr(cpu, "FS_ROW_BLOCK", 64)
    n, d = 400, 100
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, 5, (n,))
    # one 64 x N Gram block per thread, or the per-thread [N, D] gradient accumulators
    bound = 4 * max(64 * n, torch.get_num_threads() * n * d)
    assert bound < 4 * n * n
    assert _largest_bytes(lambda: fm.soft_nearest_neighbor_loss(x, y, **CPU)) <= bound


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_triplet_allocates_no_n_cubed(monkeypatch, mining, distance):
    monkeypatch.setattr(cpu, "FS_ROW_BLOCK", 16)
    n, d = 48, 16
    x = torch.randn(n, d, requires_grad=True)
    y = torch.arange(n) % 3
    pairs = 3 * 16 * 15  # positive pairs (a, p)
    kw = dict(mining=mining, distance=distance)
    if mining == "all":  # the reference's [N, N, N] terms
        assert _largest_bytes(lambda: fm.triplet_margin_loss(x, y, **kw, **REF)) >= n ** 3
    # semi-hard and hard: int64 index lists of the 2P (a, p) and (a, n) pairs;
    # "all": int64 weights of the O(N^2) (a, j) pairs
    bound = 8 * (n * n if mining == "all" else 2 * pairs + n)
    assert _largest_bytes(lambda: fm.triplet_margin_loss(x, y, **kw, **CPU)) <= bound


# ------------------------------------------------------------ dtypes and checks

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(dtype):
    x, y, c, w = _inputs([0, 1, 1, 2, 0, 0, 2, 1, 1], d=5, c=3, dtype=torch.float32)
    x, c, w = x.to(dtype), c.to(dtype), w.to(dtype)
    for name, fn in _ops(dict(reduction="mean")).items():
        (lo,), lo_grads = _run(fn, x, y, c, w, "cpu")
        (hi,), _ = _run(fn, x.float(), y, c.float(), w.float(), "cpu")
        assert lo.dtype == torch.float32, name
        torch.testing.assert_close(lo, hi, **LOW[dtype])
        assert lo_grads[0].dtype == dtype and torch.isfinite(lo_grads[0].float()).all()


def test_cpp_shape_checks():
    ops = torch.ops.fused_margin
    x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.snn_fwd(x[0], y, 1.0, 64)
    with pytest.raises(RuntimeError, match="labels must be"):
        ops.triplet_semihard_fwd(x, y[:3], 0.2, 0, 64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.triplet_hard_fwd(x.half(), y, 0.2, 0, 64)
    with pytest.raises(RuntimeError, match="distance"):
        ops.triplet_all_fwd(x, y, 0.2, 7, 64, False)
    with pytest.raises(RuntimeError, match="centers"):
        ops.knn_select(x, y, torch.randn(2, 4), 3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.center_fwd(x, y + 2, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="pair lists"):
        ops.triplet_pair_grad(x, y, y[:2], x[:, 0], 0)


def test_dispatch_registers_cpu():
    for op in ("center_loss", "contrastive_center_loss", "knn_std", "sigma2r_loss",
               "soft_nearest_neighbor_loss", "triplet_margin_loss"):
        assert dispatch.OPS[op]["cpu"].startswith("fused_margin.cpu.feature_space:")
    loss = fm.soft_nearest_neighbor_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), **CPU)
    assert math.isfinite(loss.item())
