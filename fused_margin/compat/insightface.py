"""insightface (recognition/arcface_torch) losses on fused_margin.

    from fused_margin.compat.insightface import CombinedMarginLoss, PartialFC_V2
    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)       # ArcFace, s=64, m=0.5
    module_pfc = PartialFC_V2(margin_loss, 512, num_classes, sample_rate=0.2)
    loss = module_pfc(local_embeddings, local_labels)          # every rank, as in insightface

Follows arcface_torch's losses.py and partial_fc_v2.py (insightface commit
7fadd42, 2026-07) branch by branch:

- m1 == 1 and m3 == 0: ArcFace with the angle under no_grad, as insightface
  computes it: the target logit's value is s*cos(arccos(cos_y) + m2) with no
  fallback past pi (past theta = pi - m2 the logit rises again), and its
  gradient is straight-through: d loss / d cos_j = s*(p_j - 1[j = y]), p the
  softmax of the margined logits, as though the margin were a constant shift.
- m3 > 0: CosFace, target s*(cos_y - m3); m1 and m2 are ignored.
- anything else raises (insightface's bare `raise`; here a ValueError at
  construction that names the branches).

variant="fused_margin" switches to fused_margin's own combined margin instead:
s*(cos(m1*theta_y + m2) - m3) with all three margins, true gradients, and the
monotone continuation past pi (docs/numerics.md); every m1 > 0 is accepted.

PartialFC_V2 runs fused_margin.distributed.margin_cross_entropy: the classes
split as insightface splits them (the first C % world ranks get one more),
`weight` [C_r, D] drawn from N(0, 0.01) like theirs, the loss the mean over
the global batch, the same on every rank. Gradients are insightface's: the
weight shard gets its rows of the global loss's gradient and the local
embeddings the world_size-scaled gradient its AllGatherFunc returns (so that
DDP's averaging of the backbone gradients gives the global-batch gradient).
The straight-through ArcFace is the cosface kind with a per-row target shift
cos_y - cos(arccos(cos_y) + m2), computed from O(N) values after the fused
sweep and held constant in backward (distributed.margin_cross_entropy's
`row_margin`), so no N x C_r logits tile is made.

Differences that remain: with sample_rate < 1 the kept classes are
max(P, ceil(rate * C_r)) (insightface: max(P, int(rate * C_r))) drawn from
fused_margin's generator (pass `generator=`), so the random subset is not
insightface's. Like insightface's DistCrossEntropyFunc, a row's loss is capped at
-log(1e-30) = 69.08 (its clamp_min on p_y) while the gradient stays the
softmax's (fused_margin's own losses are not capped). `interclass_filtering_threshold`
> 0 is supported by CombinedMarginLoss.forward on cosines but not by
PartialFC_V2 (the fused sweep does not express it: ValueError); fp16=True
casts the gathered embeddings and the weight to float16 for the sweep (the
kernels accumulate in float32), where insightface runs linear() under
autocast. Labels must be class indices (insightface's -1 "elsewhere" marks
are formed internally, as theirs are).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..reference.angular import target_transform

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]

VARIANTS = ("insightface", "fused_margin")
_MAX_ROW_LOSS = -math.log(1e-30)  # insightface's clamp_min(1e-30) on p_y


def _straight_through_arcface(m2: float):
    """The per-row cosine margin that turns cosface into insightface's arcface:
    cos_y - cos(arccos(cos_y) + m2), on cosines clamped to [-1, 1] as theirs."""
    def row_margin(cos_y: torch.Tensor) -> torch.Tensor:
        c = cos_y.clamp(-1, 1)
        return c - torch.cos(torch.acos(c) + m2)
    return row_margin


class CombinedMarginLoss(nn.Module):
    """insightface's CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0).

    forward(logits, labels): logits are the cosines [N, C] (PartialFC's
    clamp(normalize(x) @ normalize(W).T, -1, 1)), labels [N] or [N, 1] class
    columns, -1 for rows whose class is not in these columns; returns the
    margined, scaled logits [N, C] for a cross-entropy, as insightface's does
    (without modifying `logits` in place). Passed to PartialFC_V2, only its
    s, m1, m2, m3 are read and the fused kernels run instead.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float,
                 interclass_filtering_threshold: float = 0, *, variant: str = "insightface"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.variant = variant
        # insightface keeps these (unused by its forward); kept for code that reads them
        self.cos_m, self.sin_m = math.cos(m2), math.sin(m2)
        self.theta = math.cos(math.pi - m2)
        self.sinmm = math.sin(math.pi - m2) * m2
        self.easy_margin = False
        if variant == "insightface" and not self._is_arcface() and not m3 > 0:
            raise ValueError(
                f"CombinedMarginLoss(s={s}, m1={m1}, m2={m2}, m3={m3}): insightface only has "
                "ArcFace (m1 == 1 and m3 == 0) and CosFace (m3 > 0) and raises otherwise; "
                "variant='fused_margin' computes s*(cos(m1*theta + m2) - m3) for any m1 > 0")

    def _is_arcface(self) -> bool:
        return self.m1 == 1.0 and self.m3 == 0.0

    def fused_kwargs(self) -> dict:
        """The fused_margin.distributed.margin_cross_entropy keywords of this margin."""
        if self.variant == "fused_margin":
            return dict(kind="combined", s=self.s, m=0.0, m1=self.m1, m2=self.m2, m3=self.m3)
        if self._is_arcface():
            return dict(kind="cosface", s=self.s, m=0.0,
                        row_margin=_straight_through_arcface(self.m2))
        return dict(kind="cosface", s=self.s, m=self.m3)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        index_positive = torch.where(labels != -1)[0]
        cols = labels[index_positive]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).to(logits.dtype)
                mask = torch.ones([index_positive.size(0), logits.size(1)],
                                  dtype=logits.dtype, device=logits.device)
                mask.scatter_(1, cols[:, None], 0)
                dirty[index_positive] *= mask
                tensor_mul = 1 - dirty
            logits = tensor_mul * logits
        if self.variant == "fused_margin":
            target = logits[index_positive, cols]
            new = target_transform(target, "combined", torch.zeros_like(target), self.m1,
                                   self.m2, self.m3)
            out = logits.index_put((index_positive, cols), new)
            return out * self.s
        if self._is_arcface():
            with torch.no_grad():  # insightface: arccos, add m2 to the target, cos
                angles = logits.detach().acos()
                angles[index_positive, cols] += self.m2
                value = angles.cos_()
            # the value of insightface's in-place result, the gradient of the identity
            return (logits + (value - logits).detach()) * self.s
        target = logits[index_positive, cols]
        return logits.index_put((index_positive, cols), target - self.m3) * self.s


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by `factor` (insightface's
    AllGatherFunc returns world_size x the embeddings' gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _margin_kwargs(margin_loss) -> dict:
    if isinstance(margin_loss, CombinedMarginLoss):
        if margin_loss.interclass_filtering_threshold > 0:
            raise ValueError("PartialFC_V2: interclass_filtering_threshold > 0 is not supported "
                             "by the fused path (CombinedMarginLoss.forward on cosines has it)")
        return margin_loss.fused_kwargs()
    names = ("s", "m1", "m2", "m3")
    if all(hasattr(margin_loss, n) for n in names):  # insightface's own CombinedMarginLoss
        return _margin_kwargs(CombinedMarginLoss(
            *(getattr(margin_loss, n) for n in names),
            getattr(margin_loss, "interclass_filtering_threshold", 0)))
    if hasattr(margin_loss, "s") and hasattr(margin_loss, "margin"):  # insightface's ArcFace
        return CombinedMarginLoss(margin_loss.s, 1.0, margin_loss.margin, 0.0).fused_kwargs()
    if hasattr(margin_loss, "s") and hasattr(margin_loss, "m"):  # insightface's CosFace
        return dict(kind="cosface", s=margin_loss.s, m=margin_loss.m)
    raise TypeError("PartialFC_V2 needs a CombinedMarginLoss (or insightface's ArcFace / "
                    f"CosFace), got {type(margin_loss).__name__}: the fused kernels read its "
                    "margins instead of calling it")


class PartialFC_V2(nn.Module):
    """insightface's PartialFC_V2(margin_loss, embedding_size, num_classes,
    sample_rate=1.0, fp16=False) on fused_margin.distributed.

    Create it after torch.distributed.init_process_group; every rank calls
    forward(local_embeddings, local_labels) -> the global-batch mean loss.
    `group`, `backend` and `generator` (the class sampling's) are fused_margin
    additions.
    """

    _version = 2

    def __init__(self, margin_loss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, fp16: bool = False, *, group=None,
                 backend: str = "auto", generator: Optional[torch.Generator] = None):
        super().__init__()
        from .. import distributed as fd

        if not fd.dist.is_initialized():
            raise RuntimeError("must initialize distributed before create this")
        if not callable(margin_loss):
            raise TypeError("margin_loss must be callable")
        self.margin_softmax = margin_loss
        self._margin = _margin_kwargs(margin_loss)
        self.group = group
        self.rank = fd.dist.get_rank(group)
        self.world_size = fd.dist.get_world_size(group)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.fp16 = float(sample_rate), bool(fp16)
        self.backend, self.generator = backend, generator
        self.class_start, self.num_local = fd.shard_range(num_classes, self.rank, self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, self.embedding_size)))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        from .. import distributed as fd

        labels = local_labels.reshape(-1).long()
        x = local_embeddings
        if torch.is_grad_enabled() and x.requires_grad:
            x = _ScaleGrad.apply(x, float(self.world_size))
        w = self.weight
        if self.fp16:
            x, w = x.half(), w.half()
        per_row = fd.margin_cross_entropy(
            x, w, labels, class_start=self.class_start, num_classes=self.num_classes,
            group=self.group, sample_rate=self.sample_rate, reduction="none",
            backend=self.backend, generator=self.generator, **self._margin)
        # DistCrossEntropyFunc's p_y.clamp_min(1e-30) before the log: the value is capped
        # at -log(1e-30), its backward is the unclamped softmax's
        excess = (per_row.detach() - _MAX_ROW_LOSS).clamp_min(0)
        return (per_row - excess).mean()

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_start + self.num_local}) of rank "
                f"{self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
                f"margin={self._margin}")
