"""C++ bindings of the angular family: margin_cross_entropy, its from_cosine form,
AdaCos's one-sweep loss and the class-shard partials (csrc/angular.cpp).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from ..reference.angular import (NORM_EPS, adacos_scale_from_stats, combined_fallback,
                                 compute_dtype)
from ..reference.reduction import reduce_loss
from ..reference.sharded import ShardPartials, partials_around
from ..autograd_guard import first_order

ops = torch.ops.fused_margin

# ------------------------------------------------------------------ angular
# margin_cross_entropy / margin_cross_entropy_from_cosine (csrc/angular.cpp).
# The kernels return per-row losses w_i * (lse_i - logit_iy) (0 for ignored
# rows); the reduction is the reference's reduce_loss on those [N] values, so
# its gradient reaches the kernels as a per-row grad_output.

KIND_CODES = {"normface": 0, "arcface": 1, "cosface": 2, "sphereface": 3, "combined": 4,
              "ldam": 5, "elm": 6, "arcgrad": 7, "adaface": 8}
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
        # [N, 1] (per sample) stays 2-D: the kernels read row i's margin then
        marg = m.detach().to(dt)
        marg = marg.contiguous() if marg.dim() == 2 else marg.reshape(-1)
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
    @first_order("margin_cross_entropy (cpu backend)")
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
    @first_order("margin_cross_entropy (cpu backend)")
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


# The kernels form cos_ij = rx_i * rw_j * (x_i . W_j) and the normalisation
# Jacobian r^2 (g . v) v in the compute dtype, with the inverse norms r in float64:
# the product overflows float32 for x * 1e20 against W * 1e19 (or x * 1e38), and
# r^2 underflows for rows of norm past ~1e19. Rows whose largest |entry| lies
# outside [2^-ROW_EXP, 2^ROW_EXP] are first brought to [0.5, 1) by a power of two,
# exact in floating point and invisible to the cosines (the gradient is scaled back
# by autograd). Every ordinary call pays one max per row of each operand and makes
# no copy of W; rows of norm <= NORM_EPS stay as they are (zero vectors).
ROW_EXP = 40


def _row_pow2(t: torch.Tensor):
    """(t with out-of-range rows rescaled by powers of two, or t itself when every
    row is in range)."""
    with torch.no_grad():
        top = t.abs().amax(1).to(torch.float64)
        lo, hi = 2.0 ** -ROW_EXP, 2.0 ** ROW_EXP
        zero = top * math.sqrt(t.shape[1]) <= NORM_EPS  # norm <= NORM_EPS for sure
        if bool(((top >= lo) & (top <= hi) | zero).all()):
            return t
        safe = torch.where(top > 0, top, torch.ones_like(top))
        norm = (t.to(torch.float64) / safe[:, None]).square().sum(1).sqrt() * safe
        _, e = torch.frexp(safe)
        ok = torch.isfinite(top) & (top > 0) & (norm > NORM_EPS)
        scale = torch.ldexp(torch.ones_like(top), torch.where(ok, -e, torch.zeros_like(e)))
    return t * scale.to(t.dtype)[:, None]


def _safe_operands(features: torch.Tensor, weight: torch.Tensor):
    if features.numel() == 0 or weight.numel() == 0 or features.dtype == torch.float64:
        return features, weight
    return _row_pow2(features), _row_pow2(weight)


def _margin_ce(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
               ignore_index, reduction):
    """(reduced loss, lse_other [N], cos_y [N]) from one sweep on whichever path applies."""
    features, weight = _safe_operands(features, weight)
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
                         reduction: str = "mean", normalize: bool = True,
                         bias: Optional[torch.Tensor] = None,
                         label_smoothing: float = 0.0, sub_centers: int = 1) -> torch.Tensor:
    if sub_centers > 1:
        return _sub_center_ce(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda,
                              class_weight, ignore_index, reduction, float(label_smoothing),
                              sub_centers)
    needs_m_grad = (_per_sample(m) and m.requires_grad and torch.is_grad_enabled())
    if normalize and bias is None and not label_smoothing:
        loss, lse_other, cos_y = _margin_ce(features, weight, labels, kind, s, m, m1, m2, m3,
                                            elm_lambda, class_weight, ignore_index, reduction)
        if needs_m_grad:
            loss = loss + _margin_grad_term(lse_other, cos_y, labels, kind, s, m, m1, m2, m3,
                                            elm_lambda, class_weight, ignore_index, reduction,
                                            weight.shape[0])
        return loss
    if needs_m_grad:
        # the linear / smoothed sweeps return no per-row statistics: the reference
        # (N x C) serves a per-sample margin that needs a gradient there
        from ..reference import angular as ref
        return ref.margin_cross_entropy(
            features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
            elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, normalize=normalize, bias=bias, label_smoothing=label_smoothing)
    return _linear_or_smoothed(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda,
                               class_weight, ignore_index, reduction, normalize, bias,
                               float(label_smoothing))


# ------------------------------------------------------------ sub-centres
# margin_cross_entropy(sub_centers=K): weight [C*K, D]. Rows in chunks: per chunk one
# GEMM of the normalised rows against the normalised sub-centres into a [rows, C*K]
# scratch (sized to ROW_SCRATCH_BYTES), the max over each class's K sub-centres, then
# the C++ from-cosine sweep (cosine_ce_*) on the [rows, C] maxima; the backward
# recomputes each chunk and routes dL/dcos to the arg-max sub-centre. Never N x C*K;
# the normalisation is autograd's (reference.inv_norm, O(N D + C K D)).


class _SubCenterCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn, wn, m_in, labels, row_w, marg, args, k, rows):
        n, ck = xn.shape[0], wn.shape[0]
        c = ck // k
        loss, lse, cos_y = xn.new_empty(n), xn.new_empty(n), xn.new_empty(n)
        cstar = torch.empty(n, dtype=torch.int64)
        y = torch.where(labels != args[-1], labels, torch.zeros_like(labels))
        for r0 in range(0, n, rows):
            sl = slice(r0, min(n, r0 + rows))
            cos = (xn[sl] @ wn.T).view(-1, c, k).amax(dim=2)
            mc = marg[sl] if marg.dim() == 2 else marg
            loss[sl], lse[sl], cstar[sl] = ops.cosine_ce_fwd(cos, labels[sl], row_w[sl], mc,
                                                             *args)
            cos_y[sl] = cos.gather(1, y[sl, None])[:, 0]
        ctx.save_for_backward(xn, wn, labels, row_w, marg, lse, cstar, cos_y)
        ctx.args, ctx.k, ctx.rows = args, k, rows
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xn, wn, labels, row_w, marg, lse, cstar, cos_y = ctx.saved_tensors
        args, k, rows = ctx.args, ctx.k, ctx.rows
        need_x, need_w, need_m = ctx.needs_input_grad[:3]
        n, ck = xn.shape[0], wn.shape[0]
        c = ck // k
        grad = grad.contiguous()
        gx = torch.zeros_like(xn) if need_x else None
        gw = torch.zeros_like(wn) if need_w else None
        if need_x or need_w:
            for r0 in range(0, n, rows):
                sl = slice(r0, min(n, r0 + rows))
                full = xn[sl] @ wn.T
                cos, arg = full.view(-1, c, k).max(dim=2)
                mc = marg[sl] if marg.dim() == 2 else marg
                g = ops.cosine_ce_bwd(grad[sl], cos, labels[sl], row_w[sl], mc, lse[sl],
                                      cstar[sl], *args)
                full.zero_().view(-1, c, k).scatter_(2, arg[..., None], g[..., None])
                if need_x:
                    gx[sl] = full @ wn
                if need_w:
                    gw.addmm_(full.T, xn[sl])
        gm = None
        if need_m:  # per-sample margin [N, 1]: w_i (p_y - 1) s dt_i/dm_i
            kind = _KIND_NAMES[args[0]]
            s, m1, m2, m3, elm_lambda = args[1:6]
            valid = labels != args[-1]
            with torch.enable_grad():
                mm = marg[:, 0].detach().requires_grad_(True)
                t = _target(cos_y, kind, mm, m1, m2, m3, elm_lambda, c)
                dt, = torch.autograd.grad(t.sum(), mm)
            p = torch.exp(s * t.detach() - lse)
            gm = torch.where(valid, grad * row_w * (p - 1) * s * dt, torch.zeros_like(dt))
            gm = gm[:, None]
        return gx, gw, gm, None, None, None, None, None, None


_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


def _target(cos_y, kind, m_y, m1, m2, m3, elm_lambda, num_classes):
    """The kernel's target logit / s for a per-sample margin (ELM's term included)."""
    from ..reference import angular as ref
    t = ref.target_transform(cos_y, kind, m_y, m1, m2, m3)
    if kind == "elm" and num_classes > 1:
        t = t + elm_lambda * m_y
    return t


def _sub_center_ce(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                   ignore_index, reduction, eps, k):
    from ..reference import angular as ref
    if eps:
        # label smoothing over sub-centres: the reference (N x C*K)
        return ref.margin_cross_entropy(
            features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
            elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=eps, sub_centers=k)
    dt = compute_dtype(features.dtype)
    x, wt = features.to(dt), weight.to(dt)
    xn = x * ref.inv_norm(x)[:, None]
    wn = wt * ref.inv_norm(wt)[:, None]
    w, marg, th, offset = _prepare(features, labels, kind, m, m1, m2, class_weight, ignore_index)
    args = (KIND_CODES[kind], float(s), float(m1), float(m2), float(m3), float(elm_lambda),
            float(th), float(offset), int(ignore_index))
    m_in = m if _per_sample(m) else None
    rows = _row_block(weight.shape[0], w.element_size())
    per = _SubCenterCE.apply(xn, wn, m_in, labels, w, marg, args, k, rows)
    return reduce_loss(per, w, reduction)


def _per_sample(m) -> bool:
    return isinstance(m, torch.Tensor) and m.dim() == 2


def _margin_grad_term(lse_other, cos_y, labels, kind, s, m, m1, m2, m3, elm_lambda,
                      class_weight, ignore_index, reduction, num_classes):
    """Zero in value, d(loss)/dm in gradient, for a per-sample margin m [N, 1]: the
    kernel's per-row loss is w_i (logaddexp(lse_other_i, s t_i) - s t_i), with t_i
    the target transform of the sweep's (detached) cos_y and m_i; that expression,
    at m minus at m.detach(), is exactly 0 and carries the margin's gradient. O(N)."""
    from ..reference import angular as ref

    dt = lse_other.dtype
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    w = valid.to(dt)
    if class_weight is not None:
        w = w * class_weight.to(dt)[y]

    def per_row(mm):
        m_y = mm.to(dt)[:, 0]
        t = ref.target_transform(cos_y, kind, m_y, m1, m2, m3)
        if kind == "elm" and num_classes > 1:
            t = t + elm_lambda * m_y
        z = s * t
        per = torch.logaddexp(lse_other, z) - z
        return torch.where(valid, w * per, torch.zeros_like(per))

    return reduce_loss(per_row(m) - per_row(m.detach()), w, reduction)


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
    @first_order("margin_cross_entropy_from_cosine (cpu backend)")
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
    if _per_sample(m) and m.requires_grad and torch.is_grad_enabled():
        # the input already is N x C: the reference carries the margin's gradient
        from ..reference import angular as ref
        return ref.margin_cross_entropy_from_cosine(
            cosine, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda,
            class_weight=class_weight, ignore_index=ignore_index, reduction=reduction)
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
    @first_order("margin_shard_partials (cpu backend)")
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


# ------------------------------------------------ normalize=False, bias, label smoothing
# Raw linear logits s * (x.W_j + b_j) (csrc/angular.cpp, linear_ce_*): the same sweeps
# on the logits, margin s * m_y on the target (cosface, ldam), the bias gradient from
# the same tiles. Label smoothing (F.cross_entropy's, class weights w included) splits
# per valid row as
#   (1 - eps) w_y (lse - z_y) + eps/C sum_j w_j (lse - z_j)
#     = a_i (lse - z_y) + eps/C ((W - w_y) z_y - sum_{j != y} w_j z_j),
# a_i = (1 - eps) w_y + eps W / C, W = sum_j w_j: the kernels' cross-entropy with row
# weight a_i, plus an O(N D + C D) term in PyTorch (fused_margin/reference/smoothing.py,
# shared with the Triton backend), since every non-target logit is
# linear in x_i (s * rx_i rw_j x_i.W_j, or s * (x_i.W_j + b_j)): sum_j w_j z_j =
# s * rx_i x_i . (W^T (w * rw)) (+ s w.b). "mean" divides both by sum_i w_{y_i}.
# arcgrad (non-target logits -s*theta_j, not linear) and elm with a per-class margin
# (its target needs c*) with label smoothing are served by the reference (N x C).


class _LinearCE(torch.autograd.Function):
    """Per-row losses on the class-tiled sweep; a recomputing backward."""

    @staticmethod
    def forward(ctx, features, weight, bias, labels, row_w, marg, args):
        block, rows = _tiles(weight.shape[0], row_w.element_size())
        loss, lse = ops.linear_ce_fwd(features, weight, bias, labels, row_w, marg, *args,
                                      block, rows)
        ctx.save_for_backward(features, weight, bias, labels, row_w, marg, lse)
        ctx.args = args
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, weight, bias, labels, row_w, marg, lse = ctx.saved_tensors
        block, rows = _tiles(weight.shape[0], row_w.element_size())
        need = ctx.needs_input_grad
        gx, gw, gb = ops.linear_ce_bwd(grad.contiguous(), features, weight, bias, labels, row_w,
                                       marg, lse, *ctx.args, block, rows, need[0], need[1],
                                       bias is not None and need[2])
        return (gx if need[0] else None, gw if need[1] else None,
                gb.to(bias.dtype) if bias is not None and need[2] else None,
                None, None, None, None)


class _LinearCEFused(torch.autograd.Function):
    """Scalar reductions: gradients formed in the forward sweep (row weights carry the
    mean's scale), handed over by the first backward, as _MarginCrossEntropyFused."""

    @staticmethod
    def forward(ctx, features, weight, bias, labels, row_w, marg, args):
        need = (features.requires_grad, weight.requires_grad,
                bias is not None and bias.requires_grad)
        loss, gx, gw, gb = ops.linear_ce_fused(features, weight, bias, labels, row_w, marg, *args,
                                               _row_block(weight.shape[0], row_w.element_size()),
                                               *need)
        ctx.grads = (gx, gw, gb)
        ctx.save_for_backward(features, weight, bias, labels, row_w, marg)
        ctx.args = args
        return loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        if ctx.grads is None:
            features, weight, bias, labels, row_w, marg = ctx.saved_tensors
            _, gx, gw, gb = ops.linear_ce_fused(
                features, weight, bias, labels, row_w, marg, *ctx.args,
                _row_block(weight.shape[0], row_w.element_size()), need[0], need[1],
                bias is not None and need[2])
        else:
            gx, gw, gb = ctx.grads
            ctx.grads = None
        if not bool(grad == 1):
            gx, gw, gb = (g * grad.to(g.dtype) for g in (gx, gw, gb))
        has_b = need[2]
        return (gx if need[0] else None, gw if need[1] else None,
                gb if has_b else None, None, None, None, None)


def _row_scale(red_w: torch.Tensor, reduction: str):
    if reduction != "mean":
        return 1.0
    denom = red_w.sum()
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, 1 / safe, torch.zeros_like(denom))


def _weighted_ce(features, weight, bias, labels, kind, s, m, m1, m2, m3, elm_lambda,
                 ignore_index, reduction, normalize, row_w, red_w):
    """Cross-entropy with kernel row weights row_w and reduction weights red_w."""
    dt = compute_dtype(features.dtype)
    _, marg, th, offset = _prepare(features, labels, kind, m, m1, m2, None, ignore_index)
    grads = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))
    fused = FUSED and grads and reduction != "none" and features.shape[0] > 0
    if normalize:
        args = (KIND_CODES[kind], float(s), float(m1), float(m2), float(m3), float(elm_lambda),
                float(th), float(offset), int(ignore_index))
        if fused:
            return _MarginCrossEntropyFused.apply(features, weight, labels,
                                                  row_w * _row_scale(red_w, reduction), marg,
                                                  args)[0]
        per = _MarginCrossEntropy.apply(features, weight, labels, row_w, marg, args)[0]
        return reduce_loss(per, red_w, reduction)
    args = (KIND_CODES[kind], float(s), int(ignore_index))
    marg = marg * float(s)
    b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
    if fused:
        return _LinearCEFused.apply(features, weight, b, labels,
                                    row_w * _row_scale(red_w, reduction), marg, args)
    per = _LinearCE.apply(features, weight, b, labels, row_w, marg, args)
    return reduce_loss(per, red_w, reduction)


def _linear_or_smoothed(features, weight, labels, kind, s, m, m1, m2, m3, elm_lambda,
                        class_weight, ignore_index, reduction, normalize, bias, eps):
    from ..reference import angular as ref
    from ..reference.smoothing import needs_reference, smoothed_cross_entropy

    if needs_reference(kind, m, normalize, eps):
        return ref.margin_cross_entropy(
            features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
            elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, normalize=normalize, bias=bias, label_smoothing=eps)
    return smoothed_cross_entropy(
        lambda row_w, red_w: _weighted_ce(features, weight, bias, labels, kind, s, m, m1, m2, m3,
                                          elm_lambda, ignore_index, reduction, normalize, row_w,
                                          red_w),
        features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
        elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, normalize=normalize, bias=bias, eps=eps)
