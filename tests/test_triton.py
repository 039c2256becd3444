"""What is specific to the Triton margin cross-entropy (fused_margin/triton/angular.py):
no N x C allocation, ragged tiles, the poles of theta, zero rows, ignored and empty
batches, strided inputs, elm's tie rule, the from_cosine form, the arccos helper.
The backend-parameterised comparison over every kind lives in test_angular.py.

Runs on the Triton interpreter where there is no GPU (conftest sets TRITON_INTERPRET)."""

import pytest
import torch
import triton
import triton.language as tl

import fused_margin as fm
from fused_margin.reference import angular as ref
from fused_margin.triton import angular as ta

from conftest import AllocationRecorder, requires_cuda

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances, named once, by input dtype: the loss (float32 for 16-bit inputs) and the
# gradients (rounded back to the input dtype).
LOSS_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-4),
            torch.float64: dict(rtol=1e-10, atol=1e-10)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
            torch.float64: dict(rtol=1e-9, atol=1e-11)}

# bf16 gradients (one bf16 G tile, as every peer): max error over the tensor's largest
# entry; test_bf16_gradients_within_eager_error bounds it by eager bf16's own error
GRAD16_SCALE = 2e-2

# small tiles: several row blocks, class tiles and D chunks even at these sizes
SMALL = ta.Blocks(outer=16, sweep=16, d=16, do=16)


def cases(C):
    g = torch.Generator().manual_seed(1)
    mvec = (torch.rand(C, generator=g) * 0.5).to(DEV)
    return [
        ("normface", dict(kind="normface", s=20.0)),
        ("arcface", dict(kind="arcface", s=20.0, m=0.5)),
        ("camri", dict(kind="arcface", s=20.0, m=fm.camri_margins(C, [1, 2], 0.6).to(DEV))),
        ("cosface", dict(kind="cosface", s=20.0, m=0.35)),
        ("cosface_vec", dict(kind="cosface", s=20.0, m=mvec)),
        ("sphereface", dict(kind="sphereface", s=20.0, m=1.7)),
        ("combined", dict(kind="combined", s=20.0, m1=1.2, m2=0.3, m3=0.1)),
        ("combined_arc", dict(kind="combined", s=20.0, m2=0.4)),
        ("ldam", dict(kind="ldam", s=20.0, m=mvec)),
        ("ldam_scalar", dict(kind="ldam", s=20.0, m=0.3)),
        ("elm", dict(kind="elm", s=20.0, m=mvec, elm_lambda=0.5)),
        ("arcgrad", dict(kind="arcgrad", s=3.0)),
    ]


CASES = cases(45)
KW = dict(CASES)


def run(backend, x, W, y, blocks=None, **kw):
    """Loss and gradients; backend 'triton' goes through the autograd Function so
    that tests can choose the tiles."""
    x = x.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(True)
    if backend == "triton":
        loss = _apply(blocks, y, x, W, **kw)
    else:
        loss = ref.margin_cross_entropy(x, W, y, **kw)
    g = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    loss.backward(g)
    return loss.detach(), x.grad, W.grad


def _apply(blocks, y, *inputs, kind="arcface", s=64.0, m=0.5, m1=1.0, m2=0.0, m3=0.0,
           elm_lambda=0.5, class_weight=None, ignore_index=-100, reduction="mean"):
    return ta.apply(y, *inputs, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda,
                    class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                    blocks=blocks)


def assert_matches(got, want, dtype):
    (l1, gx1, gw1), (l0, gx0, gw0) = got, want
    assert l1.dtype == l0.dtype and gx1.dtype == gx0.dtype and gw1.dtype == gw0.dtype
    torch.testing.assert_close(l1, l0, **LOSS_TOL[dtype])
    for g1, g0 in ((gx1, gx0), (gw1, gw0)):
        if dtype == torch.bfloat16:  # one bf16 gradient tile: error on the tensor's scale
            err = float((g1.float() - g0.float()).abs().max())
            assert err <= GRAD16_SCALE * float(g0.float().abs().max()) + GRAD_TOL[dtype]["atol"]
        else:
            torch.testing.assert_close(g1.float(), g0.float(), **GRAD_TOL[dtype])


def inputs(N, D, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return x.to(dtype).to(DEV), W.to(dtype).to(DEV), y.to(DEV)


# ------------------------------------------------------------------ memory

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["arcface", "elm", "arcgrad"])
def test_no_n_by_c_allocation(name, reduction):
    """Nothing N x C; the backward's G chunk is at most chunk_rows x chunk_cols, so the
    largest allocation does not grow with N (or C)."""
    blocks = ta.Blocks(outer=16, sweep=16, d=16, chunk_rows=32, chunk_cols=48)
    largest = {}
    for N, C in ((40, 90), (80, 90), (80, 130)):  # N*C > C*D, N*D, and the chunk
        D = 6
        x, W, y = inputs(N, D, C)
        y[3] = -100
        kw = dict(cases(C))[name]
        cw = torch.rand(C, device=DEV) + 0.5
        x.requires_grad_(True)
        W.requires_grad_(True)
        with AllocationRecorder() as rec:
            loss = _apply(blocks, y, x, W, class_weight=cw, reduction=reduction, **kw)
            loss.sum().backward()
        assert rec.allocs, "the dispatch mode saw nothing"
        big = [a for a in rec.allocs if a.numel >= N * C]
        assert not big, big
        largest[N, C] = max(a.numel for a in rec.allocs if a.numel > max(N, C) * D)
    assert largest[40, 90] == largest[80, 90] == largest[80, 130] == 32 * 48
    # and the check can fail: the reference does allocate N x C
    with AllocationRecorder() as rec:
        loss = ref.margin_cross_entropy(x, W, y, class_weight=cw, reduction=reduction, **kw)
        loss.sum().backward()
    assert max(rec.sizes) >= N * C


def test_default_path_makes_no_n_by_c_tensor():
    """The public function with the default tiles, C past one chunk."""
    N, D, C = 150, 6, 300  # N*C = 45000 > the interpreter's 128 x 128 chunk
    x, W, y = inputs(N, D, C)
    x.requires_grad_(True)
    W.requires_grad_(True)
    with AllocationRecorder() as rec:
        fm.margin_cross_entropy(x, W, y, kind="arcface", s=10.0, backend="triton").backward()
    assert max(rec.sizes) < N * C


# ------------------------------------------------------------------ tiles and edges

@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_ragged_tiles(case):
    """N, C, D none a multiple of their tile: partial row, class and D blocks, several
    class tiles for the online log-sum-exp, several dX / dW programs along D."""
    x, W, y = inputs(19, 37, 45)
    y[5] = -100
    cw = torch.rand(45, device=DEV) + 0.5
    kw = dict(case[1], class_weight=cw, reduction="mean")
    assert_matches(run("triton", x, W, y, SMALL, **kw), run("reference", x, W, y, **kw),
                   torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined", "arcgrad", "cosface"])
def test_theta_zero(name, dtype):
    """Every feature equal to (a power-of-two multiple of) its class weight: cos = 1
    up to rounding, clamped for the kinds that need theta; finite, as the reference."""
    x, W, y = inputs(13, 8, 45, dtype)
    x = (W[y] * 2).contiguous()
    got = run("triton", x, W, y, SMALL, **KW[name])
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert_matches(got, run("reference", x, W, y, **KW[name]), dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_zero_feature_and_weight_rows(case):
    x, W, y = inputs(11, 7, 45)
    x[2] = 0.0
    W[3] = 0.0
    y[4] = 3  # a target whose weight row is zero: cosine 0
    y[2] = 5
    got = run("triton", x, W, y, SMALL, **case[1])
    assert_matches(got, run("reference", x, W, y, **case[1]), torch.float32)
    assert not got[1][2].any() and not got[2][3].any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    x, W, _ = inputs(9, 5, 45)
    y = torch.full((9,), 7, device=DEV)
    loss, gx, gw = run("triton", x, W, y, SMALL, kind="elm", m=KW["elm"]["m"], ignore_index=7,
                       reduction=reduction)
    assert loss.shape == ((9,) if reduction == "none" else ())
    assert loss.dtype == torch.float32 and not loss.any() and not gx.any() and not gw.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_launches_nothing(reduction, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("launched a kernel for N = 0")

    monkeypatch.setattr(ta, "margin_ce_fwd", boom)
    monkeypatch.setattr(ta, "margin_ce_bwd", boom)
    x = torch.randn(0, 5, device=DEV, requires_grad=True)
    W = torch.randn(7, 5, device=DEV, dtype=torch.float32, requires_grad=True)
    loss = fm.margin_cross_entropy(x, W, torch.zeros(0, dtype=torch.long, device=DEV),
                                   reduction=reduction, backend="triton")
    assert loss.shape == ((0,) if reduction == "none" else ()) and not loss.any()
    loss.sum().backward()
    assert x.grad.shape == (0, 5) and W.grad.shape == (7, 5) and not W.grad.any()
    cos = torch.randn(0, 7, device=DEV, requires_grad=True)
    fm.margin_cross_entropy_from_cosine(cos, torch.zeros(0, dtype=torch.long, device=DEV),
                                        reduction=reduction, backend="triton").sum().backward()
    assert cos.grad.shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_inputs(dtype):
    x, W, y = inputs(14, 9, 45, dtype)
    xs = torch.zeros(9, 28, dtype=dtype, device=DEV).T[::2]  # [14, 9], strides (2, 28)
    xs.copy_(x)
    Ws = W.T.contiguous().T  # column-major
    ys = torch.stack([y, y], 1)[:, 0]
    assert not (xs.is_contiguous() or Ws.is_contiguous() or ys.is_contiguous())
    kw = dict(KW["camri"], reduction="sum")
    got = run("triton", xs, Ws, ys, SMALL, **kw)
    assert_matches(got, run("reference", x, W, y, **kw), dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64(reduction):
    x, W, y = inputs(10, 6, 45, torch.float64)
    y[1] = -100
    for name in ("arcface", "sphereface", "combined", "elm", "arcgrad"):
        kw = dict(KW[name], reduction=reduction)
        assert_matches(run("triton", x, W, y, SMALL, **kw), run("reference", x, W, y, **kw),
                       torch.float64)


def test_zero_dim_margin_is_a_scalar():
    x, W, y = inputs(7, 5, 45)
    got = run("triton", x, W, y, SMALL, kind="arcface", s=10.0, m=torch.tensor(0.3, device=DEV))
    assert_matches(got, run("reference", x, W, y, kind="arcface", s=10.0, m=0.3), torch.float32)


def test_zero_width_features():
    x, W, y = inputs(4, 0, 45)
    assert_matches(run("triton", x, W, y, SMALL, kind="cosface", s=10.0, m=0.2),
                   run("reference", x, W, y, kind="cosface", s=10.0, m=0.2), torch.float32)


# ------------------------------------------------------------------ elm

@pytest.mark.parametrize("dup", [(3, 6), (3, 40), (20, 40)], ids=["same_tile", "across", "later"])
def test_elm_first_index_on_ties(dup):
    """Two identical weight rows share the largest wrong-class cosine: c* is the first
    one, in the same class tile or an earlier one, whatever the later tiles hold."""
    x, W, y = inputs(6, 5, 45)
    j1, j2 = dup
    W[j1] = x[0] * 3
    W[j2] = W[j1]
    y[:] = torch.tensor([0, 1, 2, 4, 5, 7], device=DEV)
    x[1:] = x[0]  # every row: the maximum wrong-class cosine sits at j1 and j2
    m = torch.zeros(45, device=DEV)
    m[j1], m[j2] = 0.1, 0.4  # tells the two apart
    kw = dict(kind="elm", s=10.0, m=m, elm_lambda=0.5, reduction="none")
    params = ta.MarginParams("elm", 10.0, 0.0, 1.0, 0.0, 0.0, 0.5, -100, "none").tensor(
        torch.float32, DEV)
    _, c_star, _ = ta.margin_ce_fwd(x, W, y, kind="elm", params=params, m_vec=m,
                                       class_weight=None, ignore_index=-100, blocks=SMALL)
    assert c_star.tolist() == [j1] * 6
    assert_matches(run("triton", x, W, y, SMALL, **kw), run("reference", x, W, y, **kw),
                   torch.float32)


def test_elm_single_class_has_no_c_star():
    x, W, y = inputs(5, 4, 1)
    kw = dict(kind="elm", s=10.0, m=torch.tensor([0.3], device=DEV), reduction="none")
    assert_matches(run("triton", x, W, y, SMALL, **kw), run("reference", x, W, y, **kw),
                   torch.float32)


# ------------------------------------------------------------------ from_cosine

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_from_cosine(case, dtype):
    x, W, y = inputs(19, 6, 45, torch.float64)
    cos = (ref.cosine(x, W) * 0.999).to(dtype)
    cos[0, y[0]] = 1.0  # a pole, clamped by the kinds that need theta
    y[3] = -100
    kw = dict(case[1], class_weight=torch.rand(45, device=DEV) + 0.5, reduction="none")
    out = {}
    for b in ("reference", "triton"):
        c = cos.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy_from_cosine(c, y, backend=b, **kw)
        loss.backward(torch.linspace(0.5, 1.5, 19, device=DEV))
        out[b] = (loss.detach(), c.grad)
    (l0, g0), (l1, g1) = out["reference"], out["triton"]
    assert l1.dtype == l0.dtype and g1.dtype == dtype
    torch.testing.assert_close(l1, l0, **LOSS_TOL[dtype])
    torch.testing.assert_close(g1.float(), g0.float(), **GRAD_TOL[dtype])


# ------------------------------------------------------------------ helpers

@triton.jit
def _acos_kernel(c_ptr, out_ptr, n, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(c_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, ta._acos(c, IS_F64), mask=i < n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 4e-7), (torch.float64, 1e-13)],
                         ids=["fp32", "fp64"])
def test_acos(dtype, tol):
    lo, hi = -1 + ref.COS_EPS, 1 - ref.COS_EPS
    c = torch.cat([torch.linspace(lo, hi, 4001, dtype=torch.float64),
                   torch.tensor([lo, hi, -0.5, 0.5, 0.0, -1.0, 1.0], dtype=torch.float64)])
    c = c.to(dtype).to(DEV)
    out = torch.empty_like(c)
    _acos_kernel[(triton.cdiv(c.numel(), 1024),)](c, out, c.numel(), IS_F64=dtype == torch.float64,
                                                 BLOCK=1024)
    want = torch.acos(c.double())
    assert float((out.double() - want).abs().max()) < tol


def test_row_stats_give_adacos_terms():
    x, W, y = inputs(12, 5, 45)
    s = 4.0
    _, lse_other, cos_y = ta.apply(y, x, W, kind="normface", s=s, m=0.0, m1=1.0, m2=0.0, m3=0.0,
                                   elm_lambda=0.0, class_weight=None, ignore_index=-100,
                                   reduction="mean", with_stats=True)
    cos = ref.cosine(x, W)
    want = torch.logsumexp((s * cos).scatter(1, y[:, None], float("-inf")), dim=1)
    torch.testing.assert_close(lse_other, want, **LOSS_TOL[torch.float32])
    torch.testing.assert_close(cos_y, cos.gather(1, y[:, None]).squeeze(1),
                               **LOSS_TOL[torch.float32])


def test_dispatch_resolves_to_this_module():
    from fused_margin import dispatch

    assert dispatch.resolve("margin_cross_entropy", "triton", DEV) is ta.margin_cross_entropy
    assert (dispatch.resolve("margin_cross_entropy_from_cosine", "triton", DEV)
            is ta.margin_cross_entropy_from_cosine)


# ------------------------------------------------------------------ GPU only

@pytest.mark.requires_cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_default_tiles(dtype, monkeypatch):
    """The GPU tiles (BLOCK_DO below D: several dX / dW programs per row block)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, W, y = inputs(300, 300, 1000, dtype)
    for name in ("arcface", "elm", "arcgrad"):
        kw = dict(KW[name] if name != "elm" else dict(kind="elm", s=20.0, m=0.2), reduction="mean")
        assert_matches(run("triton", x, W, y, **kw), run("reference", x, W, y, **kw), dtype)


@pytest.mark.requires_cuda
@requires_cuda
@pytest.mark.slow
def test_cuda_int64_offsets():
    """C*D >= 2^31 elements of weight (4 GiB in bfloat16): offsets must not wrap."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of GPU memory")
    C, D = 2 ** 22 + 3, 512
    W = torch.randn(C, D, device="cuda", dtype=torch.bfloat16)
    x = W[-4:].float().mul(0.5).add(torch.randn(4, D, device="cuda")).bfloat16()
    y = torch.arange(C - 4, C, device="cuda")
    loss, gx, gw = run("triton", x, W, y, kind="cosface", s=8.0, m=0.2, reduction="sum")
    # the targets live past the 2^31st element: their logits decide the loss
    cos = ref.cosine(x, W)
    logits = 8.0 * cos.scatter(1, y[:, None], cos.gather(1, y[:, None]) - 0.2)
    want = (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-3)
    assert bool(gw[-4:].float().abs().sum(1).gt(0).all())


def test_adacos_loss_is_one_forward_sweep(monkeypatch):
    launches = []
    real = ta.margin_ce_fwd
    monkeypatch.setattr(ta, "margin_ce_fwd", lambda *a, **k: launches.append(1) or real(*a, **k))
    x, W, y = inputs(12, 5, 45)
    W.requires_grad_(True)
    loss, _ = fm.functional.adacos_loss(x, W, y, 3.0, backend="triton")
    loss.backward()
    assert len(launches) == 1


@pytest.mark.requires_cuda
@requires_cuda
@pytest.mark.slow
def test_cuda_from_cosine_n_times_c_past_int32():
    """A cosine input of N x C > 2^31 elements (4 GiB in bfloat16): rows past the
    2^31st element keep their loss and gradient."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs 40 GiB of GPU memory")
    N, C, k = 2 ** 16 + 5, 2 ** 15 + 3, 3
    cos = (torch.rand(N, C, device="cuda", dtype=torch.bfloat16) * 2 - 1).requires_grad_(True)
    y = torch.full((N,), -100, device="cuda")
    y[-k:] = torch.tensor([C - 1, 0, C // 2], device="cuda")
    kw = dict(kind="arcface", s=16.0, m=0.3, reduction="sum")
    loss = fm.margin_cross_entropy_from_cosine(cos, y, backend="triton", **kw)
    loss.backward()
    tail = cos.detach()[-k:].clone().requires_grad_(True)
    want = fm.margin_cross_entropy_from_cosine(tail, y[-k:], backend="reference", **kw)
    want.backward()
    torch.testing.assert_close(loss, want, **LOSS_TOL[torch.bfloat16])
    torch.testing.assert_close(cos.grad[-k:].float(), tail.grad.float(),
                               **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("s", [2.0, 12.0])
def test_adacos_scale_from_row_stats_matches_reference(s):
    x, W, y = inputs(23, 9, 37)
    y[5] = -100
    want = fm.functional.adacos_scale(x, W, y, s, backend="reference")
    got = fm.functional.adacos_scale(x, W, y, s, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    none = torch.full_like(y, -100)
    assert float(fm.functional.adacos_scale(x, W, none, s, backend="triton")) == s


def test_kernels_compile_for_sm90():
    """The margin kernels the launchers pick (the loss in several kinds, the PARTIALS
    mode of fused_margin.distributed with logit offsets and kept rows, from_cosine, the
    O(N x D) kernels; bf16, fp16, fp32 IEEE and TF32, fp64) build for sm_90 with a real
    launch's specialisation, with 0 spill bytes and wgmma in every 16-bit / TF32 hot
    loop (tests/sm90_compile.py): what the interpreter never types or allocates."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    done = re.findall(r"^compiled (\d+) of (\d+); failing the checks: (\d+)$", proc.stdout,
                      re.M)
    assert done, proc.stdout[-2000:]
    n, total, bad = map(int, done[-1])
    assert n == total and total > 40 and bad == 0, done[-1]


# ------------------------------------------------------------------ issue 13

def eager16(x, W, y, **kw):
    """Same-dtype eager PyTorch: normalise and multiply in the 16-bit dtype (as a user's
    bf16 model would), then the reference's margin cross-entropy on that cosine."""
    xh = x * ref.inv_norm(x)[:, None]
    wh = W * ref.inv_norm(W)[:, None]
    return ref.margin_cross_entropy_from_cosine(xh @ wh.T, y, **kw)


def _grads(fn, x, W):
    x = x.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(True)
    loss = fn(x, W)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape))
    return loss.detach().double(), x.grad.double(), W.grad.double()


# CCE's criterion: the fused error against a float64 oracle within the same-dtype eager
# error plus this (on the scale of each tensor's largest entry)
BF16_BUDGET = 2.0 ** -7  # one bfloat16 step at the top of the tensor's range


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("name", ["arcface", "cosface", "elm", "arcgrad", "sphereface"])
def test_bf16_gradients_within_eager_error(name, seed):
    x, W, y = inputs(45, 40, 130, torch.bfloat16, seed=seed)
    kw = dict(KW[name] if name != "elm" else dict(kind="elm", s=20.0, m=0.2), reduction="sum")
    oracle = _grads(lambda a, b: ref.margin_cross_entropy(a.double(), b.double(), y, **kw), x, W)
    fused = _grads(lambda a, b: _apply(SMALL, y, a, b, **kw), x, W)
    eager = _grads(lambda a, b: eager16(a, b, y, **kw), x, W)
    for i, what in enumerate(("loss", "dx", "dW")):
        scale = float(oracle[i].abs().max())
        err_f = float((fused[i] - oracle[i]).abs().max()) / scale
        err_e = float((eager[i] - oracle[i]).abs().max()) / scale
        assert fused[i].isfinite().all()
        assert err_f <= err_e + BF16_BUDGET, (what, err_f, err_e)


@pytest.mark.parametrize("name", ["arcgrad", "arcface", "normface"])
def test_nan_feature_gives_nan(name):
    """A NaN feature makes its row's loss NaN (tl.minimum / tl.maximum clamps used to
    drop it: arcgrad's loss came out finite)."""
    x, W, y = inputs(9, 7, 45)
    x[3, 2] = float("nan")
    kw = dict(KW[name], reduction="none")
    got = _apply(SMALL, y, x, W, **kw)
    want = ref.margin_cross_entropy(x, W, y, **kw)
    assert bool(got[3].isnan()) and bool(want[3].isnan())
    torch.testing.assert_close(got, want, equal_nan=True, **LOSS_TOL[torch.float32])


@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined", "arcgrad", "normface"])
def test_nan_target_cosine_gives_nan(name):
    """A NaN target cosine (from_cosine, and a NaN weight row through features): NaN
    row losses, as the reference and the cpu backend give."""
    x, W, y = inputs(9, 7, 45, torch.float64)
    cos = ref.cosine(x, W).float()
    y = y.to(DEV)
    cos[2, y[2]] = float("nan")
    cos[5, y[5]] = float("inf")  # +inf: clamped by the theta kinds, as torch.clamp does
    kw = dict(KW[name], reduction="none")
    got = fm.margin_cross_entropy_from_cosine(cos, y, backend="triton", **kw)
    want = ref.margin_cross_entropy_from_cosine(cos, y, **kw)
    assert bool(got[2].isnan())
    torch.testing.assert_close(got, want, equal_nan=True, **LOSS_TOL[torch.float32])
    x, W, y = inputs(9, 7, 45)
    W[y[4]] = float("nan")
    got = _apply(SMALL, y, x, W, **kw)
    want = ref.margin_cross_entropy(x, W, y, **kw)
    assert bool(got[4].isnan())
    torch.testing.assert_close(got, want, equal_nan=True, **LOSS_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sx,sw", [(1e20, 1e19), (1e38, 1.0), (1e-30, 1e30), (1.0, 1e36)],
                         ids=["1e20x1e19", "x1e38", "tiny_x", "W1e36"])
def test_huge_and_tiny_operands(sx, sw, dtype):
    """Products past float32's range (x * 1e20 with W * 1e19: 6.08-ish, not inf): the
    operands are brought to a safe range by exact powers of two first."""
    x, W, y = inputs(19, 37, 45, torch.float64)
    x = (x.clamp(-3, 3) * sx).to(dtype)  # |x| <= 3e38: still finite in float32
    W = (W.clamp(-3, 3) * sw).to(dtype)
    kw = dict(kind="arcface", s=20.0, m=0.5, reduction="mean")
    got = run("triton", x, W, y, SMALL, **kw)
    want = run("reference", x, W, y, **kw)
    assert bool(torch.isfinite(got[0])) and bool(torch.isfinite(want[0]))
    torch.testing.assert_close(got[0], want[0], **LOSS_TOL[dtype])
    for g, w in zip(got[1:], want[1:]):
        assert not g.isnan().any()
        scale = float(w.float().abs().max())
        assert float((g.float() - w.float()).abs().max()) <= 2e-2 * scale + 1e-30


def test_overflow_case_through_the_public_function():
    """issue 15's case: margin_cross_entropy(x * 1e20, W * 1e19, y) was inf on Triton."""
    x, W, y = inputs(64, 32, 100)
    loss = fm.margin_cross_entropy(x * 1e20, W * 1e19, y, backend="triton")
    want = ref.margin_cross_entropy(x * 1e20, W * 1e19, y)
    assert bool(torch.isfinite(want))
    torch.testing.assert_close(loss, want, **LOSS_TOL[torch.float32])


# The GPU tiles, numerically: FUSED_MARGIN_TRITON_CONFIG=sm90 hands the interpreter the
# launchers' sm_90 choice. Shapes of a few tiles with ragged edges (N = 130: two row
# blocks, the second of 2 rows; C = 300: three class tiles of 128, the last of 44;
# D = 70: two D steps of 64, the second of 6).
SM90_SHAPE = (130, 70, 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", cases(SM90_SHAPE[2]), ids=lambda c: c[0])
def test_sm90_tiles_every_kind(case, dtype, monkeypatch):
    monkeypatch.setenv("FUSED_MARGIN_TRITON_CONFIG", "sm90")
    launched = []
    real = ta._launch

    def spy(kernel, grid, *args, **kw):
        launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), kw))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(ta, "_launch", spy)
    N, D, C = SM90_SHAPE
    x, W, y = inputs(N, D, C, dtype, seed=3)
    y[7] = -100
    kw = dict(case[1], reduction="sum")
    got = run("triton", x, W, y, None, **kw)
    want = run("reference", x, W, y, **kw)
    torch.testing.assert_close(got[0], want[0], **LOSS_TOL[dtype])
    for g, w in zip(got[1:], want[1:]):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, **GRAD_TOL[dtype])
        else:
            assert float((g.float() - w.float()).abs().max()) <= 2e-2 * float(
                w.float().abs().max())
    table = ta.kind_blocks(ta.default_blocks(dtype, D), dtype, case[1]["kind"])
    key = ta._table_key(dtype)
    assert table is ta.SM90.get((key, "arcgrad" if case[1]["kind"] == "arcgrad" else "mma"),
                                ta.SM90[(key, "mma")])
    dots = [(n, k) for n, k in launched
            if n in ("_margin_ce_fwd_kernel", "_margin_ce_grad_kernel")]
    # the forward sweep's row tile: fwd_outer unless it tracks the best wrong column
    assert dots and all((k["BLOCK_N"], k["BLOCK_C"], k["BLOCK_D"], k["num_warps"],
                         k["num_stages"]) == (
        table.fwd_rows(k["TRACK_BEST"], N) if n == "_margin_ce_fwd_kernel" else table.outer,
        table.sweep, table.d, table.num_warps, table.num_stages) for n, k in dots)
    if dtype == torch.bfloat16:  # the 256-row forward ran (elm keeps 128)
        fwd = [k["BLOCK_N"] for n, k in dots if n == "_margin_ce_fwd_kernel"]
        assert fwd == [128 if case[1]["kind"] == "elm" else 256] * len(fwd)


def test_sm90_from_cosine_and_partials(monkeypatch):
    monkeypatch.setenv("FUSED_MARGIN_TRITON_CONFIG", "sm90")
    N, D, C = SM90_SHAPE
    x, W, y = inputs(N, D, C, torch.float64)
    cos = ref.cosine(x, W).float() * 0.999
    kw = dict(kind="combined", s=20.0, m1=1.2, m2=0.3, m3=0.1, reduction="none")
    out = {}
    for b in ("reference", "triton"):
        c = cos.clone().requires_grad_(True)
        loss = fm.margin_cross_entropy_from_cosine(c, y, backend=b, **kw)
        loss.backward(torch.linspace(0.5, 1.5, N, device=DEV))
        out[b] = (loss.detach(), c.grad)
    torch.testing.assert_close(out["triton"][0], out["reference"][0], **LOSS_TOL[torch.float32])
    torch.testing.assert_close(out["triton"][1], out["reference"][1], **GRAD_TOL[torch.float32])
    from fused_margin.reference import sharded as ref_sharded
    x, W = x.float(), W.float()
    keep = torch.arange(0, C, 3, device=DEV)
    res = {}
    for name, fn in (("reference", ref_sharded.margin_shard_partials),
                     ("triton", ta.margin_shard_partials)):
        xa, Wa = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        p = fn(xa, Wa, y, class_start=10, kind="arcgrad", s=4.0, keep=keep)
        (p.sum_exp.sum() + p.target.sum()).backward()
        res[name] = (p, xa.grad, Wa.grad)
    for f in ("row_max", "sum_exp", "target", "wrong_cos"):
        torch.testing.assert_close(getattr(res["triton"][0], f), getattr(res["reference"][0], f),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res["triton"][1], res["reference"][1], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(res["triton"][2], res["reference"][2], rtol=1e-3, atol=1e-4)


def test_config_env_is_checked(monkeypatch):
    from fused_margin.triton import config
    monkeypatch.setenv(config.ENV, "sm91")
    with pytest.raises(ValueError, match="sm90"):
        config.target()
    monkeypatch.setenv(config.ENV, "interp")
    assert ta.default_blocks(torch.bfloat16, 512) is ta.INTERP


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 64)],
                         ids=["bf16", "fp32"])
def test_matrix_work_is_four_products(dtype, D, monkeypatch):
    """tl.dot and torch matmul FLOPs of forward + backward at the sm_90 tiles, in units
    of one N x D x C product: 1 (log-sum-exp) + 1 (recompute) + 2 (the gradients)."""
    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import TorchDispatchMode

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
            if name in ("mm", "addmm"):
                a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
                flops[0] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counted)
    N, C = 128, 256
    x, W, y = inputs(N, D, C, dtype)
    for kind in ("arcface", "elm"):
        flops[0] = 0
        xa, Wa = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with Mm():
            _apply(None, y, xa, Wa, kind=kind, s=10.0, m=torch.full((C,), 0.2)).backward()
        assert flops[0] / (2 * N * D * C) <= 4.05, flops[0] / (2 * N * D * C)


def test_forward_row_tile_rule():
    """The sm_90 forward's 256-row tile: not where it tracks the best wrong column, not
    where it would pad N by more than 1/8 beyond the 128-row tiles."""
    b = ta.SM90[("bf16", "mma")]
    assert [b.fwd_rows(False, n) for n in (1, 128, 130, 256, 300, 4096)] == [
        128, 128, 256, 256, 128, 256]
    assert b.fwd_rows(True, 4096) == 128
    assert ta.SM90[("tf32", "mma")].fwd_rows(False, 4096) == 128  # no fwd_outer there
