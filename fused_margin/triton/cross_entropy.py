# Weighted cross-entropy (WCE) and categorical real-world-weight cross-entropy
# (CRWWCE), Triton, fused over classes. Semantics are
# fused_margin.reference.cost_sensitive's (WCE "mean" divides by the number of
# non-ignored samples; float32 compute and loss for half inputs, float64 for float64).
#
# What it computes, per row n with target t: the per-row loss and, when a gradient
# is needed, dloss/dlogits for a unit upstream gradient (Liger style: written in the
# forward, scaled in place by grad_output[n] and handed over in backward, which thus
# runs once per forward). No [N, K] temporaries besides that gradient (stored in the
# logits' dtype): half logits are cast in registers.
#
# Tiling. One program per BLOCK_N rows, looping over K in BLOCK_K tiles:
# - pass 1: online (max, first arg-max as torch.argmax, sum of exp) -> lse;
# - pass 2 (CRWWCE only): online lse over the non-arg-max classes (log(1 - h_top) =
#   lse_others - lse, no cancellation as h_top -> 1), the fp-term of the loss,
#   sum_{k != t} fp[k, t] log(1 - h_k), and S = sum_{k != t, top} fp[k, t] h_k / (1 - h_k),
#   which every class's gradient needs before it can be written;
# - last pass: the gradient.
# WCE: w_t (h_j - [j = t]). CRWWCE (a_k = fp[k, t], 0 at k = t; q_j the softmax
# over the non-arg-max classes): fn_t (h_j - [j = t]) + a_top (h_j - [j != top] q_j)
# + [j != top] a_j h_j / (1 - h_j) - h_j S; the arg-max term is written through q so
# it stays finite when h_top rounds to 1.
# Ignored rows have loss 0 and gradient 0. Weight gradients are not fused: when a
# weight requires grad the public functions run the reference (autograd).
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..reference import cost_sensitive as _ref
from ..reference.reduction import reduce_loss
from ..autograd_guard import first_order

# class tile width cap; tests lower it to exercise several (partial) tiles
MAX_BLOCK_K = 1024
# values per [BLOCK_N, BLOCK_K] tile
TILE = 4096


@triton.jit
def _log1m(h):
    """log(1 - h) for 0 <= h <= 1/2, accurate for tiny h (no log1p in the interpreter)."""
    u = 1.0 - h
    d = u - 1.0
    return tl.where(d == 0.0, -h, tl.log(u) * (-h) / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _ce_kernel(z_ptr, y_ptr, w_ptr, fp_ptr, loss_ptr, g_ptr, N, K, stride_z, ignore_index,
               CRW: tl.constexpr, NEED_GRAD: tl.constexpr, F64: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols0 = tl.arange(0, BLOCK_K)
    y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (y != ignore_index)
    t = tl.where(valid, y, 0)
    rows64 = rows.to(tl.int64)
    zrow = z_ptr + rows64 * stride_z

    # ---- pass 1: online max, first arg-max and sum of exp
    if F64:
        m = tl.full([BLOCK_N], float("-inf"), tl.float64)
        se = tl.zeros([BLOCK_N], tl.float64)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        se = tl.zeros([BLOCK_N], tl.float32)
    top = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        mask = rmask[:, None] & (cols < K)[None, :]
        z = tl.load(zrow[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        z = z.to(tl.float64) if F64 else z.to(tl.float32)
        z = tl.where(rmask[:, None], z, tl.where((cols < K)[None, :], 0.0, float("-inf")))
        tmax = tl.max(z, axis=1)
        targ = tl.min(tl.where(z == tmax[:, None], cols[None, :], 2147483647), axis=1)
        new = tmax > m
        m_new = tl.where(new, tmax, m)
        se = se * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        top = tl.where(new, targ, top)
        m = m_new
    lse = m + tl.log(se)

    w_t = tl.load(w_ptr + t, mask=valid, other=0.0)
    z_t = tl.load(zrow + t, mask=valid, other=0.0)
    z_t = z_t.to(tl.float64) if F64 else z_t.to(tl.float32)
    loss = w_t * (lse - z_t)

    s = tl.zeros_like(lse)
    a_top = tl.zeros_like(lse)
    lse_o = lse
    if CRW:
        a_top = tl.load(fp_ptr + top * K + t, mask=valid & (top != t), other=0.0)
        # ---- pass 2: lse over the non-arg-max classes (its own online max: their
        # exp(z - max) can be subnormal), the other classes' fp-terms, and S
        mo = tl.full([BLOCK_N], float("-inf"), lse.dtype)
        so = tl.zeros_like(lse)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = cols < K
            mask = rmask[:, None] & cmask[None, :]
            z = tl.load(zrow[:, None] + cols[None, :], mask=mask, other=0.0)
            z = z.to(tl.float64) if F64 else z.to(tl.float32)
            is_top = cols[None, :] == top[:, None]
            zo = tl.where(is_top | ~mask, float("-inf"), z)
            mo_new = tl.maximum(mo, tl.max(zo, axis=1))
            mo_safe = tl.where(mo_new == float("-inf"), 0.0, mo_new)
            so = so * tl.exp(mo - mo_safe) + tl.sum(tl.exp(zo - mo_safe[:, None]), axis=1)
            mo = mo_new
            live = valid[:, None] & cmask[None, :] & (cols[None, :] != t[:, None]) & ~is_top
            a = tl.load(fp_ptr + cols[None, :] * K + t[:, None], mask=live, other=0.0)
            h = tl.where(live, tl.exp(z - lse[:, None]), 0.0)
            loss -= tl.sum(tl.where(live, a * _log1m(h), 0.0), axis=1)
            s += tl.sum(tl.where(live, a * h / (1.0 - h), 0.0), axis=1)
        lse_o = tl.where(so > 0.0, mo + tl.log(tl.where(so > 0.0, so, 1.0)), float("-inf"))
        loss -= tl.where(a_top != 0.0, a_top * (lse_o - lse), 0.0)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=rmask)

    if NEED_GRAD:
        # ---- last pass: dloss/dlogits
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            mask = rmask[:, None] & (cols < K)[None, :]
            z = tl.load(zrow[:, None] + cols[None, :], mask=mask, other=0.0)
            z = z.to(tl.float64) if F64 else z.to(tl.float32)
            h = tl.exp(z - lse[:, None])
            is_t = cols[None, :] == t[:, None]
            g = w_t[:, None] * (h - tl.where(is_t, 1.0, 0.0))
            if CRW:
                is_top = cols[None, :] == top[:, None]
                live = valid[:, None] & (cols < K)[None, :] & ~is_t
                a = tl.load(fp_ptr + cols[None, :] * K + t[:, None], mask=live, other=0.0)
                q = tl.where(is_top, 0.0, tl.exp(z - lse_o[:, None]))
                hs = tl.where(is_top, 0.0, h)
                g += tl.where(a_top[:, None] != 0.0, a_top[:, None] * (h - q), 0.0)
                g += tl.where(is_top, 0.0, a * hs / (1.0 - hs)) - h * s[:, None]
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(g_ptr + rows64[:, None] * K + cols[None, :], g.to(g_ptr.dtype.element_ty),
                     mask=mask)


def _launch(logits, labels, w, fp, ignore_index, need_grad):
    n, k = logits.shape
    dt = _ref.compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=dt, device=logits.device)
    grad = torch.empty_like(logits) if need_grad else loss
    if n == 0:
        return loss, grad
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    block_n = max(1, min(16, TILE // block_k))
    _ce_kernel[(triton.cdiv(n, block_n),)](
        logits, labels, w, fp if fp is not None else w, loss, grad, n, k, logits.stride(0),
        int(ignore_index), CRW=fp is not None, NEED_GRAD=need_grad, F64=dt == torch.float64,
        BLOCK_N=block_n, BLOCK_K=block_k)
    return loss, grad


class CostSensitiveCE(torch.autograd.Function):
    """Per-row WCE (fp_weight None) or CRWWCE loss; gradient to the logits only."""

    @staticmethod
    def forward(ctx, logits, labels, fn_weight, fp_weight, ignore_index):
        need = logits.requires_grad
        loss, g = _launch(logits, labels, fn_weight, fp_weight, ignore_index, need)
        # held on ctx, not saved: the first backward scales it in place and hands it
        # over (autograd adopts it as .grad: no second N x K)
        ctx.g = g if need else None
        return loss

    @staticmethod
    @first_order("weighted_cross_entropy / crwwce_loss (triton backend)")
    @once_differentiable
    def backward(ctx, grad):
        gz = None
        if ctx.needs_input_grad[0]:
            if ctx.g is None:
                raise RuntimeError(
                    "fused_margin: the fused WCE / CRWWCE backward scales the logit gradient "
                    "formed in the forward in place and hands it over, so it runs once per "
                    "forward: a second backward through a retained graph is not supported "
                    "(call the loss again, or use backend='reference')")
            gz, ctx.g = ctx.g, None
            # grad in the buffer's dtype: a mixed-dtype in-place op would make
            # float32 copies of a half buffer on the CPU
            gz.mul_(grad.to(gz.dtype)[:, None])
        return gz, None, None, None, None


def _needs_weight_grad(*ws) -> bool:
    return torch.is_grad_enabled() and any(w.requires_grad for w in ws)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weight: torch.Tensor, *, ignore_index: int = -100,
                           reduction: str = "mean") -> torch.Tensor:
    # the kernel differentiates the logits only; weight gradients come from the reference
    if _needs_weight_grad(class_weight):
        return _ref.weighted_cross_entropy(logits, labels, class_weight,
                                           ignore_index=ignore_index, reduction=reduction)
    dt = _ref.compute_dtype(logits.dtype)
    per = CostSensitiveCE.apply(logits.contiguous(), labels.contiguous(),
                                class_weight.to(dt).contiguous(), None, int(ignore_index))
    return reduce_loss(per, (labels != ignore_index).to(dt), reduction)


def crwwce_loss(logits: torch.Tensor, labels: torch.Tensor, fn_weight: torch.Tensor,
                fp_weight: torch.Tensor, *, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
    # the kernel differentiates the logits only; weight gradients come from the reference
    if _needs_weight_grad(fn_weight, fp_weight):
        return _ref.crwwce_loss(logits, labels, fn_weight, fp_weight,
                                ignore_index=ignore_index, reduction=reduction)
    dt = _ref.compute_dtype(logits.dtype)
    per = CostSensitiveCE.apply(logits.contiguous(), labels.contiguous(),
                                fn_weight.to(dt).contiguous(), fp_weight.to(dt).contiguous(),
                                int(ignore_index))
    return reduce_loss(per, (labels != ignore_index).to(dt), reduction)
