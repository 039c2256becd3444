# Batched log-domain Sinkhorn and the Wasserstein loss between softmax(logits) and a
# target distribution, Triton. Semantics are fused_margin.reference.cost_sensitive's.
#
# What it computes. Scaled potentials F, G [N, K] with the plan
# T_ij = exp(F_i + G_j - C_ij / eps); each iteration sets F (rows match a), then G
# (columns match b), the reference's order, so every iterate equals the reference's
# (to float rounding), not only the fixed point. Zero marginal entries enter as
# log 0 = -inf and give exact zero rows / columns; a sample whose a or b is all zero
# solves a dummy uniform problem (as the reference does, so no log-sum-exp runs over
# -inf alone) and its plan is written as exact zeros.
#
# Tiling. The scaled cost C / eps is computed once on the host (the reference's
# rounding); a shared [K, K] cost is passed with a 0 stride over N. BLOCK_K =
# next_power_of_2(K) <= MAX_K (1024; larger K raises ValueError). Two kernels:
# - tile kernel (BLOCK_K <= TILE_MAX_K = 64 on a GPU; every K under the
#   interpreter): one program per BLOCK_N samples, each sample's whole
#   [BLOCK_K, BLOCK_K] cost tile loaded once into registers ([BLOCK_N, BLOCK_K,
#   BLOCK_K] <= 4096 values on a GPU, so BLOCK_N > 1 for K <= 32); F and G stay in
#   registers across the iterations and are stored once at the end. No masks inside
#   the loop: padded rows / columns see cost 0 and carry F, G = -inf (log 0), so they
#   add exp(-inf) = 0 to every real line while their own lines stay finite.
# - streaming kernel (larger K on a GPU): one program per sample sweeping the cost
#   in [BLOCK_I, BLOCK_K] row tiles (<= 8192 values): the F update is a row
#   log-sum-exp of G_j - C_ij/eps per tile; the G update an online (max, sum) column
#   log-sum-exp of F_i - C_ij/eps across the tiles (-inf-safe: an all -inf tile
#   leaves it unchanged). F and G live in the [N, K] output buffers (the program's
#   own row, L1/L2 resident) with a barrier between the phases; the cost is re-read
#   every iteration, from L2 for K <= a few hundred (a shared cost is the same lines
#   for every program). Tested under the interpreter by forcing it (Blocks).
# A third kernel writes the plan exp(F_i + G_j - C_ij/eps) (zero for empty samples)
# and / or each sample's <T, C> (+ eps sum T (log T - 1)) without materialising T.
#
# tol. The reference stops globally: after iteration 10m (10m < n_iter) it stops
# when max_n sum_i |sum_j T_nij - a_ni| < tol. This backend launches the kernel 10
# iterations at a time, the last launch computing each sample's row error into an
# [N] buffer, and checks the same global condition on the host, so it stops at the
# same iteration as the reference (one host sync per 10 iterations). Without tol
# all n_iter iterations run in one launch.
#
# Saved for backward (wasserstein_loss with a distribution target): F, G [N, K] and
# h = softmax(logits) in the compute dtype, the scaled cost (or the [K, K] shared
# one), the cost itself, and the [N] empty-sample mask. Gradients differentiate the
# fixed point, not the iterations (see WassersteinFunction): the envelope theorem for
# entropic=True; for entropic=False the plan is re-formed and differentiated
# implicitly in PyTorch (reference.ot_cost_grads, shared with the cpu backend; not
# fused). `sinkhorn` saves its plan (compute dtype) and uses the same implicit
# solve (reference.fixed_point_grads); backend="reference" differentiates the
# unrolled iterations, which agrees at convergence.
#
# Precision: float32 compute for float16 / bfloat16 / float32 inputs, float64 for
# float64 (Triton's fp64 exp / log, on GPU and in the interpreter).
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.cost_sensitive import (TOL_EVERY, _safe_log, centred, compute_dtype,
                                        fixed_point_grads, ot_cost_grads)
from ..reference import cost_sensitive as _ref
from ..reference.reduction import reduce_loss
from ..autograd_guard import first_order

# the largest class count a program handles; its [BLOCK_K] vectors (G, the column
# statistics) stay in registers, the cost streams in [BLOCK_I, BLOCK_K] tiles
MAX_K = 1024


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------ kernels

@triton.jit
def _lse_last(x):
    """log-sum-exp over the last axis of a 3-D tile, -inf for an all -inf line."""
    mx = tl.max(x, axis=2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(x - mx[:, :, None]), axis=2))


@triton.jit
def _lse_mid(x):
    mx = tl.max(x, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.sum(tl.exp(x - mx[:, None, :]), axis=1))


@triton.jit
def _sinkhorn_tile_kernel(
    cs_ptr,        # C / eps, [N, K, K] or [K, K] (stride_cn = 0), contiguous rows
    loga_ptr,      # log a [N, K] (-inf at zeros)
    logb_ptr,      # log b [N, K]
    a_ptr,         # a [N, K], for the row error
    f_ptr,         # F [N, K], written
    g_ptr,         # G [N, K], read (the start) and written
    err_ptr,       # [N] row error after the last iteration (COMPUTE_ERR)
    stride_cn,     # cost stride over N: K*K, or 0 for a shared cost
    N,
    K,
    n_steps,       # iterations this launch
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPUTE_ERR: tl.constexpr,
):
    # BLOCK_N samples, each one whole [BLOCK_K, BLOCK_K] cost tile in registers for
    # every iteration; F and G never leave registers inside the loop
    samples = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    smask = samples < N
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    m2 = smask[:, None] & kmask[None, :]
    m3 = m2[:, :, None] & kmask[None, None, :]
    vec = samples[:, None] * K + ks[None, :]
    cs = tl.load(cs_ptr + samples[:, None, None] * stride_cn + ks[None, :, None] * K
                 + ks[None, None, :], mask=m3, other=0.0)
    # padding samples solve a uniform dummy problem, so no line is -inf alone
    pad = (~smask[:, None]) & kmask[None, :]
    log_a = tl.where(pad, 0.0, tl.load(loga_ptr + vec, mask=m2, other=float("-inf")))
    log_b = tl.where(pad, 0.0, tl.load(logb_ptr + vec, mask=m2, other=float("-inf")))
    g = tl.where(pad, 0.0, tl.load(g_ptr + vec, mask=m2, other=float("-inf")))
    f = log_a
    # no masks inside the loop: padded rows and columns see a zero cost and carry
    # F, G = -inf from log 0, so they add exp(-inf) = 0 to every real line while
    # their own lines stay finite (no -inf - -inf)
    for _ in range(n_steps):
        f = log_a - _lse_last(g[:, None, :] - cs)
        g = log_b - _lse_mid(f[:, :, None] - cs)
    tl.store(f_ptr + vec, f, mask=m2)
    tl.store(g_ptr + vec, g, mask=m2)
    if COMPUTE_ERR:
        a = tl.load(a_ptr + vec, mask=m2, other=0.0)
        err = tl.where(m2, tl.abs(tl.exp(f + _lse_last(g[:, None, :] - cs)) - a), 0.0)
        tl.store(err_ptr + samples, tl.sum(err, axis=1), mask=smask)


@triton.jit
def _sinkhorn_iter_kernel(
    cs_ptr,        # C / eps, [N, K, K] or [K, K] (stride_cn = 0), contiguous rows
    loga_ptr,      # log a [N, K] (-inf at zeros)
    logb_ptr,      # log b [N, K]
    a_ptr,         # a [N, K], for the row error
    f_ptr,         # F [N, K], read-write
    g_ptr,         # G [N, K], read-write (the iteration starts from it)
    err_ptr,       # [N] row error after the last iteration (COMPUTE_ERR)
    stride_cn,     # cost stride over N: K*K, or 0 for a shared cost
    K,             # classes
    n_steps,       # iterations this launch
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    COMPUTE_ERR: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    cs_base = cs_ptr + n * stride_cn
    vec = n * K
    log_b = tl.load(logb_ptr + vec + cols, mask=cmask, other=float("-inf"))
    for _ in range(n_steps):
        # F_i = log a_i - lse_j (G_j - C_ij / eps)
        g = tl.load(g_ptr + vec + cols, mask=cmask, other=float("-inf"))
        for i0 in range(0, K, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            rmask = rows < K
            m2 = rmask[:, None] & cmask[None, :]
            cs = tl.load(cs_base + rows[:, None] * K + cols[None, :], mask=m2, other=0.0)
            x = g[None, :] - cs
            mx = tl.max(x, axis=1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            lse = mx + tl.log(tl.sum(tl.exp(x - mx[:, None]), axis=1))
            log_a = tl.load(loga_ptr + vec + rows, mask=rmask, other=float("-inf"))
            tl.store(f_ptr + vec + rows, log_a - lse, mask=rmask)
        tl.debug_barrier()
        # G_j = log b_j - lse_i (F_i - C_ij / eps), online over the row tiles
        run_m = tl.full([BLOCK_K], float("-inf"), g.dtype)
        run_s = tl.zeros([BLOCK_K], g.dtype)
        for i0 in range(0, K, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            rmask = rows < K
            m2 = rmask[:, None] & cmask[None, :]
            cs = tl.load(cs_base + rows[:, None] * K + cols[None, :], mask=m2, other=0.0)
            f = tl.load(f_ptr + vec + rows, mask=rmask, other=float("-inf"))
            x = f[:, None] - cs
            new_m = tl.maximum(run_m, tl.max(x, axis=0))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            run_s = run_s * tl.exp(run_m - safe_m) + tl.sum(tl.exp(x - safe_m[None, :]), axis=0)
            run_m = new_m
        safe_m = tl.where(run_m == float("-inf"), 0.0, run_m)
        tl.store(g_ptr + vec + cols, log_b - (safe_m + tl.log(run_s)), mask=cmask)
        tl.debug_barrier()
    if COMPUTE_ERR:
        # sum_i |exp(F_i + lse_j (G_j - C_ij / eps)) - a_i|, the reference's check
        g = tl.load(g_ptr + vec + cols, mask=cmask, other=float("-inf"))
        err = tl.zeros([BLOCK_I], g.dtype)
        for i0 in range(0, K, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            rmask = rows < K
            m2 = rmask[:, None] & cmask[None, :]
            cs = tl.load(cs_base + rows[:, None] * K + cols[None, :], mask=m2, other=0.0)
            x = g[None, :] - cs
            mx = tl.max(x, axis=1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            lse = mx + tl.log(tl.sum(tl.exp(x - mx[:, None]), axis=1))
            f = tl.load(f_ptr + vec + rows, mask=rmask, other=float("-inf"))
            a = tl.load(a_ptr + vec + rows, mask=rmask, other=0.0)
            err += tl.where(rmask, tl.abs(tl.exp(f + lse) - a), 0.0)
        tl.store(err_ptr + n, tl.sum(err, axis=0))


@triton.jit
def _plan_kernel(
    cs_ptr,        # C / eps, as above
    c_ptr,         # C in the compute dtype, same layout as cs (LOSS)
    f_ptr,         # F [N, K]
    g_ptr,         # G [N, K]
    empty_ptr,     # [N] int8, 1: a or b all zero, the plan is 0
    plan_ptr,      # [N, K, K] plan out (WRITE_PLAN)
    loss_ptr,      # [N] <T, C> (+ eps sum T (log T - 1) when ENTROPIC) out (LOSS)
    stride_cn,
    K,
    eps,           # 1-element tensor in the compute dtype (LOSS and ENTROPIC)
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    WRITE_PLAN: tl.constexpr,
    LOSS: tl.constexpr,
    ENTROPIC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    vec = n * K
    keep = tl.load(empty_ptr + n) == 0
    g = tl.load(g_ptr + vec + cols, mask=cmask, other=float("-inf"))
    acc = tl.zeros([BLOCK_I], g.dtype)
    for i0 in range(0, K, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        rmask = rows < K
        m2 = rmask[:, None] & cmask[None, :]
        off = rows[:, None] * K + cols[None, :]
        cs = tl.load(cs_ptr + n * stride_cn + off, mask=m2, other=0.0)
        f = tl.load(f_ptr + vec + rows, mask=rmask, other=float("-inf"))
        log_t = f[:, None] + g[None, :] - cs
        log_t = tl.where(m2 & keep, log_t, float("-inf"))
        t = tl.exp(log_t)
        if WRITE_PLAN:
            tl.store(plan_ptr + n * K * K + off, t, mask=m2)
        if LOSS:
            c = tl.load(c_ptr + n * stride_cn + off, mask=m2, other=0.0)
            term = t * c
            if ENTROPIC:
                # 0 log 0 = 0: -inf entries are exact zeros of the plan
                nz = log_t > float("-inf")
                e = tl.load(eps)
                term += tl.where(nz, e * (t * (tl.where(nz, log_t, 0.0) - 1.0)), 0.0)
            acc += tl.sum(tl.where(m2, term, 0.0), axis=1)
    if LOSS:
        tl.store(loss_ptr + n, tl.sum(acc, axis=0))


# ---------------------------------------------------------------- launchers

# classes up to which the whole cost tile of a sample stays in registers (the tile
# kernel); above it the cost streams in row tiles (the streaming kernel). The
# interpreter takes the tile kernel up to MAX_K: numpy runs big tiles cheaply.
TILE_MAX_K = 64
# values in one register tile: [BLOCK_N, BLOCK_K, BLOCK_K] or [BLOCK_I, BLOCK_K]
_TILE_VALUES = 4096
_INTERPRET_TILE_VALUES = 2 ** 18


class Blocks:
    """stream: which kernel; n: samples per program (tile kernel); k: the padded
    class count; i: rows per streamed tile (streaming kernel)."""

    def __init__(self, K: int, N: int, stream: Optional[bool] = None,
                 block_i: Optional[int] = None):
        self.k = max(2, triton.next_power_of_2(K))
        if self.k > MAX_K:
            raise ValueError(f"the triton Sinkhorn handles at most {MAX_K} classes, got {K}; "
                             "use backend='reference'")
        interp = _interpreted()
        self.stream = (self.k > TILE_MAX_K and not interp) if stream is None else stream
        budget = _INTERPRET_TILE_VALUES if interp else _TILE_VALUES
        per_sample = self.k * self.k
        self.n = max(1, min(triton.next_power_of_2(max(N, 1)), budget // per_sample))
        self.i = block_i or max(1, min(self.k, budget // self.k))
        self.num_warps = 1 if interp else 4 if self.k <= 64 else 8


class Solved:
    """One batch of Sinkhorn solves: potentials and what the plan kernel needs."""

    def __init__(self, a, b, cost, eps, n_iter, tol, blocks: Optional[Blocks] = None):
        dt = compute_dtype(torch.promote_types(a.dtype, b.dtype))
        a, b = a.to(dt), b.to(dt)
        n, k = a.shape
        self.n, self.k, self.dtype, self.eps = n, k, dt, eps
        self.c = cost.to(dt).contiguous()
        self.cs = (self.c / eps).contiguous()        # the reference's rounding of C / eps
        self.stride_cn = k * k if self.c.dim() == 3 else 0
        self.empty = ((a > 0).sum(1) == 0) | ((b > 0).sum(1) == 0)
        a = torch.where(self.empty[:, None], torch.ones_like(a), a).contiguous()
        b = torch.where(self.empty[:, None], torch.ones_like(b), b).contiguous()
        self.f = torch.zeros_like(a)
        self.g = torch.zeros_like(b)
        self.blocks = bl = blocks or Blocks(k, n)
        if n == 0:
            return
        log_a, log_b = _safe_log(a).contiguous(), _safe_log(b).contiguous()
        err = torch.empty(n, dtype=dt, device=a.device)

        def launch(steps, compute_err):
            if bl.stream:
                _sinkhorn_iter_kernel[(n,)](
                    self.cs, log_a, log_b, a, self.f, self.g, err, self.stride_cn, k, steps,
                    BLOCK_K=bl.k, BLOCK_I=bl.i, COMPUTE_ERR=compute_err,
                    num_warps=bl.num_warps)
            else:
                _sinkhorn_tile_kernel[(triton.cdiv(n, bl.n),)](
                    self.cs, log_a, log_b, a, self.f, self.g, err, self.stride_cn, n, k, steps,
                    BLOCK_N=bl.n, BLOCK_K=bl.k, COMPUTE_ERR=compute_err,
                    num_warps=bl.num_warps)

        if tol is None:
            launch(n_iter, False)
            return
        done = 0
        while done < n_iter:
            steps = min(TOL_EVERY, n_iter - done)
            done += steps
            check = done < n_iter
            launch(steps, check)
            if check and float(err.max()) < tol:
                break

    def plan_and_loss(self, write_plan: bool, loss: bool, entropic: bool = False):
        n, k = self.n, self.k
        dev = self.f.device
        plan = torch.empty(n, k, k, dtype=self.dtype, device=dev) if write_plan else self.f
        per = torch.empty(n, dtype=self.dtype, device=dev) if loss else self.f
        if n == 0:
            return plan, per
        eps_t = torch.full((1,), self.eps, dtype=self.dtype, device=dev)
        _plan_kernel[(n,)](
            self.cs, self.c, self.f, self.g, self.empty.to(torch.int8), plan, per,
            self.stride_cn, k, eps_t, BLOCK_K=self.blocks.k, BLOCK_I=self.blocks.i,
            WRITE_PLAN=write_plan, LOSS=loss, ENTROPIC=entropic,
            num_warps=self.blocks.num_warps)
        return plan, per


# ----------------------------------------------------------- autograd Functions

class SinkhornFunction(torch.autograd.Function):
    """Plans from the fused iterations; gradients of the fixed point (see
    fixed_point_grads), not of the unrolled iterations: they equal the
    reference's at convergence (a and b up to a constant per sample)."""

    @staticmethod
    def forward(ctx, a, b, cost, eps, n_iter, tol):
        out_dtype = torch.promote_types(a.dtype, b.dtype)
        plan, _ = Solved(a, b, cost, eps, n_iter, tol).plan_and_loss(True, False)
        ctx.eps, ctx.dtypes, ctx.cost_shape = eps, (a.dtype, b.dtype, cost.dtype), cost.shape
        ctx.save_for_backward(plan)
        return plan.to(out_dtype)

    @staticmethod
    @first_order("sinkhorn (triton backend)")
    def backward(ctx, grad_plan):
        plan, = ctx.saved_tensors
        ga, gb, gc = fixed_point_grads(plan, grad_plan.to(plan.dtype), ctx.eps)
        if len(ctx.cost_shape) == 2:
            gc = gc.sum(0)
        da, db, dc = ctx.dtypes
        return ga.to(da), gb.to(db), gc.to(dc), None, None, None


class WassersteinFunction(torch.autograd.Function):
    """Per-sample <T, C> (plus eps sum T (log T - 1) when entropic) between
    h = softmax(z), the plan's rows, and the target, its columns; T from the fused
    Sinkhorn.

    Backward, entropic=True (envelope theorem, at the solved potentials): the
    entropic OT value W(h, t, C) = min_T <T, C> + eps sum T (log T - 1) has
    dW/dh = f, dW/dt = g, dW/dC = T, with f = eps F, g = eps G the dual potentials,
    returned centred over their supports (the softmax Jacobian removes constants
    anyway; only the simplex-tangent part of dW/dt is defined); g is 0 where t = 0.
    entropic=False: <T, C> is not the optimum of its own objective, so the envelope
    theorem does not apply; the exact gradient comes from implicit differentiation
    of the fixed point on the [N, K, K] plan (reference.ot_cost_grads, in PyTorch
    after the kernel, the cpu backend's helper), d/dt centred the same way.
    Either way dz = h * (d/dh - <h, d/dh>).
    """

    @staticmethod
    def forward(ctx, logits, target, cost, eps, n_iter, tol, entropic):
        dt = compute_dtype(logits.dtype)
        logh = torch.log_softmax(logits.to(dt), dim=1)
        h = torch.exp(logh)
        s = Solved(h, target.to(dt), cost, eps, n_iter, tol)
        _, per = s.plan_and_loss(False, True, entropic)
        ctx.solved, ctx.entropic = s, entropic
        ctx.cost_shape, ctx.cost_dtype = cost.shape, cost.dtype
        ctx.target_dtype, ctx.logits_dtype = target.dtype, logits.dtype
        ctx.save_for_backward(h, target)
        return per

    @staticmethod
    @first_order("wasserstein_loss (triton backend)")
    def backward(ctx, grad_per):
        s = ctx.solved
        h, target = ctx.saved_tensors
        go = grad_per.to(s.dtype)
        live = (~s.empty).to(s.dtype)
        need_z, need_t, need_c = ctx.needs_input_grad[:3]
        gz = gt = gc = None
        if not (need_z or need_t or need_c):
            return gz, gt, gc, None, None, None, None
        if ctx.entropic:
            dh, dt = s.eps * s.f, s.eps * s.g
            dc = s.plan_and_loss(True, False)[0] if need_c else None
        else:
            plan, _ = s.plan_and_loss(True, False)
            dh, dt, dc = ot_cost_grads(plan, s.c, s.eps)
        if need_z:
            f = centred(dh, h > 0)
            gz = (go * live)[:, None] * h * (f - (h * f).sum(1, keepdim=True))
            gz = gz.to(ctx.logits_dtype)
        if need_t:
            gt = ((go * live)[:, None] * centred(dt, target > 0)).to(ctx.target_dtype)
        if need_c:
            gc = go[:, None, None] * dc
            if len(ctx.cost_shape) == 2:
                gc = gc.sum(0)
            gc = gc.to(ctx.cost_dtype)
        return gz, gt, gc, None, None, None, None


# ------------------------------------------------------------- public entry points

def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float = 0.1,
             n_iter: int = 100, tol: Optional[float] = None) -> torch.Tensor:
    """Entropic OT plans [N, K, K] (rows follow a, columns follow b), log domain."""
    return SinkhornFunction.apply(a, b, cost, float(eps), int(n_iter), tol)


def wasserstein_loss(logits: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, *,
                     eps: float = 0.1, n_iter: int = 100, entropic: bool = False,
                     tol: Optional[float] = None, ignore_index: int = -100,
                     reduction: str = "mean") -> torch.Tensor:
    """<T, C> (plus eps * sum T (log T - 1), i.e. minus eps*H(T), when `entropic`)
    between h = softmax(logits), the plan's rows, and the target (labels [N] or
    distributions [N, K]), the columns."""
    if target.dim() == 1:
        # one plan only has a one-hot column marginal: the reference's closed form
        return _ref.wasserstein_loss(logits, target, cost, eps=eps, n_iter=n_iter,
                                     entropic=entropic, tol=tol, ignore_index=ignore_index,
                                     reduction=reduction)
    per = WassersteinFunction.apply(logits, target, cost, float(eps), int(n_iter), tol,
                                    bool(entropic))
    return reduce_loss(per, torch.ones_like(per), reduction)
