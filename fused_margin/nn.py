"""Drop-in modules: each owns its parameters and state and calls functional.

Classification modules hold the last layer `weight` [C, D] (no bias) and offer
`forward(features, labels) -> loss` and `logits(features) -> s*cos` (no
margin) for inference. Margins and class weights are buffers, so they follow
`.to(device)` and land in `state_dict`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import checks
from . import functional as F
from .reference.angular import camri_margins, ldam_margins

__all__ = [
    "MarginLoss", "NormFace", "ArcFace", "CosFace", "SphereFace", "CombinedMargin", "CAMRI",
    "ArcGrad", "AdaCos", "LDAM", "ELM", "CenterLoss", "Sigma2R", "WassersteinLoss",
    "TripletMarginLoss", "SoftNearestNeighborLoss", "ShardedMarginLoss", "GitLoss",
    "TripletCenterLoss", "ContrastiveLoss", "LinearCrossEntropy", "MSoftmax",
    "SubCenterArcFace", "MagFace", "ElasticFace", "AdaFace", "CurricularFace",
]


def _store_margin_config(module: nn.Module, *, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                         ignore_index, reduction, backend) -> None:
    """The margin settings every classification module keeps; a per-class `m` and
    `class_weight` become buffers so they follow .to() and land in state_dict."""
    checks.margin_config(module.num_classes, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                         elm_lambda=elm_lambda, class_weight=class_weight,
                         ignore_index=ignore_index, reduction_=reduction, backend=backend)
    module.kind, module.s, module.m1, module.m2, module.m3 = kind, float(s), m1, m2, m3
    module.elm_lambda, module.ignore_index = elm_lambda, ignore_index
    module.reduction, module.backend = reduction, backend
    if isinstance(m, torch.Tensor):
        module.register_buffer("m", m.detach().clone().float())
    else:
        module.m = float(m)
    module.register_buffer("class_weight",
                           None if class_weight is None else class_weight.detach().clone())


class MarginLoss(nn.Module):
    """The last layer W [C, D] plus margin_cross_entropy of one `kind`."""

    def __init__(self, in_features: int, num_classes: int, *, kind: str = "arcface",
                 s: float = 64.0, m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0,
                 m2: float = 0.0, m3: float = 0.0, elm_lambda: float = 0.5,
                 class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        checks.sizes(in_features=in_features, num_classes=num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        _store_margin_config(self, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                             elm_lambda=elm_lambda, class_weight=class_weight,
                             ignore_index=ignore_index, reduction=reduction, backend=backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def scale(self) -> float:
        return self.s

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.margin_cross_entropy(
            features, self.weight, labels, kind=self.kind, s=self.scale(), m=self.m, m1=self.m1,
            m2=self.m2, m3=self.m3, elm_lambda=self.elm_lambda, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # inference logits have no fused kernel of their own: "auto" serves them everywhere
        return F.scaled_cosine(features, self.weight, self.scale(), backend="auto")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"kind={self.kind!r}, s={self.scale():.4g}")


class NormFace(MarginLoss):
    """L2-constrained softmax / NormFace: s*cos for every class."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, **kw):
        super().__init__(in_features, num_classes, kind="normface", s=s, m=0.0, **kw)


class ArcFace(MarginLoss):
    """Additive angular margin: target logit s*cos(theta_y + m)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kw):
        super().__init__(in_features, num_classes, kind="arcface", s=s, m=m, **kw)


class CosFace(MarginLoss):
    """Additive cosine margin: target logit s*(cos_y - m)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 **kw):
        super().__init__(in_features, num_classes, kind="cosface", s=s, m=m, **kw)


class SphereFace(MarginLoss):
    """Multiplicative angular margin: target logit s*psi(theta_y), psi = cos(m*theta) near 0."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 1.35,
                 **kw):
        super().__init__(in_features, num_classes, kind="sphereface", s=s, m=m, **kw)


class CombinedMargin(MarginLoss):
    """insightface's combined margin: target logit s*(cos(m1*theta + m2) - m3)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, **kw):
        super().__init__(in_features, num_classes, kind="combined", s=s, m=0.0, m1=m1, m2=m2,
                         m3=m3, **kw)


class CAMRI(MarginLoss):
    """ArcFace with the additive angular margin on the important class(es) only."""

    def __init__(self, in_features: int, num_classes: int, important: Union[int, Sequence[int]],
                 m: float = 0.5, s: float = 64.0, **kw):
        super().__init__(in_features, num_classes, kind="arcface", s=s,
                         m=camri_margins(num_classes, important, m), **kw)
        self.important = important


class ArcGrad(MarginLoss):
    """ArcGrad: every logit is -s*theta_j, no margin (pick s with arcgrad_scale)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 1.0, **kw):
        super().__init__(in_features, num_classes, kind="arcgrad", s=s, m=0.0, **kw)


class AdaCos(MarginLoss):
    """NormFace with AdaCos's adaptive scale, kept in the buffer `s_buffer`.

    The scale starts at sqrt(2)*log(C - 1); in training mode each forward uses
    the current scale, then sets it from this batch (Eq. 10 of the ArcGrad
    paper: log(B_avg)/cos(min(pi/4, theta_med))). The paper's scale at step l
    already uses step l's batch; ours applies it from step l + 1, which lets a
    fused kernel update it from the same pass.
    """

    def __init__(self, in_features: int, num_classes: int, **kw):
        if num_classes < 3:
            # s0 = sqrt(2) log(C - 1) is 0 for two classes and Eq. 10 keeps it there
            raise ValueError("AdaCos needs at least three classes (its initial scale is 0 for two)")
        s0 = math.sqrt(2) * math.log(num_classes - 1)
        super().__init__(in_features, num_classes, kind="normface", s=s0, m=0.0, **kw)
        self.register_buffer("s_buffer", torch.tensor(s0, dtype=torch.float32))

    def scale(self) -> float:
        return float(self.s_buffer)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(features, labels)
        loss, new = F.adacos_loss(features, self.weight, labels, self.scale(),
                                  class_weight=self.class_weight,
                                  ignore_index=self.ignore_index, reduction=self.reduction,
                                  backend=self.backend)
        if bool(torch.isfinite(new)):
            self.s_buffer.copy_(new)
        return loss


class LDAM(MarginLoss):
    """LDAM: target logit s*(cos_y - Delta_y), Delta_j proportional to n_j^(-1/4)."""

    def __init__(self, in_features: int, class_counts, max_m: float = 0.5, s: float = 30.0, **kw):
        margins = ldam_margins(class_counts, max_m)
        super().__init__(in_features, margins.numel(), kind="ldam", s=s, m=margins, **kw)


class ELM(MarginLoss):
    """ELM: LDAM plus lam*Delta_{c*} on the target, c* the strongest wrong class."""

    def __init__(self, in_features: int, class_counts, max_m: float = 0.5, s: float = 30.0,
                 lam: float = 0.5, **kw):
        margins = ldam_margins(class_counts, max_m)
        super().__init__(in_features, margins.numel(), kind="elm", s=s, m=margins,
                         elm_lambda=lam, **kw)


class SubCenterArcFace(MarginLoss):
    """Sub-centre ArcFace (Deng et al., ECCV 2020): K sub-centres per class in
    `weight` [C*K, D] (rows c*K .. c*K+K-1 for class c, pytorch-metric-learning's
    column order); a class's cosine is the max over its sub-centres, then the
    `kind`'s margin (ArcFace by default). margin_cross_entropy(sub_centers=K)."""

    def __init__(self, in_features: int, num_classes: int, sub_centers: int = 3,
                 s: float = 64.0, m: float = 0.5, kind: str = "arcface", **kw):
        if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
            raise ValueError(f"sub_centers must be a positive int, got {sub_centers!r}")
        self.sub_centers = sub_centers
        super().__init__(in_features, num_classes, kind=kind, s=s, m=m, **kw)
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, in_features))
        self.reset_parameters()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.margin_cross_entropy(
            features, self.weight, labels, kind=self.kind, s=self.scale(), m=self.m, m1=self.m1,
            m2=self.m2, m3=self.m3, elm_lambda=self.elm_lambda, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            sub_centers=self.sub_centers, backend=self.backend)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """s * max_k cos(x, W_{c,k}), [N, C], no margin."""
        cos = F.scaled_cosine(features, self.weight, 1.0, backend="auto")
        n = cos.shape[0]
        return self.scale() * cos.view(n, self.num_classes, self.sub_centers).amax(dim=2)

    @torch.no_grad()
    def get_outliers(self, features: torch.Tensor, labels: torch.Tensor, threshold: float = 75.0,
                     return_dominant_centers: bool = True):
        """The paper's clean-up step, as pytorch-metric-learning names it: per class,
        the dominant sub-centre is the one most of the class's samples (in this
        call) are closest to (the first on ties; sub-centre 0 for a class without
        samples); a sample whose angle to its class's dominant sub-centre exceeds
        `threshold` degrees is an outlier. Returns the outliers' indices (int64,
        increasing) and, unless return_dominant_centers=False, the dominant
        sub-centres [C, D] (rows of `weight`; PML returns them transposed, [D, C])."""
        from .reference.angular import inv_norm
        if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError("features must be [N, D] and labels [N]")
        c, k = self.num_classes, self.sub_centers
        w = self.weight.detach()
        x = features.detach().to(w.dtype)
        valid = labels != self.ignore_index
        if bool(((labels[valid] < 0) | (labels[valid] >= c)).any()):
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index")
        y = torch.where(valid, labels, torch.zeros_like(labels))
        wn = (w * inv_norm(w)[:, None]).view(c, k, -1)
        xn = x * inv_norm(x)[:, None]
        cos = torch.einsum("nd,nkd->nk", xn, wn[y])  # each sample vs its class's sub-centres
        nearest = cos.argmax(dim=1)
        counts = torch.zeros(c * k, dtype=torch.int64, device=w.device)
        counts.index_add_(0, (y * k + nearest)[valid],
                          torch.ones(int(valid.sum()), dtype=torch.int64, device=w.device))
        dominant = counts.view(c, k).argmax(dim=1)  # first maximum on ties
        to_dominant = cos.gather(1, dominant[y][:, None])[:, 0]
        outliers = (valid & (to_dominant < math.cos(math.radians(threshold)))).nonzero()[:, 0]
        if not return_dominant_centers:
            return outliers
        return outliers, w.view(c, k, -1)[torch.arange(c, device=w.device), dominant]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sub_centers={self.sub_centers}"


def _valid_mean(v: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """A per-sample regulariser reduced as the cross-entropy is (ignored rows left out)."""
    v = torch.where(valid, v, torch.zeros_like(v))
    if reduction == "none":
        return v
    if reduction == "sum":
        return v.sum()
    count = valid.sum()
    return v.sum() / torch.clamp(count, min=1).to(v.dtype)


class MagFace(MarginLoss):
    """MagFace (Meng et al., CVPR 2021): ArcFace whose margin grows with the feature
    magnitude a_i = ||x_i|| clipped to [l_a, u_a] (Eq. 3 with the linear m(a) of the
    paper's code), m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m, plus the
    regulariser lambda_g * g(a_i), g(a) = 1/a + a/u_a^2 (Eq. 5), averaged over the
    labelled rows. The magnitude keeps its gradient, through the margin (a per-sample
    margin of the fused kernel) and through g. Defaults: the official code's
    (s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0, **kw):
        if not 0 < l_a < u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not -math.pi / 2 <= l_m <= math.pi / 2 or not -math.pi / 2 <= u_m <= math.pi / 2:
            raise ValueError(f"MagFace margins must lie in [-pi/2, pi/2], got {l_m}, {u_m}")
        super().__init__(in_features, num_classes, kind="arcface", s=s, m=0.0, **kw)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def magnitude(self, features: torch.Tensor) -> torch.Tensor:
        return features.norm(dim=1).clamp(self.l_a, self.u_a)

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.magnitude(features)
        ce = F.margin_cross_entropy(
            features, self.weight, labels, kind="arcface", s=self.scale(), m=self.margin(a),
            margin_per="sample", class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend)
        g = 1.0 / a + a / (self.u_a ** 2)
        reg = _valid_mean(g.to(ce.dtype), labels != self.ignore_index, self.reduction)
        return ce + self.lambda_g * reg

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", l_a={self.l_a:g}, u_a={self.u_a:g}, l_m={self.l_m:g}, "
                f"u_m={self.u_m:g}, lambda_g={self.lambda_g:g}")


class AdaFace(MarginLoss):
    """AdaFace (Kim et al., CVPR 2022): margins from the feature norm. With a_i =
    clip(||x_i||, 0.001, 100) (detached) and mu, sigma running averages of the batch
    mean and std of a (buffers `batch_mean`, `batch_std`, initial 20 and 100 as in the
    official code; in training mode each forward first folds this batch in with
    momentum t_alpha, then uses them), r_i = clip(h (a_i - mu) / (sigma + eps), -1, 1)
    and the target logit s*(cos(clip(theta_y - m r_i, eps, pi - eps)) - m (1 + r_i))
    (g_angle = -m r, g_add = m r + m; Eq. 11-12), kind "adaface" of the fused kernel
    with the per-sample r. Eval mode uses the stored statistics unchanged. Defaults:
    the paper's (m=0.4, h=0.333, s=64, momentum t_alpha=0.01)."""

    def __init__(self, in_features: int, num_classes: int, m: float = 0.4, h: float = 0.333,
                 s: float = 64.0, t_alpha: float = 0.01, eps: float = 1e-3, **kw):
        if not 0 < t_alpha <= 1:
            raise ValueError(f"t_alpha must lie in (0, 1], got {t_alpha}")
        if not h > 0:
            raise ValueError(f"h must be > 0, got {h}")
        super().__init__(in_features, num_classes, kind="adaface", s=s, m=0.0, m2=float(m), **kw)
        self.margin, self.h, self.t_alpha, self.eps = float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def scaler(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """r [N], updating the running statistics first in training mode."""
        a = features.detach().float().norm(dim=1).clamp(0.001, 100)
        valid = labels != self.ignore_index
        if self.training and int(valid.sum()) >= 2:
            av = a[valid]
            t = self.t_alpha
            self.batch_mean.mul_(1 - t).add_(t * av.mean())
            self.batch_std.mul_(1 - t).add_(t * av.std())
        r = (a - self.batch_mean) / (self.batch_std + self.eps) * self.h
        return r.clamp(-1, 1).to(torch.float64 if features.dtype == torch.float64
                                  else torch.float32)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.margin_cross_entropy(
            features, self.weight, labels, kind="adaface", s=self.scale(),
            m=self.scaler(features, labels), m2=self.margin, margin_per="sample",
            class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.margin:g}, h={self.h:g}, t_alpha={self.t_alpha:g}"


class CurricularFace(MarginLoss):
    """CurricularFace (Huang et al., CVPR 2020): the ArcFace target s*cos(theta_y + m)
    (insightface's fallback past pi - m) and each hard negative, cos_j > cos(theta_y + m),
    re-weighted to s*cos_j*(t + cos_j); t (buffer) is the running average of the batch's
    mean target cosine, momentum 0.01, updated at the start of each training-mode forward
    (as the official code does) and held fixed (no gradient) within the step; eval mode
    leaves it. The hard-negative transform is not in the fused kernels yet: this module
    runs the eager reference (N x C); backend="cpu" or "triton" raises NotImplementedError,
    "auto" warns once. Defaults: the paper's (m=0.5, s=64, momentum 0.01, t starts at 0)."""

    _warned = False

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 momentum: float = 0.01, **kw):
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum}")
        super().__init__(in_features, num_classes, kind="arcface", s=s, m=m, **kw)
        self.momentum = float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from . import checks
        from .reference.angular import compute_dtype, curricular_cross_entropy, inv_norm
        if self.backend in ("cpu", "triton"):
            raise NotImplementedError(
                f"CurricularFace's hard-negative transform cos_j*(t + cos_j) is not in the "
                f"{self.backend} kernel yet (issue 19); use backend='reference' (or 'auto', "
                "which runs the reference)")
        checks.margin_cross_entropy(features, self.weight, labels, kind="arcface", s=self.s,
                                    m=self.m, m1=1.0, m2=0.0, m3=0.0, elm_lambda=0.0,
                                    class_weight=self.class_weight,
                                    ignore_index=self.ignore_index, reduction_=self.reduction)
        checks.choice("backend", self.backend, ("auto", "reference"))
        if self.backend == "auto" and not CurricularFace._warned:
            CurricularFace._warned = True
            import warnings
            warnings.warn("fused_margin: CurricularFace runs the PyTorch reference (N x C) until "
                          "the fused kernels take its hard-negative transform (issue 19)",
                          RuntimeWarning, stacklevel=2)
        if self.training:
            with torch.no_grad():
                valid = labels != self.ignore_index
                if bool(valid.any()):
                    w = self.weight.detach()
                    y = labels[valid]
                    x = features.detach()[valid]
                    dt = compute_dtype(x.dtype)
                    cy = ((x.to(dt) * w[y].to(dt)).sum(1) * inv_norm(x.to(dt))
                          * inv_norm(w[y].to(dt)))
                    self.t.mul_(1 - self.momentum).add_(self.momentum * cy.mean().to(self.t))
        return curricular_cross_entropy(features, self.weight, labels, self.t, s=self.s,
                                        m=float(self.m), class_weight=self.class_weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={float(self.m):g}, momentum={self.momentum:g}"


# ElasticFace's margins (the official config/config.py): (m, std) by variant and "+"
_ELASTIC_DEFAULTS = {("arc", False): (0.50, 0.05), ("arc", True): (0.50, 0.0175),
                     ("cos", False): (0.35, 0.05), ("cos", True): (0.35, 0.02)}


class ElasticFace(MarginLoss):
    """ElasticFace (Boutros et al., CVPRW 2022): ArcFace (variant="arc", Eq. 5) or
    CosFace (variant="cos", Eq. 6) whose margin is drawn per sample from N(m, std)
    at every training-mode forward (`generator` for reproducibility); plus=True
    (ElasticFace+, Eq. 7) sorts the draws and hands the smallest margin to the sample
    closest to its class centre (largest target cosine), the largest to the farthest.
    In eval mode the margin is m for every sample (deterministic). Defaults: the
    official config's (s=64; arc m=0.5, std 0.05, arc+ 0.0175; cos m=0.35, std 0.05,
    cos+ 0.02). Draws are clipped to [-pi/2, pi/2] for "arc" (the arcface range)."""

    def __init__(self, in_features: int, num_classes: int, variant: str = "arc",
                 plus: bool = False, s: float = 64.0, m: Optional[float] = None,
                 std: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 **kw):
        if variant not in ("arc", "cos"):
            raise ValueError(f"variant must be 'arc' or 'cos', got {variant!r}")
        dm, dstd = _ELASTIC_DEFAULTS[(variant, bool(plus))]
        m = dm if m is None else float(m)
        std = dstd if std is None else float(std)
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        super().__init__(in_features, num_classes, kind="arcface" if variant == "arc" else "cosface",
                         s=s, m=m, **kw)
        self.variant, self.plus, self.std, self.generator = variant, bool(plus), std, generator

    @torch.no_grad()
    def draw_margins(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This step's per-sample margins [N] (float32 for half inputs)."""
        n = features.shape[0]
        dt = torch.float64 if features.dtype == torch.float64 else torch.float32
        gen = self.generator
        draw = torch.randn(n, generator=gen, dtype=dt,
                           device=gen.device if gen is not None else "cpu")
        m = (self.m + self.std * draw).to(features.device)
        if self.variant == "arc":
            m = m.clamp(-math.pi / 2, math.pi / 2)
        if self.plus and n:
            valid = labels != self.ignore_index
            y = torch.where(valid, labels, torch.zeros_like(labels))
            cos_y = _target_cosine(features.detach(), self.weight.detach(), y)
            cos_y = torch.where(valid, cos_y, torch.full_like(cos_y, -math.inf))
            order = torch.argsort(cos_y, descending=True, stable=True)
            out = torch.empty_like(m)
            out[order] = torch.sort(m).values  # the largest cosine gets the smallest margin
            m = out
        return m

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(features, labels)
        return F.margin_cross_entropy(
            features, self.weight, labels, kind=self.kind, s=self.scale(),
            m=self.draw_margins(features, labels), margin_per="sample",
            class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", variant={self.variant!r}, plus={self.plus}, "
                f"m={self.m:g}, std={self.std:g}")


def _target_cosine(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x_i, W_{y_i}) [N], O(N D) (no N x C)."""
    from .reference.angular import compute_dtype, inv_norm
    dt = compute_dtype(x.dtype)
    x, wy = x.to(dt), w[y].to(dt)
    return (x * wy).sum(1) * inv_norm(x) * inv_norm(wy)


# ------------------------------------------------------------ feature space

class CenterLoss(nn.Module):
    """Center loss with centres [C, D] (the parameter `centers`).

    alpha=None (default): the centres learn by gradient descent with the rest of
    the model. alpha in (0, 1]: Wen et al.'s rule instead; the centres get no
    gradient (requires_grad=False, so optimizers leave them alone) and each
    training-mode forward, after computing the loss with the current centres,
    moves them by c_j -= alpha * sum_{y_i = j}(c_j - x_i) / (1 + n_j).
    """

    def __init__(self, num_classes: int, feat_dim: int, *, alpha: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        checks.sizes(num_classes=num_classes, feat_dim=feat_dim)
        checks.reduction(reduction)
        checks.backend_name(backend)
        if alpha is not None:
            checks.finite("alpha", alpha)
        if alpha is not None and not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] or None, got {alpha}")
        self.alpha = None if alpha is None else float(alpha)
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim),
                                    requires_grad=self.alpha is None)
        self.reduction, self.backend = reduction, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.alpha is None or not self.training:
            return F.center_loss(features, labels, self.centers, reduction=self.reduction,
                                 backend=self.backend)
        # the loss's graph keeps a copy: the in-place step below must not change
        # the centres its backward sees
        now = self.centers.detach().clone()
        loss = F.center_loss(features, labels, now, reduction=self.reduction,
                             backend=self.backend)
        with torch.no_grad():
            self.centers.copy_(F.center_update(features.detach(), labels, now, self.alpha))
        return loss

    def extra_repr(self) -> str:
        rule = "gradient" if self.alpha is None else f"alpha={self.alpha}"
        return f"num_classes={self.centers.shape[0]}, feat_dim={self.centers.shape[1]}, {rule}"


class GitLoss(nn.Module):
    """Git loss's pull + push terms with learnable centres [C, D] (add the
    cross-entropy yourself, as with CenterLoss)."""

    def __init__(self, num_classes: int, feat_dim: int, *, lambda_c: float = 1.0,
                 lambda_g: float = 1.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.lambda_c, self.lambda_g = float(lambda_c), float(lambda_g)
        self.reduction, self.backend = reduction, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.git_loss(features, labels, self.centers, lambda_c=self.lambda_c,
                          lambda_g=self.lambda_g, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.centers.shape[0]}, feat_dim={self.centers.shape[1]}, "
                f"lambda_c={self.lambda_c}, lambda_g={self.lambda_g}")


class TripletCenterLoss(nn.Module):
    """Triplet-center loss (He et al. 2018) with learnable centres [C, D]."""

    def __init__(self, num_classes: int, feat_dim: int, *, margin: float = 5.0,
                 distance: str = "l2", reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.margin, self.distance = float(margin), distance
        self.reduction, self.backend = reduction, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.triplet_center_loss(features, labels, self.centers, margin=self.margin,
                                     distance=self.distance, reduction=self.reduction,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.centers.shape[0]}, feat_dim={self.centers.shape[1]}, "
                f"margin={self.margin}, distance={self.distance!r}")


class Sigma2R(nn.Module):
    """sigma^2R loss with learnable centres [C, D] and per-class slopes w_K [C]."""

    def __init__(self, num_classes: int, feat_dim: int, n_neighbors: int = 7, z: float = 40.0,
                 eps: float = 1e-3, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        checks.sizes(num_classes=num_classes, feat_dim=feat_dim)
        checks.integer("n_neighbors", n_neighbors, minimum=1)
        checks.finite("z", z, positive=True)
        checks.finite("eps", eps, nonnegative=True)
        checks.reduction(reduction)
        checks.backend_name(backend)
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.w_k = nn.Parameter(torch.zeros(num_classes))
        self.n_neighbors, self.z, self.eps = n_neighbors, z, eps
        self.reduction, self.backend = reduction, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.sigma2r_loss(features, labels, self.centers, self.w_k,
                              n_neighbors=self.n_neighbors, z=self.z, eps=self.eps,
                              reduction=self.reduction, backend=self.backend)


class WassersteinLoss(nn.Module):
    """Entropic Wasserstein loss with the cost matrix [K, K] held as a buffer.

    The buffer is passed as it is: the functional casts it to the compute dtype
    (float32 for half logits, not the logits' dtype), so it is rounded once, in
    the same place as for a direct call. (`.half()` on the module rounds the
    buffer itself; keep the module in float32 under autocast.)"""

    def __init__(self, cost: torch.Tensor, eps: float = 0.1, n_iter: int = 100, *,
                 entropic: bool = False, tol: Optional[float] = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        checks.cost_buffer(cost)
        checks.sinkhorn_params(eps, n_iter, tol)
        checks.integer("ignore_index", ignore_index, minimum=checks.INT64_MIN)
        checks.reduction(reduction)
        checks.backend_name(backend)
        self.register_buffer("cost", cost.detach().clone())
        self.eps, self.n_iter, self.entropic, self.tol = eps, n_iter, entropic, tol
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.wasserstein_loss(logits, target, self.cost, eps=self.eps, n_iter=self.n_iter,
                                  entropic=self.entropic, tol=self.tol,
                                  ignore_index=self.ignore_index, reduction=self.reduction,
                                  backend=self.backend)


class TripletMarginLoss(nn.Module):
    """Triplet loss with in-batch mining."""

    def __init__(self, margin: float = 0.2, mining: str = "semihard", distance: str = "l2", *,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        checks.finite("margin", margin, nonnegative=True)
        checks.choice("mining", mining, checks.MINING)
        checks.choice("distance", distance, checks.DISTANCES)
        checks.reduction(reduction)
        checks.backend_name(backend)
        self.margin, self.mining, self.distance = margin, mining, distance
        self.reduction, self.backend = reduction, backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.triplet_margin_loss(embeddings, labels, margin=self.margin, mining=self.mining,
                                     distance=self.distance, reduction=self.reduction,
                                     backend=self.backend)


class SoftNearestNeighborLoss(nn.Module):
    """Soft nearest neighbour loss (Frosst et al.), squared Euclidean distances."""

    def __init__(self, temperature: float = 1.0, *, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        checks.finite("temperature", temperature, positive=True, divisor=True)
        checks.reduction(reduction)
        checks.backend_name(backend)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.soft_nearest_neighbor_loss(features, labels, temperature=self.temperature,
                                            reduction=self.reduction, backend=self.backend)


class ContrastiveLoss(nn.Module):
    """Contrastive loss over all in-batch pairs (Eq. 7 of the sigma^2R paper)."""

    def __init__(self, margin: float = 1.0, distance: str = "l2", *, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.margin, self.distance = float(margin), distance
        self.reduction, self.backend = reduction, backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.contrastive_loss(embeddings, labels, margin=self.margin,
                                  distance=self.distance, reduction=self.reduction,
                                  backend=self.backend)


# ------------------------------------------------------------ raw linear logits

class LinearCrossEntropy(nn.Module):
    """A linear layer and its cross-entropy in one fused call, never holding the
    [N, C] logits on the fused backends: forward(x, y) = F.cross_entropy(x @ W.T + b,
    y, weight=class_weight, ignore_index=..., label_smoothing=...).

    Arguments in torch.nn.Linear's order (in_features, num_classes); bias=False by
    default, as torch.nn.LinearCrossEntropyLoss has it. `weight` [C, D] and `bias`
    [C] are initialised as nn.Linear's. margin_cross_entropy(kind="normface", s=1,
    normalize=False) underneath; MSoftmax adds the margin.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, *,
                 class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError("in_features and num_classes must be positive")
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        self.register_buffer("class_weight",
                             None if class_weight is None else class_weight.detach().clone())
        self.ignore_index, self.label_smoothing = ignore_index, float(label_smoothing)
        self.reduction, self.backend = reduction, backend
        self.kind, self.s, self.m = "normface", 1.0, 0.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.margin_cross_entropy(
            features, self.weight, labels, kind=self.kind, s=self.s, m=self.m,
            class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, normalize=False, bias=self.bias,
            label_smoothing=self.label_smoothing, backend=self.backend)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """s * (x @ W.T + b), [N, C], no margin."""
        z = features @ self.weight.to(features.dtype).T
        if self.bias is not None:
            z = z + self.bias.to(z.dtype)
        return self.s * z

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}")


class MSoftmax(LinearCrossEntropy):
    """Soft-margin softmax (Liang et al. 2017; compared in the ArcGrad paper):
    cross-entropy over raw logits x.W_j (+ b_j) with the target's lowered by m
    (margin_cross_entropy(kind="cosface", s=1, normalize=False))."""

    def __init__(self, in_features: int, num_classes: int, m: float = 0.35, bias: bool = False,
                 **kw):
        super().__init__(in_features, num_classes, bias, **kw)
        self.kind, self.m = "cosface", float(m)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.m}"


# ------------------------------------------------------------ beyond one machine

def _distributed():
    from . import distributed  # torch.distributed is imported only once a module needs it

    return distributed


class ShardedMarginLoss(nn.Module):
    """MarginLoss with its classes split across the ranks of a process group.

    Each rank owns `weight` [C_r, D], rows [class_start, class_start + C_r) of
    the full weight (an even split: the first num_classes % world ranks hold
    one class more). forward(features, labels) takes this rank's samples and
    returns fused_margin.distributed.margin_cross_entropy: the loss of the
    global batch, the same on every rank; every rank calls forward and
    backward together (gradient semantics in fused_margin.distributed).
    A per-class `m` and `class_weight` are the full [num_classes] tensors.
    `backend` picks the per-shard partials kernel (auto: Triton on CUDA, C++
    on CPU) and predict()'s argmax sweep.

    Initialisation: init_seed=None draws xavier-uniform (the full weight's
    bound) from each rank's default generator; init_seed=k makes the full
    weight exactly what `torch.manual_seed(k); MarginLoss(in_features,
    num_classes)` draws (each rank draws, in chunks, the rows before its own
    and discards them). `gather_state_dict()` / `load_full_state_dict(sd)`
    convert to and from MarginLoss's single-process state dict.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "arcface", group=None,
                 sample_rate: float = 1.0, *, s: float = 64.0,
                 m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                 m3: float = 0.0, elm_lambda: float = 0.5,
                 class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto",
                 generator: Optional[torch.Generator] = None, sample_correction: bool = False,
                 init_seed: Optional[int] = None):
        super().__init__()
        distributed = _distributed()
        checks.sizes(in_features=in_features, num_classes=num_classes)
        # None stays None (the default group, looked up at each call): holding
        # dist.group.WORLD here would keep the process group alive past
        # destroy_process_group(), and gloo's worker threads would then drop
        # their last tensors during interpreter shutdown (an abort at exit).
        self.group = group
        self.rank = distributed.dist.get_rank(self.group)
        self.world_size = distributed.dist.get_world_size(self.group)
        self.class_start, shard = distributed.shard_range(num_classes, self.rank, self.world_size)
        self.in_features, self.num_classes, self.sample_rate = in_features, num_classes, sample_rate
        self.generator, self.sample_correction = generator, sample_correction
        self.weight = nn.Parameter(torch.empty(shard, in_features))
        _store_margin_config(self, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
                             elm_lambda=elm_lambda, class_weight=class_weight,
                             ignore_index=ignore_index, reduction=reduction, backend=backend)
        self.reset_parameters(init_seed)

    @torch.no_grad()
    def reset_parameters(self, init_seed: Optional[int] = None) -> None:
        # nn.init.xavier_uniform_'s bound, computed the same way, on the full [C, D]
        a = math.sqrt(3.0) * math.sqrt(2.0 / float(self.num_classes + self.in_features))
        if init_seed is None:
            self.weight.uniform_(-a, a)
            return
        g = torch.Generator().manual_seed(init_seed)
        chunk = max(1, (1 << 20) // self.in_features)
        for lo in range(0, self.class_start, chunk):  # the rows of the ranks before this one
            torch.empty(min(chunk, self.class_start - lo), self.in_features).uniform_(
                -a, a, generator=g)
        self.weight.copy_(torch.empty_like(self.weight, device="cpu").uniform_(-a, a, generator=g))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _distributed().margin_cross_entropy(
            features, self.weight, labels, class_start=self.class_start,
            num_classes=self.num_classes, group=self.group, sample_rate=self.sample_rate,
            kind=self.kind, s=self.s, m=self.m, m1=self.m1, m2=self.m2, m3=self.m3,
            elm_lambda=self.elm_lambda, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
            generator=self.generator, sample_correction=self.sample_correction)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """s*cos against this rank's classes only, [N, C_r] (no collective)."""
        return F.scaled_cosine(features, self.weight, self.s, backend=self.backend)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Global argmax class of this rank's samples (a collective)."""
        return _distributed().sharded_argmax(features, self.weight, class_start=self.class_start,
                                             group=self.group, backend=self.backend)

    @torch.no_grad()
    def gather_state_dict(self) -> dict:
        """MarginLoss's single-process state dict (full weight), on every rank (a collective)."""
        sizes = [_distributed().shard_range(self.num_classes, r, self.world_size)[1]
                 for r in range(self.world_size)]
        sd = self.state_dict()
        sd["weight"] = _distributed()._gather_rows(self.weight.detach(), sizes, self.group)
        return sd

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a single-process (MarginLoss or gathered) state dict, keeping this rank's rows."""
        full = state_dict["weight"]
        if tuple(full.shape) != (self.num_classes, self.in_features):
            raise ValueError(f"weight must be [{self.num_classes}, {self.in_features}], "
                             f"got {tuple(full.shape)}")
        rows = full[self.class_start:self.class_start + self.weight.shape[0]]
        return self.load_state_dict(dict(state_dict, weight=rows), strict=strict)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"kind={self.kind!r}, s={self.s:.4g}, classes=[{self.class_start}, "
                f"{self.class_start + self.weight.shape[0]}) of rank {self.rank}/"
                f"{self.world_size}, sample_rate={self.sample_rate}")
