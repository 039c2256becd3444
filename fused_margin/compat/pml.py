"""pytorch-metric-learning 2.x losses on fused_margin's kernels.

    from fused_margin.compat.pml import ArcFaceLoss   # was: from pytorch_metric_learning.losses import ArcFaceLoss
    loss_fn = ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)
    loss = loss_fn(embeddings, labels)

Same constructor arguments and units as PML 2.x: ArcFaceLoss's `margin` in
degrees (stored in radians in `.margin`, as PML does), CosFaceLoss's as a
cosine offset, NormalizedSoftmaxLoss's `temperature` (the scale is
1/temperature). The class weights are the parameter `W` [embedding_size,
num_classes], as in PML, so a PML state_dict loads with load_state_dict; the
kernels receive W.t(), a view (Triton reads it through its strides, tested;
the C++ kernels make one contiguous [C, D] copy per forward), and on every
backend autograd lays the [C, D] gradient into W.grad's [D, C] layout (one
copy per backward). bench/bench_compat_layout.py measures what the layout
costs on CPU. Values and gradients equal PML's for the same W
(tests/test_compat_pml.py), including ArcFace's monotone fallback past pi
(cos theta - m sin m), which fused_margin's arcface kind shares. Like PML,
a forward casts W to the embeddings' dtype and device.

What is not carried over: miners' `indices_tuple`, `ref_emb` / `ref_labels`,
and the `distance`, `reducer`, `weight_regularizer` and `embedding_regularizer`
options (each raises rather than being silently ignored); `collect_stats`
is accepted and records nothing. SphereFaceLoss and LargeMarginSoftmaxLoss
are left out: PML scales their logits by the product of the feature and weight
norms, which the fused kernels (cosines only) do not express. For SubCenterArcFaceLoss
use fused_margin.nn.SubCenterArcFace (its weight [C*K, D] is PML's W.T).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .. import functional as F

__all__ = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss"]

_UNSUPPORTED = ("distance", "reducer", "weight_regularizer", "weight_reg_weight",
                "embedding_regularizer", "embedding_reg_weight")


class _PMLClassifierLoss(nn.Module):
    """A PML classification loss: W [D, C], forward(embeddings, labels) -> mean loss."""

    kind = "normface"

    def __init__(self, num_classes: int, embedding_size: int, *,
                 weight_init_func: Optional[Callable] = None, collect_stats: bool = False,
                 backend: str = "auto", **kwargs):
        super().__init__()
        bad = sorted(kwargs)
        if bad:
            known = [k for k in bad if k in _UNSUPPORTED]
            raise TypeError(f"{type(self).__name__}: {', '.join(bad)} "
                            + ("is a pytorch-metric-learning option fused_margin.compat.pml "
                               "does not support" if known else "is not an argument"))
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.collect_stats, self.backend = collect_stats, backend
        self.W = nn.Parameter(torch.Tensor(self.embedding_size, self.num_classes))
        (weight_init_func or nn.init.normal_)(self.W)

    def _margin(self) -> float:
        return 0.0

    def _scale(self) -> float:
        raise NotImplementedError

    def _weight(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.W.dtype != embeddings.dtype or self.W.device != embeddings.device:
            # PML's cast_types: the parameter follows the embeddings
            self.W.data = self.W.data.to(device=embeddings.device, dtype=embeddings.dtype)
        return self.W.t()  # [C, D], a view: no copy here

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> torch.Tensor:
        if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
            raise NotImplementedError(f"{type(self).__name__}: indices_tuple, ref_emb and "
                                      "ref_labels are not supported by fused_margin.compat.pml")
        if labels is None:
            raise ValueError(f"{type(self).__name__} requires labels")
        labels = labels.to(embeddings.device)
        return F.margin_cross_entropy(embeddings, self._weight(embeddings), labels,
                                      kind=self.kind, s=self._scale(), m=self._margin(),
                                      reduction="mean", backend=self.backend)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """scale * cos(embeddings, W[:, j]), [N, C], no margin (PML's get_logits)."""
        return F.scaled_cosine(embeddings, self._weight(embeddings), self._scale())

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"kind={self.kind!r}, scale={self._scale():.4g}, margin={self._margin():.4g}")


class ArcFaceLoss(_PMLClassifierLoss):
    """PML's ArcFaceLoss: target logit scale*cos(theta_y + margin), margin in degrees."""

    kind = "arcface"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = math.radians(margin)  # PML's init_margin (np.radians)
        self.scale = scale

    def _margin(self) -> float:
        return float(self.margin)

    def _scale(self) -> float:
        return float(self.scale)


class CosFaceLoss(_PMLClassifierLoss):
    """PML's CosFaceLoss: target logit scale*(cos_y - margin)."""

    kind = "cosface"

    def __init__(self, *args, margin: float = 0.35, scale: float = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin, self.scale = margin, scale

    def _margin(self) -> float:
        return float(self.margin)

    def _scale(self) -> float:
        return float(self.scale)


class NormalizedSoftmaxLoss(_PMLClassifierLoss):
    """PML's NormalizedSoftmaxLoss: cross-entropy over cos / temperature."""

    kind = "normface"

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05,
                 **kwargs):
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = temperature

    def _scale(self) -> float:
        return 1.0 / float(self.temperature)
