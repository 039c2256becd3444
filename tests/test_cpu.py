"""The C++ CPU backend of margin_cross_entropy (csrc/angular.cpp, fused_margin/cpu.py):
gradcheck per kind on both paths (forward + recomputing backward; forward with
gradients), no N x C allocation inside the kernels, class and row tiling, edge
cases, NaN / inf propagation, the ELM tie rule, the kernels' own label and c*
checks, float16 / float64 against the reference, and adacos_loss. The shared
comparisons with the reference (fp32 / bf16) live in test_angular.py."""
import itertools

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch
from fused_margin.reference import angular as ref

from conftest import AllocationRecorder, NativeAllocationRecorder

_ok, _why = dispatch._cpu_status()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)
if _ok:
    from fused_margin.cpu import angular as cpu

# Tolerances, named once: the cpu backend vs the reference, by input dtype.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=5e-3, atol=1e-3)}

REDUCTIONS = ("mean", "sum", "none")
PATHS = ("tiled", "fused")


def cases(C):
    """(id, keywords) for every kind; per-class margins where the kind takes them."""
    dt = torch.float64
    counts = torch.arange(C, 0, -1) * 2
    camri = torch.zeros(C, dtype=dt)
    camri[1] = 0.6
    return [
        ("normface", dict(kind="normface", s=8.0)),
        ("arcface", dict(kind="arcface", s=8.0, m=0.5)),
        ("camri", dict(kind="arcface", s=8.0, m=camri)),
        ("cosface", dict(kind="cosface", s=8.0, m=0.35)),
        ("cosface_vec", dict(kind="cosface", s=8.0, m=torch.linspace(0.1, 0.4, C, dtype=dt))),
        ("sphereface", dict(kind="sphereface", s=8.0, m=1.7)),
        ("combined", dict(kind="combined", s=8.0, m1=1.2, m2=0.3, m3=0.1)),
        ("ldam", dict(kind="ldam", s=8.0, m=fm.ldam_margins(counts).to(dt))),
        ("elm", dict(kind="elm", s=8.0, m=fm.ldam_margins(counts).to(dt), elm_lambda=0.5)),
        ("arcgrad", dict(kind="arcgrad", s=3.0)),
    ]


@pytest.fixture
def path(request, monkeypatch):
    """Small blocks so that every test crosses class (and row) tile boundaries."""
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 3)
    monkeypatch.setattr(cpu, "ROW_BLOCK", 2)
    monkeypatch.setattr(cpu, "FUSED", request.param == "fused")
    return request.param


def inputs(N, D, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return x.to(dtype), W.to(dtype), y


def run(backend, x, W, y, reduction="mean", upstream=None, **kw):
    """(loss, grad x, grad W) of one backend on fresh leaves."""
    xb, Wb = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = fm.margin_cross_entropy(xb, Wb, y, reduction=reduction, backend=backend, **kw)
    g = upstream if upstream is not None else torch.linspace(0.5, 1.5, loss.numel())
    loss.backward(g.reshape(loss.shape).to(loss.dtype))
    return loss.detach(), xb.grad, Wb.grad


def assert_matches_reference(x, W, y, reduction="mean", **kw):
    tol = TOL[x.dtype]
    for got, want in zip(run("cpu", x, W, y, reduction, **kw), run("reference", x, W, y, reduction, **kw)):
        assert got.dtype == want.dtype or got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want.double(), **tol)


# ------------------------------------------------------------------ gradcheck

@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("case", cases(7), ids=lambda c: c[0])
def test_gradcheck(path, case):
    _, kw = case
    x, W, y = inputs(5, 4, 7)
    y[3] = -100
    cw = torch.rand(7, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    W.requires_grad_(True)
    fn = lambda a, b: fm.margin_cross_entropy(a, b, y, class_weight=cw, backend="cpu", **kw)
    assert torch.autograd.gradcheck(fn, (x, W))
    fn_none = lambda a, b: fm.margin_cross_entropy(a, b, y, reduction="none", backend="cpu", **kw)
    assert torch.autograd.gradcheck(fn_none, (x, W))


@pytest.mark.parametrize("case", cases(7), ids=lambda c: c[0])
def test_gradcheck_from_cosine(case):
    _, kw = case
    x, W, y = inputs(5, 4, 7)
    y[1] = -100
    cos = (ref.cosine(x, W) * 0.9).requires_grad_(True)
    cw = torch.rand(7, dtype=torch.float64) + 0.5
    fn = lambda c: fm.margin_cross_entropy_from_cosine(c, y, class_weight=cw, reduction="sum",
                                                       backend="cpu", **kw)
    assert torch.autograd.gradcheck(fn, (cos,))


# ------------------------------------------------------------------ memory
# NativeAllocationRecorder sees every ATen allocation, the kernels' own scratch
# included. N x C x 4 bytes is well above every legitimate allocation here
# (N x D, C x D, O(N), the capped scratch).

MEM_N, MEM_D, MEM_C = 256, 8, 64
MEM_MODES = ("fused", "tiled", "no_grad")


def _native_record(mode, reduction):
    x, W, y = inputs(MEM_N, MEM_D, MEM_C, torch.float32)
    grad = mode != "no_grad"
    x.requires_grad_(grad)
    W.requires_grad_(grad)
    with NativeAllocationRecorder() as rec:
        with torch.set_grad_enabled(grad):
            loss = fm.margin_cross_entropy(x, W, y, kind="arcface", reduction=reduction,
                                           backend="cpu")
        if grad:
            loss.backward(torch.ones_like(loss))
    return rec


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MEM_MODES)
def test_no_n_by_c_scratch_inside_the_kernels(mode, reduction, monkeypatch):
    # the default CLASS_BLOCK exceeds C, so a class tile alone would span N x C: the
    # row chunks must bound the scratch, here to 4 KiB = 16 rows x C (or x the block)
    monkeypatch.setattr(cpu, "FUSED", mode == "fused")
    monkeypatch.setattr(cpu, "ROW_BLOCK", None)
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 4096)
    monkeypatch.setattr(cpu, "ROW_SCRATCH_BYTES", 4096)
    rec = _native_record(mode, reduction)
    assert 16 * MEM_C * 4 in rec.bytes  # the kernel's scratch, seen by the recorder
    assert max(rec.bytes) < MEM_N * MEM_C * 4


@pytest.mark.parametrize("mode", MEM_MODES)
def test_native_recorder_sees_an_n_by_c_scratch(mode, monkeypatch):
    # the same run with the chunk forced to all N rows: the scratch is N x C, and the
    # recorder must report it (otherwise the test above proves nothing)
    monkeypatch.setattr(cpu, "FUSED", mode == "fused")
    monkeypatch.setattr(cpu, "ROW_BLOCK", MEM_N)
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 4096)
    rec = _native_record(mode, "mean")
    assert max(rec.bytes) >= MEM_N * MEM_C * 4


# AllocationRecorder sees what every op returns, also a Python-level x @ W.T (whose
# output the native recorder attributes to aten::mm, not to an aten::empty event).

def _record(backend, reduction):
    N, D, C = 16, 8, 200
    x, W, y = inputs(N, D, C, torch.float32)
    x.requires_grad_(True)
    W.requires_grad_(True)
    with AllocationRecorder() as rec:
        loss = fm.margin_cross_entropy(x, W, y, kind="arcface", reduction=reduction,
                                       backend=backend)
        loss.backward(torch.ones_like(loss))
    return rec, N * C


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_n_by_c_op_output(path, reduction):
    rec, nc = _record("cpu", reduction)
    assert any("angular_ce" in op for op in rec.ops)  # the kernels ran under the recorder
    assert max(rec.sizes) < nc


def test_allocation_recorder_sees_reference_n_by_c():
    rec, nc = _record("reference", "mean")
    assert max(rec.sizes) >= nc


# ------------------------------------------------------------------ tiling and paths

@pytest.mark.parametrize("case", cases(23), ids=lambda c: c[0])
def test_block_size_and_path_do_not_change_results(case, monkeypatch):
    _, kw = case
    x, W, y = inputs(9, 5, 23)
    y[2] = -100
    results = []
    for block, fused in ((1, False), (4, False), (23, False), (64, False), (4, True)):
        monkeypatch.setattr(cpu, "CLASS_BLOCK", block)
        monkeypatch.setattr(cpu, "ROW_BLOCK", block)
        monkeypatch.setattr(cpu, "FUSED", fused)
        results.append(run("cpu", x, W, y, "sum", upstream=torch.tensor(1.0), **kw))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert_matches_reference(x, W, y, "sum", **kw)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_dtypes(path, dtype):
    x, W, y = inputs(11, 6, 13, dtype)
    loss, gx, gW = run("cpu", x, W, y, "mean", kind="arcface", s=8.0)
    assert loss.dtype == ref.compute_dtype(dtype) and gx.dtype == dtype and gW.dtype == dtype
    assert_matches_reference(x, W, y, "mean", kind="arcface", s=8.0)


# ------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("case", cases(7), ids=lambda c: c[0])
def test_theta_zero_and_zero_vectors(path, case):
    _, kw = case
    x, W, y = inputs(6, 4, 7)
    x[0] = 3.0 * W[y[0]]  # theta = 0
    x[1] = -W[y[1]]  # theta = pi
    x[2] = 0.0
    W[6] = 0.0
    loss, gx, gW = run("cpu", x, W, y, "sum", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gW).all()
    assert not gx[2].any() and not gW[6].any()
    assert_matches_reference(x, W, y, "sum", **kw)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_and_all_ignored(path, reduction):
    for N, label in ((0, 0), (5, -100)):
        x, W, _ = inputs(N, 4, 7, torch.float32)
        y = torch.full((N,), label, dtype=torch.long)
        loss, gx, gW = run("cpu", x, W, y, reduction, kind="elm", m=0.2)
        assert loss.shape == ((N,) if reduction == "none" else ())
        assert loss.dtype == torch.float32 and not loss.any()
        assert gx.shape == (N, 4) and gW.shape == (7, 4) and not gx.any() and not gW.any()


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_zero_class_weights_mean_is_zero(path):
    x, W, y = inputs(5, 4, 7)
    loss, gx, gW = run("cpu", x, W, y, "mean", class_weight=torch.zeros(7, dtype=torch.float64))
    assert loss == 0 and not gx.any() and not gW.any()


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_single_class(path):
    x, W, y = inputs(4, 3, 1)
    for kind in ("arcface", "elm", "arcgrad"):
        assert_matches_reference(x, W, y, "none", kind=kind, s=4.0)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_non_contiguous_inputs(path):
    x, W, y = inputs(10, 12, 9)
    xs = torch.stack([x, -x], 2).reshape(10, 24)[:, ::2]  # strided columns
    Ws = W.T.contiguous().T  # column-major
    ys = torch.stack([y, y], 1)[:, 0]
    assert not xs.is_contiguous() and not Ws.is_contiguous() and not ys.is_contiguous()
    cw = (torch.rand(18, dtype=torch.float64) + 0.5)[::2]
    kw = dict(kind="elm", s=8.0, m=torch.linspace(0.1, 0.5, 18, dtype=torch.float64)[::2],
              class_weight=cw)
    want = run("cpu", x, W, y, "mean", **kw)
    for got, w in zip(run("cpu", xs, Ws, ys, "mean", **kw), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    assert_matches_reference(xs, Ws, ys, "mean", **kw)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_elm_tie_takes_first_index(path):
    # classes 1 and 4 are the same direction and the nearest non-target class; with
    # CLASS_BLOCK = 3 they sit in different tiles. c* must be 1, the first index.
    W = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0], [0.6, 0.8]],
                     dtype=torch.float64)
    x = torch.tensor([[0.9, 0.3]], dtype=torch.float64)
    y = torch.tensor([0])
    m = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.5], dtype=torch.float64)
    kw = dict(kind="elm", s=4.0, m=m, elm_lambda=1.0, reduction="none")
    got = fm.margin_cross_entropy(x, W, y, backend="cpu", **kw)
    cos = ref.cosine(x, W)[0]
    logits = 4.0 * cos
    for cstar, match in ((1, True), (4, False)):
        logits[0] = 4.0 * (cos[0] - m[0] + m[cstar])
        want = torch.logsumexp(logits, 0) - logits[0]
        assert torch.allclose(got[0], want, rtol=1e-12) == match
    assert_matches_reference(x, W, y, kind="elm", s=4.0, m=m, elm_lambda=1.0)


# ------------------------------------------------------------------ NaN and inf
# The cpu backend must give NaN (and inf) exactly where the reference does, loss and
# gradients, element by element: ignored and zero-weight rows included (the
# reference's 0 * softmax is NaN there), and the theta kinds' clamp, whose backward
# selects 0 at a NaN cosine.

NAN, INF = float("nan"), float("inf")


def poisoned(case, dtype):
    x, W, y = inputs(6, 4, 7)
    cw = None
    if case == "nan_weight_row":
        W[2] = NAN
    elif case == "nan_feature_row":
        x[1] = NAN
    elif case == "inf_feature":
        x[1, 0] = INF
    elif case == "inf_weight":
        W[4, 1] = -INF
    elif case == "nan_ignored_row":
        x[3, 2] = NAN
        y[3] = -100
    elif case == "nan_zero_weight_row":
        x[3, 2] = NAN
        cw = torch.ones(7, dtype=torch.float64)
        cw[y[3]] = 0.0
    return x.to(dtype), W.to(dtype), y, cw


NAN_CASES = ("nan_weight_row", "nan_feature_row", "inf_feature", "inf_weight", "nan_ignored_row",
             "nan_zero_weight_row")


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", cases(7), ids=lambda c: c[0])
def test_nan_and_inf_propagate_like_the_reference(path, dtype, case):
    _, kw = case
    for bad in NAN_CASES:
        x, W, y, cw = poisoned(bad, dtype)
        for reduction in REDUCTIONS:
            got = run("cpu", x, W, y, reduction, class_weight=cw, **kw)
            want = run("reference", x, W, y, reduction, class_weight=cw, **kw)
            assert torch.isnan(want[1]).any()  # the poison reaches the gradient
            for g, w in zip(got, want):
                torch.testing.assert_close(g.double(), w.double(), equal_nan=True, **TOL[dtype],
                                           msg=lambda m: f"{bad}, {reduction}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", cases(7), ids=lambda c: c[0])
def test_nan_and_inf_cosine_propagate_like_the_reference(dtype, case):
    _, kw = case
    for value, where in itertools.product((NAN, INF, -INF), ("target", "other", "ignored")):
        x, W, y = inputs(6, 4, 7)
        cos = ref.cosine(x, W) * 0.9
        t = int(y[1])
        cos[1, t if where == "target" else (t + 1) % 7] = value
        if where == "ignored":
            y[1] = -100
        cos = cos.to(dtype)
        for reduction in REDUCTIONS:
            out = []
            for backend in ("cpu", "reference"):
                c = cos.clone().requires_grad_(True)
                loss = fm.margin_cross_entropy_from_cosine(c, y, reduction=reduction,
                                                           backend=backend, **kw)
                loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape))
                out.append((loss.detach(), c.grad))
            for g, w in zip(*out):
                torch.testing.assert_close(g.double(), w.double(), equal_nan=True, **TOL[dtype],
                                           msg=lambda m: f"{value} at {where}, {reduction}: {m}")


# ------------------------------------------------------------------ float16 / float64

@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("case", cases(13), ids=lambda c: c[0])
def test_every_kind_in_float16_and_float64(path, reduction, dtype, case):
    _, kw = case
    x, W, y = inputs(9, 6, 13, dtype, seed=1)
    y[4] = -100
    cw = torch.rand(13, dtype=torch.float64) + 0.5
    loss, gx, gW = run("cpu", x, W, y, reduction, class_weight=cw, **kw)
    assert loss.dtype == ref.compute_dtype(dtype) and gx.dtype == dtype and gW.dtype == dtype
    assert_matches_reference(x, W, y, reduction, class_weight=cw, **kw)


# ------------------------------------------------------------------ adacos_loss

def run_adacos(fn, x, W, y, s, reduction, **kw):
    xb, Wb = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss, next_s = fn(xb, Wb, y, s, reduction=reduction, **kw)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype))
    return loss.detach(), next_s, xb.grad, Wb.grad


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class_weight"])
def test_adacos_loss_matches_reference(path, reduction, dtype, weighted):
    x, W, y = inputs(9, 5, 11, dtype)
    y[[2, 6]] = -7
    s = 6.5
    kw = dict(ignore_index=-7)
    if weighted:
        kw["class_weight"] = torch.rand(11, dtype=torch.float64) + 0.5
    loss, next_s, gx, gW = run_adacos(cpu.adacos_loss, x, W, y, s, reduction, **kw)
    ref_loss = lambda a, b, yy, ss, **k: (
        ref.margin_cross_entropy(a, b, yy, kind="normface", s=ss, **k), None)
    want_loss, _, want_gx, want_gW = run_adacos(ref_loss, x, W, y, s, reduction, **kw)
    want_s = ref.adacos_scale(x, W, y, s, ignore_index=-7)
    assert next_s.dtype == torch.float32 and next_s.dim() == 0 and not next_s.requires_grad
    torch.testing.assert_close(next_s, want_s, rtol=1e-5, atol=1e-6)
    assert next_s != s  # the rows did move it
    for g, w in ((loss, want_loss), (gx, want_gx), (gW, want_gW)):
        torch.testing.assert_close(g, w, **TOL[dtype])


class _Spy:
    """Records which torch.ops.fused_margin ops the cpu module reaches."""

    def __init__(self, calls):
        self._calls = calls

    def __getattr__(self, name):
        self._calls.append(name)
        return getattr(torch.ops.fused_margin, name)


def test_adacos_loss_stats_of_the_same_sweep(monkeypatch):
    # one C++ sweep per call on either path: the scale comes from that sweep's outputs
    x, W, y = inputs(9, 5, 11, torch.float32)
    for fused, name in ((True, "angular_ce_fused"), (False, "angular_ce_fwd")):
        calls = []
        monkeypatch.setattr(cpu, "FUSED", fused)
        monkeypatch.setattr(cpu, "ops", _Spy(calls))
        _, next_s = cpu.adacos_loss(x.clone().requires_grad_(True), W, y, 5.0)
        assert calls == [name]
        torch.testing.assert_close(next_s, ref.adacos_scale(x, W, y, 5.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_adacos_loss_empty_and_all_ignored(path):
    for N, label in ((0, 0), (4, -100)):
        x, W, _ = inputs(N, 4, 7, torch.float32)
        y = torch.full((N,), label, dtype=torch.long)
        for reduction in REDUCTIONS:
            loss, next_s, gx, gW = run_adacos(cpu.adacos_loss, x, W, y, 3.0, reduction)
            assert next_s.dtype == torch.float32 and float(next_s) == 3.0
            assert not loss.any() and not gx.any() and not gW.any()
            assert next_s == ref.adacos_scale(x, W, y, 3.0)


def test_kernel_rejects_out_of_range_labels():
    # functional.py validates first; the kernel checks again rather than read past W
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    w, marg = torch.ones(3), torch.full((1,), 0.5)
    args = (cpu.KIND_CODES["arcface"], 8.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, -100)
    for bad in (5, -1, 1 << 40):
        y = torch.tensor([0, bad, 2])
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.fused_margin.angular_ce_fwd(x, W, y, w, marg, *args, 2, 2)
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.fused_margin.angular_ce_fused(x, W, y, w, marg, *args, 2, True, True)
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.fused_margin.cosine_ce_fwd(x @ W.T, y, w, marg, *args)
    y = torch.tensor([0, -100, 2])  # ignore_index itself is fine
    torch.ops.fused_margin.angular_ce_fwd(x, W, y, w, marg, *args, 2, 2)


def test_kernel_backward_rejects_out_of_range_cstar():
    # c* indexes the per-class margin in backward; a bad one must not become a read
    x, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    w, marg = torch.ones(3), torch.linspace(0.1, 0.5, 5)
    args = (cpu.KIND_CODES["elm"], 8.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, -100)
    _, lse, cstar, _, _ = torch.ops.fused_margin.angular_ce_fwd(x, W, y, w, marg, *args, 2, 2)
    grad = torch.ones(3)
    torch.ops.fused_margin.angular_ce_bwd(grad, x, W, y, w, marg, lse, cstar, *args, 2, 2, True,
                                          True)
    cos = ref.cosine(x, W)
    torch.ops.fused_margin.cosine_ce_bwd(grad, cos, y, w, marg, lse, cstar, *args)
    for bad in (5, -2, 1 << 40):
        cst = cstar.clone()
        cst[1] = bad
        with pytest.raises(RuntimeError, match="cstar"):
            torch.ops.fused_margin.angular_ce_bwd(grad, x, W, y, w, marg, lse, cst, *args, 2, 2,
                                                  True, True)
        with pytest.raises(RuntimeError, match="cstar"):
            torch.ops.fused_margin.cosine_ce_bwd(grad, cos, y, w, marg, lse, cst, *args)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_gradient_to_one_input_only(path):
    x, W, y = inputs(7, 5, 11)
    _, gx_want, gW_want = run("cpu", x, W, y, "sum", upstream=torch.tensor(2.0), kind="cosface")
    for which in (0, 1):
        xb, Wb = x.clone().requires_grad_(which == 0), W.clone().requires_grad_(which == 1)
        loss = fm.margin_cross_entropy(xb, Wb, y, reduction="sum", kind="cosface", backend="cpu")
        (2 * loss).backward()
        got, other = (xb, Wb) if which == 0 else (Wb, xb)
        assert other.grad is None
        torch.testing.assert_close(got.grad, gx_want if which == 0 else gW_want, rtol=1e-12, atol=1e-12)


def test_fused_path_retained_graph(monkeypatch):
    # the first backward hands over the gradients formed in the forward pass; a
    # second one through the retained graph recomputes them
    monkeypatch.setattr(cpu, "FUSED", True)
    x, W, y = inputs(4, 3, 5)
    x.requires_grad_(True)
    loss = fm.margin_cross_entropy(x, W, y, backend="cpu")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(3 * loss, x)
    torch.testing.assert_close(g2, 3 * g1, rtol=1e-12, atol=1e-12)


# ------------------------------------------------ issue 15 item 5: operands past float32's product range

@pytest.mark.parametrize("scales", [(1e20, 1e19), (1e38, 1.0), (1e-10, 1e30), (3e-12, 1e25)],
                         ids=["x1e20-W1e19", "x1e38", "x1e-10-W1e30", "x3e-12-W1e25"])
@pytest.mark.parametrize("kind", ["arcface", "cosface", "normface"])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_huge_operands_stay_finite(path, kind, scales):
    # x . W overflowed float32 (nan for x * 1e20 against W * 1e19, inf for x * 1e38)
    # and r^2 in the normalisation Jacobian underflowed; the rows are brought to unit
    # range by powers of two first, so loss and gradients equal the reference's
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 16, generator=g).clamp(-3, 3)
    W = torch.randn(6, 16, generator=g)
    y = torch.randint(0, 6, (9,), generator=g)
    sx, sw = scales
    kw = dict(kind=kind, s=10.0, m=0.3 if kind != "normface" else 0.0)
    xs, Ws = (x * sx).requires_grad_(True), (W * sw).requires_grad_(True)
    got = fm.margin_cross_entropy(xs, Ws, y, backend="cpu", **kw)
    got.backward()
    x64, W64 = x.double().requires_grad_(True), W.double().requires_grad_(True)
    want = fm.margin_cross_entropy(x64, W64, y, backend="reference", **kw)
    want.backward()
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    # d/d(c x) = (1/c) d/dx: compare the rescaled gradients
    torch.testing.assert_close((xs.grad.double() * sx), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((Ws.grad.double() * sw), W64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_zero_rows_stay_zero_when_others_are_rescaled(path):
    # the rescaling leaves rows of norm <= NORM_EPS alone: still zero vectors
    x = torch.randn(4, 5)
    x[1] = 1e-14
    x[2] *= 1e25
    W = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2, 0])
    got = fm.margin_cross_entropy(x, W, y, reduction="none", s=8.0, backend="cpu")
    want = fm.margin_cross_entropy(x.double(), W.double(), y, reduction="none", s=8.0,
                                   backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
