"""C++ bindings of the cost-sensitive family: WCE, CRWWCE, Sinkhorn and the
Wasserstein loss (csrc/sinkhorn.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..reference import cost_sensitive as _cs
from ..reference.reduction import reduce_loss
from ..autograd_guard import first_order

ops = torch.ops.fused_margin

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
    @first_order("weighted_cross_entropy / crwwce_loss (cpu backend)")
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
    @first_order("wasserstein_loss (cpu backend)")
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
