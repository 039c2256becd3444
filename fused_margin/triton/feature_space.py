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
# - triplet "semihard" and "all": rows are blocks of anchors taken in label order
#   (so a block's anchors mostly share a class and a positive count); the P
#   positive pairs are never listed: anchor a's pairs are slots first[a] + rank,
#   row-major, from O(N) ints of the label sort. Sweep 1 computes each d(a, j) once
#   per (anchor, column) and scatters d_ap into the pair slots (plus, per anchor,
#   the farthest negative and the self-distance). Sweep 2 runs one program per
#   (anchor block, chunk of BLOCK_P positives per anchor): the chunk's d_ap stay in
#   registers while the column tiles stream by, and a [BLOCK_M, BLOCK_P, BLOCK_N]
#   comparison keeps per pair the running (distance, index) minimum over negatives
#   with d_an > d_ap ("semihard"; ties to the lower index) or the sum and count of
#   the terms (d_ap - d_an) + margin > 0 ("all"). Backward is one more sweep, one
#   program per (row block, D chunk): for row i and column j the total weight on
#   d(i, j) from the positive pairs (i, j), (j, i) (read from their slots) and from
#   the pairs of anchor i with negative j and of anchor j with negative i
#   (re-derived from the saved choices, or for "all" recounted from d_ap), then
#   dL/dx_i = sum_j S_ij d(d_ij)/d(x_i) by one tl.dot per tile: no atomics, no
#   [P, D] gather. The distance products cost O(N^2 D) per positive chunk
#   (one chunk when a class has at most BLOCK_P + 1 members), the comparisons
#   O(P N). An anchor without negatives (a single-class batch) takes its
#   self-distance for d_an ("semihard", TF-Addons). "all" with "none" returns the
#   [T] terms themselves (T ~ N^3 / C) and is left to the reference.
# The k-NN neighbours and the batch-hard indices come back as [rows, k] index
# tensors and the differentiable part is evaluated in PyTorch on the gathered
# O(N x k x D) rows, with the reference's own std math.
# NaN: a NaN feature row gives a NaN loss, as in the reference (clamps keep NaN,
# arg-extrema prefer it as torch's do, k-NN ranks a NaN distance as +inf).
#
# Saved for backward: soft NN saves x (in the compute dtype), its labels, the
# squared row norms and per-row lse_all, lse_same, has-a-partner [N]; "semihard" /
# "all" save x, the O(N) layout and O(P) per-pair scalars (the term and the chosen
# negative, or d_ap and the live-term count); k-NN and "hard" leave their
# gathered O(N x k x D) graphs to autograd.
#
# Offsets into the [N, D] operands and the pair slots are int64 (N * D and P may
# pass 2^31); column indices and the index sentinels stay int32.
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
from ..autograd_guard import first_order

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
    per product step, BLOCK_DO of D per gradient program, BLOCK_P positive pairs
    per anchor on chip (triplet "semihard" / "all")."""
    m: int
    n: int
    d: int
    do: int
    num_warps: int = 4
    p: int = 16


def default_blocks(dtype: torch.dtype, D: int, *, selection: bool = False,
                   pairs: bool = False) -> Blocks:
    do = max(16, min(64 if dtype == torch.float64 else 128, triton.next_power_of_2(max(D, 1))))
    if _interpreted():  # numpy underneath: few, large steps are what is cheap
        return Blocks(m=32, n=32, d=32, do=do, p=32)
    if pairs:  # [BLOCK_M, BLOCK_P, BLOCK_N] comparison tiles live in registers
        return Blocks(m=16, n=32, d=16 if dtype == torch.float64 else 32, do=do, p=16)
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
        # the clamp keeps a NaN (the default maximum may return the other operand)
        logit = -tl.maximum(nr[:, None] + nc[None, :] - 2 * dot, 0.0,
                            propagate_nan=tl.PropagateNan.ALL) / temp
        other = cmask[None, :] & (rows[:, None] != cols[None, :])
        same = other & (yr[:, None] == yc[None, :])
        m_all, s_all = _lse_update(logit, other, m_all, s_all)
        m_same, s_same = _lse_update(logit, same, m_same, s_same)
    # s >= 1 once a row has seen one entry: no underflow; a NaN distance makes s NaN,
    # and the row's loss NaN, not 0 (issue 15 item 9)
    has = (s_same > 0) | (s_same != s_same)
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
    @first_order("soft_nearest_neighbor_loss (triton backend)")
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
        # a NaN ranks as +inf (the reference's rule): the merge below cannot order it
        dist = tl.where(dist != dist, float("inf"), dist)
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
        d = tl.maximum(nr[:, None] + nc[None, :] - 2 * dot, 0.0, propagate_nan=tl.PropagateNan.ALL)
        d = tl.where(rows[:, None] == cols[None, :], 0.0, d)
        if DIST == L2:
            d = tl.sqrt(d)
    return d


@triton.jit
def _arg_update(d, mask, cols, best, idx, LARGEST: tl.constexpr):
    """Running arg-max (LARGEST) / arg-min over the masked entries of each row:
    lowest index within the tile, strict comparison against earlier tiles. A NaN
    beats every number and the first NaN stays, as torch's argmax / argmin."""
    nan = mask & (d != d)
    num = mask & ~nan
    if LARGEST:
        v = tl.where(num, d, float("-inf"))
        t = tl.max(v, axis=1)
        take = t > best
    else:
        v = tl.where(num, d, float("inf"))
        t = tl.min(v, axis=1)
        take = t < best
    it = tl.min(tl.where(num & (v == t[:, None]), cols[None, :], 2147483647), axis=1)
    it_nan = tl.min(tl.where(nan, cols[None, :], 2147483647), axis=1)
    fresh_nan = (it_nan < 2147483647) & (best == best)
    best = tl.where(fresh_nan, float("nan"), tl.where(take, t, best))
    idx = tl.where(fresh_nan, it_nan, tl.where(take, it, idx))
    return best, idx


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
def _pair_slot(first, rank_anchor, rank_other):
    """Row-major slot of the positive pair (anchor, other): the anchor's first
    slot plus the other's place among the anchor's positives (its class rank,
    less one past the anchor itself)."""
    return first + rank_other - (rank_other > rank_anchor).to(tl.int64)


@triton.jit
def _triplet_pairs_kernel(u_ptr, nrm_ptr, lab_ptr, order_ptr, rank_ptr, first_ptr, dap_ptr,
                          far_d_ptr, far_i_ptr, self_d_ptr, N, D, stride_n, stride_d, stride_l,
                          DIST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # sweep 1, rows = a block of anchors in label order: d(a, p) of every positive
    # pair into its slot, the farthest negative and the self-distance per anchor
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < N
    rows = tl.load(order_ptr + r, mask=rmask, other=0)
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    rank_r = tl.load(rank_ptr + rows, mask=rmask, other=0)
    first_r = tl.load(first_ptr + rows, mask=rmask, other=0)
    far = tl.full((BLOCK_M,), float("-inf"), ACC)
    far_i = tl.full((BLOCK_M,), -1, tl.int32)
    self_d = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        rank_c = tl.load(rank_ptr + cols, mask=cmask, other=0)
        d = _dist_tile(u_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = rmask[:, None] & cmask[None, :]
        same = yr[:, None] == yc[None, :]
        pos = valid & same & (rows[:, None] != cols[None, :])
        slot = _pair_slot(first_r[:, None], rank_r[:, None], rank_c[None, :])
        tl.store(dap_ptr + slot, d, mask=pos)
        far, far_i = _arg_update(d, valid & ~same, cols, far, far_i, True)
        self_d += tl.sum(tl.where(valid & (rows[:, None] == cols[None, :]), d, 0.0), axis=1)
    tl.store(far_d_ptr + rows, far, mask=rmask)
    tl.store(far_i_ptr + rows, far_i.to(tl.int64), mask=rmask)
    tl.store(self_d_ptr + rows, self_d, mask=rmask)


@triton.jit
def _triplet_sweep_kernel(u_ptr, nrm_ptr, lab_ptr, order_ptr, first_ptr, npos_ptr, dap_ptr,
                          m_ptr, out_v_ptr, out_i_ptr, N, D, stride_n, stride_d, stride_l,
                          MINING: tl.constexpr, DIST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    # sweep 2, program (anchor block, chunk k of BLOCK_P positives per anchor): the
    # chunk's d_ap [BLOCK_M, BLOCK_P] stay on chip while the negatives stream by.
    # SEMIHARD: per pair the running (distance, index) minimum over negatives with
    # d_an > d_ap, strict across tiles and the lowest index within one, the
    # reference's tie rule. ALL: per pair the sum and the number of the terms
    # (d_ap - d_an) + margin that are > 0.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < N
    rows = tl.load(order_ptr + r, mask=rmask, other=0)
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    first_r = tl.load(first_ptr + rows, mask=rmask, other=0)
    npos_r = tl.load(npos_ptr + rows, mask=rmask, other=0)
    t = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pv = rmask[:, None] & (t[None, :] < npos_r[:, None])
    slots = first_r[:, None] + t[None, :]
    dap = tl.load(dap_ptr + slots, mask=pv, other=0.0)
    margin = tl.load(m_ptr)
    best = tl.full((BLOCK_M, BLOCK_P), float("inf"), ACC)
    best_i = tl.full((BLOCK_M, BLOCK_P), -1, tl.int32)
    total = tl.zeros((BLOCK_M, BLOCK_P), ACC)
    count = tl.zeros((BLOCK_M, BLOCK_P), ACC)
    # a block whose anchors all have fewer positives than this chunk starts: no sweep
    hi = tl.where(tl.max(tl.where(rmask, npos_r, 0), axis=0) > tl.program_id(1) * BLOCK_P, N, 0)
    for c0 in range(0, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        d = _dist_tile(u_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        neg = cmask[None, :] & (yr[:, None] != yc[None, :])
        live = pv[:, :, None] & neg[:, None, :]  # [BLOCK_M, BLOCK_P, BLOCK_N]
        d3 = d[:, None, :]
        if MINING == 0:
            live = live & (d3 > dap[:, :, None])
            v = tl.where(live, d3, float("inf"))
            t_min = tl.min(v, axis=2)
            t_i = tl.min(tl.where(live & (v == t_min[:, :, None]), cols[None, None, :],
                                  2147483647), axis=2)
            take = t_min < best
            best = tl.where(take, t_min, best)
            best_i = tl.where(take, t_i, best_i)
        else:
            v = (dap[:, :, None] - d3) + margin  # the reference's order of operations
            # a NaN term is not counted but makes the sum NaN, as the reference's
            total += tl.sum(tl.where(live & ((v > 0) | (v != v)), v, 0.0), axis=2)
            count += tl.sum(tl.where(live & (v > 0), 1.0, 0.0), axis=2)
    if MINING == 0:
        tl.store(out_v_ptr + slots, best, mask=pv)
        tl.store(out_i_ptr + slots, best_i.to(tl.int64), mask=pv)
    else:
        tl.store(out_v_ptr + slots, total, mask=pv)
        tl.store(out_i_ptr + slots, count, mask=pv)


@triton.jit
def _negative_weights(d, rows_or_cols, first, npos, pmask, w_ptr, aux_ptr, margin, kmax,
                      ANCHOR_AXIS: tl.constexpr, MINING: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """[BLOCK_M, BLOCK_N] sums, per (row i, column j) of the tile, of the pair
    weights w that reach d(anchor, negative) for anchor = i (ANCHOR_AXIS 0) or j
    (ANCHOR_AXIS 1), the other being the negative: SEMIHARD, the anchor's pairs
    whose chosen negative (aux) is the other; ALL, its pairs whose term
    (d_ap - d_an) + margin is > 0 (aux = d_ap). The anchors' pairs are read in
    BLOCK_P chunks from their first slot."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, kmax, BLOCK_P):
        t = k0 + tl.arange(0, BLOCK_P)
        pv = pmask[:, None] & (t[None, :] < npos[:, None])  # [anchors, BLOCK_P]
        sl = first[:, None] + t[None, :]
        w = tl.load(w_ptr + sl, mask=pv, other=0.0)
        if MINING == 0:
            aux = tl.load(aux_ptr + sl, mask=pv, other=-1)
        else:
            aux = tl.load(aux_ptr + sl, mask=pv, other=0.0)
        if ANCHOR_AXIS == 0:  # [BLOCK_M, BLOCK_P, BLOCK_N]
            if MINING == 0:
                hit = aux[:, :, None] == rows_or_cols[None, None, :]
            else:
                hit = (aux[:, :, None] - d[:, None, :]) + margin > 0
            acc += tl.sum(tl.where(pv[:, :, None] & hit, w[:, :, None], 0.0), axis=1)
        else:  # [BLOCK_M, BLOCK_N, BLOCK_P]
            if MINING == 0:
                hit = aux[None, :, :] == rows_or_cols[:, None, None]
            else:
                hit = (aux[None, :, :] - d[:, :, None]) + margin > 0
            acc += tl.sum(tl.where(pv[None, :, :] & hit, w[None, :, :], 0.0), axis=2)
    return acc


@triton.jit
def _triplet_grad_kernel(x_ptr, u_ptr, nrm_ptr, rinv_ptr, lab_ptr, order_ptr, rank_ptr,
                         first_ptr, npos_ptr, cpos_ptr, w_ptr, aux_ptr, m_ptr, dx_ptr, N, D,
                         stride_n, stride_d, stride_l, stride_dxn, stride_dxd,
                         MINING: tl.constexpr, DIST: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_DO: tl.constexpr):
    # the backward sweep, program (block of rows i in label order, chunk of D): for
    # every column j the total weight S_ij on d(i, j) = d(j, i), from both roles:
    # positive pairs (i, j) and (j, i) (their weights cpos read from the two
    # slots) minus the pairs of anchor i with negative j and of anchor j with
    # negative i (_negative_weights). Then dL/dx_i = sum_j S_ij d(d_ij)/d(x_i):
    # k_ij (x_i - x_j) for the Euclidean forms, -r_i (u_j - cos_ij u_i) for cosine.
    # Each row gathers its own gradient: no atomics, no [P, D] buffer.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < N
    rows = tl.load(order_ptr + r, mask=rmask, other=0)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    yr = tl.load(lab_ptr + rows * stride_l, mask=rmask, other=-1)
    rank_r = tl.load(rank_ptr + rows, mask=rmask, other=0)
    first_r = tl.load(first_ptr + rows, mask=rmask, other=0)
    npos_r = tl.load(npos_ptr + rows, mask=rmask, other=0)
    kmax_r = tl.max(tl.where(rmask, npos_r, 0), axis=0)
    margin = tl.load(m_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    rowsum = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        yc = tl.load(lab_ptr + cols * stride_l, mask=cmask, other=-2)
        rank_c = tl.load(rank_ptr + cols, mask=cmask, other=0)
        first_c = tl.load(first_ptr + cols, mask=cmask, other=0)
        npos_c = tl.load(npos_ptr + cols, mask=cmask, other=0)
        kmax_c = tl.max(tl.where(cmask, npos_c, 0), axis=0)
        d = _dist_tile(u_ptr, nrm_ptr, rows, cols, rmask, cmask, stride_n, stride_d, D,
                       DIST, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = rmask[:, None] & cmask[None, :]
        same = yr[:, None] == yc[None, :]
        pos = valid & same & (rows[:, None] != cols[None, :])
        s_ij = _pair_slot(first_r[:, None], rank_r[:, None], rank_c[None, :])
        s_ji = _pair_slot(first_c[None, :], rank_c[None, :], rank_r[:, None])
        w_pos = tl.load(cpos_ptr + s_ij, mask=pos, other=0.0) \
            + tl.load(cpos_ptr + s_ji, mask=pos, other=0.0)
        w_neg = _negative_weights(d, cols, first_r, npos_r, rmask, w_ptr, aux_ptr, margin,
                                  kmax_r, 0, MINING, ACC, BLOCK_M, BLOCK_N, BLOCK_P) \
            + _negative_weights(d, rows, first_c, npos_c, cmask, w_ptr, aux_ptr, margin,
                                kmax_c, 1, MINING, ACC, BLOCK_M, BLOCK_N, BLOCK_P)
        # each term is +d_ap - d_an: the negatives' weight enters with a minus
        s = tl.where(pos, w_pos, 0.0) - tl.where(valid & ~same, w_neg, 0.0)
        # (0 where the clamp or the safe sqrt cuts the gradient)
        if DIST == SQUARED_L2:
            s = tl.where(d > 0, 2.0 * s, 0.0)
        elif DIST == L2:
            s = tl.where(d > 0, s / tl.where(d > 0, d, 1.0), 0.0)
        if DIST == COSINE:
            rowsum += tl.sum(s * (1 - d), axis=1)
            xo = tl.load(u_ptr + cols[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                         mask=cmask[:, None] & domask[None, :], other=0.0)
        else:
            rowsum += tl.sum(s, axis=1)
            xo = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                         mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(s.to(xo.dtype), xo, acc, input_precision="ieee", out_dtype=ACC)
    if DIST == COSINE:
        uo = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=rmask[:, None] & domask[None, :], other=0.0)
        ri = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
        g = -ri[:, None] * (acc - rowsum[:, None] * uo)
    else:
        xw = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + do[None, :] * stride_d,
                     mask=rmask[:, None] & domask[None, :], other=0.0)
        g = rowsum[:, None] * xw - acc
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxn + do[None, :] * stride_dxd, g,
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


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    big = sq > 0
    return torch.where(big, torch.rsqrt(torch.where(big, sq, torch.ones_like(sq))),
                       torch.zeros_like(sq))


@dataclass
class PairLayout:
    """The positive pairs (a, p), a != p, same label, in row-major order, without
    listing them: anchor a's pairs are slots first[a] .. first[a] + npos[a] - 1, p's
    place among them its rank in its class (skipping a). order: the samples sorted
    by label (stable), which the kernels sweep as their rows. All O(N) int64."""
    order: torch.Tensor
    rank: torch.Tensor
    first: torch.Tensor
    npos: torch.Tensor
    has_neg: torch.Tensor
    P: int
    max_npos: int


@torch.no_grad()
def pair_layout(labels: torch.Tensor) -> PairLayout:
    N = labels.shape[0]
    ar = torch.arange(N, device=labels.device)
    order = torch.sort(labels, stable=True).indices  # class members in index order
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    size = counts[inverse]
    start = (torch.cumsum(counts, 0) - counts)[inverse]  # the class's segment in `order`
    rank = torch.empty_like(order)
    rank[order] = ar
    npos = size - 1
    first = torch.cumsum(npos, 0) - npos
    P = int(npos.sum()) if N else 0
    return PairLayout(order, rank - start, first, npos, size < N, P,
                      int(npos.max()) if N else 0)


class TripletPairsFunction(torch.autograd.Function):
    """x (compute dtype) -> per positive pair: "semihard" its term [P]; "all" the
    sum of its terms over the anchor's negatives and how many are > 0 ([P] each).

    Memory: O(N) ints for the layout and O(P) per-pair scalars (d_ap, the semihard
    choice and term, or the "all" sums and counts), P the number of positive pairs;
    no [P, D] gather, no [N, N] or [P, N] tensor. Work: the N x N x D distance
    products once per positive chunk (BLOCK_P pairs per anchor) and O(P x N)
    comparisons, in each of the forward and the backward."""

    @staticmethod
    def forward(ctx, x, labels, margin: float, mining: str, distance: str,
                blocks: Optional[Blocks]):
        N, D = x.shape
        lay = pair_layout(labels)
        blocks = blocks or default_blocks(x.dtype, D, pairs=True)
        u, nrm, consts = _launch_args(x, labels, distance, blocks)
        m = _scalar(margin, x.dtype, x.device)
        P = lay.P
        dap = torch.empty(P, dtype=x.dtype, device=x.device)
        far_d, self_d = torch.empty(N, dtype=x.dtype, device=x.device), torch.empty_like(nrm)
        far_i = torch.empty(N, dtype=torch.int64, device=x.device)
        v = torch.zeros(P, dtype=x.dtype, device=x.device)
        idx = (torch.full((P,), -1, dtype=torch.int64, device=x.device) if mining == "semihard"
               else torch.zeros_like(v))
        mining_code = 0 if mining == "semihard" else 1
        if P:
            grid = (triton.cdiv(N, blocks.m),)
            _triplet_pairs_kernel[grid](
                u, nrm, labels, lay.order, lay.rank, lay.first, dap, far_d, far_i, self_d, N, D,
                u.stride(0), u.stride(1), labels.stride(0), **consts)
            _triplet_sweep_kernel[grid + (triton.cdiv(lay.max_npos, blocks.p),)](
                u, nrm, labels, lay.order, lay.first, lay.npos, dap, m, v, idx, N, D,
                u.stride(0), u.stride(1), labels.stride(0), MINING=mining_code,
                BLOCK_P=blocks.p, **consts)
        ctx.blocks, ctx.cfg = blocks, (mining_code, distance)
        if mining == "all":
            ctx.save_for_backward(x, labels, m, dap, idx, *_layout_tensors(lay))
            ctx.mark_non_differentiable(idx)
            return v, idx
        # no closer negative farther than d_ap: the farthest; no negative at all:
        # the self-distance (TF-Addons' row minimum), which has no gradient
        a = torch.repeat_interleave(torch.arange(N, device=x.device), lay.npos)
        near = idx >= 0
        d_an = torch.where(near, v, torch.where(lay.has_neg[a], far_d[a], self_d[a]))
        choice = torch.where(near, idx, torch.where(lay.has_neg[a], far_i[a], -1))
        per = torch.relu(dap - d_an + margin)
        ctx.save_for_backward(x, labels, m, per, choice, *_layout_tensors(lay))
        return per

    @staticmethod
    @first_order("triplet_margin_loss (triton backend)")
    def backward(ctx, g, *_):
        x, labels, m, saved, aux, *layout = ctx.saved_tensors
        order, rank, first, npos = layout
        mining_code, distance = ctx.cfg
        if g is None or x.numel() == 0 or saved.numel() == 0:  # nothing to launch over
            return torch.zeros_like(x), None, None, None, None, None
        g = g.to(x.dtype)
        if mining_code == 0:  # saved = the terms: relu passes no gradient at <= 0
            w = torch.where(saved > 0, g, torch.zeros_like(g)).contiguous()
            cpos = w
            aux_in = aux
        else:  # d_ap's weight is its number of live terms (aux); saved = d_ap
            w = g.contiguous()
            cpos = (g * aux).contiguous()
            aux_in = saved
        blocks = ctx.blocks
        N, D = x.shape
        # the kernel reads x and u (for "cosine" a contiguous copy of x's unit rows)
        # with one pair of strides: give x the contiguous layout u has, or a sliced,
        # transposed or overlapping x is read past u's end (issue 15 item 1)
        x = x.contiguous()
        u, nrm, consts = _launch_args(x, labels, distance, blocks)
        dx = torch.empty_like(x)
        _triplet_grad_kernel[(triton.cdiv(N, blocks.m), triton.cdiv(D, blocks.do))](
            x, u, nrm, _inv_norms(x), labels, order, rank, first, npos, cpos, w, aux_in, m, dx,
            N, D, x.stride(0), x.stride(1), labels.stride(0), dx.stride(0), dx.stride(1),
            MINING=mining_code, BLOCK_P=blocks.p, BLOCK_DO=blocks.do, **consts)
        return dx, None, None, None, None, None


def _layout_tensors(lay: PairLayout):
    return lay.order, lay.rank, lay.first, lay.npos


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
    if mining == "semihard":
        per = TripletPairsFunction.apply(x, labels, float(margin), mining, distance, blocks)
        return reduce_loss(per, torch.ones_like(per), reduction)
    if mining == "all":
        sums, counts = TripletPairsFunction.apply(x, labels, float(margin), mining, distance,
                                                  blocks)
        # "mean" over the terms that are > 0, as the reference
        return reduce_loss(sums, counts, reduction)
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
