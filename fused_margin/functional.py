"""The public functions: validate the inputs, then hand them to the backend.

No math here: each function checks its arguments (fused_margin.checks) and
calls the implementation that fused_margin.dispatch picks for `backend` and
the tensors' device.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from . import checks
from .dispatch import resolve, resolve_unless
from .reference.feature_space import centred, unit_rows
from .reference.reduction import class_weighted as _class_weighted
from .reference.angular import arcgrad_scale, camri_margins, drw_weights, ldam_margins

__all__ = [
    "margin_cross_entropy", "margin_cross_entropy_from_cosine", "scaled_cosine",
    "adacos_scale", "adacos_loss",
    "ldam_margins", "drw_weights", "camri_margins", "arcgrad_scale",
    "weighted_cross_entropy", "crwwce_loss", "sinkhorn", "wasserstein_loss",
    "center_loss", "center_update", "contrastive_center_loss", "knn_std", "sigma2r_loss",
    "soft_nearest_neighbor_loss", "triplet_margin_loss", "git_loss", "triplet_center_loss",
    "contrastive_loss",
]

Margin = Union[float, torch.Tensor]


# ------------------------------------------------- 1. angular / cosine margins

def margin_cross_entropy(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         kind: str = "arcface", s: float = 64.0, m: Margin = 0.5,
                         m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                         elm_lambda: float = 0.5, class_weight: Optional[torch.Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         normalize: bool = True, bias: Optional[torch.Tensor] = None,
                         label_smoothing: float = 0.0, margin_per: str = "class",
                         sub_centers: int = 1, backend: str = "auto") -> torch.Tensor:
    """Softmax cross-entropy over s*cos(x, W_j) with the target logit shaped by `kind`.

    features [N, D], weight [C, D], labels [N] int64. See docs/api.md for the kinds.
    normalize=False (kinds normface, cosface, ldam): logits s*(x.W_j + b_j), the
    target's lowered by s*m_y; kind="normface", s=1 is plain linear cross-entropy,
    equal to F.cross_entropy(x @ W.T + bias, ...), without an N x C buffer on the
    fused backends. bias [C]: normalize=False only. label_smoothing: as
    F.cross_entropy defines it (class weights included), on the margined logits.
    m: a number, a 0-d tensor, [C] (per class) or [N] (per sample: kinds arcface,
    cosface, sphereface, ldam, elm); a length N and not C is per sample, and where
    N == C, margin_per="class" (default) or "sample" says which. A per-sample m
    carries a gradient (reference and cpu backends; the triton backend hands such
    calls to the reference, with one warning).
    sub_centers=K (sub-centre ArcFace, any kind): weight [C*K, D], rows c*K .. c*K+K-1
    the sub-centres of class c; each class's cosine is the max over its sub-centres
    (gradient to the arg-max), then the kind's margin. Triton: served by the reference.
    """
    mode = checks.margin_cross_entropy(features, weight, labels, kind=kind, s=s, m=m, m1=m1,
                                       m2=m2, m3=m3, elm_lambda=elm_lambda,
                                       class_weight=class_weight, ignore_index=ignore_index,
                                       reduction_=reduction, normalize=normalize, bias=bias,
                                       label_smoothing=label_smoothing, margin_per=margin_per,
                                       sub_centers=sub_centers)
    linear = not normalize or bias is not None or bool(label_smoothing)
    # what the Triton kernel lacks (the reference serves it there, one warning each)
    if kind == "adaface":
        pending = (_PER_SAMPLE_PENDING, "kind='adaface'")
    elif sub_centers > 1:
        pending = (_SUB_CENTER_PENDING, "sub_centers")
    elif mode == "sample":
        pending = (_PER_SAMPLE_PENDING, "per-sample margins")
    else:
        pending = None
    if pending is not None:
        fn = resolve_unless("margin_cross_entropy", backend, features.device, *pending)
    else:
        fn = resolve("margin_cross_entropy", backend, features.device)
    if bias is not None:
        features, weight, bias = mixed(features, weight, bias)
    else:
        features, weight = mixed(features, weight)
    if mode == "sample":
        m = m.reshape(-1, 1)  # backends take a per-sample margin as [N, 1] ([C] stays 1-D)
    kw = dict(kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda,
              ignore_index=ignore_index)
    if sub_centers > 1:
        kw["sub_centers"] = sub_centers
    if linear:
        if label_smoothing and _fused(fn) and _wants_grad(class_weight):
            raise RuntimeError(
                "fused_margin: margin_cross_entropy with label_smoothing on a fused backend "
                "cannot return class_weight's gradient (the smoothing term weighs every class); "
                "use backend=\"reference\" or pass class_weight.detach()")
        kw.update(normalize=normalize, bias=bias, label_smoothing=float(label_smoothing))
    with autocast_off(features.device):
        return _margin_ce_call(lambda **k: fn(features, weight, labels, **kw, **k), fn,
                               "margin_cross_entropy", labels, m, class_weight, ignore_index,
                               reduction, per_sample=mode == "sample")


# backends whose margin_cross_entropy kernel does not yet take per-sample margins
# (m of length N), sub-centres or kind="adaface" (issue 19): the reference serves
# those calls (one warning)
_PER_SAMPLE_PENDING = {"triton": "pending in the Triton margin kernel (issue 19)"}
_SUB_CENTER_PENDING = _PER_SAMPLE_PENDING


def margin_cross_entropy_from_cosine(cosine: torch.Tensor, labels: torch.Tensor, *,
                                     kind: str = "arcface", s: float = 64.0, m: Margin = 0.5,
                                     m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                                     elm_lambda: float = 0.5,
                                     class_weight: Optional[torch.Tensor] = None,
                                     ignore_index: int = -100, reduction: str = "mean",
                                     margin_per: str = "class",
                                     backend: str = "auto") -> torch.Tensor:
    """margin_cross_entropy on precomputed cosines [N, C] (m and margin_per as there)."""
    mode = checks.margin_cross_entropy_from_cosine(cosine, labels, kind=kind, s=s, m=m, m1=m1,
                                                   m2=m2, m3=m3, elm_lambda=elm_lambda,
                                                   class_weight=class_weight,
                                                   ignore_index=ignore_index,
                                                   reduction_=reduction, margin_per=margin_per)
    if mode == "sample" or kind == "adaface":
        fn = resolve_unless("margin_cross_entropy_from_cosine", backend, cosine.device,
                            _PER_SAMPLE_PENDING,
                            "kind='adaface'" if kind == "adaface" else "per-sample margins")
        if mode == "sample":
            m = m.reshape(-1, 1)
    else:
        fn = resolve("margin_cross_entropy_from_cosine", backend, cosine.device)
    kw = dict(kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda,
              ignore_index=ignore_index)
    return _margin_ce_call(lambda **k: fn(cosine, labels, **kw, **k), fn,
                           "margin_cross_entropy_from_cosine", labels, m, class_weight,
                           ignore_index, reduction, per_sample=mode == "sample")


def scaled_cosine(features: torch.Tensor, weight: torch.Tensor, s: float = 1.0, *,
                  backend: str = "auto") -> torch.Tensor:
    """Inference logits s * cos(x, W_j), [N, C], no margin."""
    checks.tensor("features", features, dim=2, floating=True)
    checks.tensor("weight", weight, dim=2, floating=True)
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and weight {tuple(weight.shape)} "
                         "disagree on D")
    checks.same_device(features=features, weight=weight)
    checks.finite("s", s)
    fn = resolve("scaled_cosine", backend, features.device)
    features, weight = mixed(features, weight)
    with autocast_off(features.device):
        return fn(features, weight, s)


def adacos_scale(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, *,
                 ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    """AdaCos's next scale from this batch (Eq. 10 of the ArcGrad paper), 0-d tensor."""
    checks.margin_cross_entropy(features, weight, labels, kind="normface", s=s, m=0.0, m1=1.0,
                                m2=0.0, m3=0.0, elm_lambda=0.0, class_weight=None,
                                ignore_index=ignore_index, reduction_="mean")
    fn = resolve("adacos_scale", backend, features.device)
    features, weight = mixed(features, weight)
    with autocast_off(features.device):
        return fn(features, weight, labels, s, ignore_index=ignore_index)


def adacos_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, *,
                class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                reduction: str = "mean",
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(NormFace loss at scale s, AdaCos's next scale from this batch): the
    margin_cross_entropy(kind="normface") value and gradients, and Eq. 10 of the
    ArcGrad paper from the statistics of the same sweep (0-d float32, no grad)."""
    checks.margin_cross_entropy(features, weight, labels, kind="normface", s=s, m=0.0, m1=1.0,
                                m2=0.0, m3=0.0, elm_lambda=0.0, class_weight=class_weight,
                                ignore_index=ignore_index, reduction_=reduction)
    fn = resolve("adacos_loss", backend, features.device)
    features, weight = mixed(features, weight)
    with autocast_off(features.device):
        if _fused(fn) and _wants_grad(class_weight):
            # the scale's statistics do not involve the class weights
            per, next_s = fn(features, weight, labels, s, class_weight=None,
                             ignore_index=ignore_index, reduction="none")
            return _class_weighted(per, labels, class_weight, ignore_index, reduction), next_s
        return fn(features, weight, labels, s, class_weight=class_weight,
                  ignore_index=ignore_index, reduction=reduction)


# ------------------------------------------------------ 2. cost-sensitive

def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weight: torch.Tensor, *, ignore_index: int = -100,
                           reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """WCE, Eq. 2 of the CAMRI paper: -1/N sum_n w_{t_n} log softmax(z_n)_{t_n}."""
    checks.logits_labels(logits, labels, ignore_index=ignore_index, reduction_=reduction)
    checks.class_vector("class_weight", class_weight, logits.shape[1])
    checks.same_device(logits=logits, labels=labels, class_weight=class_weight)
    fn = resolve("weighted_cross_entropy", backend, logits.device)
    return fn(logits, labels, class_weight, ignore_index=ignore_index, reduction=reduction)


def crwwce_loss(logits: torch.Tensor, labels: torch.Tensor, fn_weight: torch.Tensor,
                fp_weight: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                backend: str = "auto") -> torch.Tensor:
    """CRWWCE, Eq. 3 of the CAMRI paper; fn_weight [K], fp_weight [K, K] (fp[k, t])."""
    checks.logits_labels(logits, labels, ignore_index=ignore_index, reduction_=reduction)
    k = logits.shape[1]
    checks.class_vector("fn_weight", fn_weight, k)
    checks.tensor("fp_weight", fp_weight, dim=2, floating=True)
    if tuple(fp_weight.shape) != (k, k):
        raise ValueError(f"fp_weight must be [K, K] = [{k}, {k}], got {tuple(fp_weight.shape)}")
    if fp_weight.numel() and (not bool(torch.isfinite(fp_weight).all())
                              or bool((fp_weight < 0).any())):
        raise ValueError("fp_weight must be finite and >= 0")
    checks.same_device(logits=logits, labels=labels, fn_weight=fn_weight, fp_weight=fp_weight)
    fn = resolve("crwwce_loss", backend, logits.device)
    return fn(logits, labels, fn_weight, fp_weight, ignore_index=ignore_index,
              reduction=reduction)


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float = 0.1,
             n_iter: int = 100, tol: Optional[float] = None,
             backend: str = "auto") -> torch.Tensor:
    """Entropic OT plans [N, K, K] between rows of a [N, K] and b [N, K], log domain."""
    checks.marginals("a", a, None, None)
    checks.marginals("b", b, a.shape[0], a.shape[1])
    checks.cost_matrix(cost, a.shape[1], a.shape[0])
    checks.same_device(a=a, b=b, cost=cost)
    checks.equal_mass(a, b)
    checks.sinkhorn_params(eps, n_iter, tol)
    fn = resolve("sinkhorn", backend, a.device)
    return fn(a, b, cost, eps=eps, n_iter=n_iter, tol=tol)


def wasserstein_loss(logits: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, *,
                     eps: float = 0.1, n_iter: int = 100, entropic: bool = False,
                     tol: Optional[float] = None, ignore_index: int = -100,
                     reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Entropic OT cost between softmax(logits) (plan rows) and the target (columns)."""
    checks.tensor("logits", logits, dim=2, floating=True)
    checks.reduction(reduction)
    k = logits.shape[1]
    if k == 0:
        raise ValueError("there must be at least one class")
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        checks.labels(target, logits.shape[0], k, ignore_index=ignore_index, name="target")
    else:
        checks.marginals("target", target, logits.shape[0], k)
        checks.distribution_rows("target", target)
    checks.cost_matrix(cost, k, logits.shape[0])
    checks.same_device(logits=logits, target=target, cost=cost)
    checks.sinkhorn_params(eps, n_iter, tol)
    fn = resolve("wasserstein_loss", backend, logits.device)
    return fn(logits, target, cost, eps=eps, n_iter=n_iter, entropic=bool(entropic), tol=tol,
              ignore_index=ignore_index, reduction=reduction)


# ------------------------------------------------------ 3. feature space

def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """mean_i 0.5 * ||x_i - c_{y_i}||^2."""
    checks.features_centers(features, labels, centers)
    checks.reduction(reduction)
    fn = resolve("center_loss", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    with autocast_off(features.device):
        return fn(features, labels, centers, reduction=reduction)


def center_update(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                  alpha: float, *, backend: str = "auto") -> torch.Tensor:
    """Wen et al.'s centre step: c_j - alpha * sum_{y_i = j}(c_j - x_i) / (1 + n_j), new [C, D]."""
    checks.features_centers(features, labels, centers)
    checks.finite("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    fn = resolve("center_update", backend, features.device)
    x, c = mixed(features, centers)
    with autocast_off(features.device):
        return fn(x, labels, c, alpha).to(centers.dtype)


def contrastive_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                            *, delta: float = 1.0, reduction: str = "mean",
                            backend: str = "auto") -> torch.Tensor:
    """Eq. 5 of the sigma^2R paper: 0.5 ||x_i - c_{y_i}||^2 / (sum_{j != y_i} ||x_i - c_j||^2 + delta)."""
    checks.features_centers(features, labels, centers)
    checks.reduction(reduction)
    checks.finite("delta", delta, positive=True)
    fn = resolve("contrastive_center_loss", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    with autocast_off(features.device):
        return fn(features, labels, centers, delta=delta, reduction=reduction)


def knn_std(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
            n_neighbors: int = 7, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """sigma_x [N] and sigma_c [C]: std of each sample (centre) and its n nearest same-class samples."""
    checks.features_centers(features, labels, centers)
    checks.integer("n_neighbors", n_neighbors, minimum=1)
    fn = resolve("knn_std", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    with autocast_off(features.device):
        return fn(features, labels, centers, n_neighbors=n_neighbors)


def sigma2r_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                 w_k: torch.Tensor, *, n_neighbors: int = 7, z: float = 40.0, eps: float = 1e-3,
                 reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """sigma^2R (Eq. 8-10): mean_i beta_i ||x_i - c_{y_i}||^2, beta from the k-NN stds."""
    checks.features_centers(features, labels, centers)
    checks.class_vector("w_k", w_k, centers.shape[0], nonnegative=False)
    checks.same_device(features=features, w_k=w_k)
    checks.integer("n_neighbors", n_neighbors, minimum=1)
    checks.finite("z", z, positive=True)
    checks.finite("eps", eps, nonnegative=True)
    checks.reduction(reduction)
    fn = resolve("sigma2r_loss", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    with autocast_off(features.device):
        return fn(features, labels, centers, w_k, n_neighbors=n_neighbors, z=z, eps=eps,
                  reduction=reduction)


def soft_nearest_neighbor_loss(features: torch.Tensor, labels: torch.Tensor, *,
                               temperature: float = 1.0, reduction: str = "mean",
                               backend: str = "auto") -> torch.Tensor:
    """Eq. 2 of the sigma^2R paper with squared Euclidean distances."""
    checks.embeddings_labels("features", features, labels)
    checks.finite("temperature", temperature, positive=True, divisor=True)
    checks.reduction(reduction)
    fn = resolve("soft_nearest_neighbor_loss", backend, features.device)
    features, = centred(features)
    return fn(features, labels, temperature=temperature, reduction=reduction)


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2,
                        mining: str = "semihard", distance: str = "l2", reduction: str = "mean",
                        backend: str = "auto") -> torch.Tensor:
    """Triplet loss with in-batch mining ("semihard", "hard", "all")."""
    checks.embeddings_labels("embeddings", embeddings, labels)
    checks.finite("margin", margin, nonnegative=True)
    checks.choice("mining", mining, checks.MINING)
    checks.choice("distance", distance, checks.DISTANCES)
    checks.reduction(reduction)
    fn = resolve("triplet_margin_loss", backend, embeddings.device)
    if distance != "cosine":  # 1 - cos is not translation invariant
        embeddings, = centred(embeddings)
    else:  # but it is scale invariant, row by row
        embeddings = unit_rows(embeddings)
    return fn(embeddings, labels, margin=margin, mining=mining, distance=distance,
              reduction=reduction)


CENTER_DISTANCES = ("l2", "squared_l2")


def git_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
             lambda_c: float = 1.0, lambda_g: float = 1.0, reduction: str = "mean",
             backend: str = "auto") -> torch.Tensor:
    """Git loss's pull + push (Eq. 3 of the sigma^2R paper; add the cross-entropy):
    mean_i lambda_c 0.5 ||x_i - c_{y_i}||^2 + lambda_g sum_{j != y_i} 1/(1 + ||x_i - c_j||^2)."""
    checks.features_centers(features, labels, centers)
    checks.finite("lambda_c", lambda_c, nonnegative=True)
    checks.finite("lambda_g", lambda_g, nonnegative=True)
    checks.reduction(reduction)
    fn = resolve("git_loss", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    return fn(features, labels, centers, lambda_c=float(lambda_c), lambda_g=float(lambda_g),
              reduction=reduction)


def triplet_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                        margin: float = 5.0, distance: str = "l2", reduction: str = "mean",
                        backend: str = "auto") -> torch.Tensor:
    """Triplet-center loss (He et al.): mean_i max(0, margin + D(x_i, c_{y_i}) - min_{j != y_i} D(x_i, c_j))."""
    checks.features_centers(features, labels, centers)
    checks.finite("margin", margin, nonnegative=True)
    checks.choice("distance", distance, CENTER_DISTANCES)
    checks.reduction(reduction)
    fn = resolve("triplet_center_loss", backend, features.device)
    features, centers = centred(*mixed(features, centers))
    return fn(features, labels, centers, margin=float(margin), distance=distance,
              reduction=reduction)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                     distance: str = "l2", reduction: str = "mean",
                     backend: str = "auto") -> torch.Tensor:
    """Eq. 7 of the sigma^2R paper over ordered pairs a != b: d_ab (same class) or
    max(0, margin - d_ab); mean over pairs, "none" per-anchor sums."""
    checks.embeddings_labels("embeddings", embeddings, labels)
    checks.finite("margin", margin, nonnegative=True)
    checks.choice("distance", distance, CENTER_DISTANCES)
    checks.reduction(reduction)
    fn = resolve("contrastive_loss", backend, embeddings.device)
    embeddings, = centred(embeddings)
    return fn(embeddings, labels, margin=float(margin), distance=distance, reduction=reduction)


# ---------------------------------------- gradients the fused kernels do not form

def _fused(fn) -> bool:
    return not fn.__module__.startswith("fused_margin.reference")


def _wants_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


def _margin_ce_call(call, fn, op: str, labels, m, class_weight, ignore_index, reduction,
                    per_sample: bool = False):
    """Runs a margin cross-entropy backend. The fused kernels take a per-class
    margin and the class weights as constants: a margin that requires grad is an
    error there (not a silent None), and a class_weight that requires grad gets its
    true gradient from the kernels' unweighted per-row losses, weighted here. A
    per-sample margin [N, 1] gets its gradient from the cpu backend (an O(N) term)."""
    if not _fused(fn):
        return call(class_weight=class_weight, reduction=reduction)
    if _wants_grad(m) and not (per_sample and fn.__module__.split(".")[1] == "cpu"):
        backend = fn.__module__.split(".")[1]
        raise RuntimeError(
            f"fused_margin: {op} on the {backend} backend treats a per-class margin m as a "
            "constant and cannot return its gradient, but m requires grad; use "
            "backend=\"reference\" to learn margins (or pass m.detach())")
    if _wants_grad(class_weight):
        per = call(class_weight=None, reduction="none")
        return _class_weighted(per, labels, class_weight, ignore_index, reduction)
    return call(class_weight=class_weight, reduction=reduction)


# ------------------------------------------------------- mixed precision

def mixed(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The operands of a two-operand op (features and weight / centres) in one dtype,
    as torch's autocast treats linear layers: under autocast for their device, every
    float16/bfloat16/float32 operand in the autocast dtype (float64 stays); outside
    it (or where float64 remains) the wider dtype (torch.promote_types). The casts
    are differentiable, so each input's gradient comes back in its own dtype; the
    op then runs with autocast off (autocast_off), on its own compute-dtype rules."""
    dev = tensors[0].device.type
    if _autocast_on(dev):
        amp = torch.get_autocast_dtype(dev)
        tensors = tuple(t if t.dtype == torch.float64 else t.to(amp) for t in tensors)
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t.to(dt) for t in tensors)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def autocast_off(device: torch.device):
    """Autocast disabled for the op's body, where it is on (the op's own rules, float32
    compute for 16-bit inputs, then hold; the reference's matmuls are not recast)."""
    if _autocast_on(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
