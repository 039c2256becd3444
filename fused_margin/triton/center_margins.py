# Git loss and triplet-center loss, Triton, with the semantics of
# fused_margin.reference.feature_space (dtype rules, reductions, tie rules).
#
# Tiling, as triton/centers.py's contrastive centre loss: one program per BLOCK_M
# rows; the own-centre term from explicit differences (centers._own_sq); the other
# centres swept in BLOCK_C tiles of squared distances ||x_i||^2 + ||c_j||^2 - 2 x_i.c_j
# (products by tl.dot over D chunks, clamped at 0, the target column and the columns
# past C masked out). No N x C tile leaves registers.
# - Git forward: per row the push sum sum_{j != y_i} 1 / (1 + d_ij). Backward: with
#   v_ij = -lambda_g g_i / (1 + d_ij)^2 (where the clamp passes), dL/dx_i gains
#   2 (sum_j v_ij x_i - sum_j v_ij c_j) and dL/dc_j gains 2 (sum_i v_ij c_j - sum_i v_ij
#   x_i): two kernels that recompute the tiles, one per (row block, D chunk) sweeping
#   the centres and one per (centre block, D chunk) sweeping the rows, so neither
#   needs atomics. The pull term's gradients are O(N D) PyTorch.
# - Triplet-center forward: per row a running arg-min over the other centres
#   (squared distances: the square root is monotone; the lower index on ties; a NaN
#   distance ranks last, as the reference's key), then the term. Backward: O(N D)
#   PyTorch on the saved index (reference.feature_space.triplet_center_grads).
# Precision: float32 compute for float32 / float16 / bfloat16 inputs, float64 for
# float64; products in IEEE precision.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.feature_space import compute_dtype, triplet_center_grads
from ..reference.reduction import reduce_loss
from .centers import _acc, _blocks, _dist_tile, _own_sq


@triton.jit
def _git_fwd_kernel(x_ptr, c_ptr, lab_ptr, xn_ptr, cn_ptr, lam_ptr, per_ptr, N, C, D,
                    stride_xn, stride_xd, stride_cn, stride_cd, stride_l,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    own, y = _own_sq(x_ptr, c_ptr, lab_ptr, rows, rmask, stride_xn, stride_xd, stride_cn,
                     stride_cd, stride_l, D, BLOCK_M, BLOCK_D, ACC)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    push = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cn = tl.load(cn_ptr + cols, mask=cmask, other=0.0)
        _raw, d = _dist_tile(x_ptr, c_ptr, rows, cols, rmask, cmask, xn, cn, stride_xn,
                             stride_xd, stride_cn, stride_cd, D, BLOCK_M, BLOCK_C, BLOCK_D, ACC)
        keep = cmask[None, :] & (cols[None, :] != y[:, None])
        push += tl.sum(tl.where(keep, 1.0 / (1.0 + d), 0.0), axis=1)
    lam_c = tl.load(lam_ptr)
    lam_g = tl.load(lam_ptr + 1)
    tl.store(per_ptr + rows, lam_c * 0.5 * own + lam_g * push, mask=rmask)


@triton.jit
def _push_grad_store(src_ptr, dst_ptr, idx, imask, do, domask, stride_n, stride_d, D, wsum, acc):
    """The push term's gradient tile 2 (wsum_i src_i - acc_i) over rows idx x columns do of
    src (strided), stored into dst packed [*, D]."""
    m = imask[:, None] & domask[None, :]
    t = tl.load(src_ptr + idx[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                mask=m, other=0.0)
    tl.store(dst_ptr + idx[:, None].to(tl.int64) * D + do[None, :], 2 * (wsum[:, None] * t - acc),
             mask=m)


@triton.jit
def _git_bwd_x_kernel(x_ptr, c_ptr, lab_ptr, xn_ptr, cn_ptr, lam_ptr, g_ptr, dx_ptr, N, C, D,
                      stride_xn, stride_xd, stride_cn, stride_cd, stride_l,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DO: tl.constexpr, ACC: tl.constexpr):
    """The push term's dL/dx for rows x D chunk (dx packed [N, D])."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    y = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=rmask, other=0)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    lam_g = tl.load(lam_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cn = tl.load(cn_ptr + cols, mask=cmask, other=0.0)
        raw, d = _dist_tile(x_ptr, c_ptr, rows, cols, rmask, cmask, xn, cn, stride_xn,
                            stride_xd, stride_cn, stride_cd, D, BLOCK_M, BLOCK_C, BLOCK_D, ACC)
        keep = rmask[:, None] & cmask[None, :] & (cols[None, :] != y[:, None]) & (raw >= 0)
        den = 1.0 + d
        v = tl.where(keep, -lam_g * g[:, None] / (den * den), 0.0)
        rowsum += tl.sum(v, axis=1)
        cb = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_cn + do[None, :] * stride_cd,
                     mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(v, cb, acc, input_precision="ieee", out_dtype=ACC)
    _push_grad_store(x_ptr, dx_ptr, rows, rmask, do, domask, stride_xn, stride_xd, D, rowsum,
                     acc)


@triton.jit
def _git_bwd_c_kernel(x_ptr, c_ptr, lab_ptr, xn_ptr, cn_ptr, lam_ptr, g_ptr, dc_ptr, N, C, D,
                      stride_xn, stride_xd, stride_cn, stride_cd, stride_l,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DO: tl.constexpr, ACC: tl.constexpr):
    """The push term's dL/dc for centres x D chunk (dc packed [C, D]); the tiles are
    [BLOCK_C centres, BLOCK_M rows]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    cn = tl.load(cn_ptr + cols, mask=cmask, other=0.0)
    lam_g = tl.load(lam_ptr + 1)
    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC)
    colsum = tl.zeros((BLOCK_C,), dtype=ACC)
    for r0 in range(0, N, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
        y = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=rmask, other=-1)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        raw, d = _dist_tile(c_ptr, x_ptr, cols, rows, cmask, rmask, cn, xn, stride_cn,
                            stride_cd, stride_xn, stride_xd, D, BLOCK_C, BLOCK_M, BLOCK_D, ACC)
        keep = cmask[:, None] & rmask[None, :] & (cols[:, None] != y[None, :]) & (raw >= 0)
        den = 1.0 + d
        v = tl.where(keep, -lam_g * g[None, :] / (den * den), 0.0)
        colsum += tl.sum(v, axis=1)
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + do[None, :] * stride_xd,
                     mask=rmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(v, xb, acc, input_precision="ieee", out_dtype=ACC)
    _push_grad_store(c_ptr, dc_ptr, cols, cmask, do, domask, stride_cn, stride_cd, D, colsum,
                     acc)


@triton.jit
def _tcl_fwd_kernel(x_ptr, c_ptr, lab_ptr, xn_ptr, cn_ptr, m_ptr, per_ptr, own_ptr, near_ptr,
                    idx_ptr, N, C, D, stride_xn, stride_xd, stride_cn, stride_cd, stride_l,
                    L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    own, y = _own_sq(x_ptr, c_ptr, lab_ptr, rows, rmask, stride_xn, stride_xd, stride_cn,
                     stride_cd, stride_l, D, BLOCK_M, BLOCK_D, ACC)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    best = tl.full((BLOCK_M,), float("inf"), ACC)
    idx = tl.full((BLOCK_M,), 2147483647, tl.int32)
    first = tl.full((BLOCK_M,), 2147483647, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cn = tl.load(cn_ptr + cols, mask=cmask, other=0.0)
        _raw, d = _dist_tile(x_ptr, c_ptr, rows, cols, rmask, cmask, xn, cn, stride_xn,
                             stride_xd, stride_cn, stride_cd, D, BLOCK_M, BLOCK_C, BLOCK_D, ACC)
        keep = cmask[None, :] & (cols[None, :] != y[:, None])
        first = tl.minimum(first, tl.min(tl.where(keep, cols[None, :], 2147483647), axis=1))
        v = tl.where(keep & (d == d), d, float("inf"))
        t = tl.min(v, axis=1)
        it = tl.min(tl.where(keep & (d == d) & (v == t[:, None]), cols[None, :], 2147483647),
                    axis=1)
        take = t < best
        best = tl.where(take, t, best)
        idx = tl.where(take, it, idx)
    have = first < 2147483647
    found = idx < 2147483647
    # only NaN (or +inf) distances: the first other centre, its distance NaN
    near = tl.where(found, best, float("nan"))
    idx = tl.where(found, idx, first)
    if L2:
        own = tl.sqrt(own)
        near = tl.sqrt(near)
    term = tl.load(m_ptr) + own - near
    per = tl.where(have, tl.maximum(term, 0.0, propagate_nan=tl.PropagateNan.ALL), own * 0.0)
    tl.store(per_ptr + rows, per, mask=rmask)
    tl.store(own_ptr + rows, own, mask=rmask)
    tl.store(near_ptr + rows, tl.where(have, near, 0.0), mask=rmask)
    tl.store(idx_ptr + rows, tl.where(have, idx, -1).to(tl.int64), mask=rmask)


def _do_block(D: int, dt: torch.dtype) -> int:
    return max(16, min(64 if dt == torch.float64 else 128, triton.next_power_of_2(max(D, 1))))


def _lambdas(lambda_c: float, lambda_g: float, dt, device) -> torch.Tensor:
    return torch.tensor([float(lambda_c), float(lambda_g)], dtype=dt, device=device)


class _GitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, lambda_c, lambda_g, blocks):
        n, d = x.shape
        per = torch.empty(n, dtype=x.dtype, device=x.device)
        xn, cn = (x * x).sum(1), (c * c).sum(1)
        lam = _lambdas(lambda_c, lambda_g, x.dtype, x.device)
        bm, bc, bd, warps = blocks or _blocks(x.dtype, d)
        if n > 0:
            _git_fwd_kernel[(triton.cdiv(n, bm),)](
                x, c, labels, xn, cn, lam, per, n, c.shape[0], d, x.stride(0), x.stride(1),
                c.stride(0), c.stride(1), labels.stride(0), BLOCK_M=bm, BLOCK_C=bc,
                BLOCK_D=bd, ACC=_acc(x.dtype), num_warps=warps)
        ctx.save_for_backward(x, labels, c, xn, cn, lam)
        ctx.blocks = (bm, bc, bd, warps)
        return per

    @staticmethod
    def backward(ctx, grad):
        x, labels, c, xn, cn, lam = ctx.saved_tensors
        bm, bc, bd, warps = ctx.blocks
        n, d = x.shape
        nc = c.shape[0]
        g = grad.to(x.dtype).contiguous()
        pull = (lam[0] * g)[:, None] * (x - c[labels])
        gx, gc = pull.clone(), torch.zeros_like(c).index_add_(0, labels, -pull)
        if n > 0 and d > 0:
            bdo = _do_block(d, x.dtype)
            dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
            _git_bwd_x_kernel[(triton.cdiv(n, bm), triton.cdiv(d, bdo))](
                x, c, labels, xn, cn, lam, g, dx, n, nc, d, x.stride(0), x.stride(1),
                c.stride(0), c.stride(1), labels.stride(0), BLOCK_M=bm, BLOCK_C=bc,
                BLOCK_D=bd, BLOCK_DO=bdo, ACC=_acc(x.dtype), num_warps=warps)
            gx += dx
            if ctx.needs_input_grad[2]:
                dc = torch.empty(nc, d, dtype=x.dtype, device=x.device)
                _git_bwd_c_kernel[(triton.cdiv(nc, bc), triton.cdiv(d, bdo))](
                    x, c, labels, xn, cn, lam, g, dc, n, nc, d, x.stride(0), x.stride(1),
                    c.stride(0), c.stride(1), labels.stride(0), BLOCK_M=bm, BLOCK_C=bc,
                    BLOCK_D=bd, BLOCK_DO=bdo, ACC=_acc(x.dtype), num_warps=warps)
                gc += dc
        return gx, None, gc if ctx.needs_input_grad[2] else None, None, None, None


def git_loss_with_blocks(features, labels, centers, *, lambda_c, lambda_g, reduction, blocks):
    """git_loss with explicit (BLOCK_M, BLOCK_C, BLOCK_D, num_warps) tiles (tests)."""
    dt = compute_dtype(features.dtype)
    per = _GitLoss.apply(features.to(dt), labels, centers.to(dt), float(lambda_c),
                         float(lambda_g), blocks)
    return reduce_loss(per, torch.ones_like(per), reduction)


def git_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
             lambda_c: float = 1.0, lambda_g: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    return git_loss_with_blocks(features, labels, centers, lambda_c=lambda_c,
                                lambda_g=lambda_g, reduction=reduction, blocks=None)


class _TripletCenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, margin, distance, blocks):
        n, d = x.shape
        per, own, near = (torch.zeros(n, dtype=x.dtype, device=x.device) for _ in range(3))
        idx = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        bm, bc, bd, warps = blocks or _blocks(x.dtype, d)
        if n > 0:
            xn, cn = (x * x).sum(1), (c * c).sum(1)
            mt = torch.tensor([float(margin)], dtype=x.dtype, device=x.device)
            _tcl_fwd_kernel[(triton.cdiv(n, bm),)](
                x, c, labels, xn, cn, mt, per, own, near, idx, n, c.shape[0], d, x.stride(0),
                x.stride(1), c.stride(0), c.stride(1), labels.stride(0),
                L2=distance == "l2", BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd, ACC=_acc(x.dtype),
                num_warps=warps)
        ctx.save_for_backward(x, labels, c, per, own, near, idx)
        ctx.distance = distance
        return per

    @staticmethod
    def backward(ctx, grad):
        gx, gc = triplet_center_grads(grad.to(ctx.saved_tensors[0].dtype), *ctx.saved_tensors,
                                      ctx.distance)
        return gx, None, gc, None, None, None


def triplet_center_with_blocks(features, labels, centers, *, margin, distance, reduction, blocks):
    """triplet_center_loss with explicit tiles (tests)."""
    if distance not in ("l2", "squared_l2"):
        raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")
    dt = compute_dtype(features.dtype)
    per = _TripletCenterLoss.apply(features.to(dt), labels, centers.to(dt), float(margin),
                                   distance, blocks)
    return reduce_loss(per, torch.ones_like(per), reduction)


def triplet_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                        margin: float = 5.0, distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    return triplet_center_with_blocks(features, labels, centers, margin=margin,
                                      distance=distance, reduction=reduction, blocks=None)
