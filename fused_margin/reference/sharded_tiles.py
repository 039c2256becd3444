"""Per-row partials of the margin softmax cross-entropy against one class shard,
in tiles, without an N x C_r tensor (what fused_margin.distributed runs).

Computes, for every row i of the gathered batch x [N, D] against the shard's
(kept) classes W [K, D], the statistics of reference.sharded.margin_shard_partials:
the non-target row max and sum of exp, the target cosine where the target
lives here (its logit is formed outside, from O(N) values, by the reference's
target_logit), and the best wrong cosine with its global class index (elm).

Tiling: row blocks of B rows; each block sweeps the K classes in column blocks
of Kc, with B * Kc * itemsize <= TILE_BYTES. Kc = K (whole rows) while that
leaves at least MIN_ROWS rows a block; wider shards get B = MIN_ROWS and
Kc < K, and the row max and sum of exp are combined across column blocks
online (rescaled to the running max), the best wrong cosine by a strict
comparison (so the first index wins ties, as in one argmax). Keeping B large
bounds how often W is read (N / B times per pass). A tile's cosines are one
matmul with W's raw rows, scaled by W's inverse norms (no normalised copy of
W); its logits are formed in place beside them, so two tiles are alive at once
(four, briefly, while arcgrad's acos(clamp(.)) makes its temporaries).

Saved for backward: x (the gathered features, already held by the caller's
graph), W or its kept rows' indices, the labels' target columns [N], the row
shifts [N] and the logit offsets [K]; nothing of size N x K. (Per pass, a
float16/bfloat16 W is converted to a float32 copy, and sampled rows are
gathered into a [K, D] copy.) Backward takes
d loss / d sum_exp and d loss / d cos_y (they carry the global statistics the
ranks combined), recomputes each tile's cosines and logits, forms the tile's
d loss / d cos in the logits' storage (the logit's derivative by hand, checked
against autograd in the tests), and accumulates dL/dx (rows) and dL/dW with
two matmuls; the normalisations' backward is O((N + K) x D).

This is the "reference" backend of dispatch's "margin_shard_partials": the
sweep of the fused kernels (Triton's PARTIALS mode, csrc/angular.cpp's
shard_partials_*) as eager PyTorch tiles, for devices or builds without them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .angular import COS_EPS, compute_dtype, inv_norm
from .sharded import ShardPartials, class_logit, partials_around
from ..autograd_guard import first_order

__all__ = ["MIN_ROWS", "TILE_BYTES", "class_logit_backward_", "margin_shard_partials",
           "tiling", "unit_backward"]

TILE_BYTES = 8 << 20  # one [B, Kc] tile; peak scratch is a few of these
MIN_ROWS = 256        # below this many rows a block, split the columns instead


def tiling(n: int, k: int, dtype: torch.dtype, tile_bytes: Optional[int] = None,
           min_rows: Optional[int] = None) -> Tuple[int, int]:
    """(rows B, columns Kc) of a tile of `dtype` within tile_bytes (TILE_BYTES)."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    floor = MIN_ROWS if min_rows is None else min_rows
    item = torch.empty((), dtype=dtype).element_size()
    n, k = max(1, n), max(1, k)
    rows = budget // (k * item)
    if rows >= min(n, floor):
        return min(n, rows), k
    rows = min(n, floor)
    return rows, max(1, min(k, budget // (rows * item)))


def _blocks(total: int, step: int):
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)


def _inv_norm_blocked(t: torch.Tensor) -> torch.Tensor:
    """inv_norm of a [K, D] matrix in row blocks: inv_norm makes a scaled copy
    and its square, which for a whole W shard would be twice the shard's size."""
    rows = max(1, TILE_BYTES // (8 * max(1, t.shape[1])))
    if t.shape[0] <= rows:
        return inv_norm(t)
    return torch.cat([inv_norm(t[lo:hi]) for lo, hi in _blocks(t.shape[0], rows)])


def _unit(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    t = t.to(dt)
    return t * inv_norm(t)[:, None]


def unit_backward(t: torch.Tensor, grad: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """d loss / d t from d loss / d unit(t), rows [M, D]: (g - u (u . g)) / ||t||,
    0 for rows that inv_norm treats as zero (as autograd through it gives)."""
    t = t.to(dt)
    inv = inv_norm(t)[:, None]
    u = t * inv
    return inv * (grad - u * (u * grad).sum(dim=1, keepdim=True))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_d a_kd b_kd per row, without a [K, D] product tensor."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def class_logit_backward_(cos: torch.Tensor, grad: torch.Tensor, kind: str,
                          s: float) -> torch.Tensor:
    """grad * d class_logit / d cos, written into grad's storage (and cos's:
    both are scratch here). Done by hand rather than by autograd so that a
    tile's backward holds two tiles, not the five or six autograd keeps;
    tests compare it with autograd through reference.sharded.class_logit."""
    if kind != "arcgrad":
        return grad.mul_(s)
    # d(-s acos(clamp c))/dc = s / sqrt(1 - c^2) inside the clamp, 0 outside
    # (torch.clamp passes the gradient where lo <= c <= hi)
    lo, hi = -1 + COS_EPS, 1 - COS_EPS
    inside = (cos >= lo) & (cos <= hi)
    slope = cos.clamp_(lo, hi).square_().neg_().add_(1).rsqrt_().mul_(s)
    return grad.mul_(slope).masked_fill_(~inside, 0.0)


class _Tile:
    """One [B, Kc] tile: its cosines, and where the block's targets fall in it."""

    def __init__(self, xn, w, inv_w, col, c0, c1):
        self.cos = (xn @ w[c0:c1].T).mul_(inv_w[None, c0:c1])
        inside = (col >= c0) & (col < c1)
        self.rows = inside.nonzero().squeeze(1)
        self.cols = col[self.rows] - c0

    def logits(self, kind, s, offset, c0, c1) -> torch.Tensor:
        """Non-target logits (target entries -inf); a new tensor, cos stays."""
        z = class_logit(self.cos, kind, s)
        if offset is not None:
            z.add_(offset[None, c0:c1])
        z[self.rows, self.cols] = -math.inf
        return z


class _RowPartials(torch.autograd.Function):
    """(features, weight) -> row_max, sum_exp, cos_y, wrong_cos, wrong_column
    (the best wrong class's column among the kept ones); only sum_exp and
    cos_y are differentiable."""

    @staticmethod
    def forward(ctx, features, weight_shard, keep, col, logit_offset, kind: str, s: float,
                block: Optional[Tuple[int, int]]):
        dt = compute_dtype(features.dtype)
        n, device = features.shape[0], features.device
        w = (weight_shard if keep is None else weight_shard.index_select(0, keep)).detach().to(dt)
        k = w.shape[0]
        row_max = torch.full((n,), -math.inf, dtype=dt, device=device)
        sum_exp = torch.zeros(n, dtype=dt, device=device)
        cos_y = torch.zeros(n, dtype=dt, device=device)
        wrong_cos = torch.full((n,), -math.inf, dtype=dt, device=device)
        wrong_column = torch.zeros(n, dtype=torch.int64, device=device)
        offset = None if logit_offset is None else logit_offset.to(dt)
        rows_step, cols_step = block or tiling(n, k, dt)
        if k and n:
            inv_w = _inv_norm_blocked(w)
            for lo, hi in _blocks(n, rows_step):
                xn = _unit(features[lo:hi].detach(), dt)
                top = row_max[lo:hi]                 # views: updated in place below
                total, best = sum_exp[lo:hi], wrong_cos[lo:hi]
                best_id = wrong_column[lo:hi]
                for c0, c1 in _blocks(k, cols_step):
                    tile = _Tile(xn, w, inv_w, col[lo:hi], c0, c1)
                    cos_y[lo:hi][tile.rows] = tile.cos[tile.rows, tile.cols]
                    z = tile.logits(kind, s, offset, c0, c1)
                    new_top = torch.maximum(top, z.amax(dim=1))
                    shift = torch.where(torch.isfinite(new_top), new_top,
                                        torch.zeros_like(new_top))
                    # the running sum, rescaled from the old max to the new one
                    total.mul_(torch.exp(top - shift)).add_(
                        z.sub_(shift[:, None]).exp_().sum(dim=1))
                    top.copy_(new_top)
                    del z
                    tile.cos[tile.rows, tile.cols] = -math.inf
                    b, arg = tile.cos.max(dim=1)   # first index within the tile
                    better = b > best              # strict: earlier tiles win ties
                    best.copy_(torch.where(better, b, best))
                    best_id.copy_(torch.where(better, c0 + arg, best_id))
                    del tile
        ctx.save_for_backward(features, weight_shard, keep, col, row_max, offset)
        ctx.meta = (kind, s, rows_step, cols_step)
        ctx.mark_non_differentiable(row_max, wrong_cos, wrong_column)
        return row_max, sum_exp, cos_y, wrong_cos, wrong_column

    @staticmethod
    @first_order("margin_shard_partials (reference tiles backend)")
    @torch.autograd.function.once_differentiable
    def backward(ctx, _g_max, g_sum, g_cos_y, _g_wrong, _g_index):
        features, weight_shard, keep, col, row_max, offset = ctx.saved_tensors
        kind, s, rows_step, cols_step = ctx.meta
        dt = compute_dtype(features.dtype)
        n, device = features.shape[0], features.device
        w = (weight_shard if keep is None else weight_shard.index_select(0, keep)).detach().to(dt)
        k = w.shape[0]
        g_sum = torch.zeros(n, dtype=dt, device=device) if g_sum is None else g_sum.to(dt)
        g_cos_y = torch.zeros(n, dtype=dt, device=device) if g_cos_y is None else g_cos_y.to(dt)
        shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        gx = torch.zeros(features.shape, dtype=dt, device=device)
        # A_j = sum_i (dL/dcos_ij) x_i / (||x_i|| ||w_j||), then dL/dw_j from it below
        acc = torch.zeros_like(w)
        inv_w = _inv_norm_blocked(w)
        if k and n:
            for lo, hi in _blocks(n, rows_step):
                xn = _unit(features[lo:hi].detach(), dt)
                g_xn = torch.zeros_like(xn)
                for c0, c1 in _blocks(k, cols_step):
                    tile = _Tile(xn, w, inv_w, col[lo:hi], c0, c1)
                    # d loss / d z_ij = g_sum_i * exp(z_ij - shift_i) off the target, 0 on it
                    g = tile.logits(kind, s, offset, c0, c1)
                    g.sub_(shift[lo:hi, None]).exp_().mul_(g_sum[lo:hi, None])
                    g = class_logit_backward_(tile.cos, g, kind, s)
                    g[tile.rows, tile.cols] += g_cos_y[lo:hi][tile.rows]  # target, from outside
                    del tile
                    g.mul_(inv_w[None, c0:c1])  # cos = (xn . w_j) / ||w_j||
                    acc[c0:c1].addmm_(g.T, xn)
                    g_xn.addmm_(g, w[c0:c1])
                    del g
                gx[lo:hi] = unit_backward(features[lo:hi].detach(), g_xn, dt)
        # dL/dw_j = A_j - w_j (w_j . A_j) / ||w_j||^2 (0 for a zero row, whose A_j is 0)
        gw = acc.addcmul_(w, (inv_w * inv_w * _rowdot(w, acc))[:, None], value=-1)
        gw = gw.to(weight_shard.dtype)
        if keep is not None:
            gw = torch.zeros_like(weight_shard).index_add_(0, keep, gw)
        return gx.to(features.dtype), gw, None, None, None, None, None, None


def margin_shard_partials(features: torch.Tensor, weight_shard: torch.Tensor,
                          labels: torch.Tensor, *, class_start: int, kind: str = "arcface",
                          s: float = 64.0, m: Union[float, torch.Tensor] = 0.5,
                          m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                          ignore_index: int = -100, keep: Optional[torch.Tensor] = None,
                          logit_offset: Optional[torch.Tensor] = None,
                          block: Optional[Tuple[int, int]] = None) -> ShardPartials:
    """reference.sharded.margin_shard_partials (same arguments, same results)
    in tiles; `block` = (rows, columns) overrides the TILE_BYTES sizing."""
    return partials_around(
        lambda col: _RowPartials.apply(features, weight_shard, keep, col, logit_offset, kind, s,
                                       block),
        labels, shard_size=weight_shard.shape[0], class_start=class_start, keep=keep,
        ignore_index=ignore_index, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)
