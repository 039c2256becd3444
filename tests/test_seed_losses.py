"""Git loss, triplet-center loss and contrastive loss (issue 18): the reference
against the formulas written out as loops, gradcheck in float64, the fused backends
(C++, Triton) against the reference (every reduction, float32 / bfloat16 / float64,
tiles smaller than the problem, non-contiguous inputs), edge cases (N = 0, one class,
N = 1, ties) and no N x C (centre losses) or N x N (contrastive) allocation."""
import math

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch
from fused_margin.reference import feature_space as ref

from conftest import AllocationRecorder, NativeAllocationRecorder, device_for, fused_backends

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=5e-3, atol=1e-3)}
REDUCTIONS = ("mean", "sum", "none")
CENTER_LOSSES = {
    "git": lambda x, y, c, **kw: fm.git_loss(x, y, c, lambda_c=0.7, lambda_g=1.3, **kw),
    "tcl_l2": lambda x, y, c, **kw: fm.triplet_center_loss(x, y, c, margin=2.0, **kw),
    "tcl_sq": lambda x, y, c, **kw: fm.triplet_center_loss(x, y, c, margin=5.0,
                                                           distance="squared_l2", **kw),
}


def contrastive(distance):
    return lambda x, y, **kw: fm.contrastive_loss(x, y, margin=2.5, distance=distance, **kw)


def center_inputs(n=23, c=9, d=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    cen = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, c, (n,), generator=g), cen


# ------------------------------------------------------------ formulas, as loops

def _git_loop(x, y, c, lc, lg):
    out = []
    for i in range(x.shape[0]):
        pull = 0.5 * float(((x[i] - c[y[i]]) ** 2).sum())
        push = sum(1.0 / (1.0 + float(((x[i] - c[j]) ** 2).sum()))
                   for j in range(c.shape[0]) if j != y[i])
        out.append(lc * pull + lg * push)
    return torch.tensor(out, dtype=torch.float64)


def _tcl_loop(x, y, c, m, squared):
    def dist(a, b):
        v = float(((a - b) ** 2).sum())
        return v if squared else math.sqrt(v)
    out = []
    for i in range(x.shape[0]):
        others = [dist(x[i], c[j]) for j in range(c.shape[0]) if j != y[i]]
        out.append(max(0.0, m + dist(x[i], c[y[i]]) - min(others)) if others else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def _contrastive_loop(x, y, m, squared):
    n = x.shape[0]
    total, pairs = 0.0, 0
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            v = float(((x[a] - x[b]) ** 2).sum())
            d = v if squared else math.sqrt(v)
            total += d if y[a] == y[b] else max(0.0, m - d)
            pairs += 1
    return total / pairs if pairs else 0.0


def test_git_matches_formula():
    x, y, c = center_inputs()
    got = fm.git_loss(x, y, c, lambda_c=0.7, lambda_g=1.3, reduction="none", backend="reference")
    torch.testing.assert_close(got, _git_loop(x, y, c, 0.7, 1.3), **TOL[torch.float64])
    mean = fm.git_loss(x, y, c, backend="reference")
    torch.testing.assert_close(mean, _git_loop(x, y, c, 1.0, 1.0).mean(), **TOL[torch.float64])


@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_triplet_center_matches_formula(distance):
    x, y, c = center_inputs()
    x = c[y] + 0.5 * x  # near their centres: some terms positive, some clipped at 0
    m = 1.0 if distance == "l2" else 4.0
    got = fm.triplet_center_loss(x, y, c, margin=m, distance=distance, reduction="none",
                                 backend="reference")
    want = _tcl_loop(x, y, c, m, distance == "squared_l2")
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_contrastive_matches_formula(distance):
    x, _, _ = center_inputs(n=17)
    y = torch.arange(17) % 4
    got = fm.contrastive_loss(x, y, margin=2.5, distance=distance, backend="reference")
    want = _contrastive_loop(x, y, 2.5, distance == "squared_l2")
    assert abs(float(got) - want) < 1e-10
    per = fm.contrastive_loss(x, y, margin=2.5, distance=distance, reduction="none",
                              backend="reference")
    total = fm.contrastive_loss(x, y, margin=2.5, distance=distance, reduction="sum",
                                backend="reference")
    torch.testing.assert_close(per.sum(), total)
    torch.testing.assert_close(total / (17 * 16), got)


def test_defaults():
    x, y, c = center_inputs()
    torch.testing.assert_close(fm.triplet_center_loss(x, y, c, backend="reference"),
                               _tcl_loop(x, y, c, 5.0, False).mean())
    torch.testing.assert_close(fm.contrastive_loss(x, y, backend="reference"),
                               torch.tensor(_contrastive_loop(x, y, 1.0, False),
                                            dtype=torch.float64))


# ------------------------------------------------------------------ gradcheck

@pytest.mark.parametrize("name", sorted(CENTER_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_reference_centers(name, reduction):
    x, y, c = center_inputs(n=7, c=4, d=3)
    x.requires_grad_(True)
    c.requires_grad_(True)
    fn = CENTER_LOSSES[name]
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, y, b, reduction=reduction, backend="reference"), (x, c))


@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_gradcheck_reference_contrastive(distance):
    x, _, _ = center_inputs(n=8, d=3)
    x.requires_grad_(True)
    y = torch.arange(8) % 3
    assert torch.autograd.gradcheck(
        lambda a: contrastive(distance)(a, y, reduction="none", backend="reference"), (x,))


# ------------------------------------------------------------ fused vs reference

def _run(fn, args, backend, reduction, dtype):
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    leaves = [a.detach().to(dev).clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*leaves, reduction=reduction, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    floats = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad((out * w.to(out)).sum(), floats)
    for g in grads:
        assert g.dtype == dtype
    return [out.detach().cpu()] + [g.cpu() for g in grads]


def _compare(fn, args, backend, reduction, dtype):
    got = _run(fn, args, backend, reduction, dtype)
    want = _run(fn, args, "reference", reduction, dtype)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), **TOL[dtype])


@pytest.mark.parametrize("backend", fused_backends("git_loss"))
@pytest.mark.parametrize("name", sorted(CENTER_LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_center_losses_match_reference(backend, name, reduction, dtype):
    x, y, c = center_inputs(n=29, c=37, d=19, dtype=dtype)  # C past one centre tile
    fn = CENTER_LOSSES[name]
    _compare(lambda a, b, **kw: fn(a, y.to(a.device), b, **kw), (x, c), backend, reduction,
             dtype)


@pytest.mark.parametrize("backend", fused_backends("contrastive_loss"))
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_contrastive_matches_reference(backend, distance, reduction, dtype):
    x, _, _ = center_inputs(n=45, d=7, dtype=dtype)  # N past one column tile
    y = torch.randint(0, 4, (45,), generator=torch.Generator().manual_seed(1))
    fn = contrastive(distance)
    _compare(lambda a, **kw: fn(a, y.to(a.device), **kw), (x,), backend, reduction, dtype)


@pytest.mark.parametrize("backend", fused_backends("git_loss"))
def test_center_losses_small_tiles(backend, monkeypatch):
    x, y, c = center_inputs(n=29, c=37, d=19)
    if backend == "cpu":
        from fused_margin.cpu import feature_space as cpu
        monkeypatch.setattr(cpu, "FS_CENTER_BLOCK", 5)
        calls = {"git": CENTER_LOSSES["git"], "tcl": CENTER_LOSSES["tcl_l2"]}
    else:
        from fused_margin.triton import center_margins as tm
        small = (16, 16, 16, 4)
        calls = {
            "git": lambda a, yy, b, reduction, backend: tm.git_loss_with_blocks(
                a, yy, b, lambda_c=0.7, lambda_g=1.3, reduction=reduction, blocks=small),
            "tcl": lambda a, yy, b, reduction, backend: tm.triplet_center_with_blocks(
                a, yy, b, margin=2.0, distance="l2", reduction=reduction, blocks=small)}
    for name, fn in calls.items():
        got = _run(lambda a, b, **kw: fn(a, y.to(a.device), b, **kw), (x, c), backend, "none",
                   torch.float64)
        ref_fn = CENTER_LOSSES["git" if name == "git" else "tcl_l2"]
        want = _run(lambda a, b, **kw: ref_fn(a, y, b, **kw), (x, c), "reference", "none",
                    torch.float64)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("backend", fused_backends("contrastive_loss"))
def test_contrastive_small_tiles(backend, monkeypatch):
    x, _, _ = center_inputs(n=45, d=19)
    y = torch.arange(45) % 5
    if backend == "cpu":
        from fused_margin.cpu import feature_space as cpu
        monkeypatch.setattr(cpu, "FS_ROW_BLOCK", 4)
        fn = contrastive("l2")
    else:
        from fused_margin.triton.contrastive import contrastive_with_blocks
        from fused_margin.triton.feature_space import Blocks
        fn = lambda a, yy, reduction, backend: contrastive_with_blocks(  # noqa: E731
            a, yy, margin=2.5, distance="l2", reduction=reduction,
            blocks=Blocks(m=16, n=16, d=16, do=16))
    got = _run(lambda a, **kw: fn(a, y.to(a.device), **kw), (x,), backend, "none", torch.float64)
    want = _run(lambda a, **kw: contrastive("l2")(a, y, **kw), (x,), "reference", "none",
                torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("git_loss"))
def test_non_contiguous_inputs(backend):
    x, y, c = center_inputs(n=20, c=6, d=10)
    xs, cs = x.t().contiguous().t(), c[:, ::1].t().contiguous().t()  # column-major views
    ys = torch.stack([y, y], 1)[:, 0]  # strided labels
    assert not xs.is_contiguous() and not ys.is_contiguous()
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    for name, fn in CENTER_LOSSES.items():
        got = fn(xs.to(dev), ys.to(dev), cs.to(dev), backend=backend).cpu()
        torch.testing.assert_close(got, fn(x, y, c, backend="reference"))
    got = contrastive("l2")(xs.to(dev), ys.to(dev), backend=backend).cpu()
    torch.testing.assert_close(got, contrastive("l2")(x, y, backend="reference"))


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("git_loss"))
def test_float16_computed_in_float32(backend):
    x, y, c = center_inputs(n=12, c=5, d=4, dtype=torch.float16)
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    for fn in list(CENTER_LOSSES.values()):
        got = fn(x.to(dev), y.to(dev), c.to(dev), backend=backend)
        assert got.dtype == torch.float32
        want = fn(x.float(), y, c.float(), backend="reference")
        torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])
    got = contrastive("l2")(x.to(dev), y.to(dev), backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), contrastive("l2")(x.float(), y, backend="reference"),
                               **TOL[torch.float32])


# ------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("backend", ["reference"] + fused_backends("git_loss"))
def test_empty_batch(backend):
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    x = torch.zeros(0, 4, dtype=torch.float64, device=dev, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64, device=dev, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=dev)
    for fn in CENTER_LOSSES.values():
        for red in REDUCTIONS:
            out = fn(x, y, c, reduction=red, backend=backend)
            assert out.shape == ((0,) if red == "none" else ())
            if red != "none":
                assert float(out.detach()) == 0.0
                gx, gc = torch.autograd.grad(out, (x, c))
                assert gx.shape == x.shape and float(gc.abs().sum()) == 0.0
        out = contrastive("l2")(x, y, backend=backend)
        assert float(out.detach()) == 0.0


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("git_loss"))
def test_one_class(backend):
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    x = torch.randn(6, 3, dtype=torch.float64, device=dev, requires_grad=True)
    c = torch.randn(1, 3, dtype=torch.float64, device=dev, requires_grad=True)
    y = torch.zeros(6, dtype=torch.long, device=dev)
    # git: no push term, the centre loss alone; triplet-center: no other centre, 0
    git = fm.git_loss(x, y, c, backend=backend)
    torch.testing.assert_close(git, fm.center_loss(x, y, c, backend="reference"))
    tcl = fm.triplet_center_loss(x, y, c, backend=backend, reduction="none")
    assert torch.equal(tcl.detach().cpu(), torch.zeros(6, dtype=torch.float64))
    gx, gc = torch.autograd.grad(tcl.sum(), (x, c))
    assert float(gx.abs().sum()) == 0 and float(gc.abs().sum()) == 0
    # contrastive, one class: the mean pair distance; a single sample: no pair, 0
    con = contrastive("l2")(x, y, backend=backend)
    torch.testing.assert_close(con.cpu(), torch.tensor(_contrastive_loop(
        x.detach().cpu(), y.cpu(), 2.5, False), dtype=torch.float64))
    one = contrastive("l2")(x[:1], y[:1], backend=backend)
    assert float(one.detach()) == 0.0
    (g,) = torch.autograd.grad(one, (x,))
    assert float(g.abs().sum()) == 0


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("triplet_center_loss"))
def test_triplet_center_ties_pick_lower_index(backend):
    # centres 1 and 2 coincide: the gradient goes to centre 1 alone
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 0.0], [9.0, 9.0]], dtype=torch.float64,
                     device=dev, requires_grad=True)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=dev)
    y = torch.tensor([0], device=dev)
    loss = fm.triplet_center_loss(x, y, c, margin=5.0, backend=backend)
    torch.testing.assert_close(float(loss), 5.0 + 1.0 - 2.0)
    (gc,) = torch.autograd.grad(loss, (c,))
    assert float(gc[1].abs().sum()) > 0 and float(gc[2].abs().sum()) == 0


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("contrastive_loss"))
def test_contrastive_identical_points_no_nan(backend):
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    x = torch.ones(4, 3, dtype=torch.float64, device=dev, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1], device=dev)
    loss = contrastive("l2")(x, y, backend=backend)
    (g,) = torch.autograd.grad(loss, (x,))
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(float(loss), 2.5 * 8 / 12)


# ------------------------------------------------------------------ allocations

def _cpu_ok():
    return dispatch._status("cpu")[0]


@pytest.mark.skipif(not _cpu_ok(), reason="C++ extension not built")
def test_cpu_center_losses_no_n_by_c(monkeypatch):
    from fused_margin.cpu import feature_space as cpu
    monkeypatch.setattr(cpu, "FS_CENTER_BLOCK", 16)
    n, c, d = 300, 200, 8
    x, y, cen = center_inputs(n=n, c=c, d=d, dtype=torch.float32)
    x.requires_grad_(True)
    cen.requires_grad_(True)
    for fn in CENTER_LOSSES.values():
        with NativeAllocationRecorder() as rec:
            fn(x, y, cen, backend="cpu").backward()
        assert rec.bytes and max(rec.bytes) < n * c * 4
    with NativeAllocationRecorder() as rec:  # the reference does hold N x C
        CENTER_LOSSES["git"](x, y, cen, backend="reference").backward()
    assert max(rec.bytes) >= n * c * 4


@pytest.mark.skipif(not _cpu_ok(), reason="C++ extension not built")
def test_cpu_contrastive_no_n_by_n(monkeypatch):
    from fused_margin.cpu import feature_space as cpu
    monkeypatch.setattr(cpu, "FS_ROW_BLOCK", 16)
    n, d = 400, 8
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, 5, (n,))
    with NativeAllocationRecorder() as rec:
        contrastive("l2")(x, y, backend="cpu").backward()
    assert rec.bytes and max(rec.bytes) < n * n * 4
    with NativeAllocationRecorder() as rec:
        contrastive("l2")(x, y, backend="reference").backward()
    assert max(rec.bytes) >= n * n * 4


@pytest.mark.skipif(not dispatch._status("triton")[0], reason="triton unavailable")
def test_triton_no_n_by_c_or_n_by_n():
    n, c, d = 70, 64, 8
    dev = device_for("triton")
    x, y, cen = (t.to(dev) for t in center_inputs(n=n, c=c, d=d, dtype=torch.float32))
    x.requires_grad_(True)
    cen.requires_grad_(True)
    with AllocationRecorder() as rec:
        for fn in CENTER_LOSSES.values():
            fn(x, y, cen, backend="triton").backward()
        contrastive("l2")(x, y, backend="triton").backward()
    assert max(rec.sizes) < min(n * c, n * n), [a for a in rec.allocs if a.numel >= n * c]
    assert max(rec.sizes) >= n * d  # the recorder saw the [N, D] gradients


# ------------------------------------------------------------------ modules, dispatch

def test_modules():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    git = fm.nn.GitLoss(3, 4, lambda_c=0.5, lambda_g=2.0, backend="reference")
    tcl = fm.nn.TripletCenterLoss(3, 4, margin=1.0, distance="squared_l2", backend="reference")
    con = fm.nn.ContrastiveLoss(margin=2.0, backend="reference")
    torch.testing.assert_close(git(x, y), fm.git_loss(x, y, git.centers, lambda_c=0.5,
                                                      lambda_g=2.0, backend="reference"))
    torch.testing.assert_close(tcl(x, y), fm.triplet_center_loss(
        x, y, tcl.centers, margin=1.0, distance="squared_l2", backend="reference"))
    torch.testing.assert_close(con(x, y), fm.contrastive_loss(x, y, margin=2.0,
                                                              backend="reference"))
    (git(x, y) + tcl(x, y)).backward()
    assert git.centers.grad is not None and tcl.centers.grad is not None
    assert "centers" in git.state_dict() and "centers" in tcl.state_dict()


def test_registered_and_exported():
    for op in ("git_loss", "triplet_center_loss", "contrastive_loss"):
        assert set(dispatch.OPS[op]) == {"reference", "cpu", "triton"}
        assert op in fm.__all__ and hasattr(fm.functional, op)


def test_argument_checks():
    x, y, c = center_inputs(n=4, c=3, d=2)
    with pytest.raises(ValueError):
        fm.triplet_center_loss(x, y, c, distance="cosine")
    with pytest.raises(ValueError):
        fm.contrastive_loss(x, y, margin=-1.0)
    with pytest.raises(ValueError):
        fm.git_loss(x, y, c, lambda_g=float("nan"))
    with pytest.raises(ValueError):
        fm.git_loss(x, torch.tensor([0, 1, 2, 3]), c)


def test_fused_signatures_match_reference():
    import importlib
    import inspect

    for op in ("git_loss", "triplet_center_loss", "contrastive_loss"):
        want = inspect.signature(getattr(ref, op))
        for backend in ("cpu", "triton"):
            if not dispatch._status(backend)[0]:
                continue
            module, fn = dispatch.OPS[op][backend].split(":")
            assert inspect.signature(getattr(importlib.import_module(module), fn)) == want, \
                (op, backend)
