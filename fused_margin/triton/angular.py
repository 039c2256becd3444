# Fused margin softmax cross-entropy (every kind of API.md, section 1), Triton.
#
# Computes loss_i = w_i * (logsumexp_j z_ij - z_iy), z_ij = s*cos_ij (arcgrad:
# -s*theta_ij) off the target, the kind's target transform at the target, with
# cos_ij = rx_i * rw_j * <x_i, W_j> and rx, rw the per-row inverse norms (0 for
# rows of norm <= NORM_EPS), as fused_margin.reference.angular does.
#
# Tiling. Forward: one program per BLOCK_N rows sweeps the classes in BLOCK_C
# tiles; each logit tile is tl.dot over D in BLOCK_D chunks, scaled by rx, rw
# (never a normalised copy of W). An online log-sum-exp runs over the non-target
# columns; the target cosine (and elm's c*, the first argmax of the wrong-class
# cosines) is picked up in the same sweep, and the target logit is added to the
# log-sum-exp once the sweep ends (elm's needs m[c*], known only then).
# Backward: recompute each cosine tile and form the gradient tile
#   g_ij = a_i * (p_ij * dz_ij/dcos_ij)        off the target,
#   g_iy = a_i * (p_iy - 1) * dz_iy/dcos_iy     at the target,
# a_i = class weight * grad_output scale; then dL/dx = rx*(G - rowsum(g*cos) x_hat),
# G = g @ (rw*W), in one kernel over (row block, D chunk), and dL/dW likewise in
# one over (class block, D chunk): no atomics, and the row / column sums of g*cos
# come out of the same sweeps. Each D chunk's program recomputes the logit tiles,
# so D <= Blocks.do (256 on a GPU) costs one recompute per backward kernel and
# D = 512 two. The from_cosine form runs the same kernels with the cosine tile
# loaded instead of computed, and writes g itself.
#
# PARTIALS mode (fused_margin.distributed's per-shard statistics): the same forward
# sweep with each row's target column in [-1, C) for its label, an optional per-class
# logit offset, a sampled shard's kept rows read through their index (HAS_KEEP: column
# j is W's row keep[j]; the dW kernel writes those rows of a zero gradient), and the
# best wrong column tracked for every row; it stores the row
# max, sum of exp, target cosine and best wrong cosine and stops there (the target
# logit is formed outside, from O(N) values). Its backward is the two gradient
# kernels with lse = the row shift, a = dL/dsum_exp and b = dL/dcos_y.
#
# Saved for backward: the inputs, rx [N], rw [C] and per-row statistics [N_STATS, N]
# (loss, class weight, lse, g_iy / a_i, target cosine, lse of the non-target
# logits; elm's c* only enters through lse and g_iy): O(N + C), no N x C buffer
# anywhere (except the from_cosine form's own input and gradient, which are
# N x C by definition).
#
# Precision: float32 accumulation (float64 for float64 inputs). float16 / bfloat16
# tiles go to tl.dot as they are; the gradient tile is split into hi + lo parts in
# the input dtype for the two backward products (two MMAs instead of one, but ~16
# bits of g instead of 8), and the row / column sums of g*cos use the same rounded
# g, so the radial part of the normalisation Jacobian cancels exactly. float32
# tiles use IEEE products unless torch allows TF32 matmuls. The inverse norms are
# accumulated in float64 and rounded once (cosines near +-1 feed 1/sin(theta)).
# The interpreter has no libdevice, so arccos is Cephes' asinf polynomial with the
# usual range reduction (~1 ulp in float32) plus one Newton step in float64; and it
# multiplies bfloat16 tiles as raw uint16, so there (only) they are upcast first.
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..reference.angular import COS_EPS, NORM_EPS, adacos_scale_from_stats, combined_fallback
from ..reference.sharded import ShardPartials, partials_around
from ..autograd_guard import first_order

KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm", "arcgrad")
# the kernels' KIND is the index in KINDS (kernels read globals only as tl.constexpr)
NORMFACE, ARCFACE, COSFACE, SPHEREFACE, COMBINED, LDAM, ELM, ARCGRAD = (
    tl.constexpr(i) for i in range(len(KINDS)))

# rows of the per-row statistics tensor [N_STATS, N]
ST_LOSS, ST_W, ST_LSE, ST_DTGT, ST_COSY, ST_LSE_OTHER = range(6)
N_STATS = 6
_ST_LOSS, _ST_W, _ST_LSE, _ST_DTGT, _ST_COSY, _ST_LSE_OTHER = (tl.constexpr(i) for i in range(6))
# ... and in PARTIALS mode (a class shard of fused_margin.distributed): the non-target
# row max, the sum of exp(logit - max) (max 0 where it is -inf), the target cosine, the
# best wrong cosine (its column goes to the c* output)
PT_MAX, PT_SUM, PT_COSY, PT_WRONG = range(4)
_PT_MAX, _PT_SUM, _PT_COSY, _PT_WRONG = (tl.constexpr(i) for i in range(4))
# entries of the scalar parameter tensor, in the compute dtype (exact for float64)
PARAMS = ("s", "m", "m1", "m2", "m3", "elm_lambda", "th", "offset", "lo", "hi", "pi")
P_S, P_M, P_M1, P_M2, P_M3, P_LAM, P_TH, P_OFF, P_LO, P_HI, P_PI = (
    tl.constexpr(i) for i in range(len(PARAMS)))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------ device helpers

@triton.jit
def _acos(c, IS_F64: tl.constexpr):
    """arccos on [-1, 1]: asin(r) by Cephes' asinf polynomial, r = |c| below 1/2,
    else sqrt((1 - |c|)/2) with acos(|c|) = 2*asin(r)."""
    a = tl.abs(c)
    big = a > 0.5
    z = tl.where(big, 0.5 * (1.0 - a), a * a)
    r = tl.where(big, tl.sqrt(z), a)
    p = ((((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z
          + 7.4953002686e-2) * z + 1.6666752422e-1) * z * r + r
    acos_a = tl.where(big, 2.0 * p, 1.5707963267948966 - p)
    th = tl.where(c < 0, 3.141592653589793 - acos_a, acos_a)
    if IS_F64:
        # one Newton step on cos(th) = c: float32-accurate start -> float64
        sn = tl.sin(th)
        th = th + tl.where(sn != 0, (tl.cos(th) - c) / tl.where(sn != 0, sn, 1.0), 0.0)
    return th


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bfloat16 tiles as their uint16 bits
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _grad_dot(g, b, acc, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              SPLIT: tl.constexpr):
    """acc + g @ b with g (ACC) rounded to b's dtype; SPLIT: as hi + lo, two products,
    so a 16-bit b keeps the gradient tile to ~16 bits. Returns (acc, g as used)."""
    hi = g.to(b.dtype)
    acc = _dot(hi, b, acc, ACC, PREC, UPCAST)
    used = hi.to(ACC)
    if SPLIT:
        lo = (g - used).to(b.dtype)
        acc = _dot(lo, b, acc, ACC, PREC, UPCAST)
        used = used + lo.to(ACC)
    return acc, used


@triton.jit
def _cos_tile(x_ptr, w_ptr, rows, wrows, rmask, cmask, stride_xn, stride_xd,
              stride_wc, stride_wd, D, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """x @ W.T on a [BLOCK_N, BLOCK_C] tile (column j: W's row wrows[j]), summed over
    D in BLOCK_D chunks; the caller scales by rx, rw (the backward needs the
    unscaled products too)."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = dd < D
        a = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(w_ptr + wrows[:, None] * stride_wc + dd[None, :] * stride_wd,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, ACC, PREC, UPCAST)
    return acc


@triton.jit
def _load_cos(cos_ptr, rows, cols, rmask, cmask, stride_n, stride_c, ACC: tl.constexpr):
    c = tl.load(cos_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c,
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    return c.to(ACC)


@triton.jit
def _nontarget(cos, s, lo, hi, KIND: tl.constexpr, IS_F64: tl.constexpr):
    """(logit, d logit / d cos) of every non-target column."""
    if KIND == ARCGRAD:  # -s*theta, cosine clamped torch.clamp style
        c = tl.minimum(tl.maximum(cos, lo), hi)
        z = -s * _acos(c, IS_F64)
        dz = tl.where((cos >= lo) & (cos <= hi), s / tl.sqrt(1.0 - c * c), 0.0)
    else:
        z = s * cos
        dz = tl.zeros_like(cos) + s
    return z, dz


@triton.jit
def _target(cos_y, m_y, p_ptr, KIND: tl.constexpr, IS_F64: tl.constexpr):
    """(t, dt/dcos) per row: the target logit over s (before elm's extra term)."""
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    pi = tl.load(p_ptr + P_PI)
    one = tl.zeros_like(cos_y) + 1.0
    if KIND == NORMFACE:
        t = cos_y
        dt = one
    elif KIND == COSFACE or KIND == LDAM or KIND == ELM:
        t = cos_y - m_y
        dt = one
    else:
        c = tl.minimum(tl.maximum(cos_y, lo), hi)
        inside = (cos_y >= lo) & (cos_y <= hi)
        sin = tl.sqrt(1.0 - c * c)
        if KIND == ARCFACE:  # insightface's fallback past pi - m
            cm = tl.cos(m_y)
            sm = tl.sin(m_y)
            on = c > tl.cos(pi - m_y)
            t = tl.where(on, c * cm - sin * sm, c - m_y * sm)
            dt = tl.where(on, cm + c * sm / sin, one)
        elif KIND == SPHEREFACE:  # psi, k = floor(m*theta/pi) held fixed
            th = _acos(c, IS_F64)
            k = tl.floor(m_y * th / pi)
            sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k * 0.5))
            t = sign * tl.cos(m_y * th) - 2.0 * k
            dt = sign * m_y * tl.sin(m_y * th) / sin
        elif KIND == COMBINED:  # fallback (threshold, offset) from the host
            m1 = tl.load(p_ptr + P_M1)
            m2 = tl.load(p_ptr + P_M2)
            m3 = tl.load(p_ptr + P_M3)
            thr = tl.load(p_ptr + P_TH)
            off = tl.load(p_ptr + P_OFF)
            ang = m1 * _acos(c, IS_F64) + m2
            on = c > thr
            t = tl.where(on, tl.cos(ang) - m3, c - m3 - off)
            dt = tl.where(on, m1 * tl.sin(ang) / sin, one)
        else:  # arcgrad: -theta
            t = -_acos(c, IS_F64)
            dt = one / sin
        dt = tl.where(inside, dt, 0.0)
    return t, dt


@triton.jit
def _row_info(labels_ptr, rows, rmask, stride_l, ignore_index):
    y = tl.load(labels_ptr + rows * stride_l, mask=rmask, other=ignore_index)
    valid = (y != ignore_index) & rmask
    # -1 never matches a column: ignored rows have no target column
    return valid, tl.where(valid, y, -1), tl.where(valid, y, 0)


@triton.jit
def _wrows(keep_ptr, cols, cmask, HAS_KEEP: tl.constexpr):
    """W's row of each column: keep[col] for a sampled shard (the kept classes are
    read in place, never gathered into a copy), else the column itself."""
    if HAS_KEEP:
        return tl.load(keep_ptr + cols, mask=cmask, other=0)
    else:
        return cols


@triton.jit
def _add_offset(z, off_ptr, cols, cmask, ACC: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """z plus the tile's per-class logit offsets (sampled shards' log 1/q); the
    loss itself (HAS_OFFSET off) does no work here."""
    if HAS_OFFSET:
        z = z + tl.load(off_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    return z


@triton.jit
def _grad_tile(cos, cols, cmask, y_col, lse, a, b, off_ptr, s, lo, hi, KIND: tl.constexpr,
               IS_F64: tl.constexpr, ACC: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """dL/dcos of a tile: a_i * exp(z_ij + off_j - lse_i) * dz_ij/dcos off the
    target, b_i (the caller's whole target term) at it."""
    z, dz = _nontarget(cos, s, lo, hi, KIND, IS_F64)
    z = _add_offset(z, off_ptr, cols, cmask, ACC, HAS_OFFSET)
    p = tl.exp(z - lse[:, None])
    is_t = cols[None, :] == y_col[:, None]
    g = tl.where(is_t, b[:, None], p * dz * a[:, None])
    return tl.where(cmask[None, :], g, 0.0)


# ------------------------------------------------------------------------ kernels

@triton.jit
def _inv_norm_kernel(x_ptr, out_ptr, N, D, stride_n, stride_d, eps2,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # float64 throughout, rounded once at the end: O(N*D) work beside the O(N*C*D)
    # products, and every cosine near +-1 (where theta's derivative explodes) is
    # then off by the product's rounding alone
    sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        v = tl.load(x_ptr + rows[:, None] * stride_n + dd[None, :] * stride_d,
                    mask=rmask[:, None] & (dd < D)[None, :], other=0.0).to(tl.float64)
        sq += tl.sum(v * v, axis=1)
    big = sq > eps2
    r = tl.where(big, 1.0 / tl.sqrt(tl.where(big, sq, 1.0)), 0.0)
    tl.store(out_ptr + rows, r.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _margin_ce_fwd_kernel(
        x_ptr, w_ptr, rx_ptr, rw_ptr,  # features [N, D], weight [C, D], inverse norms
        # (FROM_COSINE: x_ptr is the cosine [N, C], the rest unused)
        labels_ptr, m_ptr, cw_ptr, p_ptr,  # labels [N], margins [C], class weights [C], scalars
        off_ptr,  # HAS_OFFSET: per-class logit offsets [C] (non-target logits only)
        keep_ptr,  # HAS_KEEP: W's row [C] int64 of each column (a sampled shard)
        stats_ptr, cstar_ptr,  # out: statistics [N_STATS, N], elm's c* [N] int64
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l,
        N, C, D, ignore_index,
        KIND: tl.constexpr, FROM_COSINE: tl.constexpr, HAS_M_VEC: tl.constexpr,
        HAS_CLASS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_KEEP: tl.constexpr,
        PARTIALS: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    valid, y_col, y = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
    s = tl.load(p_ptr + P_S)
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    if not FROM_COSINE:
        rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)

    m_run = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_run = tl.zeros((BLOCK_N,), dtype=ACC)
    cos_y = tl.zeros((BLOCK_N,), dtype=ACC)
    best = tl.full((BLOCK_N,), float("-inf"), ACC)
    c_star = tl.full((BLOCK_N,), -1, tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        if FROM_COSINE:
            cos = _load_cos(x_ptr, rows, cols, rmask, cmask, stride_xn, stride_xd, ACC)
        else:
            rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
            cos = _cos_tile(x_ptr, w_ptr, rows, _wrows(keep_ptr, cols, cmask, HAS_KEEP), rmask,
                            cmask, stride_xn, stride_xd,
                            stride_wc, stride_wd, D, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PREC,
                            UPCAST) * rx[:, None] * rw[None, :]
        is_t = cols[None, :] == y_col[:, None]
        cos_y += tl.sum(tl.where(is_t, cos, 0.0), axis=1)
        z, _ = _nontarget(cos, s, lo, hi, KIND, IS_F64)
        z = _add_offset(z, off_ptr, cols, cmask, ACC, HAS_OFFSET)
        off = is_t | (~cmask)[None, :]
        z = tl.where(off, float("-inf"), z)
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m_run = m_new
        if KIND == ELM or PARTIALS:  # the first argmax of the wrong-class cosines
            others = tl.where(off, float("-inf"), cos)
            t_max = tl.max(others, axis=1)
            t_idx = tl.min(tl.where(others == t_max[:, None], cols[None, :], C), axis=1)
            take = t_max > best  # strict: an earlier tile keeps the tie
            best = tl.where(take, t_max, best)
            c_star = tl.where(take, t_idx, c_star)

    if PARTIALS:  # a class shard's statistics; the target logit is formed outside
        tl.store(stats_ptr + _PT_MAX * N + rows, m_run, mask=rmask)
        tl.store(stats_ptr + _PT_SUM * N + rows, l_run, mask=rmask)
        tl.store(stats_ptr + _PT_COSY * N + rows, cos_y, mask=rmask)
        tl.store(stats_ptr + _PT_WRONG * N + rows, best, mask=rmask)
        tl.store(cstar_ptr + rows, c_star, mask=rmask)
    else:
        if HAS_M_VEC:
            m_y = tl.load(m_ptr + y, mask=rmask, other=0.0).to(ACC)
        else:
            m_y = tl.zeros((BLOCK_N,), dtype=ACC) + tl.load(p_ptr + P_M)
        t, dt = _target(cos_y, m_y, p_ptr, KIND, IS_F64)
        if KIND == ELM:
            lam = tl.load(p_ptr + P_LAM)
            has = c_star >= 0
            if HAS_M_VEC:
                m_c = tl.load(m_ptr + tl.where(has, c_star, 0), mask=rmask, other=0.0).to(ACC)
            else:
                m_c = tl.zeros((BLOCK_N,), dtype=ACC) + tl.load(p_ptr + P_M)
            t = t + tl.where(has, lam * m_c, 0.0)
        z_y = s * t
        top = tl.maximum(m_run, z_y)
        lse = top + tl.log(l_run * tl.exp(m_run - top) + tl.exp(z_y - top))
        lse_other = tl.where(l_run > 0, m_run + tl.log(tl.where(l_run > 0, l_run, 1.0)),
                             float("-inf"))
        if HAS_CLASS_WEIGHT:
            w = tl.load(cw_ptr + y, mask=rmask, other=0.0).to(ACC)
        else:
            w = tl.zeros((BLOCK_N,), dtype=ACC) + 1.0
        w = tl.where(valid, w, 0.0)
        loss = tl.where(valid, w * (lse - z_y), 0.0)
        dtgt = (tl.exp(z_y - lse) - 1.0) * s * dt

        tl.store(stats_ptr + _ST_LOSS * N + rows, loss, mask=rmask)
        tl.store(stats_ptr + _ST_W * N + rows, w, mask=rmask)
        tl.store(stats_ptr + _ST_LSE * N + rows, lse, mask=rmask)
        tl.store(stats_ptr + _ST_DTGT * N + rows, dtgt, mask=rmask)
        tl.store(stats_ptr + _ST_COSY * N + rows, cos_y, mask=rmask)
        tl.store(stats_ptr + _ST_LSE_OTHER * N + rows, lse_other, mask=rmask)
        tl.store(cstar_ptr + rows, c_star, mask=rmask)


@triton.jit
def _margin_ce_bwd_dx_kernel(
        x_ptr, w_ptr, rx_ptr, rw_ptr,  # as forward (x_ptr is the cosine for FROM_COSINE)
        labels_ptr, p_ptr, off_ptr,  # labels, scalars, logit offsets [C] (HAS_OFFSET)
        keep_ptr,  # HAS_KEEP: W's row of each column
        lse_ptr, a_ptr, b_ptr,  # per row [N]: lse, a (softmax scale), b (target term)
        dx_ptr,  # out: dL/dx [N, D] (dL/dcos [N, C] for FROM_COSINE), contiguous
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l,
        N, C, D, ignore_index,
        KIND: tl.constexpr, FROM_COSINE: tl.constexpr, HAS_OFFSET: tl.constexpr,
        HAS_KEEP: tl.constexpr, IS_F64: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DO: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dout = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = dout < D
    _, y_col, _ = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
    s = tl.load(p_ptr + P_S)
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
    if not FROM_COSINE:
        rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    row_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        if FROM_COSINE:
            cos = _load_cos(x_ptr, rows, cols, rmask, cmask, stride_xn, stride_xd, ACC)
            g = _grad_tile(cos, cols, cmask, y_col, lse, a, b, off_ptr, s, lo, hi, KIND, IS_F64,
                           ACC, HAS_OFFSET)
            tl.store(dx_ptr + rows[:, None] * C + cols[None, :],
                     g.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        else:
            rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
            wrows = _wrows(keep_ptr, cols, cmask, HAS_KEEP)
            xw = _cos_tile(x_ptr, w_ptr, rows, wrows, rmask, cmask, stride_xn, stride_xd,
                           stride_wc, stride_wd, D, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PREC,
                           UPCAST) * rx[:, None]
            g = _grad_tile(xw * rw[None, :], cols, cmask, y_col, lse, a, b, off_ptr, s, lo, hi,
                           KIND, IS_F64, ACC, HAS_OFFSET)
            wt = tl.load(w_ptr + wrows[:, None] * stride_wc + dout[None, :] * stride_wd,
                         mask=cmask[:, None] & omask[None, :], other=0.0)
            acc, gw = _grad_dot(g * rw[None, :], wt, acc, ACC, PREC, UPCAST, SPLIT)
            # x_hat . G from the same rounded gw that G is made of, so that the radial
            # part cancels exactly in reduced precision too
            row_sum += tl.sum(gw * xw, axis=1)
    if not FROM_COSINE:
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + dout[None, :] * stride_xd,
                     mask=rmask[:, None] & omask[None, :], other=0.0).to(ACC)
        dx = rx[:, None] * (acc - row_sum[:, None] * xt * rx[:, None])
        tl.store(dx_ptr + rows[:, None] * D + dout[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & omask[None, :])


@triton.jit
def _margin_ce_bwd_dw_kernel(
        x_ptr, w_ptr, rx_ptr, rw_ptr, labels_ptr, p_ptr, off_ptr, keep_ptr,  # as dx's
        lse_ptr, a_ptr, b_ptr,
        dw_ptr,  # out: dL/dW [C, D] (HAS_KEEP: W's rows, the kept ones written), contiguous
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l,
        N, C, D, ignore_index,
        KIND: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_KEEP: tl.constexpr,
        IS_F64: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    dout = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    omask = dout < D
    s = tl.load(p_ptr + P_S)
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
    wrows = _wrows(keep_ptr, cols, cmask, HAS_KEEP)
    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC)
    col_sum = tl.zeros((BLOCK_C,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        _, y_col, _ = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
        rx = tl.load(rx_ptr + rows, mask=rmask, other=0.0)
        xw = _cos_tile(x_ptr, w_ptr, rows, wrows, rmask, cmask, stride_xn, stride_xd,
                       stride_wc, stride_wd, D, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PREC,
                       UPCAST) * rw[None, :]
        g = _grad_tile(xw * rx[:, None], cols, cmask, y_col, lse, a, b, off_ptr, s, lo, hi,
                       KIND, IS_F64, ACC, HAS_OFFSET)
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + dout[None, :] * stride_xd,
                     mask=rmask[:, None] & omask[None, :], other=0.0)
        acc, gx = _grad_dot(tl.trans(g * rx[:, None]), xt, acc, ACC, PREC, UPCAST, SPLIT)
        col_sum += tl.sum(tl.trans(gx) * xw, axis=0)
    wt = tl.load(w_ptr + wrows[:, None] * stride_wc + dout[None, :] * stride_wd,
                 mask=cmask[:, None] & omask[None, :], other=0.0).to(ACC)
    dw = rw[:, None] * (acc - col_sum[:, None] * wt * rw[:, None])
    tl.store(dw_ptr + wrows[:, None] * D + dout[None, :], dw.to(dw_ptr.dtype.element_ty),
             mask=cmask[:, None] & omask[None, :])


# ---------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class Blocks:
    """Tile sizes. Every kernel owns `outer` rows (dW: classes) per program and sweeps
    the other axis `sweep` at a time; the products step through D `d` at a time; the
    gradient programs each own `do` of D (their accumulator is outer x do, and a D
    above `do` means the logit tiles are recomputed once per D chunk)."""
    outer: int
    sweep: int
    d: int
    do: int
    num_warps: int = 4


def default_blocks(dtype: torch.dtype, D: int) -> Blocks:
    """Untuned (no GPU was at hand to time them), chosen so that the sm_90 builds
    do not spill registers (checked with cuobjdump -res-usage) and that N = 4096
    still gives 128 row programs."""
    do = max(16, min(256, triton.next_power_of_2(max(D, 1))))
    if _interpreted():
        # numpy underneath: few, larger steps are what is cheap
        return Blocks(outer=128, sweep=128, d=32, do=min(do, 64))
    if dtype == torch.float64:
        return Blocks(outer=32, sweep=32, d=16, do=min(do, 64), num_warps=4)
    if dtype == torch.float32:
        return Blocks(outer=32, sweep=32, d=32, do=do, num_warps=8)
    return Blocks(outer=32, sweep=64, d=64, do=do, num_warps=8)


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreted()


def _precision(dtype: torch.dtype) -> str:
    """float32 products follow torch's TF32 switch; 16-bit ones ignore the setting
    (MMA on bf16/fp16 tiles is exact in the float32 accumulator)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreted():
        return "tf32"
    return "ieee"


def row_inv_norm(x: torch.Tensor, block_n: int = 32, block_d: int = 32) -> torch.Tensor:
    """1/||x_i|| in the compute dtype, 0 for rows of norm <= NORM_EPS."""
    n, d = x.shape
    tdt = _acc(x.dtype)[1]
    out = torch.empty(n, dtype=tdt, device=x.device)
    if n:
        _inv_norm_kernel[(triton.cdiv(n, block_n),)](
            x, out, n, d, x.stride(0), x.stride(1), NORM_EPS * NORM_EPS,
            BLOCK_N=block_n, BLOCK_D=block_d)
    return out


@dataclass(frozen=True)
class MarginParams:
    """The scalar arguments of margin_cross_entropy (a per-class m travels as a tensor)."""
    kind: str
    s: float
    m: float  # the scalar margin; unused where m_vec is given
    m1: float
    m2: float
    m3: float
    elm_lambda: float
    ignore_index: int
    reduction: str
    blocks: Optional[Blocks] = None  # None: default_blocks
    # also return per-row (lse of the non-target logits, target cosine) from the
    # same sweep, for AdaCos's scale update
    with_stats: bool = False

    def tensor(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The scalars the kernels read, in PARAMS order, in the compute dtype."""
        th, off = combined_fallback(self.m1, self.m2) if self.kind == "combined" else (0.0, 0.0)
        vals = dict(s=self.s, m=self.m, m1=self.m1, m2=self.m2, m3=self.m3,
                    elm_lambda=self.elm_lambda, th=th, offset=off, lo=-1 + COS_EPS,
                    hi=1 - COS_EPS, pi=math.pi)
        return torch.tensor([float(vals[k]) for k in PARAMS], dtype=dtype, device=device)


@dataclass
class _Saved:
    kind: int
    params: torch.Tensor
    ignore_index: int
    blocks: Blocks
    rx: Optional[torch.Tensor]
    rw: Optional[torch.Tensor]
    stats: torch.Tensor


def margin_ce_fwd(features: torch.Tensor, weight: Optional[torch.Tensor], labels: torch.Tensor,
                  *, kind: str, params: torch.Tensor, m_vec: Optional[torch.Tensor],
                  class_weight: Optional[torch.Tensor], ignore_index: int,
                  blocks: Optional[Blocks] = None, offset: Optional[torch.Tensor] = None,
                  partials: bool = False, keep: Optional[torch.Tensor] = None):
    """Launch the forward sweep. `weight` None: `features` is the cosine [N, C].
    Returns (stats [N_STATS, N], c* [N] int64, rx, rw); with `partials` the
    stats rows are PT_* (a class shard's) and c* is the best wrong column of
    every row. `offset` [C] is added to the non-target logits. `keep` [C] int64:
    the columns are those rows of `weight` (read in place), and rw is theirs."""
    from_cos = weight is None
    N = features.shape[0]
    C = features.shape[1] if from_cos else (weight.shape[0] if keep is None else keep.numel())
    D = 0 if from_cos else features.shape[1]
    blocks = blocks or default_blocks(features.dtype, D)
    acc, tdt = _acc(features.dtype)
    dev = features.device
    stats = torch.empty(N_STATS, N, dtype=tdt, device=dev)
    c_star = torch.empty(N, dtype=torch.int64, device=dev)
    rx = rw = None
    if not from_cos:
        rx, rw = row_inv_norm(features), row_inv_norm(weight)
        if keep is not None:  # O(C_r) floats, then the kept ones
            rw = rw.index_select(0, keep)
    w = features if from_cos else weight
    _margin_ce_fwd_kernel[(triton.cdiv(N, blocks.outer),)](
        features, w, rx, rw, labels, m_vec, class_weight, params, offset, keep, stats, c_star,
        features.stride(0), features.stride(1), w.stride(0), w.stride(1), labels.stride(0),
        N, C, D, ignore_index,
        KIND=KINDS.index(kind), FROM_COSINE=from_cos, HAS_M_VEC=m_vec is not None,
        HAS_CLASS_WEIGHT=class_weight is not None, HAS_OFFSET=offset is not None,
        HAS_KEEP=keep is not None, PARTIALS=partials, IS_F64=features.dtype == torch.float64,
        ACC=acc, PREC=_precision(features.dtype), UPCAST=_upcast(features.dtype),
        BLOCK_N=blocks.outer, BLOCK_C=blocks.sweep, BLOCK_D=blocks.d,
        num_warps=blocks.num_warps)
    return stats, c_star, rx, rw


def margin_ce_bwd(features: torch.Tensor, weight: Optional[torch.Tensor], labels: torch.Tensor,
                  saved: _Saved, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  offset: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None):
    """dL/dfeatures, dL/dweight (or dL/dcosine, None) for dL/dcos_ij =
    a_i exp(z_ij + offset_j - lse_i) dz_ij/dcos_ij off the target and b_i at it
    (lse, a, b: contiguous [N]). With `keep` the columns are those rows of
    weight, and dL/dweight is 0 on the others."""
    from_cos = weight is None
    N = features.shape[0]
    C = features.shape[1] if from_cos else (weight.shape[0] if keep is None else keep.numel())
    D = 0 if from_cos else features.shape[1]
    blk = saved.blocks
    acc, _ = _acc(features.dtype)
    common = dict(KIND=saved.kind, HAS_OFFSET=offset is not None, HAS_KEEP=keep is not None,
                  IS_F64=features.dtype == torch.float64, ACC=acc,
                  PREC=_precision(features.dtype), UPCAST=_upcast(features.dtype),
                  SPLIT=features.dtype in (torch.float16, torch.bfloat16), BLOCK_D=blk.d,
                  BLOCK_DO=blk.do, num_warps=blk.num_warps)
    w = features if from_cos else weight
    strides = (features.stride(0), features.stride(1), w.stride(0), w.stride(1), labels.stride(0))
    dx = torch.empty((N, C) if from_cos else (N, D), dtype=features.dtype, device=features.device)
    n_do = 1 if from_cos else triton.cdiv(D, blk.do)
    if n_do == 0:  # D = 0: nothing depends on the (empty) features
        return dx, torch.empty((weight.shape[0], 0), dtype=weight.dtype, device=weight.device)
    _margin_ce_bwd_dx_kernel[(triton.cdiv(N, blk.outer), n_do)](
        features, w, saved.rx, saved.rw, labels, saved.params, offset, keep, lse, a, b, dx,
        *strides,
        N, C, D, saved.ignore_index, FROM_COSINE=from_cos, BLOCK_N=blk.outer, BLOCK_C=blk.sweep,
        **common)
    if from_cos:
        return dx, None
    dw = (torch.empty if keep is None else torch.zeros)(weight.shape, dtype=weight.dtype,
                                                        device=weight.device)
    _margin_ce_bwd_dw_kernel[(triton.cdiv(C, blk.outer), n_do)](
        features, w, saved.rx, saved.rw, labels, saved.params, offset, keep, lse, a, b, dw,
        *strides,
        N, C, D, saved.ignore_index, BLOCK_N=blk.sweep, BLOCK_C=blk.outer, **common)
    return dx, dw


# ----------------------------------------------------------------- autograd Function

class MarginCrossEntropyFunction(torch.autograd.Function):
    """inputs = (features, weight) or (cosine,); only they receive gradients (a
    per-class margin or class weight is a constant here). With p.with_stats the
    outputs are (loss, lse_other [N], cos_y [N]), the last two without gradient."""

    @staticmethod
    def forward(ctx, p: MarginParams, labels, m_vec, class_weight, *inputs):
        features = inputs[0]
        weight = inputs[1] if len(inputs) == 2 else None
        tdt = _acc(features.dtype)[1]
        ctx.p = p
        ctx.shapes = [(t.shape, t.dtype) for t in inputs]
        ctx.empty = features.shape[0] == 0
        if ctx.empty:  # nothing to launch: zero loss, zero gradients of the right shapes
            out = torch.zeros(0, dtype=tdt, device=features.device)
            return _with_stats(ctx, p, out if p.reduction == "none" else out.sum(), out, out)
        params = p.tensor(tdt, features.device)
        blocks = p.blocks or default_blocks(features.dtype, 0 if weight is None
                                            else features.shape[1])
        stats, _, rx, rw = margin_ce_fwd(features, weight, labels, kind=p.kind, params=params,
                                         m_vec=m_vec, class_weight=class_weight,
                                         ignore_index=p.ignore_index, blocks=blocks)
        ctx.saved = _Saved(KINDS.index(p.kind), params, p.ignore_index, blocks, rx, rw, stats)
        ctx.save_for_backward(labels, *inputs)
        loss = stats[ST_LOSS]
        if p.reduction == "none":
            out = loss.clone()
        elif p.reduction == "sum":
            out = loss.sum()
        else:
            ctx.denom = denom = stats[ST_W].sum()
            total = loss.sum()
            out = torch.where(denom > 0, total / torch.where(denom > 0, denom, 1.0), total * 0)
        return _with_stats(ctx, p, out, stats[ST_LSE_OTHER], stats[ST_COSY])

    @staticmethod
    @first_order("margin_cross_entropy (triton backend)")
    def backward(ctx, grad_out, *_stats_grads):
        head = (None,) * 4
        if ctx.empty:
            return head + tuple(torch.zeros(sh, dtype=dt, device=grad_out.device)
                                for sh, dt in ctx.shapes)
        labels, *inputs = ctx.saved_tensors
        sv = ctx.saved
        w = sv.stats[ST_W]
        g = grad_out.to(w.dtype)
        if ctx.p.reduction == "mean":
            d = ctx.denom
            g = torch.where(d > 0, g / torch.where(d > 0, d, 1.0), g * 0)
        a = (w * g).contiguous()
        dx, dw = margin_ce_bwd(inputs[0], inputs[1] if len(inputs) == 2 else None, labels, sv,
                               sv.stats[ST_LSE], a, a * sv.stats[ST_DTGT])
        return head + ((dx,) if len(inputs) == 1 else (dx, dw))


def _with_stats(ctx, p: MarginParams, out, lse_other, cos_y):
    if not p.with_stats:
        return out
    lse_other, cos_y = lse_other.clone(), cos_y.clone()
    ctx.mark_non_differentiable(lse_other, cos_y)
    return out, lse_other, cos_y


class ShardPartialsFunction(torch.autograd.Function):
    """One class shard's per-row statistics for fused_margin.distributed:
    (features [N, D], weight [C_r, D]) -> row_max, sum_exp, cos_y, wrong_cos,
    wrong_column, from the forward kernel in PARTIALS mode, over the K columns
    `keep` selects (all C_r rows where keep is None). `col` [N] is each
    row's target column in [0, K) or -1 (never a label: the kernels cannot read
    outside the shard). Only sum_exp and cos_y are differentiable; backward runs
    the loss's two gradient kernels with lse = the row shift, a = dL/dsum_exp
    and b = dL/dcos_y."""

    @staticmethod
    def forward(ctx, p: MarginParams, col, offset, keep, features, weight):
        n = features.shape[0]
        k = weight.shape[0] if keep is None else keep.numel()
        tdt = _acc(features.dtype)[1]
        dev = features.device
        ctx.shapes = [(t.shape, t.dtype) for t in (features, weight)]
        ctx.empty = n == 0 or k == 0
        if ctx.empty:  # no launch: nothing folded, the reference's values for an empty sweep
            stats = torch.zeros(N_STATS, n, dtype=tdt, device=dev)
            stats[PT_MAX] = stats[PT_WRONG] = -math.inf
            wrong = torch.zeros(n, dtype=torch.int64, device=dev)
        else:
            params = p.tensor(tdt, dev)
            blocks = p.blocks or default_blocks(features.dtype, features.shape[1])
            stats, wrong, rx, rw = margin_ce_fwd(features, weight, col, kind=p.kind,
                                                 params=params, m_vec=None, class_weight=None,
                                                 ignore_index=-1, blocks=blocks, offset=offset,
                                                 partials=True, keep=keep)
            ctx.saved = _Saved(KINDS.index(p.kind), params, -1, blocks, rx, rw, stats)
            ctx.save_for_backward(col, offset, keep, features, weight)
        out = (stats[PT_MAX], stats[PT_SUM], stats[PT_COSY], stats[PT_WRONG], wrong)
        ctx.mark_non_differentiable(out[0], out[3], out[4])
        return out

    @staticmethod
    @first_order("margin_shard_partials (triton backend)")
    @torch.autograd.function.once_differentiable
    def backward(ctx, _g_max, g_sum, g_cos_y, _g_wrong, _g_column):
        head = (None,) * 4
        if ctx.empty:
            return head + tuple(torch.zeros(sh, dtype=dt, device=g_sum.device)
                                for sh, dt in ctx.shapes)
        col, offset, keep, features, weight = ctx.saved_tensors
        sv = ctx.saved
        row_max = sv.stats[PT_MAX]
        shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        a = torch.zeros_like(shift) if g_sum is None else g_sum.to(shift.dtype).contiguous()
        b = torch.zeros_like(shift) if g_cos_y is None else g_cos_y.to(shift.dtype).contiguous()
        dx, dw = margin_ce_bwd(features, weight, col, sv, shift.contiguous(), a, b, offset, keep)
        return head + (dx, dw)


def margin_shard_partials(features: torch.Tensor, weight_shard: torch.Tensor,
                          labels: torch.Tensor, *, class_start: int, kind: str = "arcface",
                          s: float = 64.0, m: Union[float, torch.Tensor] = 0.5,
                          m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                          ignore_index: int = -100, keep: Optional[torch.Tensor] = None,
                          logit_offset: Optional[torch.Tensor] = None,
                          blocks: Optional[Blocks] = None) -> ShardPartials:
    """reference.sharded.margin_shard_partials on the fused kernels; a sampled
    shard's kept rows (`keep`) are read in place and only they get a gradient
    (no [K, D] copy of W or of its gradient)."""
    offset = None
    if logit_offset is not None:
        offset = logit_offset.detach().to(_acc(features.dtype)[1]).contiguous()
    p = MarginParams(kind, float(s), 0.0, float(m1), float(m2), float(m3), 0.0, -1, "none",
                     blocks)
    if keep is not None:
        keep = keep.to(device=weight_shard.device, dtype=torch.int64).contiguous()
    return partials_around(
        lambda col: ShardPartialsFunction.apply(p, col.contiguous(), offset, keep, features,
                                                weight_shard),
        labels, shard_size=weight_shard.shape[0], class_start=class_start, keep=keep,
        ignore_index=ignore_index, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)


def apply(labels: torch.Tensor, *inputs: torch.Tensor, kind: str, s: float,
          m: Union[float, torch.Tensor], m1: float, m2: float, m3: float, elm_lambda: float,
          class_weight: Optional[torch.Tensor], ignore_index: int, reduction: str,
          blocks: Optional[Blocks] = None, with_stats: bool = False):
    """MarginCrossEntropyFunction on (features, weight) or (cosine,); `blocks`
    overrides the tile sizes (tests)."""
    m_vec = None
    if isinstance(m, torch.Tensor):
        # per-class vectors are read by class index: contiguous; a 0-d m is a scalar
        m_vec, m = (m.detach().contiguous(), 0.0) if m.dim() == 1 else (None, float(m))
    if class_weight is not None:
        class_weight = class_weight.detach().contiguous()
    p = MarginParams(kind, float(s), float(m), float(m1), float(m2), float(m3),
                     float(elm_lambda), int(ignore_index), reduction, blocks, with_stats)
    return MarginCrossEntropyFunction.apply(p, labels, m_vec, class_weight, *inputs)


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         kind: str = "arcface", s: float = 64.0,
                         m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                         m3: float = 0.0, elm_lambda: float = 0.5,
                         class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    return apply(labels, features, weight, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                 elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
                 reduction=reduction)


def margin_cross_entropy_from_cosine(cosine: torch.Tensor, labels: torch.Tensor, *,
                                     kind: str = "arcface", s: float = 64.0,
                                     m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0,
                                     m2: float = 0.0, m3: float = 0.0, elm_lambda: float = 0.5,
                                     class_weight: Optional[torch.Tensor] = None,
                                     ignore_index: int = -100,
                                     reduction: str = "mean") -> torch.Tensor:
    return apply(labels, cosine, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                 elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
                 reduction=reduction)


def adacos_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, *,
                class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                reduction: str = "mean"):
    """(normface loss at scale s, AdaCos's next scale): the scale comes from the
    row statistics of the loss's own forward sweep (no second pass over C)."""
    loss, lse_other, cos_y = apply(labels, features, weight, kind="normface", s=s, m=0.0, m1=1.0,
                                   m2=0.0, m3=0.0, elm_lambda=0.0, class_weight=class_weight,
                                   ignore_index=ignore_index, reduction=reduction,
                                   with_stats=True)
    return loss, adacos_scale_from_stats(lse_other, cos_y, labels != ignore_index, s)


def adacos_scale(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float,
                 ignore_index: int = -100) -> torch.Tensor:
    """AdaCos's next scale alone (one fused sweep; the loss it also yields is dropped)."""
    with torch.no_grad():
        return adacos_loss(features, weight, labels, s, ignore_index=ignore_index,
                           reduction="none")[1]
