"""Angular and cosine margin softmax cross-entropy, eager PyTorch.

cos = normalize(x) @ normalize(W).T; every non-target logit is s*cos_j (arcgrad:
-s*theta_j); the target logit is transformed by `kind` (table in docs/api.md). The
pieces are split as pytorch-metric-learning does: cosines, target transform,
scale, cross-entropy.

Conventions every backend follows (docs/numerics.md):
- a row whose L2 norm is <= NORM_EPS has inverse norm 0: cosine 0 with every
  class, and no gradient through its normalisation (no 1/eps blow-up);
- kinds that need theta or sin(theta) (arcface, combined, sphereface, arcgrad)
  clamp the cosine to [-1 + COS_EPS, 1 - COS_EPS] first, torch.clamp style (zero
  gradient outside), so theta = 0 gives a finite gradient;
- arcface: insightface's fallback, cos(theta + m) where cos(theta) > cos(pi - m),
  else cos(theta) - m*sin(m); combined: cos(m1*theta + m2) - m3 where
  m1*theta + m2 <= pi, else a fallback that keeps the logit decreasing in theta
  (the same as arcface's when m1 = 1);
- sphereface: SphereFace's monotone psi(theta) = (-1)^k cos(m*theta) - 2k,
  k = floor(m*theta/pi), equal to cos(m*theta) on [0, pi/m];
- elm: c* = argmax_{j != y} cos_j, the first index on ties, held fixed for the
  gradient; computations run in float32 for float16/bfloat16 inputs and the loss
  is returned in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .reduction import reduce_loss

NORM_EPS = 1e-12
COS_EPS = 1e-6
THETA_KINDS = ("arcface", "combined", "sphereface", "arcgrad", "adaface")
ADAFACE_EPS = 1e-3  # AdaFace's clip of the margined angle to [eps, pi - eps]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1/||x_i|| per row, 0 where ||x_i|| <= NORM_EPS (safe under autograd).
    Each row is divided by its largest |entry| before squaring, so rows past
    sqrt(float32 max) ~ 1.8e19 stay finite; the scale is detached because the
    value does not depend on it."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    a = x.detach().abs().amax(dim=1)
    a = torch.where(a > 0, a, torch.ones_like(a))
    sq = ((x / a[:, None]) ** 2).sum(dim=1)
    big = a * sq.detach().sqrt() > NORM_EPS
    return torch.where(big, torch.rsqrt(torch.where(big, sq, torch.ones_like(sq))) / a,
                       torch.zeros_like(sq))


def cosine(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dt = compute_dtype(features.dtype)
    x, w = features.to(dt), weight.to(dt)
    return (x * inv_norm(x)[:, None]) @ (w * inv_norm(w)[:, None]).T


def _per_row(m: Union[float, torch.Tensor], idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The margin of each row at class idx: m scalar, [C] (m[idx]) or per sample
    [N, 1] (row i's own m, whatever idx: ELM's c* term reads it too)."""
    if isinstance(m, torch.Tensor):
        m = m.to(like.dtype)
        if m.dim() == 2:
            return m[:, 0]
        return m.expand(like.shape[0]) if m.dim() == 0 else m[idx]
    return torch.full_like(like, float(m))


def combined_fallback(m1: float, m2: float):
    """(threshold on cos theta, offset): the logit is cos(theta) - m3 - offset
    wherever cos(theta) <= threshold, i.e. where m1*theta + m2 would pass pi."""
    if m1 == 1.0:
        return math.cos(math.pi - m2), m2 * math.sin(m2)  # insightface's arcface fallback
    theta_star = (math.pi - m2) / m1
    if theta_star >= math.pi:
        return -2.0, 0.0  # never reached: cos(theta) > -1 after clamping
    if theta_star <= 0:
        return 2.0, 2.0  # always: cos(theta) - m3 - 2 keeps the logit below -1 - m3
    # continuous at theta*: cos(theta*) - offset = -1
    return math.cos(theta_star), 1.0 + math.cos(theta_star)


def target_transform(cos_y: torch.Tensor, kind: str, m_y: torch.Tensor, m1: float, m2: float,
                     m3: float) -> torch.Tensor:
    """The target logit divided by s, for every kind but arcgrad and elm's extra term."""
    if kind == "normface":
        return cos_y
    if kind in ("cosface", "ldam", "elm"):
        return cos_y - m_y
    c = cos_y.clamp(-1 + COS_EPS, 1 - COS_EPS)
    if kind == "arcface":
        sin = torch.sqrt(1 - c * c)
        phi = c * torch.cos(m_y) - sin * torch.sin(m_y)
        return torch.where(c > torch.cos(math.pi - m_y), phi, c - m_y * torch.sin(m_y))
    theta = torch.acos(c)
    if kind == "adaface":
        # AdaFace (Kim et al. 2022, Eq. 11-12): m_y is the clipped norm-hat r, m2 the margin
        a = torch.clip(theta - m2 * m_y, ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return torch.cos(a) - m2 * (1 + m_y)
    if kind == "sphereface":
        k = torch.floor(m_y * theta / math.pi).detach()
        sign = 1 - 2 * torch.remainder(k, 2)
        return sign * torch.cos(m_y * theta) - 2 * k
    if kind == "combined":
        th, offset = combined_fallback(m1, m2)
        return torch.where(c > th, torch.cos(m1 * theta + m2) - m3, c - m3 - offset)
    raise ValueError(f"no target transform for kind {kind!r}")


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, *, kind: str = "arcface",
                  s: float = 64.0, m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0,
                  m2: float = 0.0, m3: float = 0.0, elm_lambda: float = 0.5,
                  ignore_index: int = -100) -> torch.Tensor:
    """The [N, C] logits the cross-entropy sees (ignored rows keep plain s*cos)."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    if kind == "arcgrad":
        return -s * torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    m_y = _per_row(m, y, cos_y)
    target = target_transform(cos_y, kind, m_y, m1, m2, m3)
    if kind == "elm" and cos.shape[1] > 1:
        others = cos.detach().scatter(1, y[:, None], float("-inf"))
        c_star = others.argmax(dim=1)
        target = target + elm_lambda * _per_row(m, c_star, cos_y)
    hit = torch.zeros_like(cos, dtype=torch.bool).scatter(1, y[:, None], valid[:, None])
    return s * torch.where(hit, target[:, None], cos)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weight: Optional[torch.Tensor],
                   ignore_index: int, reduction: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy on `logits`, label smoothing included:
    per row (1 - eps) w_y (lse - z_y) + eps / C sum_j w_j (lse - z_j) (w the class
    weights, 1 without), 0 for ignored rows; "mean" divides by sum_i w_{y_i}."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=1)
    per = lse - logits.gather(1, y[:, None]).squeeze(1)
    w = valid.to(logits.dtype)
    if class_weight is not None:
        w = w * class_weight.to(logits.dtype)[y]
    if label_smoothing:
        eps = float(label_smoothing)
        nll = lse[:, None] - logits
        if class_weight is not None:
            nll = nll * class_weight.to(logits.dtype)[None, :]
        smooth = nll.sum(1) / logits.shape[1]
        loss = (1 - eps) * per * w + eps * smooth
        return reduce_loss(torch.where(valid, loss, torch.zeros_like(per)), w, reduction)
    return reduce_loss(torch.where(valid, per * w, torch.zeros_like(per)), w, reduction)


# kinds that margin_cross_entropy(normalize=False) accepts: their target logit is
# additive (s * (x.W_y + b_y - m_y)), which reads the same on raw logits
LINEAR_KINDS = ("normface", "cosface", "ldam")


def linear_logits(features: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W.T (+ b), [N, C], in the compute dtype: normalize=False's "cosines"."""
    dt = compute_dtype(features.dtype)
    z = features.to(dt) @ weight.to(dt).T
    return z if bias is None else z + bias.to(dt)[None, :]


def margin_cross_entropy_from_cosine(cosine: torch.Tensor, labels: torch.Tensor, *,
                                     kind: str = "arcface", s: float = 64.0,
                                     m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0,
                                     m2: float = 0.0, m3: float = 0.0, elm_lambda: float = 0.5,
                                     class_weight: Optional[torch.Tensor] = None,
                                     ignore_index: int = -100, reduction: str = "mean",
                                     label_smoothing: float = 0.0) -> torch.Tensor:
    cos = cosine.to(compute_dtype(cosine.dtype))
    logits = margin_logits(cos, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                           elm_lambda=elm_lambda, ignore_index=ignore_index)
    return _cross_entropy(logits, labels, class_weight, ignore_index, reduction, label_smoothing)


def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         kind: str = "arcface", s: float = 64.0,
                         m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                         m3: float = 0.0, elm_lambda: float = 0.5,
                         class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", normalize: bool = True,
                         bias: Optional[torch.Tensor] = None,
                         label_smoothing: float = 0.0, sub_centers: int = 1) -> torch.Tensor:
    """normalize=False (kinds LINEAR_KINDS): logits s * (x.W_j + b_j), the target's
    lowered by s * m_y (cosface, ldam); normface with s=1 is plain linear
    cross-entropy. bias (optional [C], normalize=False only) joins the raw dot products.
    sub_centers=K: weight [C*K, D], rows c*K .. c*K+K-1 the sub-centres of class c; a
    class's cosine is the max over its sub-centres (gradient to the arg-max)."""
    if normalize:
        if bias is not None:
            raise ValueError("bias applies only with normalize=False")
        cos = subcenter_max(cosine(features, weight), sub_centers)
    else:
        if kind not in LINEAR_KINDS:
            raise ValueError(f"normalize=False supports kinds {LINEAR_KINDS}, got {kind!r}")
        cos = linear_logits(features, weight, bias)
    return margin_cross_entropy_from_cosine(
        cos, labels, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
        elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing)


def curricular_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             t: Union[float, torch.Tensor], *, s: float = 64.0, m: float = 0.5,
                             class_weight: Optional[torch.Tensor] = None,
                             ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """CurricularFace (Huang et al., CVPR 2020, Eq. 7-9): the ArcFace target (with its
    fallback) and every non-target cos_j > cos(theta_y + m) (a hard negative) replaced by
    cos_j * (t + cos_j); t (detached) is the caller's running average. N x C (eager)."""
    cos = cosine(features, weight)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    m_y = torch.full_like(cos_y, float(m))
    target = target_transform(cos_y, "arcface", m_y, 1.0, 0.0, 0.0)
    c = cos_y.clamp(-1 + COS_EPS, 1 - COS_EPS)
    cos_theta_m = (c * math.cos(m) - torch.sqrt(1 - c * c) * math.sin(m)).detach()
    t = torch.as_tensor(t, dtype=cos.dtype, device=cos.device).detach()
    hard = cos.detach() > cos_theta_m[:, None]
    others = torch.where(hard, cos * (t + cos), cos)
    hit = torch.zeros_like(cos, dtype=torch.bool).scatter(1, y[:, None], valid[:, None])
    logits = s * torch.where(hit, target[:, None], others)
    return _cross_entropy(logits, labels, class_weight, ignore_index, reduction)


def subcenter_max(cos: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """[N, C*K] cosines -> [N, C]: the max over each class's K sub-centres (torch.max's
    gradient goes to one arg-max per class)."""
    if sub_centers == 1:
        return cos
    n, ck = cos.shape
    return cos.view(n, ck // sub_centers, sub_centers).max(dim=2).values


def scaled_cosine(features: torch.Tensor, weight: torch.Tensor, s: float) -> torch.Tensor:
    """Inference logits s*cos, no margin."""
    return s * cosine(features, weight)


@torch.no_grad()
def adacos_scale(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float,
                 ignore_index: int = -100) -> torch.Tensor:
    """AdaCos's next scale (Eq. 10 of the ArcGrad paper) from this batch:
    log(B_avg) / cos(min(pi/4, theta_med)), B_avg the mean over rows of
    sum_{j != y} exp(s*cos_j), theta_med the median target angle. Returns a
    0-d float32 tensor; the unchanged s when no row is labelled."""
    return _adacos_scale_from_cosine(cosine(features, weight), labels, s, ignore_index)


def adacos_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, *,
                class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                reduction: str = "mean"):
    """(normface loss at scale s, AdaCos's next scale from the same cosines)."""
    cos = cosine(features, weight)
    loss = margin_cross_entropy_from_cosine(cos, labels, kind="normface", s=s, m=0.0,
                                            class_weight=class_weight,
                                            ignore_index=ignore_index, reduction=reduction)
    return loss, _adacos_scale_from_cosine(cos.detach(), labels, s, ignore_index)


@torch.no_grad()
def _adacos_scale_from_cosine(cos: torch.Tensor, labels: torch.Tensor, s: float,
                              ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    lse_other = torch.logsumexp((s * cos).scatter(1, y[:, None], float("-inf")), dim=1)
    return adacos_scale_from_stats(lse_other, cos_y, valid, s)


@torch.no_grad()
def adacos_scale_from_stats(lse_other: torch.Tensor, cos_y: torch.Tensor, valid: torch.Tensor,
                            s: float) -> torch.Tensor:
    """Eq. 10 from per-row log sum_{j != y} exp(s*cos_j) and target cosines, the
    O(N) statistics a fused forward sweep also produces."""
    if not bool(valid.any()):
        return torch.tensor(float(s), device=cos_y.device)
    lse_other, cos_y = lse_other[valid].double(), cos_y[valid]
    log_b_avg = torch.logsumexp(lse_other, dim=0) - math.log(lse_other.numel())
    theta_med = torch.acos(cos_y.clamp(-1 + COS_EPS, 1 - COS_EPS)).median()
    theta_med = torch.clamp(theta_med, max=math.pi / 4)
    return (log_b_avg / torch.cos(theta_med.double())).float()


# ------------------------------------------------------------------- helpers

def _counts(class_counts: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty 1-D sequence")
    if bool((counts <= 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("class_counts must be positive and finite")
    return counts


def ldam_margins(class_counts, max_m: float = 0.5) -> torch.Tensor:
    """LDAM's Delta_j proportional to n_j^(-1/4), the largest equal to max_m."""
    inv = _counts(class_counts) ** -0.25
    return (inv * (max_m / inv.max())).float()


def drw_weights(class_counts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights (1 - beta) / (1 - beta^n_j), normalised to sum C."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    counts = _counts(class_counts)
    w = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (w * (counts.numel() / w.sum())).float()


def camri_margins(num_classes: int, important, m: float) -> torch.Tensor:
    """CAMRI's per-class margin: m at the important class(es), 0 elsewhere."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    idx = torch.as_tensor(important, dtype=torch.long).reshape(-1)
    if idx.numel() == 0 or bool((idx < 0).any()) or bool((idx >= num_classes).any()):
        raise ValueError(f"important classes must lie in [0, {num_classes}), got {important!r}")
    if not math.isfinite(m):
        raise ValueError(f"m must be finite, got {m}")
    out = torch.zeros(num_classes)
    out[idx] = float(m)
    return out


def lambert_w(x: float) -> float:
    """Principal branch W0(x) for x >= 0, by Halley's iteration."""
    if x < 0:
        raise ValueError("lambert_w is implemented for x >= 0")
    w = math.log1p(x) if x < 3 else math.log(x) - math.log(math.log(x))
    for _ in range(50):
        ew = math.exp(w)
        f = w * ew - x
        step = f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
        w -= step
        if abs(step) <= 1e-15 * (1 + abs(w)):
            break
    return w


def arcgrad_scale(num_classes: int, gap: float) -> float:
    """Eq. 19 of the ArcGrad paper: s = (W((C - 1)/e) + 1) / gap (gap in radians)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not (math.isfinite(gap) and gap > 0):
        raise ValueError(f"gap must be a positive angle in radians, got {gap}")
    return (lambert_w((num_classes - 1) / math.e) + 1) / gap
