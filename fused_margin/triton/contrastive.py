# Contrastive loss over all in-batch pairs (Eq. 7 of the sigma^2R paper), Triton,
# fused as soft nearest neighbour is (triton/feature_space.py): no N x N tensor.
#
# Forward: one program per BLOCK_M anchors sweeps the batch in BLOCK_N column tiles;
# a tile of squared distances by expansion (tl.dot over D chunks, clamped at 0,
# self-pairs masked), as "l2" the safe square root, the term d_ab (same class) or
# max(0, margin - d_ab), summed per anchor. Backward: one program per (anchor block,
# D chunk) recomputes the tiles and forms S_ab = (g_a + g_b) dterm_ab/draw_ab, which
# holds both d(l_a)/d(raw_ab) and d(l_b)/d(raw_ba) (the term is symmetric in a, b),
# so dL/dx_a = 2 (sum_b S_ab x_a - sum_b S_ab x_b) with no atomics and no second pass.
# dd/draw is 1 (squared, where the clamp passes) or 1 / (2 d) (l2; 0 at d = 0).
# Precision: float32 compute for float32 / float16 / bfloat16, float64 for float64;
# products in IEEE precision.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.reduction import reduce_loss
from .feature_space import Blocks, _acc, _dot_tile, _prep, default_blocks


@triton.jit
def _pair_tile(x_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
               L2: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(raw squared distance, clamped squared distance, distance) tiles."""
    dot = _dot_tile(x_ptr, x_ptr, rows, cols, rmask, cmask, stride_n, stride_d, stride_n,
                    stride_d, D, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
    nr = tl.load(nrm_ptr + rows, mask=rmask, other=0.0)
    nc = tl.load(nrm_ptr + cols, mask=cmask, other=0.0)
    raw = nr[:, None] + nc[None, :] - 2 * dot
    v = tl.maximum(raw, 0.0, propagate_nan=tl.PropagateNan.ALL)
    v = tl.where(rows[:, None] == cols[None, :], 0.0, v)
    if L2:
        d = tl.sqrt(v)
    else:
        d = v
    return raw, v, d


@triton.jit
def _contrastive_fwd_kernel(x_ptr, nrm_ptr, lab_ptr, m_ptr, per_ptr, N, D, stride_n, stride_d,
                            stride_l, L2: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    margin = tl.load(m_ptr)
    yr = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=rmask, other=-1)
    acc = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols.to(tl.int64) * stride_l, mask=cmask, other=-2)
        _raw, _v, d = _pair_tile(x_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                                 L2, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        other = cmask[None, :] & (rows[:, None] != cols[None, :])
        same = yr[:, None] == yc[None, :]
        term = tl.where(same, d, tl.maximum(margin - d, 0.0, propagate_nan=tl.PropagateNan.ALL))
        acc += tl.sum(tl.where(other, term, 0.0), axis=1)
    tl.store(per_ptr + rows, acc, mask=rmask)


@triton.jit
def _contrastive_bwd_kernel(x_ptr, nrm_ptr, lab_ptr, m_ptr, g_ptr, dx_ptr, N, D, stride_n,
                            stride_d, stride_l, L2: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    margin = tl.load(m_ptr)
    yr = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=rmask, other=-1)
    gr = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    rowsum = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols.to(tl.int64) * stride_l, mask=cmask, other=-2)
        gc = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        raw, v, d = _pair_tile(x_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                               L2, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        if L2:
            k = tl.where(v > 0, 0.5 / tl.where(v > 0, d, 1.0), 0.0)
        else:
            k = tl.where(raw >= 0, 1.0, 0.0)
        other = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        same = yr[:, None] == yc[None, :]
        coef = tl.where(same, k, tl.where(margin - d > 0, -k, 0.0))
        s = tl.where(other, (gr[:, None] + gc[None, :]) * coef, 0.0)
        rowsum += tl.sum(s, axis=1)
        xc = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(s, xc, acc, input_precision="ieee", out_dtype=ACC)
    xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                 mask=rmask[:, None] & domask[None, :], other=0.0)
    dx = 2 * (rowsum[:, None] * xr - acc)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * D + do[None, :], dx,
             mask=rmask[:, None] & domask[None, :])


class ContrastiveFunction(torch.autograd.Function):
    """x (compute dtype) -> per-anchor sums of the pair terms [N]."""

    @staticmethod
    def forward(ctx, x, labels, margin: float, distance: str, blocks: Optional[Blocks]):
        n, d = x.shape
        blocks = blocks or default_blocks(x.dtype, d)
        mt = torch.tensor([float(margin)], dtype=x.dtype, device=x.device)
        nrm = (x * x).sum(1)
        per = torch.zeros(n, dtype=x.dtype, device=x.device)
        if n > 0:
            _contrastive_fwd_kernel[(triton.cdiv(n, blocks.m),)](
                x, nrm, labels, mt, per, n, d, x.stride(0), x.stride(1), labels.stride(0),
                L2=distance == "l2", ACC=_acc(x.dtype), BLOCK_M=blocks.m, BLOCK_N=blocks.n,
                BLOCK_D=blocks.d, num_warps=blocks.num_warps)
        ctx.save_for_backward(x, labels, mt, nrm)
        ctx.distance, ctx.blocks = distance, blocks
        return per

    @staticmethod
    def backward(ctx, grad):
        x, labels, mt, nrm = ctx.saved_tensors
        n, d = x.shape
        dx = torch.zeros(n, d, dtype=x.dtype, device=x.device)
        if n < 2 or d == 0:
            return dx, None, None, None, None
        b = ctx.blocks
        g = grad.to(x.dtype).contiguous()
        _contrastive_bwd_kernel[(triton.cdiv(n, b.m), triton.cdiv(d, b.do))](
            x, nrm, labels, mt, g, dx, n, d, x.stride(0), x.stride(1), labels.stride(0),
            L2=ctx.distance == "l2", ACC=_acc(x.dtype), BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_D=b.d,
            BLOCK_DO=b.do, num_warps=b.num_warps)
        return dx, None, None, None, None


def contrastive_with_blocks(embeddings, labels, *, margin, distance, reduction,
                            blocks: Optional[Blocks] = None) -> torch.Tensor:
    """contrastive_loss with explicit tiles (tests)."""
    if distance not in ("l2", "squared_l2"):
        raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")
    x = _prep(embeddings)
    per = ContrastiveFunction.apply(x, labels, float(margin), distance, blocks)
    n = x.shape[0]
    return reduce_loss(per, torch.full_like(per, float(max(n - 1, 0))), reduction)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                     distance: str = "l2", reduction: str = "mean") -> torch.Tensor:
    return contrastive_with_blocks(embeddings, labels, margin=margin, distance=distance,
                                   reduction=reduction)
