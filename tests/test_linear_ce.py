"""margin_cross_entropy's linear mode (normalize=False), bias and label_smoothing
(issue 18): plain linear cross-entropy equals torch.nn.functional.cross_entropy
(x @ W.T + b, ...) for every reduction, class weights, ignore_index and label
smoothing; M-Softmax's lowered target; label smoothing on every kind (cpu and triton
vs the reference); gradcheck; no N x C buffer on the cpu and triton backends; the
Triton kernels at small ragged tiles and at the sm_90 tiles (FUSED_MARGIN_TRITON_CONFIG
=sm90), matrix work <= 4 products; nn.LinearCrossEntropy / nn.MSoftmax."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin import dispatch

from conftest import AllocationRecorder, NativeAllocationRecorder

CPU_OK = dispatch._status("cpu")[0]
TRITON_OK = dispatch._status("triton")[0]
BACKENDS = ["reference"] + ([pytest.param("cpu")] if CPU_OK else
                            [pytest.param("cpu", marks=pytest.mark.skip("no C++ extension"))])
BACKENDS += [pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK,
                                                             reason="triton unavailable"))]
# the Triton interpreter runs on CPU tensors; a GPU run gets CUDA ones
TDEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=5e-3, atol=1e-3)}
KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm", "arcgrad")


def dev(backend):
    return TDEV if backend == "triton" else torch.device("cpu")


def inputs(n=23, d=6, c=11, dtype=torch.float64, seed=0, device=None):
    if device is not None:
        return tuple(t.to(device) for t in inputs(n, d, c, dtype, seed))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[n // 2] = y[-1] = -100
    cw = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, y, cw


def grads(out, leaves):
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return torch.autograd.grad((out * u.to(out)).sum(), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_bias,use_weight,eps", list(itertools.product(
    (False, True), (False, True), (0.0, 0.3))))
def test_linear_equals_torch_cross_entropy(backend, reduction, use_bias, use_weight, eps):
    x, w, b, y, cw = inputs(device=dev(backend))
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    bias = b if use_bias else None
    weight = cw if use_weight else None
    want = F.cross_entropy(x @ w.T + (b if use_bias else 0), y, weight=weight, ignore_index=-100,
                           label_smoothing=eps, reduction=reduction)
    got = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=bias,
                                  class_weight=weight, ignore_index=-100, label_smoothing=eps,
                                  reduction=reduction, backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    use = leaves if use_bias else leaves[:2]
    for g, h in zip(grads(got, use), grads(want, use)):
        torch.testing.assert_close(g, h, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_low_precision(backend, dtype):
    x, w, b, y, cw = inputs(dtype=dtype, device=dev(backend))
    got = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=b,
                                  label_smoothing=0.1, backend=backend)
    assert got.dtype == torch.float32
    want = F.cross_entropy(x.float() @ w.float().T + b.float(), y, label_smoothing=0.1)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cosface", "ldam"])
def test_msoftmax_lowers_the_target(backend, kind):
    x, w, b, y, cw = inputs(device=dev(backend))
    s = 2.0
    m = (torch.rand(11, dtype=torch.float64) * 0.5).to(x.device) if kind == "ldam" else 0.35
    valid = y != -100
    yy = torch.where(valid, y, 0)
    z = s * (x @ w.T + b)
    mm = m[yy] if isinstance(m, torch.Tensor) else torch.full((23,), m, dtype=torch.float64,
                                                              device=x.device)
    z = z - (s * mm * valid)[:, None] * F.one_hot(yy, 11)
    want = F.cross_entropy(z, y, weight=cw, label_smoothing=0.2)
    got = fm.margin_cross_entropy(x, w, y, kind=kind, s=s, m=m, normalize=False, bias=b,
                                  class_weight=cw, label_smoothing=0.2, backend=backend)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_label_smoothing_every_kind_cpu_matches_reference(kind, reduction, fused, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", fused)
    x, w, b, y, cw = inputs()
    kw = dict(kind=kind, s=4.0, m=0.3, class_weight=cw, label_smoothing=0.2, reduction=reduction)
    if kind == "sphereface":
        kw["m"] = 1.35
    if kind == "combined":
        kw.update(m1=1.0, m2=0.3, m3=0.1)
    if kind == "ldam":
        kw["m"] = torch.rand(11, dtype=torch.float64) * 0.4
    out = {}
    for backend in ("reference", "cpu"):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy(xl, wl, y, backend=backend, **kw)
        out[backend] = [loss.detach()] + list(grads(loss, (xl, wl)))
    for a, c in zip(out["cpu"], out["reference"]):
        torch.testing.assert_close(a, c, **TOL[torch.float64])


def test_label_smoothing_definition_on_margined_logits():
    # the reference: F.cross_entropy's smoothing on the arcface logits themselves
    x, w, b, y, cw = inputs()
    from fused_margin.reference import angular as ref
    logits = ref.margin_logits(ref.cosine(x, w), y, kind="arcface", s=8.0, m=0.4)
    want = F.cross_entropy(logits, y, weight=cw, label_smoothing=0.25)
    got = fm.margin_cross_entropy(x, w, y, kind="arcface", s=8.0, m=0.4, class_weight=cw,
                                  label_smoothing=0.25, backend="reference")
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_linear(backend):
    x, w, b, y, cw = inputs(n=6, d=3, c=4, device=dev(backend))
    y[3] = 2  # one ignored row left (the last)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]

    def fn(a, ww, bb):
        return fm.margin_cross_entropy(a, ww, y, kind="cosface", s=1.5, m=0.3, normalize=False,
                                       bias=bb, class_weight=cw[:4], label_smoothing=0.15,
                                       reduction="none", backend=backend)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    x, w, b, y, cw = inputs(n=4, device=dev(backend))
    b.requires_grad_(True)
    y = torch.full((4,), -100, device=x.device)
    loss = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False, bias=b,
                                   label_smoothing=0.1, backend=backend)
    assert float(loss.detach()) == 0.0
    (gb,) = torch.autograd.grad(loss, (b,))
    assert float(gb.abs().sum()) == 0.0
    e = fm.margin_cross_entropy(x[:0], w, y[:0], kind="normface", s=1.0, normalize=False,
                                bias=b, backend=backend)
    assert float(e.detach()) == 0.0


def test_argument_checks():
    x, w, b, y, cw = inputs()
    for kind in ("arcface", "sphereface", "combined", "elm", "arcgrad"):
        with pytest.raises(ValueError, match="normalize=False"):
            fm.margin_cross_entropy(x, w, y, kind=kind, normalize=False)
    with pytest.raises(ValueError, match="bias"):
        fm.margin_cross_entropy(x, w, y, kind="normface", bias=b)
    with pytest.raises(ValueError):
        fm.margin_cross_entropy(x, w, y, kind="normface", normalize=False, bias=b[:3])
    with pytest.raises(ValueError):
        fm.margin_cross_entropy(x, w, y, label_smoothing=1.5)


# ------------------------------------------------------------------ memory (cpu)

@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
@pytest.mark.parametrize("mode", ["fused", "tiled", "no_grad"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_linear_no_n_by_c(mode, reduction, monkeypatch):
    from fused_margin.cpu import angular as cpu
    monkeypatch.setattr(cpu, "FUSED", mode == "fused")
    monkeypatch.setattr(cpu, "ROW_BLOCK", None)
    monkeypatch.setattr(cpu, "CLASS_BLOCK", 4096)
    monkeypatch.setattr(cpu, "ROW_SCRATCH_BYTES", 4096)
    n, d, c = 256, 8, 64
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
    b, y = torch.randn(c, generator=g), torch.randint(0, c, (n,), generator=g)
    grad = mode != "no_grad"
    for t in (x, w, b):
        t.requires_grad_(grad)
    with NativeAllocationRecorder() as rec, AllocationRecorder() as rec2:
        with torch.set_grad_enabled(grad):
            loss = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False,
                                           bias=b, label_smoothing=0.1, reduction=reduction,
                                           backend="cpu")
        if grad:
            loss.backward(torch.ones_like(loss))
    assert any("linear_ce" in op for op in rec2.ops)
    assert 16 * c * 4 in rec.bytes  # the capped scratch, seen by the recorder
    assert max(rec.bytes) < n * c * 4
    assert max(rec2.sizes) < n * c


# ------------------------------------------------------------------ triton kernels

needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton unavailable")


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_every_kind_triton_matches_reference(kind, reduction):
    x, w, b, y, cw = inputs(device=TDEV)
    kw = dict(kind=kind, s=4.0, m=0.3, class_weight=cw, label_smoothing=0.2, reduction=reduction)
    if kind == "sphereface":
        kw["m"] = 1.35
    if kind == "combined":
        kw.update(m1=1.0, m2=0.3, m3=0.1)
    if kind == "ldam":
        kw["m"] = (torch.rand(11, dtype=torch.float64) * 0.4).to(TDEV)
    out = {}
    for backend in ("reference", "triton"):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy(xl, wl, y, backend=backend, **kw)
        out[backend] = [loss.detach()] + list(grads(loss, (xl, wl)))
    for a, c in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


def _tiles(name, monkeypatch):
    """The tiles the public function gets: small ragged ones (several row blocks, class
    tiles, D steps, splits and gradient chunks) or the sm_90 GPU table."""
    from fused_margin.triton import angular as ta
    if name == "sm90":
        monkeypatch.setenv("FUSED_MARGIN_TRITON_CONFIG", "sm90")
    else:
        monkeypatch.setattr(ta, "INTERP", ta.Blocks(16, 16, 16, programs=6, chunk_rows=32,
                                                    chunk_cols=48))


@needs_triton
@pytest.mark.parametrize("tiles", ["small", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["plain", "bias_weight_smooth", "cosface", "ldam_mean"])
def test_triton_linear_tiles_match_float64(tiles, dtype, case, monkeypatch):
    """The fused linear mode at ragged shapes (no size a multiple of a tile) against
    F.cross_entropy in float64 on the same (rounded) inputs."""
    from fused_margin.triton import angular as ta
    if tiles == "sm90" and dtype == torch.float64 and case != "plain":
        pytest.skip("one float64 case at the sm_90 tiles is enough")
    _tiles(tiles, monkeypatch)
    launched = []
    real = ta._launch

    def spy(kernel, grid, *args, **kw):
        launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), kw))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(ta, "_launch", spy)
    n, d, c = (130, 70, 300) if tiles == "sm90" else (37, 21, 83)
    x, w, b, y, cw = inputs(n, d, c, dtype, seed=4, device=TDEV)
    x, w, b = x / 2, w / 2, b  # logits of a few units
    s, kind, m, red = 1.0, "normface", 0.0, "sum"
    kw = dict(reduction="sum")
    if case == "bias_weight_smooth":
        kw.update(bias=b, class_weight=cw, label_smoothing=0.1, reduction="mean")
    elif case == "cosface":
        s, kind, m = 3.0, "cosface", 0.4
        kw.update(bias=b, reduction="none")
    elif case == "ldam_mean":
        s, kind = 2.0, "ldam"
        m = (torch.rand(c, generator=torch.Generator().manual_seed(2)) * 0.5).to(TDEV)
        kw.update(class_weight=cw, reduction="mean")
    red = kw["reduction"]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    got = fm.margin_cross_entropy(leaves[0], leaves[1], y, kind=kind, s=s, m=m, normalize=False,
                                  backend="triton",
                                  **dict(kw, bias=leaves[2] if "bias" in kw else None))
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    z = s * (x64 @ w64.T + (b64 if "bias" in kw else 0))
    valid = y != -100
    yy = torch.where(valid, y, 0)
    mm = m[yy].double() if isinstance(m, torch.Tensor) else torch.full((n,), m, device=TDEV,
                                                                        dtype=torch.float64)
    z = z - (s * mm * valid)[:, None] * F.one_hot(yy, c)
    cwt = kw.get("class_weight")
    want = F.cross_entropy(z, y, weight=None if cwt is None else cwt.double(),
                           label_smoothing=kw.get("label_smoothing", 0.0), reduction=red)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    use = [0, 1, 2] if "bias" in kw else [0, 1]
    g_got = grads(got, [leaves[i] for i in use])
    g_want = grads(want, [(x64, w64, b64)[i] for i in use])
    for gg, gw in zip(g_got, g_want):
        assert gg.dtype == dtype
        err = float((gg.double() - gw).abs().max())
        scale = float(gw.abs().max())
        bound = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        assert err <= bound * scale + 1e-12, (err, scale)
    dots = [(name, k) for name, k in launched if name in ("_margin_ce_fwd_kernel",
                                                          "_margin_ce_grad_kernel")]
    assert dots and all(k.get("NORMALIZE") is False for _, k in dots)
    assert not any(name == "_row_scale_kernel" for name, _ in launched)  # x read raw
    if tiles == "sm90":
        table = ta.default_blocks(dtype, d)
        assert table is ta.SM90[(ta._table_key(dtype), "mma")]
        assert all((k["BLOCK_N"], k["BLOCK_C"], k["BLOCK_D"], k["num_warps"], k["num_stages"])
                   == (table.fwd_rows(False, n) if name == "_margin_ce_fwd_kernel" else table.outer,
                       table.sweep, table.d, table.num_warps, table.num_stages)
                   for name, k in dots)


@needs_triton
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_triton_linear_no_n_by_c_and_no_fallback(eps, monkeypatch):
    """The kernels serve the linear mode (the reference is never called, no warning),
    and no tensor of N x C elements is made: C spans several gradient chunks."""
    from fused_margin.reference import angular as ref_angular
    from fused_margin.triton import angular as ta
    monkeypatch.setattr(ta, "INTERP", ta.Blocks(32, 32, 16, programs=4, chunk_rows=64,
                                                chunk_cols=64))

    def boom(*a, **k):
        raise AssertionError("the reference served a Triton call")

    monkeypatch.setattr(ref_angular, "margin_cross_entropy", boom)
    n, d, c = 150, 8, 200
    x, w, b, y, cw = inputs(n, d, c, torch.float32, device=TDEV)
    for t in (x, w, b):
        t.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AllocationRecorder() as rec:
            loss = fm.margin_cross_entropy(x, w, y, kind="normface", s=1.0, normalize=False,
                                           bias=b, class_weight=cw, label_smoothing=eps,
                                           backend="triton")
            loss.backward()
    assert rec.allocs and max(rec.sizes) < n * c, max(rec.sizes)
    assert b.grad is not None and b.grad.shape == (c,)


@needs_triton
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 64)],
                         ids=["bf16", "fp32"])
def test_triton_linear_matrix_work_is_four_products(dtype, D, monkeypatch):
    """tl.dot and torch matmul FLOPs of the linear mode, forward + backward at the
    sm_90 tiles, in units of one N x D x C product: <= 4.05 (as the normalised loss)."""
    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_margin.triton import angular as ta
    if not ta._interpreted():
        pytest.skip("counts tl.dot inside the interpreter")
    monkeypatch.setenv("FUSED_MARGIN_TRITON_CONFIG", "sm90")
    flops = [0]
    real = interp.InterpreterBuilder.create_dot

    def counted(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        flops[0] += 2 * m * k * b.data.shape[-1] * (a.data.size // (m * k))
        return real(self, a, b, d, *args)

    class Mm(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "bmm", "baddbmm"):
                a, bb = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
                flops[0] += 2 * a.shape[-2] * a.shape[-1] * bb.shape[-1]
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counted)
    N, C = 128, 256
    x, w, b, y, cw = inputs(N, D, C, dtype)
    for eps in (0.0, 0.1):
        flops[0] = 0
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        with Mm():
            fm.margin_cross_entropy(leaves[0], leaves[1], y, kind="cosface", s=1.0, m=0.2,
                                    normalize=False, bias=leaves[2], label_smoothing=eps,
                                    backend="triton").backward()
        assert flops[0] / (2 * N * D * C) <= 4.05, flops[0] / (2 * N * D * C)


# ------------------------------------------------------------------ modules

def test_linear_cross_entropy_module():
    torch.manual_seed(0)
    mod = fm.nn.LinearCrossEntropy(6, 11)
    assert mod.bias is None  # bias off by default, as torch's LinearCrossEntropyLoss
    x, _, _, y, _ = inputs(dtype=torch.float32)
    torch.testing.assert_close(mod(x, y), F.cross_entropy(x @ mod.weight.T, y))
    mb = fm.nn.LinearCrossEntropy(6, 11, bias=True, label_smoothing=0.1)
    torch.testing.assert_close(mb(x, y), F.cross_entropy(F.linear(x, mb.weight, mb.bias), y,
                                                         label_smoothing=0.1))
    mb(x, y).backward()
    assert mb.bias.grad is not None and mb.weight.grad is not None
    torch.testing.assert_close(mb.logits(x), F.linear(x, mb.weight, mb.bias))
    ms = fm.nn.MSoftmax(6, 11, m=0.5)
    z = (x @ ms.weight.T).detach()
    valid = y != -100
    z = z - 0.5 * F.one_hot(torch.where(valid, y, 0), 11) * valid[:, None]
    torch.testing.assert_close(ms(x, y), F.cross_entropy(z, y))


@pytest.mark.skipif(not CPU_OK, reason="no C++ extension")
def test_cpu_signature_matches_reference():
    import inspect

    from fused_margin.cpu import angular as cpu
    from fused_margin.reference import angular as ref
    assert inspect.signature(cpu.margin_cross_entropy) == inspect.signature(ref.margin_cross_entropy)


@needs_triton
def test_triton_signature_matches_reference():
    import inspect

    from fused_margin.reference import angular as ref
    from fused_margin.triton import angular as ta
    assert inspect.signature(ta.margin_cross_entropy) == inspect.signature(
        ref.margin_cross_entropy)
