# Fused margin softmax cross-entropy (every kind of docs/api.md, section 1), Triton.
#
# Computes loss_i = w_i * (logsumexp_j z_ij - z_iy), z_ij = s*cos_ij (arcgrad:
# -s*theta_ij) off the target, the kind's target transform at the target, with
# cos_ij = <x_i, W_j> / (|x_i| |W_j|) (0 for rows of norm <= NORM_EPS), as
# fused_margin.reference.angular does.
#
# Operands in a safe range. x's rows are copied once, O(N x D), scaled by exact powers
# of two, xs_i = x_i * 2^-(e_i + E): e_i puts the row's largest |entry| in [1/2, 1),
# E = max(0, e(max |W|) - 64) keeps every product <x_s, W_j> under D * 2^64, so no
# float32 / bfloat16 product overflows or underflows (x * 1e20 with W * 1e19 is fine);
# W is read in place, never copied or normalised. The inverse norms are factors on the
# product: cos = <xs_i, W_j> * qx_i * rw_j, qx_i = 1 / |x_i 2^-e_i| (O(1)),
# rw_j = 2^E / |W_j| (accumulated in float64, rounded once).
#
# Tiling. Forward (_margin_ce_fwd_kernel): one program per (BLOCK_N rows, split of the
# class tiles), the row block fastest in program order, so that the programs running
# at one time all sweep the same W tiles and W comes from HBM about once (x, small,
# stays in L2). Each BLOCK_N x BLOCK_C logit tile is a tl.dot over D in BLOCK_D steps;
# an online log-sum-exp runs over the non-target columns (elm / partials also keep the
# first argmax of the wrong cosines), and each program writes its rows' partial
# (max, sum of exp[, best, its column]) for its split. _margin_ce_finish_kernel merges
# the splits in class order, takes the target cosine from an O(N x D) indexed dot (no
# per-tile reduction), and forms the target logit, lse and loss.
# Backward: per chunk of at most chunk_rows x chunk_cols (rows x classes),
# _margin_ce_grad_kernel recomputes the logit tiles and writes G_ij = dL/d<xs_i, W_j>
# = g_ij * qx_i * rw_j into a chunk buffer in the input dtype (bf16 stays bf16), with
#   g_ij = a_i * p_ij * dz_ij/dcos_ij off the target,  g_iy = b_i at it;
# torch.mm / addmm then accumulate A = G W (N x D) and B = G^T xs (per class chunk),
# fp32 accumulators for 16-bit inputs. The normalisation's Jacobian is a projection
# (_project_kernel): dx_i = 2^-(e_i+E) (A_i - <A_i, u_i> u_i) with u_i = x_i / |x_i|,
# dW_j = B_j - <B_j, v_j> v_j with v_j = W_j / |W_j|: the row / column sums
# sum_j g_ij cos_ij are <A_i, u_i> / ... exactly, so the radial part cancels to the
# rounding of that one projection. Matrix work: 1 (forward) + 1 (recompute) + 2 (mm)
# products of N x D x C, no N x C tensor (the buffer is bounded whatever N and C).
#
# PARTIALS mode (fused_margin.distributed's per-shard statistics): the same sweep with
# each row's target column in [-1, C) for its label, optional per-class logit offsets,
# a sampled shard's kept rows read through their index (HAS_KEEP: column j is W's row
# keep[j]), the best wrong column tracked for every row; it stores the row max, sum of
# exp, target cosine and best wrong cosine (the target logit is formed outside from
# O(N) values). Its backward is the loss's with lse = the row shift, a = dL/dsum_exp
# and b = dL/dcos_y; a sampled shard's dX product gathers one chunk of kept rows at a
# time (chunk_cols x D), dW is written only on the kept rows.
#
# Saved for backward: the inputs, xs [N, D], the per-row exponents and inverse norms
# (O(N + C)), per-row statistics [N_STATS, N] (loss, class weight, lse, g_iy / a_i,
# target cosine, lse of the non-target logits); no N x C buffer anywhere (except the
# from_cosine form's own input and gradient, N x C by definition).
#
# Precision: float32 accumulation (float64 for float64 inputs); bf16 / fp16 tiles go to
# tl.dot as they are, float32 ones with IEEE products unless torch allows TF32. NaN
# propagates (clamps are written with where, which keeps NaN; tl.minimum drops it).
# The interpreter has no libdevice, so arccos is Cephes' asinf polynomial with the
# usual range reduction (~1 ulp in float32) plus one Newton step in float64; and it
# multiplies bfloat16 tiles as raw uint16, so there (only) they are upcast first.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..reference.angular import COS_EPS, NORM_EPS, adacos_scale_from_stats, combined_fallback
from ..reference.sharded import ShardPartials, partials_around
from ..autograd_guard import first_order
from . import config

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
# x's extra scale exponent E (module header): W's largest |entry| minus this
W_EXP_HEADROOM = 64


def _interpreted() -> bool:
    return config.interpreted()


# ------------------------------------------------------------------ device helpers

@triton.jit
def _acos(c, IS_F64: tl.constexpr):
    """arccos on [-1, 1]: asin(r) by Cephes' asinf polynomial, r = |c| below 1/2,
    else sqrt((1 - |c|)/2) with acos(|c|) = 2*asin(r). NaN in, NaN out."""
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
def _clamp(c, lo, hi):
    """torch.clamp: NaN stays NaN (tl.minimum / tl.maximum would return the bound)."""
    return tl.where(c < lo, lo, tl.where(c > hi, hi, c))


@triton.jit
def _pow2(k):
    """2^k as float64, exact, for an integer tensor k (clamped to float64's normal range)."""
    k = tl.where(k < -1022, -1022, tl.where(k > 1023, 1023, k))
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bfloat16 tiles as their uint16 bits
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _cos_tile(x_ptr, w_ptr, rows, wrows, rmask, cmask, stride_xn, stride_xd,
              stride_wc, stride_wd, D, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """xs @ W.T on a [BLOCK_N, BLOCK_C] tile (column j: W's row wrows[j]), summed over
    D in BLOCK_D steps (the hot loop: its loads are what the pipeliner stages); the
    caller applies the inverse norms."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
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
        c = _clamp(cos, lo, hi)
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
        c = _clamp(cos_y, lo, hi)
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
def _add_bias(z, bias_ptr, cols, cmask, ACC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """normalize=False's raw product tile plus b_j (HAS_BIAS)."""
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
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
def _row_scale_kernel(v_ptr, out_ptr, e_ptr, q_ptr, E_ptr,  # rows [M, D]; out: xs (WRITE),
                      # the exponents e [M] int32, inverse norms q [M]; E [1] int32 (WRITE)
                      M, D, stride_m, stride_d, eps,
                      WRITE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Per row: e with max|v| = m 2^e, m in [1/2, 1); q = 1/|v 2^-e| (0 if |v| <= eps,
    NaN if the row holds NaN or inf); WRITE: out = v 2^-(e + E), exact. float64
    inside: O(M x D) work beside the O(N x C x D) products."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    amax = tl.zeros((BLOCK_M,), dtype=tl.float64)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(v_ptr + rows[:, None] * stride_m + dd[None, :] * stride_d,
                    mask=rmask[:, None] & (dd < D)[None, :], other=0.0).to(tl.float64)
        av = tl.abs(v)
        amax = tl.maximum(amax, tl.max(tl.where(av == av, av, 0.0), axis=1))
        bad += tl.sum(((av != av) | (av == float("inf"))).to(tl.int32), axis=1)
    ex = ((amax.to(tl.int64, bitcast=True) >> 52) & 2047).to(tl.int32)
    e = tl.where(amax == 0, 0, tl.where(ex == 0, -1022, ex - 1022))
    sc = _pow2(-e)
    if WRITE:
        sw = _pow2(-(e + tl.load(E_ptr)))
    sq = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (dd < D)[None, :]
        v = tl.load(v_ptr + rows[:, None] * stride_m + dd[None, :] * stride_d, mask=m2,
                    other=0.0).to(tl.float64)
        u = v * sc[:, None]
        sq += tl.sum(u * u, axis=1)
        if WRITE:
            # exact in float32 too (a power-of-two multiple of an input value); through
            # ACC because the interpreter's float64 -> bfloat16 cast is wrong
            tl.store(out_ptr + rows[:, None] * D + dd[None, :],
                     (v * sw[:, None]).to(ACC).to(out_ptr.dtype.element_ty), mask=m2)
    big = tl.sqrt(sq) * _pow2(e) > eps
    q = tl.where(big, 1.0 / tl.sqrt(tl.where(big, sq, 1.0)), 0.0)
    q = tl.where(bad > 0, float("nan"), q)
    tl.store(e_ptr + rows, e, mask=rmask)
    tl.store(q_ptr + rows, q.to(q_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _margin_ce_fwd_kernel(
        x_ptr, w_ptr, qx_ptr, rw_ptr,  # xs [N, D], weight [C, D], inverse-norm factors
        # (FROM_COSINE: x_ptr is the cosine [N, C], the rest unused)
        labels_ptr, p_ptr,  # labels / target columns [N], scalars
        off_ptr,  # HAS_OFFSET: per-class logit offsets [C] (non-target logits only)
        keep_ptr,  # HAS_KEEP: W's row [C] int64 of each column (a sampled shard)
        bias_ptr,  # HAS_BIAS: b [C] (normalize=False), added to the raw products
        pm_ptr, pl_ptr, pb_ptr, pi_ptr,  # out: per split [S, N]: max, sum exp, best, column
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l,
        N, C, D, tiles_per_split, ignore_index,
        KIND: tl.constexpr, FROM_COSINE: tl.constexpr, HAS_OFFSET: tl.constexpr,
        HAS_KEEP: tl.constexpr, TRACK_BEST: tl.constexpr, IS_F64: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr = True,
        HAS_BIAS: tl.constexpr = False):
    n_rb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_r = pid % n_rb  # row blocks fastest: concurrent programs share W tiles in L2
    pid_s = pid // n_rb
    rows = pid_r.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    _, y_col, _ = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
    s = tl.load(p_ptr + P_S)
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    if NORMALIZE and not FROM_COSINE:
        qx = tl.load(qx_ptr + rows, mask=rmask, other=0.0)

    m_run = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_run = tl.zeros((BLOCK_N,), dtype=ACC)
    best = tl.full((BLOCK_N,), float("-inf"), ACC)
    c_star = tl.full((BLOCK_N,), -1, tl.int64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_C))
    for t in range(t0, t1):
        cols = (t * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = cols < C
        if FROM_COSINE:
            cos = _load_cos(x_ptr, rows, cols, rmask, cmask, stride_xn, stride_xd, ACC)
        else:
            if NORMALIZE:
                rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
            cos = _cos_tile(x_ptr, w_ptr, rows, _wrows(keep_ptr, cols, cmask, HAS_KEEP), rmask,
                            cmask, stride_xn, stride_xd, stride_wc, stride_wd, D, BLOCK_N,
                            BLOCK_C, BLOCK_D, ACC, PREC, UPCAST)
            if NORMALIZE:
                cos = cos * qx[:, None] * rw[None, :]
            else:  # normalize=False: the raw products (plus b_j) are the "cosines"
                cos = _add_bias(cos, bias_ptr, cols, cmask, ACC, HAS_BIAS)
        z, _dz = _nontarget(cos, s, lo, hi, KIND, IS_F64)
        z = _add_offset(z, off_ptr, cols, cmask, ACC, HAS_OFFSET)
        off = (cols[None, :] == y_col[:, None]) | (~cmask)[None, :]
        z = tl.where(off, float("-inf"), z)
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        # an infinite max (no class yet, or a +inf logit) shifts by 0: exp(inf - inf) would be NaN
        m_safe = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m_run = m_new
        if TRACK_BEST:  # the first argmax of the wrong-class cosines
            others = tl.where(off, float("-inf"), cos)
            t_max = tl.max(others, axis=1)
            t_idx = tl.min(tl.where(others == t_max[:, None], cols[None, :], C), axis=1)
            take = t_max > best  # strict: an earlier tile keeps the tie
            best = tl.where(take, t_max, best)
            c_star = tl.where(take, t_idx, c_star)
    at = pid_s.to(tl.int64) * N + rows
    tl.store(pm_ptr + at, m_run, mask=rmask)
    tl.store(pl_ptr + at, l_run, mask=rmask)
    if TRACK_BEST:
        tl.store(pb_ptr + at, best, mask=rmask)
        tl.store(pi_ptr + at, c_star, mask=rmask)


@triton.jit
def _margin_ce_finish_kernel(
        x_ptr, w_ptr, qx_ptr, rw_ptr,  # as the sweep's
        labels_ptr, m_ptr, cw_ptr, p_ptr,  # labels [N], margins [C], class weights [C], scalars
        keep_ptr,  # HAS_KEEP: W's row of each column
        bias_ptr,  # HAS_BIAS: b [C]
        pm_ptr, pl_ptr, pb_ptr, pi_ptr,  # the sweep's partials [S, N]
        stats_ptr, cstar_ptr,  # out: statistics [N_STATS, N], c* [N] int64
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l,
        N, C, D, S, ignore_index,
        KIND: tl.constexpr, FROM_COSINE: tl.constexpr, HAS_M_VEC: tl.constexpr,
        HAS_CLASS_WEIGHT: tl.constexpr, HAS_KEEP: tl.constexpr, PARTIALS: tl.constexpr,
        TRACK_BEST: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr = True,
        HAS_BIAS: tl.constexpr = False, ROW_WEIGHT: tl.constexpr = False):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    valid, y_col, y = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
    # a column outside [0, C) is never read (labels are checked in Python; this is the
    # kernel's own bound)
    has_t = rmask & (y_col >= 0) & (y_col < C)
    yc = tl.where(has_t, y_col, 0)

    # the splits, merged in class order (elm's tie rule: the earliest split keeps a tie)
    m_run = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_run = tl.zeros((BLOCK_N,), dtype=ACC)
    best = tl.full((BLOCK_N,), float("-inf"), ACC)
    c_star = tl.full((BLOCK_N,), -1, tl.int64)
    for k in range(0, S):
        at = k * N + rows
        mk = tl.load(pm_ptr + at, mask=rmask, other=float("-inf"))
        lk = tl.load(pl_ptr + at, mask=rmask, other=0.0)
        m_new = tl.maximum(m_run, mk)
        # an infinite max (no class yet, or a +inf logit) shifts by 0: exp(inf - inf) would be NaN
        m_safe = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + lk * tl.exp(mk - m_safe)
        m_run = m_new
        if TRACK_BEST:
            bk = tl.load(pb_ptr + at, mask=rmask, other=float("-inf"))
            ik = tl.load(pi_ptr + at, mask=rmask, other=-1)
            take = bk > best
            best = tl.where(take, bk, best)
            c_star = tl.where(take, ik, c_star)

    # the target cosine: one indexed dot per row, O(N x D)
    if FROM_COSINE:
        cos_y = tl.load(x_ptr + rows * stride_xn + yc * stride_xd, mask=has_t,
                        other=0.0).to(ACC)
    else:
        wrow = _wrows(keep_ptr, yc, has_t, HAS_KEEP)
        dot = tl.zeros((BLOCK_N,), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = has_t[:, None] & (dd < D)[None, :]
            a = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd, mask=m2,
                        other=0.0).to(ACC)
            b = tl.load(w_ptr + wrow[:, None] * stride_wc + dd[None, :] * stride_wd, mask=m2,
                        other=0.0).to(ACC)
            dot += tl.sum(a * b, axis=1)
        if NORMALIZE:
            qx = tl.load(qx_ptr + rows, mask=rmask, other=0.0)
            rwy = tl.load(rw_ptr + yc, mask=has_t, other=0.0)
            cos_y = dot * qx * rwy
        elif HAS_BIAS:
            cos_y = dot + tl.load(bias_ptr + yc, mask=has_t, other=0.0).to(ACC)
        else:
            cos_y = dot
    cos_y = tl.where(has_t, cos_y, 0.0)

    if PARTIALS:  # a class shard's statistics; the target logit is formed outside
        tl.store(stats_ptr + _PT_MAX * N + rows, m_run, mask=rmask)
        tl.store(stats_ptr + _PT_SUM * N + rows, l_run, mask=rmask)
        tl.store(stats_ptr + _PT_COSY * N + rows, cos_y, mask=rmask)
        tl.store(stats_ptr + _PT_WRONG * N + rows, best, mask=rmask)
        tl.store(cstar_ptr + rows, c_star, mask=rmask)
    else:
        s = tl.load(p_ptr + P_S)
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
        top = tl.where(z_y != z_y, z_y, top)  # a NaN target logit must reach the loss
        top = tl.where((top == float("inf")) | (top == float("-inf")), 0.0, top)  # no inf - inf
        lse = top + tl.log(l_run * tl.exp(m_run - top) + tl.exp(z_y - top))
        lse_other = tl.where(l_run > 0, m_run + tl.log(tl.where(l_run > 0, l_run, 1.0)),
                             float("-inf"))
        lse_other = tl.where(l_run != l_run, l_run, lse_other)
        if ROW_WEIGHT:  # per-row weights [N] (label smoothing's a_i)
            w = tl.load(cw_ptr + rows, mask=rmask, other=0.0).to(ACC)
        elif HAS_CLASS_WEIGHT:
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
def _margin_ce_grad_kernel(
        x_ptr, w_ptr, qx_ptr, rw_ptr,  # as the sweep's (x_ptr is the cosine for FROM_COSINE)
        labels_ptr, p_ptr, off_ptr, keep_ptr,  # labels, scalars, logit offsets, kept rows
        lse_ptr, a_ptr, b_ptr,  # per row [N]: lse, a (softmax scale), b (target term)
        g_ptr,  # out: the chunk's G [n_rows, n_cols] (row stride stride_gn), input dtype
        bias_ptr, db_ptr,  # HAS_BIAS: b [C]; out: the tile's column sums of G, float32
        # [row blocks of the chunk, n_cols] (row stride stride_gn)
        stride_xn, stride_xd, stride_wc, stride_wd, stride_l, stride_gn,
        N, C, D, r0, c0, n_rows, n_cols, ignore_index,
        KIND: tl.constexpr, FROM_COSINE: tl.constexpr, HAS_OFFSET: tl.constexpr,
        HAS_KEEP: tl.constexpr, IS_F64: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr = True,
        HAS_BIAS: tl.constexpr = False):
    """One tile of the chunk (rows r0 + [0, n_rows), classes c0 + [0, n_cols)): the
    logits recomputed, G = dL/d<xs_i, W_j> (FROM_COSINE: dL/dcos) written."""
    n_rb = tl.cdiv(n_rows, BLOCK_N)
    pid = tl.program_id(0)
    pid_r = pid % n_rb
    lr = pid_r.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    lc = (pid // n_rb).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = r0 + lr
    cols = c0 + lc
    rmask = lr < n_rows
    cmask = lc < n_cols
    _, y_col, _ = _row_info(labels_ptr, rows, rmask, stride_l, ignore_index)
    s = tl.load(p_ptr + P_S)
    lo = tl.load(p_ptr + P_LO)
    hi = tl.load(p_ptr + P_HI)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
    if FROM_COSINE:
        cos = _load_cos(x_ptr, rows, cols, rmask, cmask, stride_xn, stride_xd, ACC)
        g = _grad_tile(cos, cols, cmask, y_col, lse, a, b, off_ptr, s, lo, hi, KIND, IS_F64,
                       ACC, HAS_OFFSET)
    elif not NORMALIZE:  # G = dL/d(x.W + b) = dL/dcos: no factors
        xw = _cos_tile(x_ptr, w_ptr, rows, _wrows(keep_ptr, cols, cmask, HAS_KEEP), rmask,
                       cmask, stride_xn, stride_xd, stride_wc, stride_wd, D, BLOCK_N, BLOCK_C,
                       BLOCK_D, ACC, PREC, UPCAST)
        g = _grad_tile(_add_bias(xw, bias_ptr, cols, cmask, ACC, HAS_BIAS), cols, cmask,
                       y_col, lse, a, b, off_ptr, s, lo, hi, KIND, IS_F64, ACC, HAS_OFFSET)
        g = tl.where(rmask[:, None], g, 0.0)
        if HAS_BIAS:  # dL/db: this tile's column sums, unrounded (no atomics: summed after)
            tl.store(db_ptr + pid_r * stride_gn + lc, tl.sum(g, axis=0), mask=cmask)
    else:
        xw = _cos_tile(x_ptr, w_ptr, rows, _wrows(keep_ptr, cols, cmask, HAS_KEEP), rmask,
                       cmask, stride_xn, stride_xd, stride_wc, stride_wd, D, BLOCK_N, BLOCK_C,
                       BLOCK_D, ACC, PREC, UPCAST)
        # the factors after the product (a tile of them live across the D loop would
        # cost 64 registers a thread)
        qx = tl.load(qx_ptr + rows, mask=rmask, other=0.0)
        rw = tl.load(rw_ptr + cols, mask=cmask, other=0.0)
        g = _grad_tile(xw * qx[:, None] * rw[None, :], cols, cmask, y_col, lse, a, b, off_ptr,
                       s, lo, hi, KIND, IS_F64, ACC, HAS_OFFSET) * qx[:, None] * rw[None, :]
    tl.store(g_ptr + lr[:, None] * stride_gn + lc[None, :], g.to(g_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _project_kernel(a_ptr, v_ptr, t_ptr, ks_ptr, E_ptr, idx_ptr, out_ptr,
                    # a [M, D] (dL/d of the raw product), v [., D] the rows it belongs to,
                    # t [M] their factors, ks [M] int32 (HAS_KS), E [1] int32, idx [M]
                    # (HAS_IDX: row of v and of out), out [., D] contiguous
                    M, D, stride_am, stride_vm, stride_vd,
                    E_SIGN: tl.constexpr, HAS_KS: tl.constexpr, HAS_IDX: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_i = 2^-(ks_i + E) (a_i - <a_i, u_i> u_i), u_i = v_i t_i 2^(E_SIGN E) (a unit
    vector, or 0): the normalisation's Jacobian, i.e. a_i's part orthogonal to the
    row, so the radial part cancels up to this one projection's rounding."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    if HAS_IDX:
        vr = tl.load(idx_ptr + m, mask=mmask, other=0)
    else:
        vr = m
    E = tl.load(E_ptr)
    # float64 for the factor alone: 2^(E_SIGN E) / |W_j| may lie below float32's range
    t = tl.load(t_ptr + m, mask=mmask, other=0.0).to(tl.float64) * _pow2(E_SIGN * E)
    dot = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = mmask[:, None] & (dd < D)[None, :]
        a = tl.load(a_ptr + m[:, None] * stride_am + dd[None, :], mask=m2, other=0.0).to(ACC)
        u = (tl.load(v_ptr + vr[:, None] * stride_vm + dd[None, :] * stride_vd, mask=m2,
                     other=0.0).to(tl.float64) * t[:, None]).to(ACC)
        dot += tl.sum(a * u, axis=1)
    if HAS_KS:
        sc = _pow2(-(tl.load(ks_ptr + m, mask=mmask, other=0) + E))
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = mmask[:, None] & (dd < D)[None, :]
        a = tl.load(a_ptr + m[:, None] * stride_am + dd[None, :], mask=m2, other=0.0).to(ACC)
        u = (tl.load(v_ptr + vr[:, None] * stride_vm + dd[None, :] * stride_vd, mask=m2,
                     other=0.0).to(tl.float64) * t[:, None]).to(ACC)
        o = a - dot[:, None] * u
        if HAS_KS:
            o = (o.to(tl.float64) * sc[:, None]).to(ACC)
        tl.store(out_ptr + vr[:, None] * D + dd[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=m2)


# ---------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class Blocks:
    """Tile sizes. Every kernel's tiles are `outer` rows x `sweep` classes, the products
    step through D `d` at a time. The forward gives each program `split` class tiles
    (0: enough splits for about `programs` programs). The backward's G buffer is at
    most chunk_rows x chunk_cols (0: one tile, outer x sweep), whatever N and C.
    `do` is ignored (the D chunk of the kernels before issue 13, kept so that
    Blocks(outer, sweep, d, do) still builds). `fwd_outer` (0: outer) is the forward
    sweep's row tile where it does not track the best wrong column (elm, partials keep
    `outer`: their argmax needs the registers) and where it pads N by at most 1/8 more
    than `outer` does (N = 128 keeps 128-row tiles: a 256-row tile would double the work)."""
    outer: int
    sweep: int
    d: int
    do: int = 0
    num_warps: int = 4
    num_stages: int = 2
    split: int = 0
    programs: int = 1024
    chunk_rows: int = 0
    chunk_cols: int = 0
    fwd_outer: int = 0

    def fwd_rows(self, track_best: bool, N: int) -> int:
        fo = self.fwd_outer
        if track_best or not fo or 8 * -(-N // fo) * fo > 9 * -(-N // self.outer) * self.outer:
            return self.outer
        return fo


# The tiles an sm_90 GPU gets (FUSED_MARGIN_TRITON_CONFIG=sm90 gives them to the
# interpreter too), keyed by (dtype, products): tile rows a multiple of 64 (Triton
# emits wgmma only then). The 128 x 128 bf16 tile with 8 warps holds its fp32 logits in
# 64 registers a thread and its operands in 3 stages of 32 KiB; arcgrad's theta per
# logit needs more registers, so its class tile is 64 wide; IEEE float32 runs on the
# FMA units, 128 x 64 x 16; float64 (DMMA) 32 x 32 with 8 warps. Chosen from the sm_90 builds'
# register, spill and shared-memory counts (bench/sm90_report.py), untimed: no GPU has
# run them yet. The bf16 / fp16 forward sweep takes 256-row tiles (256 x 128: 85 FLOP per
# byte of L2 traffic against 64, 254 registers and 0 spills, 144 KiB of 3 stages; arcgrad
# 256 x 64) except where it tracks the best wrong column (elm, partials: 128 rows, which
# spill at 256); the gradient kernel keeps 128 x 128 (256 x 128 and 128 x 256 spill
# 200-300 bytes there). The G chunk is at most 8192 x 4096 (64 MiB in bf16), 8192 x 2048
# (float32, 64 MiB), 4096 x 1024 (float64, 32 MiB).
_B16 = dict(num_warps=8, num_stages=3, chunk_rows=8192, chunk_cols=4096)
_B32 = dict(num_warps=8, num_stages=3, chunk_rows=8192, chunk_cols=2048)
SM90 = {
    ("bf16", "mma"): Blocks(128, 128, 64, fwd_outer=256, **_B16),
    ("bf16", "arcgrad"): Blocks(128, 64, 64, fwd_outer=256, **_B16),
    ("tf32", "mma"): Blocks(128, 128, 32, **_B32),
    ("tf32", "arcgrad"): Blocks(128, 64, 32, **_B32),
    ("fp32", "mma"): Blocks(128, 64, 16, **dict(_B32, num_stages=2)),
    ("fp64", "mma"): Blocks(32, 32, 16, num_warps=8, num_stages=2, chunk_rows=4096,
                            chunk_cols=1024),
}
SM90[("fp16", "mma")], SM90[("fp16", "arcgrad")] = SM90[("bf16", "mma")], SM90[("bf16", "arcgrad")]
# numpy underneath: few, larger steps are what is cheap; several splits and chunks
# at test sizes, so that the merges run
INTERP = Blocks(64, 64, 32, programs=8, chunk_rows=128, chunk_cols=128)
# rows per program and D step of the O(N) / O(N x D) kernels (no tl.dot: 4 warps, 2
# stages of loads in flight), small enough that float64 rows do not spill
ROW_BLOCK = 16
ROW_D = 64
ROW_LAUNCH = dict(num_warps=4, num_stages=2)


def _table_key(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if _precision(dtype) == "tf32" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype,
                                                                                     "fp32")


def default_blocks(dtype: torch.dtype, D: int) -> Blocks:
    """The tile table FUSED_MARGIN_TRITON_CONFIG selects (fused_margin.triton.config)."""
    if config.target() == "interp":
        return INTERP
    return SM90[(_table_key(dtype), "mma")]


def kind_blocks(blocks: Blocks, dtype: torch.dtype, kind: str) -> Blocks:
    """A kind's own entry where the table has one and `blocks` is the table's default
    (explicit tiles are kept as they are)."""
    if kind == "arcgrad" and blocks is SM90.get((_table_key(dtype), "mma")):
        return SM90.get((_table_key(dtype), "arcgrad"), blocks)
    return blocks


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


# Every launch goes through here; tests/sm90_compile.py sets LAUNCH_HOOK to record the
# kernels, arguments and options a real launch would compile, without running them.
LAUNCH_HOOK = None


def _launch(kernel, grid, *args, **kw):
    if LAUNCH_HOOK is not None:
        return LAUNCH_HOOK(kernel, grid, args, kw)
    return kernel[grid](*args, **kw)


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
    # normalize=False: logits s * (x.W_j + b_j), no inverse norms (kinds LINEAR_KINDS)
    normalize: bool = True
    # the class_weight tensor is a per-row weight [N] (label smoothing's a_i)
    row_weight: bool = False

    def tensor(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The scalars the kernels read, in PARAMS order, in the compute dtype."""
        th, off = combined_fallback(self.m1, self.m2) if self.kind == "combined" else (0.0, 0.0)
        vals = dict(s=self.s, m=self.m, m1=self.m1, m2=self.m2, m3=self.m3,
                    elm_lambda=self.elm_lambda, th=th, offset=off, lo=-1 + COS_EPS,
                    hi=1 - COS_EPS, pi=math.pi)
        return torch.tensor([float(vals[k]) for k in PARAMS], dtype=dtype, device=device)


@dataclass
class Prepared:
    """The operands in a safe range (module header): xs = x 2^-(ex + E) [N, D] in x's
    dtype, ex [N] int32, qx [N] = 1/|x 2^-ex|, E [1] int32, rw [C] = 2^E/|W_j| (the
    sweep's columns: the kept ones for a sampled shard)."""
    xs: torch.Tensor
    ex: torch.Tensor
    qx: torch.Tensor
    E: torch.Tensor
    rw: torch.Tensor


@dataclass
class _Saved:
    kind: int
    params: torch.Tensor
    ignore_index: int
    blocks: Blocks
    prep: Optional[Prepared]
    stats: torch.Tensor


def _row_scale(v: torch.Tensor, E: Optional[torch.Tensor] = None):
    """(e [M] int32, q [M], xs or None): see _row_scale_kernel; xs when E is given."""
    M, D = v.shape
    tdt = _acc(v.dtype)[1]
    e = torch.empty(M, dtype=torch.int32, device=v.device)
    q = torch.empty(M, dtype=tdt, device=v.device)
    out = None if E is None else torch.empty(M, D, dtype=v.dtype, device=v.device)
    if M:
        bd = min(ROW_D, max(16, triton.next_power_of_2(max(D, 1))))
        _launch(_row_scale_kernel, (triton.cdiv(M, ROW_BLOCK),),
                v, out, e, q, E, M, D, v.stride(0), v.stride(1), NORM_EPS,
                WRITE=E is not None, ACC=_acc(v.dtype)[0], BLOCK_M=ROW_BLOCK, BLOCK_D=bd,
                **ROW_LAUNCH)
    return e, q, out


def prepare(features: torch.Tensor, weight: torch.Tensor,
            keep: Optional[torch.Tensor] = None) -> Prepared:
    ew, qw, _ = _row_scale(weight)
    if ew.numel():
        E = (ew.max() - W_EXP_HEADROOM).clamp(min=0).reshape(1).to(torch.int32)
    else:
        E = torch.zeros(1, dtype=torch.int32, device=weight.device)
    # 2^(E - e_j) * q_j = 2^E / |W_j|: O(C), exact scaling, in float64 then rounded once
    rw = torch.ldexp(qw.to(torch.float64), (E - ew).to(torch.float64)).to(qw.dtype)
    if keep is not None:  # O(C_r) floats, then the kept ones
        rw = rw.index_select(0, keep)
    ex, qx, xs = _row_scale(features, E)
    return Prepared(xs, ex, qx, E, rw)


def _splits(blocks: Blocks, N: int, C: int, rows: int = 0):
    """(class tiles per forward program, number of splits) for row tiles of `rows`
    (0: blocks.outer)."""
    n_rb = triton.cdiv(N, rows or blocks.outer)
    n_ct = max(1, triton.cdiv(C, blocks.sweep))
    tps = blocks.split or triton.cdiv(n_ct, max(1, min(n_ct, blocks.programs // n_rb)))
    return tps, triton.cdiv(n_ct, tps)


def margin_ce_fwd(features: torch.Tensor, weight: Optional[torch.Tensor], labels: torch.Tensor,
                  *, kind: str, params: torch.Tensor, m_vec: Optional[torch.Tensor],
                  class_weight: Optional[torch.Tensor], ignore_index: int,
                  blocks: Optional[Blocks] = None, offset: Optional[torch.Tensor] = None,
                  partials: bool = False, keep: Optional[torch.Tensor] = None,
                  normalize: bool = True, bias: Optional[torch.Tensor] = None,
                  row_weight: bool = False):
    """Launch the forward sweep and its finish. `weight` None: `features` is the cosine
    [N, C]. Returns (stats [N_STATS, N], c* [N] int64, Prepared or None); with
    `partials` the stats rows are PT_* (a class shard's) and c* is the best wrong
    column of every row. `offset` [C] is added to the non-target logits. `keep` [C]
    int64: the columns are those rows of `weight` (read in place). normalize=False: the
    "cosines" are x.W_j (+ bias_j), x and W read as they are (Prepared.xs is x itself,
    no factors); row_weight: `class_weight` is a per-row weight [N] instead."""
    from_cos = weight is None
    N = features.shape[0]
    C = features.shape[1] if from_cos else (weight.shape[0] if keep is None else keep.numel())
    D = 0 if from_cos else features.shape[1]
    blocks = kind_blocks(blocks or default_blocks(features.dtype, D), features.dtype, kind)
    acc, tdt = _acc(features.dtype)
    dev = features.device
    if from_cos:
        prep = None
    elif normalize:
        prep = prepare(features, weight, keep)
    else:  # the raw products: no scaled copy of x, no inverse norms
        prep = Prepared(features, None, None, None, None)
    x = features if from_cos else prep.xs
    w = features if from_cos else weight
    qx = None if from_cos else prep.qx
    rw = None if from_cos else prep.rw
    track = kind == "elm" or partials
    # normalize=False's specialisations (the defaults otherwise: the same binaries)
    linear = {} if normalize else dict(NORMALIZE=False, HAS_BIAS=bias is not None)
    fwd_rows = blocks.fwd_rows(track, N)
    tps, S = _splits(blocks, N, C, fwd_rows)
    pm = torch.empty(S, N, dtype=tdt, device=dev)
    pl = torch.empty(S, N, dtype=tdt, device=dev)
    pb = torch.empty(S, N, dtype=tdt, device=dev) if track else None
    pi = torch.empty(S, N, dtype=torch.int64, device=dev) if track else None
    strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1), labels.stride(0))
    is64 = features.dtype == torch.float64
    _launch(_margin_ce_fwd_kernel, (triton.cdiv(N, fwd_rows) * S,),
            x, w, qx, rw, labels, params, offset, keep, bias, pm, pl, pb, pi, *strides,
            N, C, D, tps, ignore_index,
            KIND=KINDS.index(kind), FROM_COSINE=from_cos, HAS_OFFSET=offset is not None,
            HAS_KEEP=keep is not None, TRACK_BEST=track, IS_F64=is64, ACC=acc,
            PREC=_precision(features.dtype), UPCAST=_upcast(features.dtype),
            BLOCK_N=fwd_rows, BLOCK_C=blocks.sweep, BLOCK_D=blocks.d,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages, **linear)
    stats = torch.empty(N_STATS, N, dtype=tdt, device=dev)
    c_star = torch.empty(N, dtype=torch.int64, device=dev)
    _launch(_margin_ce_finish_kernel, (triton.cdiv(N, ROW_BLOCK),),
            x, w, qx, rw, labels, m_vec, class_weight, params, keep, bias, pm, pl, pb, pi,
            stats, c_star, *strides, N, C, D, S, ignore_index,
            KIND=KINDS.index(kind), FROM_COSINE=from_cos, HAS_M_VEC=m_vec is not None,
            HAS_CLASS_WEIGHT=class_weight is not None, HAS_KEEP=keep is not None,
            PARTIALS=partials, TRACK_BEST=track, IS_F64=is64, ACC=acc,
            BLOCK_N=ROW_BLOCK, BLOCK_D=min(ROW_D, max(16, triton.next_power_of_2(max(D, 1)))),
            **linear, **(dict(ROW_WEIGHT=True) if row_weight else {}), **ROW_LAUNCH)
    return stats, c_star, prep


_ADDMM_DTYPE_OK = True  # torch.addmm(..., out_dtype=float32) on CUDA (torch >= 2.8)


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 for 16-bit a, b (cuBLAS accumulates in float32 either
    way; out_dtype also keeps the sum in float32 across chunks)."""
    global _ADDMM_DTYPE_OK
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    if a.is_cuda and _ADDMM_DTYPE_OK:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_DTYPE_OK = False
    acc.add_(torch.mm(a, b))


def _project(a, v, t, E, out, *, ks=None, idx=None, e_sign=1):
    M, D = a.shape
    if M == 0 or D == 0:
        return
    bd = min(ROW_D, max(16, triton.next_power_of_2(D)))
    _launch(_project_kernel, (triton.cdiv(M, ROW_BLOCK),),
            a, v, t, ks, E, idx, out, M, D, a.stride(0), v.stride(0), v.stride(1),
            E_SIGN=e_sign, HAS_KS=ks is not None, HAS_IDX=idx is not None,
            ACC=_acc(out.dtype)[0], BLOCK_M=ROW_BLOCK, BLOCK_D=bd, **ROW_LAUNCH)


def margin_ce_bwd(features: torch.Tensor, weight: Optional[torch.Tensor], labels: torch.Tensor,
                  saved: _Saved, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  offset: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                  need_dx: bool = True, need_dw: bool = True,
                  bias: Optional[torch.Tensor] = None, db: Optional[torch.Tensor] = None):
    """dL/dfeatures, dL/dweight (or dL/dcosine, None) for dL/dcos_ij =
    a_i exp(z_ij + offset_j - lse_i) dz_ij/dcos_ij off the target and b_i at it
    (lse, a, b: contiguous [N]). With `keep` the columns are those rows of
    weight, and dL/dweight is 0 on the others. A gradient not needed is None.
    normalize=False (saved.prep.qx None): cos is x.W_j (+ bias_j), so dL/dx = G W,
    dL/dW = G^T x with no projection; `db` (zeros [C], compute dtype) receives
    dL/dbias, the column sums of the G tiles, unrounded."""
    from_cos = weight is None
    N = features.shape[0]
    C = features.shape[1] if from_cos else (weight.shape[0] if keep is None else keep.numel())
    blk = saved.blocks
    acc, tdt = _acc(features.dtype)
    dev = features.device
    common = dict(KIND=saved.kind, HAS_OFFSET=offset is not None, HAS_KEEP=keep is not None,
                  IS_F64=features.dtype == torch.float64, ACC=acc,
                  PREC=_precision(features.dtype), UPCAST=_upcast(features.dtype),
                  BLOCK_N=blk.outer, BLOCK_C=blk.sweep, BLOCK_D=blk.d,
                  num_warps=blk.num_warps, num_stages=blk.num_stages)
    if from_cos:  # G is dL/dcos itself: the whole [N, C] is the one chunk
        dcos = torch.empty(N, C, dtype=features.dtype, device=dev)
        _launch(_margin_ce_grad_kernel,
                (triton.cdiv(N, blk.outer) * triton.cdiv(C, blk.sweep),),
                features, features, None, None, labels, saved.params, offset, keep, lse, a, b,
                dcos, None, None, features.stride(0), features.stride(1), 0, 0, labels.stride(0), C,
                N, C, 0, 0, 0, N, C, saved.ignore_index, FROM_COSINE=True, **common)
        return dcos, None
    D = features.shape[1]
    pr = saved.prep
    linear = pr.qx is None
    need_db = db is not None
    dx = torch.zeros(N, D, dtype=features.dtype, device=dev) if need_dx else None
    dw = None
    if need_dw:
        dw = (torch.empty if keep is None else torch.zeros)(weight.shape, dtype=weight.dtype,
                                                            device=dev)
    if not need_db and (D == 0 or not (need_dx or need_dw)):
        # D = 0: nothing depends on the (empty) features
        return dx, (dw.zero_() if dw is not None else None)
    if linear:
        common.update(NORMALIZE=False, HAS_BIAS=bias is not None)
    xs = pr.xs
    rows_c = min(N, blk.chunk_rows or blk.outer)
    cols_c = min(C, blk.chunk_cols or blk.sweep)
    G = torch.empty(rows_c, cols_c, dtype=features.dtype, device=dev)
    # dL/db's per-tile column sums, [row blocks of a chunk, cols_c] (row stride cols_c)
    Gs = torch.empty(triton.cdiv(rows_c, blk.outer), cols_c, dtype=tdt,
                     device=dev) if need_db else None
    A = torch.zeros(N, D, dtype=tdt, device=dev) if need_dx else None
    strides = (xs.stride(0), xs.stride(1), weight.stride(0), weight.stride(1), labels.stride(0),
               cols_c)
    for c0 in range(0, C, cols_c):
        nc = min(cols_c, C - c0)
        if need_dx:  # the chunk's rows of W (a sampled shard: one chunk of kept rows)
            wc = weight[c0:c0 + nc] if keep is None else weight.index_select(0, keep[c0:c0 + nc])
        B = torch.zeros(nc, D, dtype=tdt, device=dev) if need_dw else None
        for r0 in range(0, N, rows_c):
            nr = min(rows_c, N - r0)
            g = G[:nr, :nc]
            _launch(_margin_ce_grad_kernel,
                    (triton.cdiv(nr, blk.outer) * triton.cdiv(nc, blk.sweep),),
                    xs, weight, pr.qx, pr.rw, labels, saved.params, offset, keep, lse, a, b, g,
                    bias, Gs, *strides, N, C, D, r0, c0, nr, nc, saved.ignore_index,
                    FROM_COSINE=False, **common)
            if need_db:
                db[c0:c0 + nc] += Gs[:triton.cdiv(nr, blk.outer), :nc].sum(0)
            if need_dx:
                _addmm_acc(A[r0:r0 + nr], g, wc)
            if need_dw:
                _addmm_acc(B, g.T, xs[r0:r0 + nr])
        if need_dw and linear:
            dw[c0:c0 + nc] = B
        elif need_dw:  # dW_j = B_j - <B_j, v_j> v_j, v_j = W_j 2^E/|W_j| 2^-E
            if keep is None:
                _project(B, weight[c0:c0 + nc], pr.rw[c0:c0 + nc], pr.E, dw[c0:c0 + nc],
                         e_sign=-1)
            else:
                _project(B, weight, pr.rw[c0:c0 + nc], pr.E, dw, idx=keep[c0:c0 + nc],
                         e_sign=-1)
    if need_dx and linear:
        dx.copy_(A)
    elif need_dx:  # dx_i = 2^-(e_i + E) (A_i - <A_i, u_i> u_i), u_i = xs_i qx_i 2^E
        _project(A, xs, pr.qx, pr.E, dx, ks=pr.ex, e_sign=1)
    return dx, dw


# ----------------------------------------------------------------- autograd Function

class MarginCrossEntropyFunction(torch.autograd.Function):
    """inputs = (features, weight), (features, weight, bias) (p.normalize False) or
    (cosine,); only they receive gradients (a per-class margin or class weight is a
    constant here). With p.with_stats the outputs are (loss, lse_other [N], cos_y [N]),
    the last two without gradient."""

    @staticmethod
    def forward(ctx, p: MarginParams, labels, m_vec, class_weight, *inputs):
        features = inputs[0]
        weight = inputs[1] if len(inputs) >= 2 else None
        bias = inputs[2] if len(inputs) == 3 else None
        tdt = _acc(features.dtype)[1]
        ctx.p = p
        ctx.shapes = [(t.shape, t.dtype) for t in inputs]
        ctx.empty = features.shape[0] == 0
        if ctx.empty:  # nothing to launch: zero loss, zero gradients of the right shapes
            out = torch.zeros(0, dtype=tdt, device=features.device)
            return _with_stats(ctx, p, out if p.reduction == "none" else out.sum(), out, out)
        params = p.tensor(tdt, features.device)
        blocks = kind_blocks(p.blocks or default_blocks(
            features.dtype, 0 if weight is None else features.shape[1]), features.dtype, p.kind)
        stats, _, prep = margin_ce_fwd(features, weight, labels, kind=p.kind, params=params,
                                       m_vec=m_vec, class_weight=class_weight,
                                       ignore_index=p.ignore_index, blocks=blocks,
                                       normalize=p.normalize, bias=bias,
                                       row_weight=p.row_weight)
        ctx.saved = _Saved(KINDS.index(p.kind), params, p.ignore_index, blocks, prep, stats)
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
        need = ctx.needs_input_grad[4:]
        bias = inputs[2] if len(inputs) == 3 else None
        db = None
        if bias is not None and need[2]:
            db = torch.zeros(bias.shape, dtype=a.dtype, device=a.device)
        dx, dw = margin_ce_bwd(inputs[0], inputs[1] if len(inputs) >= 2 else None, labels, sv,
                               sv.stats[ST_LSE], a, a * sv.stats[ST_DTGT], need_dx=need[0],
                               need_dw=len(need) >= 2 and need[1], bias=bias, db=db)
        grads = (dx, dw, None if db is None else db.to(bias.dtype))
        return head + grads[:len(inputs)]


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
    the loss's gradient chunks with lse = the row shift, a = dL/dsum_exp
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
            blocks = kind_blocks(p.blocks or default_blocks(features.dtype, features.shape[1]),
                                 features.dtype, p.kind)
            stats, wrong, prep = margin_ce_fwd(features, weight, col, kind=p.kind,
                                               params=params, m_vec=None, class_weight=None,
                                               ignore_index=-1, blocks=blocks, offset=offset,
                                               partials=True, keep=keep)
            ctx.saved = _Saved(KINDS.index(p.kind), params, -1, blocks, prep, stats)
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
        need = ctx.needs_input_grad[4:]
        dx, dw = margin_ce_bwd(features, weight, col, sv, shift.contiguous(), a, b, offset, keep,
                               need_dx=need[0], need_dw=need[1])
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
          blocks: Optional[Blocks] = None, with_stats: bool = False, normalize: bool = True,
          bias: Optional[torch.Tensor] = None, row_weight: Optional[torch.Tensor] = None):
    """MarginCrossEntropyFunction on (features, weight) or (cosine,); `blocks`
    overrides the tile sizes (tests). normalize=False: raw logits s * (x.W_j + bias_j).
    row_weight [N] replaces class_weight by per-row weights."""
    m_vec = None
    if isinstance(m, torch.Tensor):
        # per-class vectors are read by class index: contiguous; a 0-d m is a scalar
        m_vec, m = (m.detach().contiguous(), 0.0) if m.dim() == 1 else (None, float(m))
    if row_weight is not None:
        class_weight = row_weight
    if class_weight is not None:
        class_weight = class_weight.detach().contiguous()
    p = MarginParams(kind, float(s), float(m), float(m1), float(m2), float(m3),
                     float(elm_lambda), int(ignore_index), reduction, blocks, with_stats,
                     bool(normalize), row_weight is not None)
    if not normalize and bias is not None:
        inputs = inputs + (bias.contiguous(),)
    return MarginCrossEntropyFunction.apply(p, labels, m_vec, class_weight, *inputs)


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         kind: str = "arcface", s: float = 64.0,
                         m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                         m3: float = 0.0, elm_lambda: float = 0.5,
                         class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", normalize: bool = True,
                         bias: Optional[torch.Tensor] = None,
                         label_smoothing: float = 0.0, sub_centers: int = 1) -> torch.Tensor:
    """normalize=False (kinds normface, cosface, ldam): logits s * (x.W_j + b_j), the
    kernels' products read raw (no inverse norms, no scaled copy of x), dL/db the
    column sums of the gradient tiles. label_smoothing: the fused cross-entropy with
    per-row weights plus an O(N D + C D) term (fused_margin.reference.smoothing),
    arcgrad and elm with a per-class margin by the reference. sub_centers > 1 is not
    in these kernels yet: fused_margin.functional hands such calls to the reference."""
    if sub_centers != 1:
        raise NotImplementedError("the Triton margin kernels do not take sub_centers yet; "
                                  "fused_margin.margin_cross_entropy serves them by the reference")
    eps = float(label_smoothing)
    if not eps:
        return apply(labels, features, weight, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                     elm_lambda=elm_lambda, class_weight=class_weight,
                     ignore_index=ignore_index, reduction=reduction, normalize=normalize,
                     bias=bias)
    from ..reference import angular as ref
    from ..reference.reduction import reduce_loss
    from ..reference.smoothing import needs_reference, smoothed_cross_entropy

    if needs_reference(kind, m, normalize, eps):
        return ref.margin_cross_entropy(
            features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
            elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, normalize=normalize, bias=bias, label_smoothing=eps)

    def ce(row_w, red_w):
        per = apply(labels, features, weight, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                    elm_lambda=elm_lambda, class_weight=None, ignore_index=ignore_index,
                    reduction="none", normalize=normalize, bias=bias, row_weight=row_w)
        return reduce_loss(per, red_w, reduction)

    return smoothed_cross_entropy(
        ce, features, weight, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
        elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, normalize=normalize, bias=bias, eps=eps)


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
