# Feature-space losses over in-batch pairs (soft nearest neighbour, k-NN stds and
# sigma^2R, triplet with batch-hard / semi-hard / all mining), Triton, with
# O(N x tile) memory: no N x N distance matrix is ever held. Semantics are
# fused_margin.reference.feature_space's (tie rules, safe sqrt, empty sets).
#
# Tiling. Every kernel runs one program per BLOCK_M rows (samples, class centres,
# or (anchor, positive) pairs) and sweeps the batch in BLOCK_N column tiles; a
# distance tile is ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j with the products by tl.dot
# over D in BLOCK_D chunks (k-NN selection alone uses explicit differences, as the
# reference does, so that duplicate points tie exactly).
# - soft NN forward: two online log-sum-exps per row (same class without self, all
#   without self). Backward: one program per (row block, D chunk) recomputes the
#   tiles and forms, for its rows i and every column j, S_ij = G_ij + G_ji with
#   G_ij = g_i (p_same_ij - p_all_ij) / T (p: the row softmaxes rebuilt from the
#   saved log-sum-exps); then dL/dx_i = 2 (sum_j S_ij x_i - sum_j S_ij x_j). G_ji
#   needs only row j's saved statistics, so there are no atomics and no second pass.
# - k-NN: a running top-K (K = next power of two >= n_neighbors, n_neighbors <=
#   MAX_TOP_K; above it the reference's [M, N] selection) per row held in
#   registers, merged with each column tile by K rounds of lexicographic
#   (distance, index) minimum, which is the reference's stable-sort tie rule.
# - triplet "hard": a running arg-max over positives and arg-min over negatives
#   per row (strict comparisons across tiles, lowest index within a tile).
#   "semihard": one row per positive pair (a, p), built from the label sort; a
#   first sweep picks up d(a, p) from the same tile arithmetic plus the farthest
#   negative, a second the closest negative strictly farther than p.
#   "all" ("mean" / "sum"): one row per positive pair; the forward sums the live
#   terms relu(d_ap - d_an + margin) and counts them; the backward gives d_ap its
#   count (through PyTorch) and the d_an part by two kernels, one over pair rows
#   (the anchor's side, [P, D], index_add-ed onto the anchors) and one over sample
#   rows sweeping the pairs (the negative's side): again no atomics. "all" with
#   "none" returns the [T] terms themselves and is left to the reference.
# The discrete choices (neighbour, hardest / semi-hard indices) come back as
# [rows, k] index tensors and the differentiable part is evaluated in PyTorch on
# the gathered O(N x k x D) rows, with the reference's own std math.
#
# Saved for backward: soft NN saves x (in the compute dtype), its labels, the
# squared row norms and per-row lse_all, lse_same, has-a-partner [N]; "all" saves
# x, the pairs' anchors and d_ap [P] and their live-term counts [P]; the other ops
# leave their (gathered, O(N x k x D) or O(P x D)) graphs to autograd.
#
# Offsets into the [N, D] operands are int64 (N * D may pass 2^31); row indices
# and the index sentinels stay int32.
#
# Precision: float32 compute for float32 / float16 / bfloat16 inputs (a 16-bit
# input is upcast once, O(N x D)), float64 for float64; products in IEEE
# precision (the losses subtract large distances, TF32 would not do). Scalar
# parameters travel as 1-element tensors in the compute dtype, so float64 runs are
# exact to the reference's rounding.
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference.feature_space import _std_with, compute_dtype, safe_sqrt, sigma2r_with
from ..reference.reduction import reduce_loss
from ..reference import feature_space as _ref

# larger n_neighbors select with the reference's [M, N] sort instead of the kernel
MAX_TOP_K = 64
# triplet distance forms, the kernels' DIST constexpr
DISTANCES = ("squared_l2", "l2", "cosine")
SQUARED_L2, L2, COSINE = (tl.constexpr(i) for i in range(3))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Blocks:
    """Tile sizes: BLOCK_M rows per program, BLOCK_N columns per step, BLOCK_D of D
    per product step, BLOCK_DO of D per soft-NN gradient program."""
    m: int
    n: int
    d: int
    do: int
    num_warps: int = 4


def default_blocks(dtype: torch.dtype, D: int, *, selection: bool = False) -> Blocks:
    do = max(16, min(64 if dtype == torch.float64 else 128, triton.next_power_of_2(max(D, 1))))
    if _interpreted():  # numpy underneath: few, large steps are what is cheap
        return Blocks(m=32, n=32, d=32, do=do)
    if selection:  # [BLOCK_M, BLOCK_N, BLOCK_D] difference tiles live in registers
        return Blocks(m=32, n=32, d=8, do=do)
    if dtype == torch.float64:
        return Blocks(m=32, n=32, d=16, do=min(do, 64))
    return Blocks(m=64, n=64, d=32, do=do, num_warps=8)


def _acc(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _prep(x: torch.Tensor) -> torch.Tensor:
    """The input in its compute dtype; the kernels read it by strides."""
    return x.to(compute_dtype(x.dtype))


def _scalar(v: float, dt: torch.dtype, device) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=dt, device=device)


# ------------------------------------------------------------------ device helpers

@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, stride_an, stride_ad, stride_bn,
              stride_bd, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """a[rows] @ b[cols].T, summed over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_an + dd[None, :] * stride_ad,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bn + dd[None, :] * stride_bd,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _lse_update(logit, mask, m, s):
    """One online log-sum-exp step over the masked entries of each row; m stays
    -inf (and s 0) for a row that has seen none."""
    l = tl.where(mask, logit, float("-inf"))
    m_new = tl.maximum(m, tl.max(l, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(l - m_safe[:, None]), axis=1)
    return m_new, s


# ----------------------------------------------------------- soft nearest neighbour

@triton.jit
def _snn_fwd_kernel(x_ptr, nrm_ptr, lab_ptr, t_ptr, per_ptr, lse_all_ptr, lse_same_ptr,
                    N, D, stride_n, stride_d, stride_l,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    temp = tl.load(t_ptr)
    nr = tl.load(nrm_ptr + rows, mask=rmask, other=0.0)
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    m_all = tl.full((BLOCK_M,), float("-inf"), ACC)
    m_same = tl.full((BLOCK_M,), float("-inf"), ACC)
    s_all = tl.zeros((BLOCK_M,), ACC)
    s_same = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        nc = tl.load(nrm_ptr + cols, mask=cmask, other=0.0)
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        dot = _dot_tile(x_ptr, x_ptr, rows, cols, rmask, cmask, stride_n, stride_d, stride_n,
                        stride_d, D, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        logit = -tl.maximum(nr[:, None] + nc[None, :] - 2 * dot, 0.0) / temp
        other = cmask[None, :] & (rows[:, None] != cols[None, :])
        same = other & (yr[:, None] == yc[None, :])
        m_all, s_all = _lse_update(logit, other, m_all, s_all)
        m_same, s_same = _lse_update(logit, same, m_same, s_same)
    has = s_same > 0  # s >= 1 once a row has seen one entry: no underflow
    lse_all = tl.where(has, m_all + tl.log(tl.where(has, s_all, 1.0)), 0.0)
    lse_same = tl.where(has, m_same + tl.log(tl.where(has, s_same, 1.0)), 0.0)
    tl.store(per_ptr + rows, lse_all - lse_same, mask=rmask)
    # rows without a partner keep finite dummies (0): their p's below stay <= 1
    tl.store(lse_all_ptr + rows, lse_all, mask=rmask)
    tl.store(lse_same_ptr + rows, lse_same, mask=rmask)


@triton.jit
def _snn_bwd_kernel(x_ptr, nrm_ptr, lab_ptr, t_ptr, g_ptr, lse_all_ptr, lse_same_ptr, dx_ptr,
                    N, D, stride_n, stride_d, stride_l, stride_dxn, stride_dxd,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    temp = tl.load(t_ptr)
    nr = tl.load(nrm_ptr + rows, mask=rmask, other=0.0)
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    gr = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    la_r = tl.load(lse_all_ptr + rows, mask=rmask, other=0.0)
    ls_r = tl.load(lse_same_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    rowsum = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        nc = tl.load(nrm_ptr + cols, mask=cmask, other=0.0)
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        gc = tl.load(g_ptr + cols, mask=cmask, other=0.0)
        la_c = tl.load(lse_all_ptr + cols, mask=cmask, other=0.0)
        ls_c = tl.load(lse_same_ptr + cols, mask=cmask, other=0.0)
        dot = _dot_tile(x_ptr, x_ptr, rows, cols, rmask, cmask, stride_n, stride_d, stride_n,
                        stride_d, D, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
        raw = nr[:, None] + nc[None, :] - 2 * dot
        logit = -tl.maximum(raw, 0.0) / temp
        other = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        same = other & (yr[:, None] == yc[None, :])
        # d(l_i)/d(d_ij) from row i's softmaxes, and d(l_j)/d(d_ji) from row j's;
        # masked before exp, where a masked-off exponent may be huge
        g_ij = tl.exp(tl.where(same, logit - ls_r[:, None], float("-inf"))) \
            - tl.exp(tl.where(other, logit - la_r[:, None], float("-inf")))
        g_ji = tl.exp(tl.where(same, logit - ls_c[None, :], float("-inf"))) \
            - tl.exp(tl.where(other, logit - la_c[None, :], float("-inf")))
        s = (gr[:, None] * g_ij + gc[None, :] * g_ji) / temp
        s = tl.where(raw >= 0, s, 0.0)  # clamp_min(0) passes no gradient below 0
        rowsum += tl.sum(s, axis=1)
        xc = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(s, xc, acc, input_precision="ieee", out_dtype=ACC)
    xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                 mask=rmask[:, None] & domask[None, :], other=0.0)
    dx = 2 * (rowsum[:, None] * xr - acc)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxn + do[None, :] * stride_dxd, dx,
             mask=rmask[:, None] & domask[None, :])


def snn_fwd(x: torch.Tensor, labels: torch.Tensor, temp: torch.Tensor, blocks: Blocks):
    """x in its compute dtype. Returns (per [N], lse_all [N], lse_same [N], sq norms [N]);
    per is 0 (and both lse 0) for rows without a same-class partner."""
    N, D = x.shape
    nrm = (x * x).sum(1)
    per, lse_all, lse_same = (torch.empty(N, dtype=x.dtype, device=x.device) for _ in range(3))
    _snn_fwd_kernel[(triton.cdiv(N, blocks.m),)](
        x, nrm, labels, temp, per, lse_all, lse_same, N, D, x.stride(0), x.stride(1),
        labels.stride(0), ACC=_acc(x.dtype), BLOCK_M=blocks.m, BLOCK_N=blocks.n,
        BLOCK_D=blocks.d, num_warps=blocks.num_warps)
    return per, lse_all, lse_same, nrm


def snn_bwd(x, labels, temp, g, lse_all, lse_same, nrm, blocks: Blocks) -> torch.Tensor:
    """dL/dx for per-row upstream gradients g (0 on rows without a partner)."""
    N, D = x.shape
    dx = torch.empty_like(x)
    _snn_bwd_kernel[(triton.cdiv(N, blocks.m), triton.cdiv(D, blocks.do))](
        x, nrm, labels, temp, g, lse_all, lse_same, dx, N, D, x.stride(0), x.stride(1),
        labels.stride(0), dx.stride(0), dx.stride(1), ACC=_acc(x.dtype), BLOCK_M=blocks.m,
        BLOCK_N=blocks.n, BLOCK_D=blocks.d, BLOCK_DO=blocks.do, num_warps=blocks.num_warps)
    return dx


class SoftNearestNeighborFunction(torch.autograd.Function):
    """x (compute dtype) -> (per-sample loss [N], has-a-partner mask [N])."""

    @staticmethod
    def forward(ctx, x, labels, temperature: float, blocks: Optional[Blocks]):
        N, D = x.shape
        blocks = blocks or default_blocks(x.dtype, D)
        temp = _scalar(temperature, x.dtype, x.device)
        has = _has_partner(labels)
        if N == 0:
            per = lse_all = lse_same = nrm = x.new_zeros(0)
        else:
            per, lse_all, lse_same, nrm = snn_fwd(x, labels, temp, blocks)
        ctx.blocks = blocks
        ctx.save_for_backward(x, labels, temp, lse_all, lse_same, nrm, has)
        ctx.mark_non_differentiable(has)
        return per, has

    @staticmethod
    def backward(ctx, g_per, _g_has):
        x, labels, temp, lse_all, lse_same, nrm, has = ctx.saved_tensors
        if g_per is None or x.numel() == 0:  # nothing to launch over
            return torch.zeros_like(x), None, None, None
        g = torch.where(has, g_per.to(x.dtype), torch.zeros_like(lse_all)).contiguous()
        return snn_bwd(x, labels, temp, g, lse_all, lse_same, nrm, ctx.blocks), None, None, None


def _has_partner(labels: torch.Tensor) -> torch.Tensor:
    """Whether each sample's class occurs at least twice (O(N log N), no N x N)."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def soft_nearest_neighbor(features: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                          reduction: str, blocks: Optional[Blocks] = None) -> torch.Tensor:
    """soft_nearest_neighbor_loss with tile sizes `blocks` (tests)."""
    x = _prep(features)
    per, has = SoftNearestNeighborFunction.apply(x, labels, float(temperature), blocks)
    return reduce_loss(per, has.to(x.dtype), reduction)


# ------------------------------------------------------------------- k-NN selection

@triton.jit
def _knn_kernel(q_ptr, qlab_ptr, x_ptr, lab_ptr, out_ptr, M, N, D, K_OUT,
                stride_qn, stride_qd, stride_ql, stride_xn, stride_xd, stride_l,
                stride_on, stride_ok,
                EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr, K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    yr = tl.load(qlab_ptr + rows * stride_ql, mask=rmask, other=-1)
    slots = tl.arange(0, K)
    # an empty slot is (inf, int32 max): it sorts after every real column
    best_d = tl.full((BLOCK_M, K), float("inf"), ACC)
    best_i = tl.full((BLOCK_M, K), 2147483647, tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        dist = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            a = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_qn + dd[None, :] * stride_qd,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            diff = a[:, None, :] - b[None, :, :]
            dist += tl.sum(diff * diff, axis=2)
        allowed = cmask[None, :] & (yr[:, None] == yc[None, :])
        if EXCLUDE_SELF:
            allowed = allowed & (rows[:, None] != cols[None, :])
        td = tl.where(allowed, dist, float("inf"))
        ti = tl.where(allowed, cols[None, :], 2147483647)
        new_d = tl.full((BLOCK_M, K), float("inf"), ACC)
        new_i = tl.full((BLOCK_M, K), 2147483647, tl.int32)
        # K smallest of (running best) + (tile) in (distance, index) order
        for s in tl.static_range(K):
            m = tl.minimum(tl.min(best_d, axis=1), tl.min(td, axis=1))
            mi = tl.minimum(
                tl.min(tl.where(best_d == m[:, None], best_i, 2147483647), axis=1),
                tl.min(tl.where(td == m[:, None], ti, 2147483647), axis=1))
            new_d = tl.where(slots[None, :] == s, m[:, None], new_d)
            new_i = tl.where(slots[None, :] == s, mi[:, None], new_i)
            # column indices are unique, so the index alone marks the one taken;
            # it leaves as (inf, sentinel) so that an exhausted row yields sentinels
            taken = best_i == mi[:, None]
            best_d = tl.where(taken, float("inf"), best_d)
            best_i = tl.where(taken, 2147483647, best_i)
            taken = ti == mi[:, None]
            td = tl.where(taken, float("inf"), td)
            ti = tl.where(taken, 2147483647, ti)
        best_d = new_d
        best_i = new_i
    out = tl.where(best_i == 2147483647, -1, best_i).to(tl.int64)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_on + slots[None, :] * stride_ok, out,
             mask=rmask[:, None] & (slots[None, :] < K_OUT))


@torch.no_grad()
def knn_indices(queries: torch.Tensor, query_labels: torch.Tensor, x: torch.Tensor,
                labels: torch.Tensor, k: int, *, exclude_self: bool,
                blocks: Optional[Blocks] = None) -> torch.Tensor:
    """[M, min(k, N)] indices of the nearest samples of x with label == the query's
    label (and, with exclude_self, not the query's own row), nearest first, ties
    to the lower index, -1 where fewer exist. queries and x share the compute dtype."""
    M, D = queries.shape
    N = x.shape[0]
    k = min(k, N)
    out = torch.empty(M, k, dtype=torch.int64, device=x.device)
    if M == 0 or k == 0:
        return out
    if k > MAX_TOP_K:
        # the running top-K lives in registers and its merge is unrolled K times
        allowed = query_labels[:, None] == labels[None, :]
        if exclude_self:
            allowed &= ~torch.eye(M, N, dtype=torch.bool, device=x.device)
        idx, valid = _ref._nearest(_ref._exact_sq_dists(queries, x), allowed, k)
        return torch.where(valid, idx, torch.full_like(idx, -1))
    blocks = blocks or default_blocks(x.dtype, D, selection=True)
    _knn_kernel[(triton.cdiv(M, blocks.m),)](
        queries, query_labels, x, labels, out, M, N, D, k,
        queries.stride(0), queries.stride(1), query_labels.stride(0), x.stride(0), x.stride(1),
        labels.stride(0), out.stride(0), out.stride(1),
        EXCLUDE_SELF=exclude_self, ACC=_acc(x.dtype), K=max(2, triton.next_power_of_2(k)),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=blocks.d, num_warps=blocks.num_warps)
    return out


def _std_of_neighbours(anchor: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    valid = idx >= 0
    return _std_with(anchor, x[idx.clamp_min(0)], valid)


def knn_stds(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
             n_neighbors: int,
             blocks: Optional[Blocks] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """knn_std with tile sizes `blocks` (tests)."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    classes = torch.arange(c.shape[0], device=x.device)
    idx = knn_indices(x, labels, x, labels, n_neighbors, exclude_self=True, blocks=blocks)
    idx_c = knn_indices(c, classes, x, labels, n_neighbors, exclude_self=False, blocks=blocks)
    return _std_of_neighbours(x, x, idx), _std_of_neighbours(c, x, idx_c)


def sigma2r(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
            w_k: torch.Tensor, *, n_neighbors: int, z: float, eps: float, reduction: str,
            blocks: Optional[Blocks] = None) -> torch.Tensor:
    """sigma2r_loss with tile sizes `blocks` (tests); the reference's formula on
    this backend's stds."""
    def stds(x, y, c, *, n_neighbors):
        return knn_stds(x, y, c, n_neighbors=n_neighbors, blocks=blocks)

    return sigma2r_with(stds, features, labels, centers, w_k, n_neighbors=n_neighbors, z=z,
                        eps=eps, reduction=reduction)


# ------------------------------------------------------------------------- triplet

@triton.jit
def _dist_tile(x_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
               DIST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(x[rows], x[cols]) as the reference's triplet_distances; for COSINE x holds
    the unit rows (zero rows stay zero)."""
    dot = _dot_tile(x_ptr, x_ptr, rows, cols, rmask, cmask, stride_n, stride_d, stride_n,
                    stride_d, D, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
    if DIST == COSINE:
        d = 1 - dot
    else:
        nr = tl.load(nrm_ptr + rows, mask=rmask, other=0.0)
        nc = tl.load(nrm_ptr + cols, mask=cmask, other=0.0)
        d = tl.maximum(nr[:, None] + nc[None, :] - 2 * dot, 0.0)
        d = tl.where(rows[:, None] == cols[None, :], 0.0, d)
        if DIST == L2:
            d = tl.sqrt(d)
    return d


@triton.jit
def _arg_update(d, mask, cols, best, idx, LARGEST: tl.constexpr):
    """Running arg-max (LARGEST) / arg-min over the masked entries of each row:
    lowest index within the tile, strict comparison against earlier tiles."""
    if LARGEST:
        v = tl.where(mask, d, float("-inf"))
        t = tl.max(v, axis=1)
        take = t > best
    else:
        v = tl.where(mask, d, float("inf"))
        t = tl.min(v, axis=1)
        take = t < best
    it = tl.min(tl.where(mask & (v == t[:, None]), cols[None, :], 2147483647), axis=1)
    return tl.where(take, t, best), tl.where(take, it, idx)


@triton.jit
def _triplet_hard_kernel(x_ptr, nrm_ptr, lab_ptr, pos_ptr, neg_ptr, N, D,
                         stride_n, stride_d, stride_l,
                         DIST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    best_p = tl.full((BLOCK_M,), float("-inf"), ACC)
    best_n = tl.full((BLOCK_M,), float("inf"), ACC)
    idx_p = tl.full((BLOCK_M,), -1, tl.int32)
    idx_n = tl.full((BLOCK_M,), -1, tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        d = _dist_tile(x_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        same = yr[:, None] == yc[None, :]
        pos = cmask[None, :] & same & (rows[:, None] != cols[None, :])
        neg = cmask[None, :] & ~same
        best_p, idx_p = _arg_update(d, pos, cols, best_p, idx_p, True)
        best_n, idx_n = _arg_update(d, neg, cols, best_n, idx_n, False)
    tl.store(pos_ptr + rows, idx_p.to(tl.int64), mask=rmask)
    tl.store(neg_ptr + rows, idx_n.to(tl.int64), mask=rmask)


@triton.jit
def _triplet_semihard_kernel(x_ptr, nrm_ptr, lab_ptr, a_ptr, p_ptr, neg_ptr, P, N, D,
                             stride_n, stride_d, stride_l,
                             DIST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows are (anchor, positive) pairs; the tiles are the anchors' distance rows
    prs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = prs < P
    ra = tl.load(a_ptr + prs, mask=pmask, other=0)
    rp = tl.load(p_ptr + prs, mask=pmask, other=0)
    yr = tl.load(lab_ptr + ra * stride_l, mask=pmask, other=-1)
    # sweep 1: d(a, p) from the same tile arithmetic as the negatives (so that
    # equal distances compare equal), and the farthest negative
    d_ap = tl.zeros((BLOCK_M,), ACC)
    far = tl.full((BLOCK_M,), float("-inf"), ACC)
    far_i = tl.full((BLOCK_M,), -1, tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        d = _dist_tile(x_ptr, nrm_ptr, ra, cols, pmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        d_ap += tl.sum(tl.where(cols[None, :] == rp[:, None], d, 0.0), axis=1)
        neg = cmask[None, :] & (yr[:, None] != yc[None, :])
        far, far_i = _arg_update(d, neg, cols, far, far_i, True)
    # sweep 2: the closest negative strictly farther than the positive
    near = tl.full((BLOCK_M,), float("inf"), ACC)
    near_i = tl.full((BLOCK_M,), -1, tl.int32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        d = _dist_tile(x_ptr, nrm_ptr, ra, cols, pmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        outside = cmask[None, :] & (yr[:, None] != yc[None, :]) & (d > d_ap[:, None])
        near, near_i = _arg_update(d, outside, cols, near, near_i, False)
    choice = tl.where(near_i >= 0, near_i, far_i)
    tl.store(neg_ptr + prs, choice.to(tl.int64), mask=pmask)


@triton.jit
def _triplet_all_fwd_kernel(u_ptr, nrm_ptr, lab_ptr, a_ptr, dap_ptr, m_ptr, sum_ptr, cnt_ptr,
                            P, N, D, stride_n, stride_d, stride_l,
                            DIST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows are (anchor, positive) pairs: the sum and the number of positive terms
    # relu(d_ap - d_an + margin) over the anchor's negatives n
    prs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = prs < P
    ra = tl.load(a_ptr + prs, mask=pmask, other=0)
    dap = tl.load(dap_ptr + prs, mask=pmask, other=0.0)
    margin = tl.load(m_ptr)
    yr = tl.load(lab_ptr + ra * stride_l, mask=pmask, other=-1)
    total = tl.zeros((BLOCK_M,), ACC)
    count = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        d = _dist_tile(u_ptr, nrm_ptr, ra, cols, pmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        v = (dap[:, None] - d) + margin  # the reference's order of operations
        live = pmask[:, None] & cmask[None, :] & (yr[:, None] != yc[None, :]) & (v > 0)
        total += tl.sum(tl.where(live, v, 0.0), axis=1)
        count += tl.sum(tl.where(live, 1.0, 0.0), axis=1)
    tl.store(sum_ptr + prs, total, mask=pmask)
    tl.store(cnt_ptr + prs, count, mask=pmask)


@triton.jit
def _triplet_all_grad_kernel(x_ptr, u_ptr, nrm_ptr, rinv_ptr, lab_ptr, a_ptr, dap_ptr, m_ptr,
                             out_ptr, M, L, D, stride_n, stride_d, stride_l, stride_on,
                             stride_od, SIDE: tl.constexpr, DIST: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    # sum over the live (pair r = (a, p), negative n) terms of d(d_an)/d(x_own):
    # SIDE 0, own = a, one row per pair r, sweeping the negatives n;
    # SIDE 1, own = n, one row per sample, sweeping the pairs r (their anchors
    # gathered). The caller scales by -dL/dterm.
    rid = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rid < M
    if SIDE == 0:
        own = tl.load(a_ptr + rid, mask=rmask, other=0)
        dap_r = tl.load(dap_ptr + rid, mask=rmask, other=0.0)
    else:
        own = rid
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    margin = tl.load(m_ptr)
    yo = tl.load(lab_ptr + own * stride_l, mask=rmask, other=-1)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    rowsum = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, L, BLOCK_N):
        cid = c0 + tl.arange(0, BLOCK_N)
        cmask = cid < L
        if SIDE == 0:
            oth = cid
            v_ap = dap_r[:, None]
        else:
            oth = tl.load(a_ptr + cid, mask=cmask, other=0)
            v_ap = tl.load(dap_ptr + cid, mask=cmask, other=0.0)[None, :]
        yt = tl.load(lab_ptr + oth * stride_l, mask=cmask, other=-2)
        d = _dist_tile(u_ptr, nrm_ptr, own, oth, rmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        live = rmask[:, None] & cmask[None, :] & (yo[:, None] != yt[None, :]) \
            & ((v_ap - d) + margin > 0)
        # d(d)/d(x_own) = k (x_own - x_oth) for the Euclidean forms (0 where the
        # clamp or the safe sqrt cuts the gradient); -r_own (u_oth - cos u_own) for cosine
        if DIST == SQUARED_L2:
            k = tl.where(live & (d > 0), 2.0, 0.0)
        elif DIST == L2:
            k = tl.where(live & (d > 0), 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        else:
            k = tl.where(live, 1.0, 0.0)
        if DIST == COSINE:
            rowsum += tl.sum(k * (1 - d), axis=1)
            xo = tl.load(u_ptr + oth[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                         mask=cmask[:, None] & domask[None, :], other=0.0)
        else:
            rowsum += tl.sum(k, axis=1)
            xo = tl.load(x_ptr + oth[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                         mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(k.to(xo.dtype), xo, acc, input_precision="ieee", out_dtype=ACC)
    if DIST == COSINE:
        uo = tl.load(u_ptr + own[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=rmask[:, None] & domask[None, :], other=0.0)
        r = tl.load(rinv_ptr + own, mask=rmask, other=0.0)
        g = -r[:, None] * (acc - rowsum[:, None] * uo)
    else:
        xw = tl.load(x_ptr + own[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=rmask[:, None] & domask[None, :], other=0.0)
        g = rowsum[:, None] * xw - acc
    tl.store(out_ptr + rid[:, None].to(tl.int64) * stride_on + do[None, :] * stride_od, g,
             mask=rmask[:, None] & domask[None, :])


def _distance_operand(x: torch.Tensor, distance: str) -> torch.Tensor:
    """What the kernels multiply: x, or for "cosine" its unit rows (as the reference)."""
    if distance != "cosine":
        return x
    sq = (x * x).sum(1)
    big = sq > 0
    inv = torch.where(big, torch.rsqrt(torch.where(big, sq, torch.ones_like(sq))),
                      torch.zeros_like(sq))
    return x * inv[:, None]


def _launch_args(x: torch.Tensor, labels: torch.Tensor, distance: str, blocks: Blocks):
    u = _distance_operand(x, distance)
    nrm = (u * u).sum(1)
    consts = dict(DIST=DISTANCES.index(distance), ACC=_acc(x.dtype), BLOCK_M=blocks.m,
                  BLOCK_N=blocks.n, BLOCK_D=blocks.d, num_warps=blocks.num_warps)
    return u, nrm, consts


@torch.no_grad()
def hardest_indices(x: torch.Tensor, labels: torch.Tensor, distance: str,
                    blocks: Optional[Blocks] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor the farthest positive and the nearest negative (lower index on
    ties), -1 where there is none."""
    N, D = x.shape
    pos = torch.empty(N, dtype=torch.int64, device=x.device)
    neg = torch.empty_like(pos)
    if N == 0:
        return pos, neg
    blocks = blocks or default_blocks(x.dtype, D)
    u, nrm, consts = _launch_args(x, labels, distance, blocks)
    _triplet_hard_kernel[(triton.cdiv(N, blocks.m),)](
        u, nrm, labels, pos, neg, N, D, u.stride(0), u.stride(1), labels.stride(0), **consts)
    return pos, neg


@torch.no_grad()
def positive_pairs(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, p), a != p, same label, a with at least one negative, in row-major
    order, built from the label sort (O(P), no N x N mask)."""
    N = labels.shape[0]
    order = torch.sort(labels, stable=True).indices  # class members in index order
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    size = counts[inverse]
    start = (torch.cumsum(counts, 0) - counts)[inverse]  # a's class segment in `order`
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N, device=labels.device)
    rank = rank - start  # a's place within its class
    npos = torch.where(size < N, size - 1, torch.zeros_like(size))
    a = torch.repeat_interleave(torch.arange(N, device=labels.device), npos)
    first = torch.cumsum(npos, 0) - npos
    k = torch.arange(a.shape[0], device=labels.device) - first[a]
    k = k + (k >= rank[a]).long()  # skip a itself
    return a, order[start[a] + k]


@torch.no_grad()
def semihard_negatives(x: torch.Tensor, labels: torch.Tensor, a: torch.Tensor, p: torch.Tensor,
                       distance: str, blocks: Optional[Blocks] = None) -> torch.Tensor:
    P = a.shape[0]
    neg = torch.empty(P, dtype=torch.int64, device=x.device)
    if P == 0:
        return neg
    blocks = blocks or default_blocks(x.dtype, x.shape[1])
    u, nrm, consts = _launch_args(x, labels, distance, blocks)
    _triplet_semihard_kernel[(triton.cdiv(P, blocks.m),)](
        u, nrm, labels, a, p, neg, P, x.shape[0], x.shape[1], u.stride(0), u.stride(1),
        labels.stride(0), **consts)
    return neg


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    big = sq > 0
    return torch.where(big, torch.rsqrt(torch.where(big, sq, torch.ones_like(sq))),
                       torch.zeros_like(sq))


class AllTripletFunction(torch.autograd.Function):
    """(x, d_ap [P]) -> the "mean" / "sum" of relu(d_ap - d_an + margin) over every
    (positive pair, negative); d_ap comes in differentiable (from PyTorch on the P
    gathered pairs), d_an never exists outside a tile."""

    @staticmethod
    def forward(ctx, x, d_ap, labels, a, margin: float, distance: str, reduction: str,
                blocks: Optional[Blocks]):
        N, D = x.shape
        P = a.shape[0]
        blocks = blocks or default_blocks(x.dtype, D)
        u, nrm, consts = _launch_args(x, labels, distance, blocks)
        m = _scalar(margin, x.dtype, x.device)
        dap = d_ap.detach().contiguous()
        sums = torch.zeros(P, dtype=x.dtype, device=x.device)
        counts = torch.zeros_like(sums)
        if P and D:
            _triplet_all_fwd_kernel[(triton.cdiv(P, blocks.m),)](
                u, nrm, labels, a, dap, m, sums, counts, P, N, D, u.stride(0), u.stride(1),
                labels.stride(0), **consts)
        total, count = sums.sum(), counts.sum()
        ctx.save_for_backward(x, dap, labels, a, m, counts, count)
        ctx.cfg = (distance, reduction, blocks)
        if reduction == "sum":
            return total
        return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), total * 0)

    @staticmethod
    def backward(ctx, g):
        x, dap, labels, a, m, counts, count = ctx.saved_tensors
        distance, reduction, blocks = ctx.cfg
        g = g.to(x.dtype)
        if reduction == "mean":
            g = torch.where(count > 0, g / torch.where(count > 0, count, 1.0), g * 0)
        N, D = x.shape
        P = a.shape[0]
        dx = torch.zeros_like(x)
        if P and D:
            u, nrm, consts = _launch_args(x, labels, distance, blocks)
            rinv = _inv_norms(x)
            side_a = torch.empty(P, D, dtype=x.dtype, device=x.device)
            side_n = torch.empty_like(x)
            for side, out, rows, cols in ((0, side_a, P, N), (1, side_n, N, P)):
                _triplet_all_grad_kernel[(triton.cdiv(rows, blocks.m),
                                          triton.cdiv(D, blocks.do))](
                    x, u, nrm, rinv, labels, a, dap, m, out, rows, cols, D, x.stride(0),
                    x.stride(1), labels.stride(0), out.stride(0), out.stride(1), SIDE=side,
                    BLOCK_DO=blocks.do, **consts)
            # each live term is +d_ap - d_an: d_an's gradient enters with a minus
            dx = -g * side_n.index_add_(0, a, side_a)
        return dx, g * counts, None, None, None, None, None, None


def pair_distances(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """d(a_r, b_r) per row, differentiable, with the reference's formulas
    (expansion clamped at 0, safe sqrt, 1 - cos with zero rows at cosine 0)."""
    if distance == "cosine":
        return 1 - (_distance_operand(a, distance) * _distance_operand(b, distance)).sum(1)
    sq = ((a * a).sum(1) + (b * b).sum(1) - 2 * (a * b).sum(1)).clamp_min(0)
    return safe_sqrt(sq) if distance == "l2" else sq


def triplet(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float, mining: str,
            distance: str, reduction: str, blocks: Optional[Blocks] = None) -> torch.Tensor:
    """triplet_margin_loss with tile sizes `blocks` (tests)."""
    if mining == "all" and reduction == "none":
        # the [T] terms are the output itself (T ~ N^3 / C): the reference builds them
        return _ref.triplet_margin_loss(embeddings, labels, margin=margin, mining=mining,
                                        distance=distance, reduction=reduction)
    if mining not in ("hard", "semihard", "all"):
        raise ValueError(f"unknown mining {mining!r}")
    x = _prep(embeddings)
    if mining == "all":
        a, p = positive_pairs(labels)
        d_ap = pair_distances(x[a], x[p], distance)
        return AllTripletFunction.apply(x, d_ap, labels, a, float(margin), distance, reduction,
                                        blocks)
    if mining == "semihard":
        a, p = positive_pairs(labels)
        n = semihard_negatives(x.detach(), labels, a, p, distance, blocks)
        xa = x[a]
        per = torch.relu(pair_distances(xa, x[p], distance) - pair_distances(xa, x[n], distance)
                         + margin)
        return reduce_loss(per, torch.ones_like(per), reduction)
    hp, hn = hardest_indices(x.detach(), labels, distance, blocks)
    valid = (hp >= 0) & (hn >= 0)
    rows = torch.arange(x.shape[0], device=x.device)
    # an anchor without a positive / negative pairs with itself; where() drops it
    d_ap = pair_distances(x, x[torch.where(hp >= 0, hp, rows)], distance)
    d_an = pair_distances(x, x[torch.where(hn >= 0, hn, rows)], distance)
    per = torch.relu(d_ap - d_an + margin)
    per = torch.where(valid, per, torch.zeros_like(per))
    return reduce_loss(per, valid.to(x.dtype), reduction)


# ------------------------------------------------- the backend (reference signatures)

def soft_nearest_neighbor_loss(features: torch.Tensor, labels: torch.Tensor, *,
                               temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    return soft_nearest_neighbor(features, labels, temperature=temperature, reduction=reduction)


def knn_std(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
            n_neighbors: int = 7) -> Tuple[torch.Tensor, torch.Tensor]:
    return knn_stds(features, labels, centers, n_neighbors=n_neighbors)


def sigma2r_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                 w_k: torch.Tensor, *, n_neighbors: int = 7, z: float = 40.0, eps: float = 1e-3,
                 reduction: str = "mean") -> torch.Tensor:
    return sigma2r(features, labels, centers, w_k, n_neighbors=n_neighbors, z=z, eps=eps,
                   reduction=reduction)


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2,
                        mining: str = "semihard", distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    return triplet(embeddings, labels, margin=margin, mining=mining, distance=distance,
                   reduction=reduction)
