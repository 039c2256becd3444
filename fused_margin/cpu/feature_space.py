"""C++ bindings of the feature-space family (csrc/feature_space.cpp).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from ..reference import feature_space as _fs
from ..reference.reduction import reduce_loss
from ..autograd_guard import first_order

ops = torch.ops.fused_margin

# ------------------------------------------------------------ feature space
# soft_nearest_neighbor_loss / triplet_margin_loss / knn_std / sigma2r_loss
# (csrc/feature_space.cpp). The kernels return per-row (per-pair) terms or,
# for "all" mining with a scalar reduction, the sum and count of the positive
# terms; the reductions are the reference's reduce_loss on those.

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
    @first_order("soft_nearest_neighbor_loss (cpu backend)")
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
    @first_order("triplet_margin_loss (cpu backend)")
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
    @first_order("triplet_margin_loss (cpu backend)")
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
    @first_order("triplet_margin_loss (cpu backend)")
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
    @first_order("center_loss (cpu backend)")
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
    @first_order("contrastive_center_loss (cpu backend)")
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


# Git / triplet-center / contrastive (csrc/feature_space.cpp, last section): the
# centre losses sweep the centres in blocks of FS_CENTER_BLOCK; contrastive_loss the
# Gram rows in blocks of FS_ROW_BLOCK. None holds N x C or N x N.


class _GitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, lambda_c, lambda_g):
        per, _own = ops.git_fwd(x, labels, c, lambda_c, lambda_g, FS_CENTER_BLOCK)
        ctx.save_for_backward(x, labels, c)
        ctx.lambdas = (lambda_c, lambda_g)
        return per

    @staticmethod
    def backward(ctx, grad):
        x, labels, c = ctx.saved_tensors
        gx, gc = ops.git_bwd(grad.contiguous(), x, labels, c, *ctx.lambdas, FS_CENTER_BLOCK)
        return gx, None, gc, None, None


def git_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
             lambda_c: float = 1.0, lambda_g: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    dt = _fs.compute_dtype(features.dtype)
    per = _GitLoss.apply(features.to(dt), labels, centers.to(dt), float(lambda_c),
                         float(lambda_g))
    return reduce_loss(per, torch.ones_like(per), reduction)


class _TripletCenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, c, margin, distance):
        per, own, near, idx = ops.tcl_fwd(x, labels, c, margin, DISTANCE_CODES[distance],
                                          FS_CENTER_BLOCK)
        ctx.save_for_backward(x, labels, c, per, own, near, idx)
        ctx.distance = distance
        return per

    @staticmethod
    def backward(ctx, grad):
        gx, gc = _fs.triplet_center_grads(grad, *ctx.saved_tensors, ctx.distance)
        return gx, None, gc, None, None


def triplet_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                        margin: float = 5.0, distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    if distance not in ("l2", "squared_l2"):
        raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")
    dt = _fs.compute_dtype(features.dtype)
    per = _TripletCenterLoss.apply(features.to(dt), labels, centers.to(dt), float(margin),
                                   distance)
    return reduce_loss(per, torch.ones_like(per), reduction)


class _ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, margin, code):
        ctx.save_for_backward(x, labels)
        ctx.args = (margin, code)
        return ops.contrastive_fwd(x, labels, margin, code, FS_ROW_BLOCK)

    @staticmethod
    def backward(ctx, grad):
        x, labels = ctx.saved_tensors
        gx = ops.contrastive_bwd(grad.contiguous(), x, labels, *ctx.args, FS_ROW_BLOCK)
        return gx, None, None, None


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                     distance: str = "l2", reduction: str = "mean") -> torch.Tensor:
    if distance not in ("l2", "squared_l2"):
        raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")
    x = embeddings.to(_fs.compute_dtype(embeddings.dtype))
    per = _ContrastiveLoss.apply(x, labels, float(margin), DISTANCE_CODES[distance])
    n = x.shape[0]
    return reduce_loss(per, torch.full_like(per, float(max(n - 1, 0))), reduction)
