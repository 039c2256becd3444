"""Input validation, in one place, run before any backend sees a tensor.

Every public function validates here first, so a bad shape, dtype, device or
label is a clear Python error and never a memory read inside a kernel.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
MARGIN_KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm", "arcgrad",
                "adaface")
# kinds whose margin may be a per-class tensor [C]
PER_CLASS_KINDS = ("arcface", "cosface", "ldam", "elm")
MINING = ("semihard", "hard", "all")
DISTANCES = ("l2", "squared_l2", "cosine")


def tensor(name: str, t, *, dim: Optional[int] = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:
        where = ", ".join(f"{k} is {v.dtype}" for k, v in tensors.items())
        raise TypeError(f"floating inputs must share one dtype, got {where}")


def reduction(r: str) -> None:
    if r not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {r!r}")


# Scalar parameters enter float32 arithmetic (the kernels, and the reference for
# 16-bit and float32 inputs): a finite Python float past float32's range (s = 1e300
# rounds to inf) or a divisor that underflows (temperature = 1e-300, eps = 1e-50
# round to 0) would give NaN. Magnitudes past SCALAR_MAX and divisors below
# DIVISOR_MIN are rejected, with room left for the products they enter.
SCALAR_MAX = 1e30
DIVISOR_MIN = 1e-30
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def finite(name: str, v, *, positive: bool = False, nonnegative: bool = False,
           divisor: bool = False) -> None:
    """A real, finite scalar within float32-safe bounds: |v| <= SCALAR_MAX, and
    with `divisor` (it divides a distance or cost) v >= DIVISOR_MIN."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        fv = float(v)
    except OverflowError:  # an int past float64's range
        raise ValueError(f"{name} must be finite, got an int of {int(v).bit_length()} bits") \
            from None
    if not math.isfinite(fv):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if abs(fv) > SCALAR_MAX:
        raise ValueError(f"{name} = {v:g} is too large: scalars must have magnitude at most "
                         f"{SCALAR_MAX:g} (float32 arithmetic would overflow to inf / NaN)")
    if divisor and fv < DIVISOR_MIN:
        raise ValueError(f"{name} = {v:g} is too small: it divides the distances (costs), and "
                         f"must be at least {DIVISOR_MIN:g} (float32 arithmetic would round it "
                         "to 0 or overflow the quotient to inf / NaN)")


def integer(name: str, v, *, minimum: int = 0, maximum: int = INT64_MAX) -> None:
    """A Python int in [minimum, maximum] (by default at most int64's maximum, what
    the kernels take)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if v > maximum:
        raise ValueError(f"{name} must be <= {maximum} (an int64), got {v}")


def choice(name: str, v, options: Sequence[str]) -> None:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")


def labels(y, n: int, num_classes: int, *, ignore_index: Optional[int] = None,
           name: str = "labels") -> torch.Tensor:
    """int64 [n], every value in [0, num_classes) or == ignore_index."""
    tensor(name, y, dim=1)
    if ignore_index is not None:
        integer("ignore_index", ignore_index, minimum=INT64_MIN)
    if y.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but there are {n} samples")
    if n == 0:
        return y
    bad = (y < 0) | (y >= num_classes)
    if ignore_index is not None:
        bad &= y != ignore_index
    if bool(bad.any()):
        value = int(y[bad][0])
        extra = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name} must lie in [0, {num_classes}){extra}; found {value}")
    return y


def class_vector(name: str, v, num_classes: int, *, nonnegative: bool = True) -> None:
    tensor(name, v, dim=1, floating=True)
    if v.shape[0] != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got {v.shape[0]}")
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite")
    if nonnegative and v.numel() and bool((v < 0).any()):
        raise ValueError(f"{name} must be >= 0")


MARGIN_PER = ("class", "sample")
# kinds whose margin may be a per-sample tensor [N] (combined's m1/m2/m3 stay scalars;
# normface and arcgrad have no margin)
PER_SAMPLE_KINDS = ("arcface", "cosface", "sphereface", "ldam", "elm", "adaface")


def margin_mode(m, num_classes: int, n: Optional[int], margin_per: str = "class") -> str:
    """"scalar", "class" ([C]) or "sample" ([N]) for a margin m: a 1-D length that is
    N and not C is per sample, C and not N per class; where N == C, margin_per says
    which. n=None: per-sample margins are not accepted (per class only)."""
    choice("margin_per", margin_per, MARGIN_PER)
    if not isinstance(m, torch.Tensor) or m.dim() == 0:
        return "scalar"
    if m.dim() != 1:
        raise ValueError(f"m must be a number, a 0-d tensor, [C] or [N], got shape "
                         f"{tuple(m.shape)}")
    k = m.shape[0]
    if n is None:
        return "class"
    if k == n and (k != num_classes or margin_per == "sample"):
        return "sample"
    if k == num_classes and margin_per == "class":
        return "class"
    raise ValueError(f"m must have one entry per class ({num_classes}) or per sample ({n}), "
                     f"got {k}")


def margin(m: Union[float, torch.Tensor], kind: str, num_classes: int, n: Optional[int] = None,
           margin_per: str = "class") -> str:
    """Validates m; returns margin_mode's answer."""
    mode = margin_mode(m, num_classes, n, margin_per)
    if isinstance(m, torch.Tensor):
        if mode == "sample":
            if kind not in PER_SAMPLE_KINDS:
                raise ValueError(f"a per-sample margin tensor [N] is supported for kinds "
                                 f"{PER_SAMPLE_KINDS}, not {kind!r}")
            tensor("m", m, dim=1, floating=True)
            if m.numel() and not bool(torch.isfinite(m.detach()).all()):
                raise ValueError("m must be finite")
        elif kind not in PER_CLASS_KINDS:
            raise ValueError(f"a per-class margin tensor is supported for kinds {PER_CLASS_KINDS}, "
                             f"not {kind!r}")
        elif m.dim() == 0:
            finite("m", float(m))
        else:
            class_vector("m", m.detach(), num_classes, nonnegative=False)
        lo, hi = (float(m.detach().min()), float(m.detach().max())) if m.numel() else (0.0, 0.0)
    else:
        finite("m", m)
        lo = hi = float(m)
    # an additive angle beyond pi/2 no longer separates classes (the target logit
    # stops being monotone in theta); negative margins (few-shot work) are legal
    if kind == "arcface" and not (-ANGLE_LIMIT <= lo and hi <= ANGLE_LIMIT):
        raise ValueError(f"arcface margins must lie in [-pi/2, pi/2], got [{lo}, {hi}]")
    if kind == "sphereface" and lo < 0:
        raise ValueError(f"sphereface's multiplicative margin must be >= 0, got {lo}")
    return mode


ANGLE_LIMIT = math.pi / 2


def combined_margins(kind: str, m1: float, m2: float) -> None:
    if kind != "combined":
        return
    if not m1 > 0:
        raise ValueError(f"combined needs m1 > 0 (it multiplies theta), got {m1}")
    if not -ANGLE_LIMIT <= m2 <= ANGLE_LIMIT:
        raise ValueError(f"combined's additive angle m2 must lie in [-pi/2, pi/2], got {m2}")


# ---------------------------------------------------------------- per family

def margin_cross_entropy(features, weight, labels_, *, kind, s, m, m1, m2, m3, elm_lambda,
                         class_weight, ignore_index, reduction_, normalize=True, bias=None,
                         label_smoothing=0.0, margin_per=None, sub_centers=1) -> str:
    """Returns the margin's mode ("scalar", "class", "sample"); margin_per=None
    accepts no per-sample margin (callers that do not serve one)."""
    tensor("features", features, dim=2, floating=True)
    tensor("weight", weight, dim=2, floating=True)
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features [N, D] and weight [C, D] disagree on D: "
                         f"{tuple(features.shape)} vs {tuple(weight.shape)}")
    # features and weight may differ in dtype: functional.mixed promotes them (or casts
    # them to the autocast dtype)
    integer("sub_centers", sub_centers, minimum=1)
    if weight.shape[0] % sub_centers:
        raise ValueError(f"with sub_centers={sub_centers}, weight must be [C*K, D] (rows c*K .. "
                         f"c*K+K-1 for class c); {weight.shape[0]} rows is not a multiple of "
                         f"{sub_centers}")
    if sub_centers > 1 and not normalize:
        raise ValueError("sub_centers applies to cosines (normalize=True) only")
    mode = _margin_common(features.shape[0], weight.shape[0] // sub_centers, labels_,
                          kind=kind, s=s, m=m,
                          m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda, class_weight=class_weight,
                          ignore_index=ignore_index, reduction_=reduction_,
                          margin_per=margin_per)
    same_device(features=features, weight=weight, labels=labels_, class_weight=class_weight,
                m=m if isinstance(m, torch.Tensor) else None)
    linear_mode(kind, normalize, bias, label_smoothing, weight)
    return mode


# kinds that normalize=False accepts (reference.angular.LINEAR_KINDS)
LINEAR_KINDS = ("normface", "cosface", "ldam")


def linear_mode(kind, normalize, bias, label_smoothing, weight) -> None:
    """normalize / bias / label_smoothing of margin_cross_entropy."""
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not normalize and kind not in LINEAR_KINDS:
        raise ValueError(f"normalize=False supports the additive kinds {LINEAR_KINDS} (logits "
                         f"s*(x.W_j + b_j), the target lowered by s*m); {kind!r} is defined on "
                         "cosines or angles")
    finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if bias is not None:
        if normalize:
            raise ValueError("bias applies only with normalize=False (logits s*(x.W_j + b_j))")
        tensor("bias", bias, dim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [C] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        same_device(weight=weight, bias=bias)


def margin_cross_entropy_from_cosine(cosine, labels_, *, kind, s, m, m1, m2, m3, elm_lambda,
                                     class_weight, ignore_index, reduction_,
                                     margin_per=None) -> str:
    tensor("cosine", cosine, dim=2, floating=True)
    mode = _margin_common(cosine.shape[0], cosine.shape[1], labels_, kind=kind, s=s, m=m,
                          m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda, class_weight=class_weight,
                          ignore_index=ignore_index, reduction_=reduction_,
                          margin_per=margin_per)
    same_device(cosine=cosine, labels=labels_, class_weight=class_weight,
                m=m if isinstance(m, torch.Tensor) else None)
    return mode


def _margin_common(n, c, labels_, *, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                   ignore_index, reduction_, margin_per=None) -> str:
    choice("kind", kind, MARGIN_KINDS)
    reduction(reduction_)
    finite("s", s)
    for name, v in (("m1", m1), ("m2", m2), ("m3", m3), ("elm_lambda", elm_lambda)):
        finite(name, v)
    mode = margin(m, kind, c, None if margin_per is None else n,
                  "class" if margin_per is None else margin_per)
    combined_margins(kind, m1, m2)
    integer("ignore_index", ignore_index, minimum=INT64_MIN)
    if class_weight is not None:
        class_vector("class_weight", class_weight, c)
    if c == 0:
        raise ValueError("there must be at least one class")
    labels(labels_, n, c, ignore_index=ignore_index)
    return mode


def logits_labels(logits, labels_, *, ignore_index, reduction_) -> None:
    tensor("logits", logits, dim=2, floating=True)
    reduction(reduction_)
    integer("ignore_index", ignore_index, minimum=INT64_MIN)
    if logits.shape[1] == 0:
        raise ValueError("there must be at least one class")
    labels(labels_, logits.shape[0], logits.shape[1], ignore_index=ignore_index)


def cost_matrix(cost, k: int, n: Optional[int]) -> None:
    tensor("cost", cost, floating=True)
    if cost.dim() == 2:
        ok = tuple(cost.shape) == (k, k)
    elif cost.dim() == 3:
        ok = tuple(cost.shape) == (n, k, k)
    else:
        ok = False
    if not ok:
        raise ValueError(f"cost must be [K, K] = [{k}, {k}] or [N, K, K] = [{n}, {k}, {k}], "
                         f"got {tuple(cost.shape)}")
    if cost.numel() and not bool(torch.isfinite(cost).all()):
        raise ValueError("cost must be finite")


def marginals(name: str, a, n: Optional[int], k: Optional[int]) -> None:
    tensor(name, a, dim=2, floating=True)
    if (n is not None and a.shape[0] != n) or (k is not None and a.shape[1] != k):
        raise ValueError(f"{name} must be [N, K] = [{n}, {k}], got {tuple(a.shape)}")
    if a.numel() and bool((a < 0).any()):
        raise ValueError(f"{name} must be non-negative (a probability vector per row)")
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} must be finite")


# How far apart two marginals' masses (or a target row's mass and 1) may be,
# relative, by the coarser input dtype: a few roundings of K entries each.
MASS_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def equal_mass(a, b) -> None:
    """sum a_n = sum b_n for every sample n (balanced OT: with unequal masses no
    plan has both marginals, and solvers disagree on what to return). A sample
    whose a or b is all zero is exempt: it has the zero plan by definition."""
    if a.numel() == 0:
        return
    sa, sb = a.sum(1, dtype=torch.float64), b.sum(1, dtype=torch.float64)
    rtol = max(MASS_RTOL[a.dtype], MASS_RTOL[b.dtype])
    bad = (sa > 0) & (sb > 0) & ((sa - sb).abs() > rtol * torch.maximum(sa, sb))
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"a and b must have equal mass in every sample (relative tolerance "
                         f"{rtol:g} for {a.dtype}/{b.dtype}); sample {n} has sum(a) = "
                         f"{float(sa[n]):.9g}, sum(b) = {float(sb[n]):.9g}. Normalise both "
                         "rows (unbalanced OT is not supported)")


def distribution_rows(name: str, t) -> None:
    """every row of t sums to 1 (a probability vector, as softmax rows are), or is
    all zero (an empty sample: zero plan, zero loss)."""
    if t.numel() == 0:
        return
    st = t.sum(1, dtype=torch.float64)
    rtol = MASS_RTOL[t.dtype]
    bad = (st > 0) & ((st - 1).abs() > rtol)
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} rows must sum to 1 (probability distributions, like the "
                         f"softmax rows they are matched with; relative tolerance {rtol:g} for "
                         f"{t.dtype}) or be all zero; row {n} sums to {float(st[n]):.9g}")


def sinkhorn_params(eps, n_iter, tol) -> None:
    finite("eps", eps, positive=True, divisor=True)
    integer("n_iter", n_iter, minimum=1)
    if tol is not None:
        finite("tol", tol, positive=True)


def embeddings_labels(name: str, x, labels_) -> None:
    tensor(name, x, dim=2, floating=True)
    labels(labels_, x.shape[0], 2 ** 62)
    same_device(**{name: x, "labels": labels_})


def features_centers(features, labels_, centers, *, ignore_index=None) -> None:
    tensor("features", features, dim=2, floating=True)
    tensor("centers", centers, dim=2, floating=True)
    if centers.shape[1] != features.shape[1]:
        raise ValueError(f"features [N, D] and centers [C, D] disagree on D: "
                         f"{tuple(features.shape)} vs {tuple(centers.shape)}")
    if centers.shape[0] == 0:
        raise ValueError("there must be at least one class")
    labels(labels_, features.shape[0], centers.shape[0], ignore_index=ignore_index)
    same_device(features=features, labels=labels_, centers=centers)


# ------------------------------------------------------------- module settings
# The nn modules validate their settings in __init__, with the same checks the
# functions run, so a bad argument fails where it is written, not at the first
# forward.

def backend_name(backend) -> None:
    from .dispatch import BACKENDS
    choice("backend", backend, BACKENDS)


def margin_config(num_classes: int, *, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                  ignore_index, reduction_, backend) -> None:
    choice("kind", kind, MARGIN_KINDS)
    reduction(reduction_)
    backend_name(backend)
    finite("s", s)
    for name, v in (("m1", m1), ("m2", m2), ("m3", m3), ("elm_lambda", elm_lambda)):
        finite(name, v)
    margin(m, kind, num_classes)
    combined_margins(kind, m1, m2)
    integer("ignore_index", ignore_index, minimum=INT64_MIN)
    if class_weight is not None:
        class_vector("class_weight", class_weight, num_classes)


def sizes(**named) -> None:
    for name, v in named.items():
        integer(name, v, minimum=1)


def cost_buffer(cost) -> None:
    """A WassersteinLoss cost: a floating [K, K] (or [N, K, K]) finite tensor."""
    tensor("cost", cost, floating=True)
    if cost.dim() == 2:
        if cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
            raise ValueError(f"cost must be a square [K, K] matrix with K >= 1, got "
                             f"{tuple(cost.shape)}")
    elif cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be [K, K] or [N, K, K], got {tuple(cost.shape)}")
    if cost.numel() and not bool(torch.isfinite(cost).all()):
        raise ValueError("cost must be finite")
