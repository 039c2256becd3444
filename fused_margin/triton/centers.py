# Centre losses, Triton: center_loss (0.5 ||x_i - c_{y_i}||^2 per sample) and
# contrastive_center_loss (that over sum_{j != y_i} ||x_i - c_j||^2 + delta), with
# the semantics of fused_margin.reference.feature_space (dtype rules, reductions).
#
# Tiling. One program per BLOCK_M rows. The own-centre term gathers c[y_i] and sums
# explicit differences over D in BLOCK_D chunks (no cancellation). The contrastive
# denominator sweeps the centres in BLOCK_C tiles: a tile of squared distances is
# ||x_i||^2 + ||c_j||^2 - 2 x_i.c_j with the products by tl.dot over D chunks,
# clamped at 0 as the reference's pairwise_sq_dists is, the target column and the
# columns past C masked out, and summed into a per-row accumulator. No N x C tile
# leaves registers. (The closed form C ||x||^2 - 2 x.sum_j c_j + sum_j ||c_j||^2
# would be cheaper but cancels badly in float32 when the points sit far from the
# origin; the sweep costs one N x C x D product, the same as the reference's.)
#
# Saved for backward: x and c in the compute dtype, the labels, and for the
# contrastive loss the per-row own-centre distance and denominator [N]. The
# backward is O(N x D + C x D) PyTorch on those per-row factors: with
# a_i = g_i / den_i and b_i = -g_i own_i / den_i^2 (g the upstream gradient),
#   dL/dx_i = a_i (x_i - c_{y_i}) + b_i ((C - 1) x_i - (sum_j c_j - c_{y_i}))
#   dL/dc_j = -b-weighted sum over rows with y_i != j of (x_i - c_j)
#             - a-weighted sum over rows with y_i = j of (x_i - c_j),
# the first sum being (sum_i b_i x_i - sum_i b_i c_j) less the rows of class j,
# which an index_add over the labels puts back. The clamp's zero gradient (exact
# coincidences of x_i and c_j) is not reproduced; it has measure zero.
#
# Precision: float32 compute for float32 / float16 / bfloat16 inputs (upcast once,
# O(N x D)), float64 for float64; products in IEEE precision (no TF32).
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference.feature_space import compute_dtype
from ..reference.reduction import reduce_loss
from ..autograd_guard import first_order


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(dtype: torch.dtype, D: int):
    """(BLOCK_M, BLOCK_C, BLOCK_D, num_warps)."""
    if _interpreted():  # numpy underneath: few, large steps are what is cheap
        return 32, 32, 32, 4
    if dtype == torch.float64:
        return 32, 32, 16, 4
    return 64, 64, 32, 4


def _acc(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


@triton.jit
def _own_sq(x_ptr, c_ptr, lab_ptr, rows, rmask, stride_xn, stride_xd, stride_cn, stride_cd,
            stride_l, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """||x_i - c_{y_i}||^2 from explicit differences, and the labels (read by
    their stride: a strided view must not be read as if packed)."""
    y = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=rmask, other=0)
    own = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (dd < D)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                    mask=m2, other=0.0)
        c = tl.load(c_ptr + y[:, None].to(tl.int64) * stride_cn + dd[None, :] * stride_cd,
                    mask=m2, other=0.0)
        diff = x - c
        own += tl.sum(diff * diff, axis=1)
    return own, y


@triton.jit
def _center_fwd_kernel(x_ptr, c_ptr, lab_ptr, per_ptr, N, D, stride_xn, stride_xd, stride_cn,
                       stride_cd, stride_l, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    own, y = _own_sq(x_ptr, c_ptr, lab_ptr, rows, rmask, stride_xn, stride_xd, stride_cn,
                     stride_cd, stride_l, D, BLOCK_M, BLOCK_D, ACC)
    tl.store(per_ptr + rows, 0.5 * own, mask=rmask)


@triton.jit
def _dist_tile(x_ptr, c_ptr, rows, cols, rmask, cmask, xn, cn, stride_xn, stride_xd, stride_cn,
               stride_cd, D, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """(raw, clamped) squared distances between x[rows] and c[cols] by expansion; the
    clamp keeps a NaN (the default maximum may return the other operand)."""
    dot = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + dd[None, :] * stride_cd,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        dot = tl.dot(a, tl.trans(b), dot, input_precision="ieee", out_dtype=ACC)
    raw = xn[:, None] + cn[None, :] - 2 * dot
    return raw, tl.maximum(raw, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _contrastive_fwd_kernel(x_ptr, c_ptr, lab_ptr, xn_ptr, cn_ptr, delta_ptr, per_ptr, own_ptr,
                            den_ptr, N, C, D, stride_xn, stride_xd, stride_cn, stride_cd,
                            stride_l, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    own, y = _own_sq(x_ptr, c_ptr, lab_ptr, rows, rmask, stride_xn, stride_xd, stride_cn,
                     stride_cd, stride_l, D, BLOCK_M, BLOCK_D, ACC)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    others = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cn = tl.load(cn_ptr + cols, mask=cmask, other=0.0)
        _, d = _dist_tile(x_ptr, c_ptr, rows, cols, rmask, cmask, xn, cn, stride_xn, stride_xd,
                          stride_cn, stride_cd, D, BLOCK_M, BLOCK_C, BLOCK_D, ACC)
        keep = cmask[None, :] & (cols[None, :] != y[:, None])
        others += tl.sum(tl.where(keep, d, 0.0), axis=1)
    delta = tl.load(delta_ptr)
    den = others + delta
    tl.store(own_ptr + rows, own, mask=rmask)
    tl.store(den_ptr + rows, den, mask=rmask)
    tl.store(per_ptr + rows, 0.5 * own / den, mask=rmask)


def center_fwd(x: torch.Tensor, labels: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    per = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return per
    bm, _, bd, warps = _blocks(x.dtype, d)
    _center_fwd_kernel[(triton.cdiv(n, bm),)](
        x, c, labels, per, n, d, x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        labels.stride(0), BLOCK_M=bm, BLOCK_D=bd, ACC=_acc(x.dtype), num_warps=warps)
    return per


def contrastive_center_fwd(x: torch.Tensor, labels: torch.Tensor, c: torch.Tensor, delta: float,
                           blocks=None):
    """Per-row loss, own-centre squared distance and denominator, each [N]."""
    n, d = x.shape
    per, own, den = (torch.empty(n, dtype=x.dtype, device=x.device) for _ in range(3))
    if n == 0:
        return per, own, den
    bm, bc, bd, warps = blocks or _blocks(x.dtype, d)
    xn = (x * x).sum(1)
    cn = (c * c).sum(1)
    delta_t = torch.tensor([float(delta)], dtype=x.dtype, device=x.device)
    _contrastive_fwd_kernel[(triton.cdiv(n, bm),)](
        x, c, labels, xn, cn, delta_t, per, own, den, n, c.shape[0], d, x.stride(0), x.stride(1),
        c.stride(0), c.stride(1), labels.stride(0), BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd,
        ACC=_acc(x.dtype), num_warps=warps)
    return per, own, den


class _CenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c):
        ctx.save_for_backward(x, labels, c)
        return center_fwd(x, labels, c)

    @staticmethod
    @first_order("center_loss (triton backend)")
    def backward(ctx, grad):
        x, labels, c = ctx.saved_tensors
        gx = grad[:, None] * (x - c[labels])
        gc = torch.zeros_like(c).index_add_(0, labels, -gx) if ctx.needs_input_grad[2] else None
        return gx, None, gc


class _ContrastiveCenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, delta, blocks):
        per, own, den = contrastive_center_fwd(x, labels, c, delta, blocks)
        ctx.save_for_backward(x, labels, c, own, den)
        return per

    @staticmethod
    @first_order("contrastive_center_loss (triton backend)")
    def backward(ctx, grad):
        x, labels, c, own, den = ctx.saved_tensors
        a = grad / den                  # d per / d own, times 2
        b = -grad * (own / den) / den   # d per / d den, times 2 (den * den under- /
        # overflows float32 for spreads past ~1e+-10)
        cy = c[labels]
        diff = x - cy
        # sums over the classes j != y_i are formed without subtracting the own class
        # from a total (an inf or NaN own term would turn the others' finite sum
        # into NaN where the reference's is finite: issue 15 item 9)
        gx = a[:, None] * diff + b[:, None] * ((c.shape[0] - 1) * x - _excluding(c)[labels])
        gc = None
        if ctx.needs_input_grad[2]:
            # row i pulls centre j != y_i by -b_i (x_i - c_j) and its own centre by
            # -a_i (x_i - c_{y_i}): per class k the sums of b_i and b_i x_i over its
            # rows, then for each j the sums over the other classes
            n_c = c.shape[0]
            sb = torch.zeros(n_c, dtype=c.dtype, device=c.device).index_add_(0, labels, b)
            sbx = torch.zeros_like(c).index_add_(0, labels, b[:, None] * x)
            gc = _excluding(sb[:, None]) * c - _excluding(sbx)
            gc = gc.index_add_(0, labels, -a[:, None] * diff)
        return gx, None, gc, None, None


def _excluding(v: torch.Tensor) -> torch.Tensor:
    """[K, D] -> row j: sum of the rows k != j, as an exclusive prefix plus an
    exclusive suffix sum (no total - own subtraction)."""
    zero = torch.zeros_like(v[:1])
    pre = torch.cat([zero, torch.cumsum(v, 0)[:-1]])
    suf = torch.cat([torch.cumsum(v.flip(0), 0)[:-1].flip(0), zero])
    return pre + suf


def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                reduction: str = "mean") -> torch.Tensor:
    dt = compute_dtype(features.dtype)
    per = _CenterLoss.apply(features.to(dt), labels, centers.to(dt))
    return reduce_loss(per, torch.ones_like(per), reduction)


def contrastive_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                            *, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    return contrastive_center_with_blocks(features, labels, centers, delta=delta,
                                          reduction=reduction, blocks=None)


def contrastive_center_with_blocks(features, labels, centers, *, delta, reduction, blocks):
    """contrastive_center_loss with explicit (BLOCK_M, BLOCK_C, BLOCK_D, num_warps)
    tiles; None picks the defaults. Tests use it to exercise the tiling."""
    dt = compute_dtype(features.dtype)
    per = _ContrastiveCenterLoss.apply(features.to(dt), labels, centers.to(dt), float(delta),
                                       blocks)
    return reduce_loss(per, torch.ones_like(per), reduction)
