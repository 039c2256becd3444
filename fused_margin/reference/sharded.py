"""Per-shard partials of the margin softmax cross-entropy, eager PyTorch.

One rank holds the weight rows of classes [class_start, class_start + C_r) and
the whole (all-gathered) batch. `margin_shard_partials` returns, per row, what
the ranks combine into the global loss (fused_margin.distributed):

- row_max: the largest non-target logit on this shard (detached; -inf if none);
- sum_exp: sum over the shard's non-target classes of exp(logit - row_max);
- target:  the target logit s * target_transform(cos_y) where y lives on this
  shard, 0 elsewhere (exactly one rank owns each labelled row);
- wrong_cos, wrong_index: the best wrong cosine on this shard and its global
  class index (first index on ties), for elm's c* (detached).

The margin math is fused_margin.reference.angular's (cosine, target_transform,
_per_row): the sharded loss equals the single-process one term by term. This
eager version builds an N x C_r cosine tile and lets PyTorch's autograd keep
several such tiles: it is the oracle the tests compare against, not what
fused_margin.distributed runs (that is dispatch's "margin_shard_partials":
the Triton or C++ kernel, or fused_margin.reference.sharded_tiles' eager tiles, all
with O(N) saved state). No custom autograd here. partials_around (with
target_columns and finish_partials) holds the O(N) steps all of them share.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from .angular import COS_EPS, _per_row, cosine, target_transform

NO_CLASS = torch.iinfo(torch.int64).max  # wrong_index where a row has no wrong class here


class ShardPartials(NamedTuple):
    row_max: torch.Tensor      # [N] detached, compute dtype
    sum_exp: torch.Tensor      # [N] differentiable, relative to row_max
    target: torch.Tensor       # [N] differentiable, 0 where the target is elsewhere
    wrong_cos: torch.Tensor    # [N] detached, -inf where no wrong class is kept here
    wrong_index: torch.Tensor  # [N] int64 global class index, NO_CLASS where none


def class_logit(cos: torch.Tensor, kind: str, s: float) -> torch.Tensor:
    """The logit of a class without a margin: s*cos, or arcgrad's -s*theta
    (which every class, the target too, gets)."""
    if kind == "arcgrad":
        return -s * torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    return s * cos


def target_logit(cos_y: torch.Tensor, y: torch.Tensor, *, kind: str, s: float,
                 m: Union[float, torch.Tensor], m1: float, m2: float, m3: float) -> torch.Tensor:
    """The target logit from the target cosine, without elm's lambda * m_{c*}
    (angular.target_transform; arcgrad has no target transform)."""
    if kind == "arcgrad":
        return class_logit(cos_y, kind, s)
    return s * target_transform(cos_y, kind, _per_row(m, y, cos_y), m1, m2, m3)


def margin_shard_partials(features: torch.Tensor, weight_shard: torch.Tensor,
                          labels: torch.Tensor, *, class_start: int, kind: str = "arcface",
                          s: float = 64.0, m: Union[float, torch.Tensor] = 0.5,
                          m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                          ignore_index: int = -100, keep: Optional[torch.Tensor] = None,
                          logit_offset: Optional[torch.Tensor] = None) -> ShardPartials:
    """Partials of every row of the global batch against one class shard.

    features [N, D] and labels [N] are the global batch; weight_shard [C_r, D]
    covers classes [class_start, class_start + C_r); `m` is a scalar or the FULL
    per-class [num_classes] tensor. `keep` (sorted local indices [K]) restricts
    the shard to those classes (PartialFC sampling); `logit_offset` [K] is
    added to their non-target logits (log inverse inclusion probabilities).
    elm's lambda * m_{c*} term needs the global c*, so it is not in `target`:
    the caller adds it once the ranks agree on c*.
    """
    w = weight_shard if keep is None else weight_shard.index_select(0, keep)
    local = torch.arange(w.shape[0], device=labels.device) if keep is None else keep
    gid = local.to(labels.device) + class_start                              # [K] global ids
    cos = cosine(features, w)                                                # [N, K]
    valid = labels != ignore_index
    hit = (gid[None, :] == labels[:, None]) & valid[:, None]                # target column
    owner = hit.any(dim=1)

    z = class_logit(cos, kind, s)
    if logit_offset is not None:
        z = z + logit_offset.to(z.dtype)[None, :]
    z_wrong = z.masked_fill(hit, -math.inf)
    n, k = cos.shape
    if k == 0:
        row_max = cos.new_full((n,), -math.inf)
    else:
        row_max = z_wrong.detach().amax(dim=1)
    # a row whose only kept class is its target has row_max = -inf: shift by 0 there
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sum_exp = torch.exp(z_wrong - shift[:, None]).sum(dim=1)

    col = hit.to(torch.int64).argmax(dim=1) if k else torch.zeros_like(labels)
    y = torch.where(owner, labels, torch.zeros_like(labels))
    if k == 0:
        target = cos.new_zeros(n) + z.sum(dim=1)  # empty: keeps the graph, value 0
    else:
        cos_y = cos.gather(1, col[:, None]).squeeze(1)
        t = target_logit(cos_y, y, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)
        target = torch.where(owner, t, torch.zeros_like(t))

    others = cos.detach().masked_fill(hit, -math.inf)
    if k == 0:
        wrong_cos = cos.new_full((n,), -math.inf)
        wrong_index = torch.full_like(labels, NO_CLASS)
    else:
        wrong_cos, arg = others.max(dim=1)  # first index on ties
        wrong_index = torch.where(torch.isfinite(wrong_cos), gid[arg],
                                  torch.full_like(labels, NO_CLASS))
    return ShardPartials(row_max, sum_exp, target, wrong_cos, wrong_index)


def target_columns(labels: torch.Tensor, *, class_start: int, shard_size: int,
                   keep: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """[N] int64: the column of each row's target among the shard's kept
    classes, -1 where the target lives elsewhere (or the row is ignored).
    What the tiled and fused partials take instead of labels: no kernel ever
    sees a label, only a column in [-1, K)."""
    local = labels - class_start
    here = (labels != ignore_index) & (local >= 0) & (local < shard_size)
    none = torch.full_like(labels, -1)
    if shard_size == 0 or (keep is not None and keep.numel() == 0):
        return none
    safe = torch.where(here, local, torch.zeros_like(local))
    if keep is None:
        return torch.where(here, safe, none)
    lut = torch.full((shard_size,), -1, dtype=torch.int64, device=labels.device)
    lut[keep.to(labels.device)] = torch.arange(keep.numel(), device=labels.device)
    return torch.where(here, lut[safe], none)


def finish_partials(row_max: torch.Tensor, sum_exp: torch.Tensor, cos_y: torch.Tensor,
                    wrong_cos: torch.Tensor, wrong_column: torch.Tensor, labels: torch.Tensor,
                    col: torch.Tensor, *, keep: Optional[torch.Tensor], class_start: int,
                    kind: str, s: float, m: Union[float, torch.Tensor], m1: float, m2: float,
                    m3: float) -> ShardPartials:
    """ShardPartials from a sweep's per-row statistics, in O(N): the target
    logit from the target cosine cos_y (where col >= 0), and the best wrong
    column (index among the kept classes, any value where wrong_cos is not
    finite) as a global class index. Shared by the tiled and fused backends."""
    owner = col >= 0
    y = torch.where(owner, labels, torch.zeros_like(labels))
    t = target_logit(cos_y, y, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)
    target = torch.where(owner, t, torch.zeros_like(t))
    found = torch.isfinite(wrong_cos)
    safe = torch.where(found, wrong_column, torch.zeros_like(wrong_column))
    if keep is not None and keep.numel():
        safe = keep.to(safe.device)[safe]
    wrong_index = torch.where(found, safe + class_start, torch.full_like(safe, NO_CLASS))
    return ShardPartials(row_max, sum_exp, target, wrong_cos, wrong_index)


def partials_around(sweep, labels: torch.Tensor, *, shard_size: int, class_start: int,
                    keep: Optional[torch.Tensor], ignore_index: int, kind: str, s: float,
                    m: Union[float, torch.Tensor], m1: float, m2: float,
                    m3: float) -> ShardPartials:
    """The O(N) steps every backend's margin_shard_partials shares around its
    sweep: labels to target columns, `sweep(col)` -> (row_max, sum_exp, cos_y,
    wrong_cos, wrong_column), then finish_partials."""
    col = target_columns(labels, class_start=class_start, shard_size=shard_size, keep=keep,
                         ignore_index=ignore_index)
    return finish_partials(*sweep(col), labels, col, keep=keep, class_start=class_start,
                           kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3)


def sampled_logit_offset(keep: torch.Tensor, positive: torch.Tensor, shard_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """log(1/q) per kept class: 0 for the shard's positives (always kept), and
    log((C_r - P) / (K - P)) for the uniformly sampled others, so that
    sum_kept exp(z + offset) is an unbiased estimate of the shard's full sum."""
    n_pos = int(positive.sum())
    n_keep = keep.numel()
    offset = torch.zeros(n_keep, dtype=dtype, device=keep.device)
    if n_keep > n_pos:
        offset = torch.where(positive[keep], offset,
                             offset + math.log((shard_size - n_pos) / (n_keep - n_pos)))
    return offset
