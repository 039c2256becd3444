"""Bindings to the C++ kernels in csrc/, reached as torch.ops.fused_margin.*.

Importing this module loads fused_margin._C (built by setup.py); the dispatch
module only imports it once that import is known to work. Each family's
section exposes functions with the reference's signature.
"""
from __future__ import annotations

import torch

import fused_margin._C  # noqa: F401  (loads the operator registrations)

from .reference.angular import NORM_EPS

ops = torch.ops.fused_margin


def row_inv_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """1/||x_i|| per row, 0 for rows of norm <= eps (proves the build path)."""
    return ops.row_inv_norm(x, eps)


# ------------------------------------------------------------------ angular
# margin_cross_entropy / margin_cross_entropy_from_cosine (csrc/angular.cpp).
# The kernels return per-row losses w_i * (lse_i - logit_iy) (0 for ignored
# rows); the reduction is the reference's reduce_loss on those [N] values, so
# its gradient reaches the kernels as a per-row grad_output.

import os  # noqa: E402
from typing import Optional, Tuple, Union  # noqa: E402

from .reference.angular import (adacos_scale_from_stats, combined_fallback,  # noqa: E402
                                compute_dtype)
from .reference.reduction import reduce_loss  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

KIND_CODES = {"normface": 0, "arcface": 1, "cosface": 2, "sphereface": 3, "combined": 4,
              "ldam": 5, "elm": 6, "arcgrad": 7}
# Class-tiled path (no gradients, reduction="none", or FUSED off): classes per GEMM
# block; tests shrink it to exercise tiling.
CLASS_BLOCK = int(os.environ.get("FUSED_MARGIN_CPU_CLASS_BLOCK", "4096"))
# Rows per chunk on both paths: scratch ROW_BLOCK x C (fused) or ROW_BLOCK x
# min(CLASS_BLOCK, C) (class-tiled), whatever N. None sizes the chunk to
# ROW_SCRATCH_BYTES with at least 8 rows (fewer chunks = less gW read-modify-write).
# FUSED_MARGIN_CPU_FUSED=0 switches the fused path off (forward, then a recomputing backward).
ROW_BLOCK: Optional[int] = (int(os.environ["FUSED_MARGIN_CPU_ROW_BLOCK"])
                            if "FUSED_MARGIN_CPU_ROW_BLOCK" in os.environ else None)
ROW_SCRATCH_BYTES = 16 << 20
FUSED = os.environ.get("FUSED_MARGIN_CPU_FUSED", "1") != "0"


def _row_block(row_len: int, elem_bytes: int) -> int:
    """Rows per chunk for a scratch of rows x row_len elements of elem_bytes."""
    if ROW_BLOCK is not None:
        return ROW_BLOCK
    return max(8, ROW_SCRATCH_BYTES // max(1, row_len * elem_bytes))


def _tiles(num_classes: int, elem_bytes: int):
    """(class block, row chunk) of the class-tiled path."""
    block = max(1, min(CLASS_BLOCK, num_classes))
    return block, _row_block(block, elem_bytes)


def _prepare(x: torch.Tensor, labels: torch.Tensor, kind: str, m, m1: float, m2: float,
             class_weight: Optional[torch.Tensor], ignore_index: int):
    """Row weights (class weight of the target, 0 if ignored), margin [1] or [C],
    the scalar arguments the kernels take, all in the compute dtype."""
    dt = compute_dtype(x.dtype)
    valid = labels != ignore_index
    w = valid.to(dt)
    if class_weight is not None:
        y = torch.where(valid, labels, torch.zeros_like(labels))
        w = w * class_weight.to(dt)[y]
    if isinstance(m, torch.Tensor):
        marg = m.detach().to(dt).reshape(-1)
    else:
        marg = torch.full((1,), float(m), dtype=dt)
    th, offset = combined_fallback(m1, m2) if kind == "combined" else (0.0, 0.0)
    return w, marg, th, offset


class _MarginCrossEntropy(torch.autograd.Function):
    """Per-row losses, plus AdaCos's row statistics (lse_other, cos_y) of the same sweep
    as outputs without gradient."""

    @staticmethod
    def forward(ctx, features, weight, labels, row_w, marg, args):
        block, rows = _tiles(weight.shape[0], row_w.element_size())
        loss, lse, cstar, lse_other, cos_y = ops.angular_ce_fwd(
            features, weight, labels, row_w, marg, *args, block, rows)
        ctx.save_for_backward(features, weight, labels, row_w, marg, lse, cstar)
        ctx.args = args
        ctx.mark_non_differentiable(lse_other, cos_y)
        return loss, lse_other, cos_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _lse_other, _cos_y):
        features, weight, labels, row_w, marg, lse, cstar = ctx.saved_tensors
        block, rows = _tiles(weight.shape[0], row_w.element_size())
        gx, gw = ops.angular_ce_bwd(grad, features, weight, labels, row_w, marg, lse, cstar,
                                    *ctx.args, block, rows, ctx.needs_input_grad[0],
                                    ctx.needs_input_grad[1])
        return (gx if ctx.needs_input_grad[0] else None,
                gw if ctx.needs_input_grad[1] else None, None, None, None, None)


class _MarginCrossEntropyFused(torch.autograd.Function):
    """Scalar reductions only: gradients are formed in the forward pass for a unit
    upstream gradient (row weights carry the mean's 1/sum(w)) and scaled here.
    Also returns the sweep's (lse_other, cos_y), without gradient."""

    @staticmethod
    def forward(ctx, features, weight, labels, row_w, marg, args):
        loss, gx, gw, lse_other, cos_y = _fused(features, weight, labels, row_w, marg, args,
                                                features.requires_grad, weight.requires_grad)
        # held on ctx, not saved: the first backward hands them over (autograd then
        # adopts them as .grad without a C x D copy); a later backward through a
        # retained graph recomputes them from the saved inputs
        ctx.grads = (gx, gw)
        ctx.save_for_backward(features, weight, labels, row_w, marg)
        ctx.args = args
        ctx.mark_non_differentiable(lse_other, cos_y)
        return loss.sum(), lse_other, cos_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _lse_other, _cos_y):
        if ctx.grads is None:
            features, weight, labels, row_w, marg = ctx.saved_tensors
            _, gx, gw, _, _ = _fused(features, weight, labels, row_w, marg, ctx.args,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        else:
            gx, gw = ctx.grads
            ctx.grads = None
        if not bool(grad == 1):  # a plain .backward() passes 1: no C x D copy then
            gx, gw = gx * grad.to(gx.dtype), gw * grad.to(gw.dtype)
        return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def _fused(features, weight, labels, row_w, marg, args, need_x, need_w):
    return ops.angular_ce_fused(features, weight, labels, row_w, marg, *args,
                                _row_block(weight.shape[0], row_w.element_size()), need_x, need_w)


def _margin_ce(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
               ignore_index, reduction):
    """(reduced loss, lse_other [N], cos_y [N]) from one sweep on whichever path applies."""
    w, marg, th, offset = _prepare(features, labels, kind, m, m1, m2, class_weight, ignore_index)
    args = (KIND_CODES[kind], float(s), float(m1), float(m2), float(m3), float(elm_lambda),
            float(th), float(offset), int(ignore_index))
    grads = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    if FUSED and grads and reduction != "none" and features.shape[0] > 0:
        # the gradient of a sum / mean is a known per-row scale: form it now, once
        scale = 1.0
        if reduction == "mean":  # reduce_loss's mean: 0 when the weights sum to 0
            denom = w.sum()
            safe = torch.where(denom > 0, denom, torch.ones_like(denom))
            scale = torch.where(denom > 0, 1 / safe, torch.zeros_like(denom))
        return _MarginCrossEntropyFused.apply(features, weight, labels, w * scale, marg, args)
    per, lse_other, cos_y = _MarginCrossEntropy.apply(features, weight, labels, w, marg, args)
    return reduce_loss(per, w, reduction), lse_other, cos_y


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         kind: str = "arcface", s: float = 64.0,
                         m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                         m3: float = 0.0, elm_lambda: float = 0.5,
                         class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    return _margin_ce(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                      ignore_index, reduction)[0]


def adacos_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, *,
                class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                reduction: str = "mean"):
    """(normface margin cross-entropy at scale s, AdaCos's next scale): the scale is
    Eq. 10 of the ArcGrad paper from the per-row statistics the loss's own C++ sweep
    returns (no second pass over the classes); a 0-d float32 tensor without gradient."""
    loss, lse_other, cos_y = _margin_ce(features, weight, labels, "normface", s, 0.0, 1.0, 0.0,
                                        0.0, 0.0, class_weight, ignore_index, reduction)
    next_s = adacos_scale_from_stats(lse_other, cos_y, labels != ignore_index, float(s))
    return loss, next_s.to(torch.float32)


class _MarginCrossEntropyFromCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cosine, labels, row_w, marg, args):
        loss, lse, cstar = ops.cosine_ce_fwd(cosine, labels, row_w, marg, *args)
        ctx.save_for_backward(cosine, labels, row_w, marg, lse, cstar)
        ctx.args = args
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cosine, labels, row_w, marg, lse, cstar = ctx.saved_tensors
        g = ops.cosine_ce_bwd(grad, cosine, labels, row_w, marg, lse, cstar, *ctx.args)
        return g, None, None, None, None


def margin_cross_entropy_from_cosine(cosine: torch.Tensor, labels: torch.Tensor, *,
                                     kind: str = "arcface", s: float = 64.0,
                                     m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0,
                                     m2: float = 0.0, m3: float = 0.0, elm_lambda: float = 0.5,
                                     class_weight: Optional[torch.Tensor] = None,
                                     ignore_index: int = -100,
                                     reduction: str = "mean") -> torch.Tensor:
    w, marg, th, offset = _prepare(cosine, labels, kind, m, m1, m2, class_weight, ignore_index)
    args = (KIND_CODES[kind], float(s), float(m1), float(m2), float(m3), float(elm_lambda),
            float(th), float(offset), int(ignore_index))
    per = _MarginCrossEntropyFromCosine.apply(cosine, labels, w, marg, args)
    return reduce_loss(per, w, reduction)


# ------------------------------------------------------------ class-shard partials
# fused_margin.distributed's per-shard statistics (csrc/angular.cpp,
# shard_partials_*): the class-tiled sweep of the loss with each row's target
# column in place of its label; the target logit and global indices are formed
# here, in O(N), by reference.sharded.finish_partials.

from .reference.sharded import ShardPartials, partials_around  # noqa: E402


class _ShardPartials(torch.autograd.Function):
    """(features, weight [C_r, D]) -> row_max, sum_exp, cos_y, wrong_cos,
    wrong_column over the rows `keep` lists (all where None); only sum_exp and
    cos_y are differentiable."""

    @staticmethod
    def forward(ctx, features, weight, col, offset, keep, kind, s, block):
        elem = torch.empty((), dtype=compute_dtype(features.dtype)).element_size()
        k = weight.shape[0] if keep is None else keep.numel()
        tiles = _tiles(k, elem) if block is None else block
        out = ops.shard_partials_fwd(features, weight, col, offset, keep, KIND_CODES[kind],
                                     float(s), *tiles)
        ctx.save_for_backward(features, weight, col, offset, keep, out[0])
        ctx.args = (KIND_CODES[kind], float(s)) + tuple(tiles)
        ctx.mark_non_differentiable(out[0], out[3], out[4])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, _g_max, g_sum, g_cos_y, _g_wrong, _g_column):
        features, weight, col, offset, keep, row_max = ctx.saved_tensors
        zero = torch.zeros_like(row_max)
        gx, gw = ops.shard_partials_bwd(zero if g_sum is None else g_sum,
                                        zero if g_cos_y is None else g_cos_y, features, weight,
                                        col, offset, keep, row_max, *ctx.args,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (gx if ctx.needs_input_grad[0] else None,
                gw if ctx.needs_input_grad[1] else None, None, None, None, None, None, None)


def margin_shard_partials(features: torch.Tensor, weight_shard: torch.Tensor,
                          labels: torch.Tensor, *, class_start: int, kind: str = "arcface",
                          s: float = 64.0, m: Union[float, torch.Tensor] = 0.5,
                          m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                          ignore_index: int = -100, keep: Optional[torch.Tensor] = None,
                          logit_offset: Optional[torch.Tensor] = None,
                          block: Optional[Tuple[int, int]] = None) -> ShardPartials:
    """reference.sharded.margin_shard_partials on the C++ sweep; `block` =
    (classes, rows) of a tile overrides CLASS_BLOCK / the row sizing (tests).
    A sampled shard's kept rows (`keep`) are gathered one class block at a
    time, and only they get a gradient (no [K, D] copy of W or its gradient)."""
    offset = None if logit_offset is None else logit_offset.detach()
    if keep is not None:
        keep = keep.to(torch.int64).contiguous()
    return partials_around(
        lambda col: _ShardPartials.apply(features, weight_shard, col, offset, keep, kind, s,
                                         block),
        labels, shard_size=weight_shard.shape[0], class_start=class_start, keep=keep,
        ignore_index=ignore_index, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)


# ------------------------------------------------------------ feature space
# soft_nearest_neighbor_loss / triplet_margin_loss / knn_std / sigma2r_loss
# (csrc/feature_space.cpp). The kernels return per-row (per-pair) terms or,
# for "all" mining with a scalar reduction, the sum and count of the positive
# terms; the reductions are the reference's reduce_loss on those.

from .reference import feature_space as _fs  # noqa: E402

# Rows of the pairwise-distance matrix per GEMM: each thread holds one
# FS_ROW_BLOCK x N scratch. Tests shrink it to exercise the tiling.
FS_ROW_BLOCK = int(os.environ.get("FUSED_MARGIN_CPU_FS_ROW_BLOCK", "64"))
DISTANCE_CODES = {"l2": 0, "squared_l2": 1, "cosine": 2}


class _SoftNearestNeighbor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, temperature):
        per, lse_all, lse_same, has = ops.snn_fwd(x, labels, temperature, FS_ROW_BLOCK)
        ctx.save_for_backward(x, labels, lse_all, lse_same)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(has)
        return per, has

    @staticmethod
    def backward(ctx, grad, _):
        x, labels, lse_all, lse_same = ctx.saved_tensors
        gx = ops.snn_bwd(grad.contiguous(), x, labels, lse_all, lse_same, ctx.temperature,
                         FS_ROW_BLOCK)
        return gx, None, None


def soft_nearest_neighbor_loss(features: torch.Tensor, labels: torch.Tensor, *,
                               temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    x = features.to(_fs.compute_dtype(features.dtype))
    per, has = _SoftNearestNeighbor.apply(x, labels, float(temperature))
    return reduce_loss(per, has.to(x.dtype), reduction)


def _pair_grad(x, a, b, w, distance):
    return ops.triplet_pair_grad(x, a, b, w, distance)


class _TripletMined(torch.autograd.Function):
    """Semi-hard and batch-hard: one term per (a, p, n) triple, saved as indices."""

    @staticmethod
    def forward(ctx, x, labels, margin, mining, distance):
        if mining == "semihard":
            per, a, p, n = ops.triplet_semihard_fwd(x, labels, margin, distance, FS_ROW_BLOCK)
            valid = torch.ones_like(per, dtype=torch.bool)
        else:
            per, valid, p, n = ops.triplet_hard_fwd(x, labels, margin, distance, FS_ROW_BLOCK)
            a = torch.arange(per.shape[0], device=per.device)
        ctx.save_for_backward(x, per, valid, a, p, n)
        ctx.distance = distance
        ctx.mark_non_differentiable(valid)
        return per, valid

    @staticmethod
    def backward(ctx, grad, _):
        x, per, valid, a, p, n = ctx.saved_tensors
        w = torch.where(valid & (per > 0), grad, torch.zeros_like(grad))
        # d term = d dist(a, p) - d dist(a, n)
        gx = _pair_grad(x, torch.cat([a, a]), torch.cat([p, n]), torch.cat([w, -w]), ctx.distance)
        return gx, None, None, None, None


class _TripletAllTerms(torch.autograd.Function):
    """"all" with reduction="none": the [T] terms themselves."""

    @staticmethod
    def forward(ctx, x, labels, margin, distance):
        per = ops.triplet_all_fwd(x, labels, margin, distance, FS_ROW_BLOCK, True)[0]
        ctx.save_for_backward(x, labels, per)
        ctx.distance = distance
        return per

    @staticmethod
    def backward(ctx, grad):
        x, labels, per = ctx.saved_tensors
        w = torch.where(per > 0, grad, torch.zeros_like(grad))
        a, b, pw = ops.triplet_all_term_pairs(w.contiguous(), labels)
        return _pair_grad(x, a, b, pw, ctx.distance), None, None, None


class _TripletAllSum(torch.autograd.Function):
    """"all" with a scalar reduction: the sum of the terms (and, not
    differentiable, how many are > 0), gradients through integer pair weights."""

    @staticmethod
    def forward(ctx, x, labels, margin, distance):
        stats, a, b, pw = ops.triplet_all_fwd(x, labels, margin, distance, FS_ROW_BLOCK, False)
        ctx.save_for_backward(x, a, b, pw)
        ctx.distance = distance
        count = stats[1].to(x.dtype)
        ctx.mark_non_differentiable(count)
        return stats[0].to(x.dtype), count

    @staticmethod
    def backward(ctx, grad, _):
        x, a, b, pw = ctx.saved_tensors
        return _pair_grad(x, a, b, pw.to(x.dtype) * grad, ctx.distance), None, None, None


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2,
                        mining: str = "semihard", distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    if mining not in ("semihard", "hard", "all"):
        raise ValueError(f"unknown mining {mining!r}")
    if distance not in DISTANCE_CODES:
        raise ValueError(f"unknown distance {distance!r}")
    x = embeddings.to(_fs.compute_dtype(embeddings.dtype))
    code = DISTANCE_CODES[distance]
    if mining == "all":
        if reduction == "none":
            return _TripletAllTerms.apply(x, labels, float(margin), code)
        total, count = _TripletAllSum.apply(x, labels, float(margin), code)
        return reduce_loss(total.reshape(1), count.reshape(1), reduction).reshape(())
    per, valid = _TripletMined.apply(x, labels, float(margin), mining, code)
    return reduce_loss(per, valid.to(x.dtype), reduction)


def knn_std(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
            n_neighbors: int = 7) -> Tuple[torch.Tensor, torch.Tensor]:
    dt = _fs.compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    # the neighbours are discrete choices, held fixed for the gradient
    idx, valid, idx_c, valid_c = ops.knn_select(x.detach(), labels, c.detach(), int(n_neighbors))
    return _fs._std_with(x, x[idx], valid), _fs._std_with(c, x[idx_c], valid_c)


def sigma2r_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                 w_k: torch.Tensor, *, n_neighbors: int = 7, z: float = 40.0, eps: float = 1e-3,
                 reduction: str = "mean") -> torch.Tensor:
    # the reference's O(N D) formula (Eq. 8-10) on top of the kernel's k-NN stds
    return _fs.sigma2r_with(knn_std, features, labels, centers, w_k, n_neighbors=n_neighbors,
                            z=z, eps=eps, reduction=reduction)


# centre losses: per-sample terms from the kernels; contrastive_center_loss
# sweeps the centres in blocks of FS_CENTER_BLOCK (scratch N x FS_CENTER_BLOCK)
FS_CENTER_BLOCK = int(os.environ.get("FUSED_MARGIN_CPU_FS_CENTER_BLOCK", "1024"))


class _CenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c):
        ctx.save_for_backward(x, labels, c)
        return ops.center_fwd(x, labels, c)

    @staticmethod
    def backward(ctx, grad):
        x, labels, c = ctx.saved_tensors
        gx, gc = ops.center_bwd(grad.contiguous(), x, labels, c)
        return gx, None, gc


class _ContrastiveCenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, delta):
        per, own, den = ops.contrastive_center_fwd(x, labels, c, delta, FS_CENTER_BLOCK)
        ctx.save_for_backward(x, labels, c, own, den)
        return per

    @staticmethod
    def backward(ctx, grad):
        x, labels, c, own, den = ctx.saved_tensors
        gx, gc = ops.contrastive_center_bwd(grad.contiguous(), x, labels, c, own, den,
                                            FS_CENTER_BLOCK)
        return gx, None, gc, None


def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                reduction: str = "mean") -> torch.Tensor:
    dt = _fs.compute_dtype(features.dtype)
    per = _CenterLoss.apply(features.to(dt), labels, centers.to(dt))
    return reduce_loss(per, torch.ones_like(per), reduction)


def contrastive_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                            *, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    dt = _fs.compute_dtype(features.dtype)
    per = _ContrastiveCenterLoss.apply(features.to(dt), labels, centers.to(dt), float(delta))
    return reduce_loss(per, torch.ones_like(per), reduction)


# ----------------------------------------------------------- cost-sensitive
# weighted_cross_entropy / crwwce_loss / sinkhorn / wasserstein_loss
# (csrc/sinkhorn.cpp). The CE kernels take the logits in their own dtype (half
# is converted in registers, no float32 copy) and return per-row losses in the
# compute dtype and, when a gradient is needed, dloss/dlogits for a unit
# upstream gradient in the logits' dtype (held, then scaled in place by the
# per-row grad_output and handed over in backward: so backward runs once per
# forward, and a second one through a retained graph is a clear error).
# Sinkhorn returns the log potentials F, G (scaled by 1/eps) of the reference's
# iteration and, on request, the plans; the Wasserstein costs and backward's
# plans are formed from F, G. Gradients of the Wasserstein loss (distribution
# targets) are implicit, not unrolled: entropic=True: the envelope theorem,
# d/dh = eps F, d/db = eps G, d/dC = T; entropic=False (<T, C>, T the entropic
# plan): implicit differentiation of the optimality conditions (reference
# ot_cost_grads, the helper the triton backend uses too: one answer, plans that
# decouple into blocks included). Only the tangent part of d/dh, d/db is
# defined (both marginals are on a simplex): h's reaches the logits through the
# softmax Jacobian, which drops the rest; the target's is returned centred over
# its support. They equal the reference's unrolled gradients once Sinkhorn has
# converged. `sinkhorn` called with inputs that need gradients runs the
# reference (unrolled iterations): the kernel has no backward of the plans.

from .reference import cost_sensitive as _cs  # noqa: E402


def _class_grad(per_row: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, k: int):
    """sum over the rows of each target class (ignored rows excluded)."""
    y = torch.where(valid, labels, torch.zeros_like(labels))
    vals = torch.where(valid, per_row, torch.zeros_like(per_row))
    return torch.zeros(k, dtype=per_row.dtype).index_add_(0, y, vals)


def _handed_over(g: Optional[torch.Tensor]) -> torch.Tensor:
    if g is None:
        raise RuntimeError(
            "fused_margin: the fused WCE / CRWWCE backward scales the logit gradient formed "
            "in the forward in place and hands it over, so it runs once per forward: a "
            "second backward through a retained graph is not supported (call the loss "
            "again, or use backend='reference')")
    return g


class _CostSensitiveCE(torch.autograd.Function):
    """WCE (fp_weight None) and CRWWCE. Weight gradients: per class sums of the
    per-row nll / log terms (the CRWWCE fp_weight one recomputes log(1 - h) with
    the reference's log1m_softmax, O(N K), only when fp_weight needs it)."""

    @staticmethod
    def forward(ctx, z, labels, fn_weight, fp_weight, ignore_index):
        need = z.requires_grad
        if fp_weight is None:
            loss, term, g = ops.wce_fwd(z, labels, fn_weight, ignore_index, need)
        else:
            loss, term, g = ops.crwwce_fwd(z, labels, fn_weight, fp_weight, ignore_index, need)
        # held on ctx, not saved: the first backward scales it in place and hands it
        # over (autograd adopts it as .grad: no second N x K)
        ctx.g = g if need else None
        ctx.save_for_backward(term, labels, z if (fp_weight is not None and
                                                   ctx.needs_input_grad[3]) else None)
        ctx.ignore_index, ctx.k = ignore_index, z.shape[1]
        ctx.wce = fp_weight is None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        term, labels, z = ctx.saved_tensors
        valid = labels != ctx.ignore_index
        k = ctx.k
        gz = None
        if ctx.needs_input_grad[0]:
            gz, ctx.g = _handed_over(ctx.g), None
            # grad in the buffer's dtype: a mixed-dtype in-place op would make
            # float32 copies of a half buffer on the CPU
            gz.mul_(grad.to(gz.dtype)[:, None])
        gfn = gfp = None
        if ctx.needs_input_grad[2]:
            # WCE: d/dw_t = nll; CRWWCE: d/dfn_t = -log h_t
            per = term if ctx.wce else -term
            gfn = _class_grad(per * grad, labels, valid, k)
        if ctx.needs_input_grad[3]:
            y = torch.where(valid, labels, torch.zeros_like(labels))
            off = torch.ones_like(z, dtype=torch.bool).scatter(1, y[:, None], False)
            off = off & valid[:, None]
            zc = z.to(_cs.compute_dtype(z.dtype))
            m = torch.where(off, -_cs.log1m_softmax(zc) * grad[:, None], torch.zeros_like(zc))
            gfp = torch.zeros(k, k, dtype=zc.dtype).index_add_(0, y, m).t()  # [k, t_n] += m[n, k]
        return gz, None, gfn, gfp, None


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weight: torch.Tensor, *, ignore_index: int = -100,
                           reduction: str = "mean") -> torch.Tensor:
    dt = _cs.compute_dtype(logits.dtype)
    per = _CostSensitiveCE.apply(logits, labels, class_weight.to(dt), None, int(ignore_index))
    return reduce_loss(per, (labels != ignore_index).to(dt), reduction)


def crwwce_loss(logits: torch.Tensor, labels: torch.Tensor, fn_weight: torch.Tensor,
                fp_weight: torch.Tensor, *, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
    dt = _cs.compute_dtype(logits.dtype)
    per = _CostSensitiveCE.apply(logits, labels, fn_weight.to(dt), fp_weight.to(dt),
                                 int(ignore_index))
    return reduce_loss(per, (labels != ignore_index).to(dt), reduction)


def _potentials(a, b, cost, eps, n_iter, tol, plan=False):
    """(F, G, plans or an empty tensor) of the reference's iteration."""
    return ops.sinkhorn_potentials(a.detach().contiguous(), b.detach().contiguous(),
                                   cost.detach().contiguous(), float(eps), int(n_iter),
                                   -1.0 if tol is None else float(tol), bool(plan))


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float = 0.1,
             n_iter: int = 100, tol: Optional[float] = None) -> torch.Tensor:
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or cost.requires_grad):
        # gradients through the plans are the reference's unrolled iterations
        return _cs.sinkhorn(a, b, cost, eps=eps, n_iter=n_iter, tol=tol)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    dt = _cs.compute_dtype(out_dtype)
    return _potentials(a.to(dt), b.to(dt), cost.to(dt), eps, n_iter, tol, True)[2].to(out_dtype)


class _WassersteinDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, cost, eps, n_iter, tol, entropic):
        h = torch.softmax(z.detach(), dim=1)
        b, c = target.detach().contiguous(), cost.detach().contiguous()
        f, g, _ = _potentials(h, b, c, eps, n_iter, tol)
        per = ops.sinkhorn_cost(f, g, c, float(eps), bool(entropic))
        ctx.save_for_backward(h, b, c, f, g)
        ctx.cfg = (float(eps), bool(entropic))
        return per

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, b, c, f, g = ctx.saved_tensors
        eps, entropic = ctx.cfg
        need_z, need_b, need_c = ctx.needs_input_grad[:3]
        t = ops.sinkhorn_plan(f, g, c, eps) if (need_c or not entropic) else None
        if entropic:   # envelope theorem on OT_eps(h, b)
            gh = torch.where(h > 0, eps * f, torch.zeros_like(f))
            gb = torch.where(b > 0, eps * g, torch.zeros_like(g))
            gc = t if need_c else None
        else:
            gh, gb, gc = _cs.ot_cost_grads(t, c, eps)     # shared with triton
        gz = gtarget = gcost = None
        if need_z:
            gz = h * (gh - (h * gh).sum(1, keepdim=True)) * grad[:, None]
        if need_b:
            gtarget = _cs.centred(gb, b > 0) * grad[:, None]
        if need_c:
            gc = gc * grad[:, None, None]
            gcost = gc.sum(0) if c.dim() == 2 else gc
        return gz, gtarget, gcost, None, None, None, None


def wasserstein_loss(logits: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, *,
                     eps: float = 0.1, n_iter: int = 100, entropic: bool = False,
                     tol: Optional[float] = None, ignore_index: int = -100,
                     reduction: str = "mean") -> torch.Tensor:
    if target.dim() == 1:   # labels: the closed form, O(N K), is the reference's
        return _cs.wasserstein_loss(logits, target, cost, eps=eps, n_iter=n_iter,
                                    entropic=entropic, tol=tol, ignore_index=ignore_index,
                                    reduction=reduction)
    dt = _cs.compute_dtype(logits.dtype)
    per = _WassersteinDist.apply(logits.to(dt), target.to(dt), cost.to(dt), float(eps),
                                 int(n_iter), tol, bool(entropic))
    return reduce_loss(per, torch.ones_like(per), reduction)
