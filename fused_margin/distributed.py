"""Class-sharded margin cross-entropy over torch.distributed (PartialFC style).

Each rank holds a contiguous slice of the classes, W_r [C_r, D] for classes
[class_start, class_start + C_r), and its own samples (x_r [N_r, D], y_r [N_r];
N_r may differ per rank). One forward:

1. metadata (N_r, D, class_start, C_r, num_classes, the dtypes of features,
   weight_shard and labels, a configuration fingerprint, an error flag) is
   all-gathered and checked on every rank, so bad input raises ValueError on
   EVERY rank instead of hanging (or, for mismatched dtypes, aborting) a
   collective;
2. features and labels are all-gathered (features through an autograd Function
   whose backward all-reduces the gradient and keeps this rank's rows);
3. each rank computes per-row partials on its shard (dispatch.OPS
   "margin_shard_partials": non-target row max and sum of exp, the target
   logit where the target lives here, elm's best wrong cosine and its global
   index) with its backend's fused kernel: on CUDA the Triton forward sweep of
   the loss in its PARTIALS mode (fused_margin.triton.angular), on CPU the C++
   class-tiled sweep (csrc/angular.cpp, shard_partials_*), each an autograd
   Function whose backward runs the loss's own gradient kernels from O(N)
   saved statistics. backend="reference" runs fused_margin.reference.sharded_tiles,
   the same sweep as eager PyTorch tiles. None of them holds an N_global x C_r
   tensor. reference.sharded holds the plain N x C_r oracle the tests compare
   to. The kernels never see a label: each row's target column in [-1, C_r)
   is formed here first;
4. partials are combined with all_reduce, MAX then SUM (insightface PartialFC),
   and every rank assembles the same global loss on the global batch.

Communication per step: the metadata all_gather (12 int64 per rank, plus an
object all_gather only when some rank's input is invalid), the features
all_gather (N x D) and the labels all_gather (N int64), all_reduce MAX of
2 x N, all_reduce SUM of 2 x N, for elm an all_reduce MIN of N int64 (c*);
backward one all_reduce SUM of N x D (the features' gradient). Nothing N x C
crosses ranks.

Gradient semantics. The loss is replicated: every rank holds the same value
and every rank must call backward on it (the feature gather's backward is a
collective). Backward of the SUM all-reduce is the identity, not another
all-reduce: each rank's upstream gradient is already the gradient of the one
global loss, and a summand's derivative is that gradient (torch.distributed.nn's
all_reduce would sum it over ranks, multiplying by the world size). Hence, with
sample_rate=1 and loss.backward() on every rank, rank r's weight_shard.grad is
the rows [class_start, class_start + C_r) of the single-process gradient of the
same loss w.r.t. the full weight, and rank r's features.grad is the
single-process gradient's rows of rank r's samples. So: never all-reduce
W_r's gradient (it is not replicated), and SUM the backbone's gradients over
ranks to get the global-batch gradient. DDP averages them instead; under DDP
multiply the feature gradient by the world size, e.g.
features.register_hook(lambda g: g * world_size), which is what insightface's
AllGatherFunc does inside its backward (scaling the loss would scale W_r's
gradient too).

sample_rate < 1 (PartialFC): each rank keeps the P classes of its shard that
are targets in the global batch plus a uniform random sample, without
replacement, of its C_r - P other classes, K = min(C_r, max(P,
ceil(sample_rate * C_r))) in all; the softmax runs over the kept classes of all
ranks, and only kept rows of W_r get a gradient (others are 0). This is the
PartialFC estimator: the loss of a softmax over a subset, a biased (too small)
estimate of the full loss.

sample_correction=True adds log(1/q) to the logits of the sampled (non-
positive) classes, q = (K - P) / (C_r - P) their inclusion probability, so that
each shard's sum_kept exp(logit + offset) is the Horvitz-Thompson estimate of
its full sum of exp: over the sampling, the estimated softmax normaliser of
every row has expectation equal to the full normaliser (its log, the loss,
stays biased low by Jensen's inequality, less so). That needs K > P wherever
C_r > P: with K = P no negative is drawn and the shard's negatives would be
estimated by 0. So under sample_correction=True each shard keeps at least one
negative, K = min(C_r, max(P + 1, ceil(sample_rate * C_r))); with C_r = P every
class is kept and the sum is exact. elm's c* is the best wrong cosine among the
kept classes (no correction applies to it).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import checks, dispatch
from .functional import autocast_off, mixed
from .reference import sharded
from .reference.angular import _per_row, compute_dtype
from .reference.reduction import reduce_loss

__all__ = ["margin_cross_entropy", "sample_classes", "shard_range", "sharded_argmax"]

# metadata row per rank: ok, N_r, D(features), D(weight), class_start, C_r, num_classes,
# fingerprint, grad, dtype codes of features, weight_shard, labels
_META = 12


def _dtype_code(t) -> int:
    return zlib.crc32(str(t.dtype).encode()) if isinstance(t, torch.Tensor) else -1


def _dtype_name(code: int) -> str:
    for v in vars(torch).values():
        if isinstance(v, torch.dtype) and zlib.crc32(str(v).encode()) == code:
            return str(v).replace("torch.", "")
    return "?"


# --------------------------------------------------------- autograd collectives

class _GatherRows(torch.autograd.Function):
    """all_gather of [N_r, D] rows of uneven N_r; backward sums the gathered
    gradient over ranks and keeps this rank's rows (each rank's graph holds
    only its shard's share of d loss / d x_global)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        acc = grad.to(compute_dtype(grad.dtype), copy=True).contiguous()  # never the caller's
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return acc[start:start + ctx.sizes[ctx.rank]].to(grad.dtype), None, None, None


class _SumReplicated(torch.autograd.Function):
    """all_reduce SUM whose backward is the identity: the output feeds a loss
    that every rank computes identically, so each rank's upstream gradient is
    already d loss / d output, which is d loss / d (this rank's summand)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _gather_rows(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Plain all_gather of uneven row blocks, padded to the largest."""
    top = max(sizes)
    pad = x.new_zeros((top,) + tuple(x.shape[1:]))
    pad[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


# ------------------------------------------------------------------ checks

def _comm_device(group, *tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)


def _fingerprint(config: tuple) -> int:
    return zlib.crc32(repr(config).encode())


def _raise_collectively(local_error: Optional[str], group) -> None:
    """Every rank learns whether any rank failed; then every rank raises."""
    msgs: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(msgs, local_error, group=group)
    bad = [(r, msg) for r, msg in enumerate(msgs) if msg is not None]
    if bad:
        raise ValueError("fused_margin.distributed.margin_cross_entropy: invalid input on "
                         + "; ".join(f"rank {r}: {msg}" for r, msg in bad))


def _exchange_metadata(features, weight_shard, labels, class_start, num_classes, config, group,
                       local_error: Optional[str]) -> List[List[int]]:
    world = dist.get_world_size(group)
    device = _comm_device(group, features, weight_shard)
    ok = local_error is None
    row = [int(ok)] + [-1] * (_META - 1)
    row[7] = _fingerprint(config)
    if ok:
        row[1:7] = [features.shape[0], features.shape[1], weight_shard.shape[1], class_start,
                    weight_shard.shape[0], num_classes]
        row[8] = int(torch.is_grad_enabled() and features.requires_grad)
        row[9:12] = [_dtype_code(features), _dtype_code(weight_shard), _dtype_code(labels)]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    meta = torch.stack(rows).tolist()
    if not all(r[0] for r in meta):
        _raise_collectively(local_error, group)
    problem = _global_problem(meta)
    if problem is not None:
        raise ValueError(f"fused_margin.distributed.margin_cross_entropy: {problem}")
    return meta


def _global_problem(meta: List[List[int]]) -> Optional[str]:
    """What is wrong across ranks (same answer on every rank), or None."""
    if len({r[7] for r in meta}) > 1:
        return ("ranks disagree on the loss configuration (kind, s, m, m1, m2, m3, elm_lambda, "
                "ignore_index, reduction, sample_rate, ...)")
    if len({r[6] for r in meta}) > 1:
        return f"ranks disagree on num_classes: {[r[6] for r in meta]}"
    dims = {r[2] for r in meta} | {r[3] for r in meta}
    if len(dims) > 1:
        return f"feature dimension D differs across ranks: {[(r[2], r[3]) for r in meta]}"
    if len({tuple(r[9:12]) for r in meta}) > 1:
        seen = ", ".join(f"rank {i}: " + "/".join(_dtype_name(c) for c in r[9:12])
                         for i, r in enumerate(meta))
        return ("dtypes (features/weight_shard/labels) differ across ranks, which the "
                f"collectives cannot mix: {seen}")
    if len({r[8] for r in meta}) > 1:
        return ("features require grad on some ranks only; the gather's backward is a "
                "collective, so every rank or none must differentiate")
    num_classes = meta[0][6]
    shards = sorted((r[4], r[5]) for r in meta)
    end = 0
    for start, size in shards:
        if start != end:
            break
        end = start + size
    if end != num_classes or shards[0][0] != 0:
        spans = [(r[4], r[4] + r[5]) for r in meta]
        return (f"the weight shards must tile [0, {num_classes}) without gaps or overlaps; "
                f"ranks hold {spans}")
    return None


def _local_problem(features, weight_shard, labels, *, class_start, num_classes, sample_rate,
                   kind, s, m, m1, m2, m3, elm_lambda, class_weight, ignore_index, reduction,
                   backend, sample_correction) -> Optional[str]:
    try:
        checks.tensor("features", features, dim=2, floating=True)
        checks.tensor("weight_shard", weight_shard, dim=2, floating=True)
        if features.shape[1] != weight_shard.shape[1]:
            raise ValueError(f"features [N, D] and weight_shard [C_r, D] disagree on D: "
                             f"{tuple(features.shape)} vs {tuple(weight_shard.shape)}")
        checks.same_dtype(features=features, weight_shard=weight_shard)
        checks.integer("num_classes", num_classes, minimum=1)
        checks.integer("class_start", class_start, minimum=0)
        checks.finite("sample_rate", sample_rate, positive=True)
        if sample_rate > 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        checks.choice("backend", backend, dispatch.BACKENDS)
        if not isinstance(sample_correction, bool):
            raise TypeError("sample_correction must be a bool")
        checks._margin_common(features.shape[0], num_classes, labels, kind=kind, s=s, m=m, m1=m1,
                              m2=m2, m3=m3, elm_lambda=elm_lambda, class_weight=class_weight,
                              ignore_index=ignore_index, reduction_=reduction)
        if kind == "adaface":
            raise ValueError("kind 'adaface' is not supported by fused_margin.distributed yet "
                             "(issue 19)")
        checks.same_device(features=features, weight_shard=weight_shard, labels=labels,
                           class_weight=class_weight,
                           m=m if isinstance(m, torch.Tensor) else None)
        _partials_fn(backend, features.device)
    except Exception as exc:  # noqa: BLE001  (any local failure must reach every rank)
        return f"{type(exc).__name__}: {exc}"
    return None


def _partials_fn(backend: str, device: torch.device):
    """The per-shard partials `backend` picks for `device` (raises if it cannot run)."""
    return dispatch.resolve("margin_shard_partials", backend, device)


# ---------------------------------------------------------------- sampling

def shard_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(class_start, C_r) of an even split: the first num_classes % world_size
    ranks get one extra class."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def _positive_mask(labels: torch.Tensor, class_start: int, shard_size: int,
                   ignore_index: int) -> torch.Tensor:
    local = labels[labels != ignore_index] - class_start
    local = local[(local >= 0) & (local < shard_size)]
    return torch.zeros(shard_size, dtype=torch.bool, device=labels.device).index_fill_(0, local,
                                                                                       True)


def sample_classes(labels: torch.Tensor, *, class_start: int, shard_size: int, sample_rate: float,
                   ignore_index: int = -100,
                   generator: Optional[torch.Generator] = None,
                   min_negatives: int = 0) -> torch.Tensor:
    """Sorted local indices of the classes a shard keeps under PartialFC sampling.

    Every class of [class_start, class_start + shard_size) that is a target in
    `labels` (the global batch), P of them, plus a uniform random subset of the
    others, min(shard_size, max(P + min_negatives, ceil(sample_rate *
    shard_size))) in all (min_negatives=1 is what sample_correction needs). The
    random scores come from `generator` (its device), else the default
    generator of labels' device; seed it per rank for independent choices.
    """
    positive = _positive_mask(labels, class_start, shard_size, ignore_index)
    n_keep = max(int(positive.sum()) + min_negatives,
                 math.ceil(sample_rate * shard_size - 1e-9))
    n_keep = min(shard_size, n_keep)
    device = generator.device if generator is not None else labels.device
    score = torch.rand(shard_size, generator=generator, device=device).to(labels.device)
    score = torch.where(positive, torch.full_like(score, 2.0), score)
    return score.topk(n_keep).indices.sort().values


def _sampled_shard(labels: torch.Tensor, *, class_start: int, shard_size: int,
                   sample_rate: float, ignore_index: int, generator: Optional[torch.Generator],
                   sample_correction: bool, dtype: torch.dtype, device: torch.device
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(kept local classes [K], their logit offsets [K] or None): the sampling
    and the Horvitz-Thompson correction of the module docstring."""
    keep = sample_classes(labels, class_start=class_start, shard_size=shard_size,
                          sample_rate=sample_rate, ignore_index=ignore_index,
                          generator=generator,
                          min_negatives=1 if sample_correction else 0).to(device)
    if not sample_correction:
        return keep, None
    positive = _positive_mask(labels, class_start, shard_size, ignore_index).to(device)
    return keep, sharded.sampled_logit_offset(keep, positive, shard_size, dtype)


# --------------------------------------------------------------------- loss

def margin_cross_entropy(features: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor,
                         *, class_start: int, num_classes: int, group=None,
                         sample_rate: float = 1.0, kind: str = "arcface", s: float = 64.0,
                         m: Union[float, torch.Tensor] = 0.5, m1: float = 1.0, m2: float = 0.0,
                         m3: float = 0.0, elm_lambda: float = 0.5,
                         class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", backend: str = "auto",
                         generator: Optional[torch.Generator] = None,
                         sample_correction: bool = False,
                         row_margin: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                         ) -> torch.Tensor:
    """fused_margin.margin_cross_entropy with the classes split across ranks.

    features [N_r, D] and labels [N_r] are this rank's samples; weight_shard
    [C_r, D] holds classes [class_start, class_start + C_r), and the shards of
    all ranks must tile [0, num_classes). A per-class `m` and `class_weight` are
    the FULL [num_classes] tensors, the same on every rank. Returns the loss of
    the global batch (every rank's samples, in rank order), the same on every
    rank: a scalar for "mean"/"sum", [N_global] for "none". Every rank must call
    it (and backward) together; invalid input on any rank raises ValueError on
    every rank. `backend` picks the shard's partials kernel (auto: Triton on
    CUDA, C++ on CPU; "reference": eager PyTorch tiles); ranks must agree on it.
    `generator` drives the class sampling of sample_rate < 1. Gradients,
    sampling and costs: module docstring.

    `row_margin` (kind="cosface" only): an elementwise function of the target
    cosines cos_y [N_global] (used where the row's target lives on this rank's
    shard) returning a per-row cosine margin, held constant in backward: the target logit is
    then s*(cos_y - m_y - row_margin(cos_y)) with the gradient of
    s*(cos_y - m_y). fused_margin.compat.insightface builds its
    straight-through ArcFace (the angle under no_grad) from it with
    row_margin(c) = c - cos(arccos(c) + m).
    """
    if row_margin is not None and kind != "cosface":
        raise ValueError(f"row_margin needs kind='cosface', got kind={kind!r}")
    if group is None:
        group = dist.group.WORLD
    if (isinstance(features, torch.Tensor) and isinstance(weight_shard, torch.Tensor)
            and features.is_floating_point() and weight_shard.is_floating_point()):
        # mixed precision as on one process: the autocast dtype under autocast, else the
        # wider of the two; every rank runs the same autocast, so the dtypes still agree
        features, weight_shard = mixed(features, weight_shard)
        with autocast_off(features.device):
            return _margin_cross_entropy(
                features, weight_shard, labels, class_start=class_start,
                num_classes=num_classes, group=group, sample_rate=sample_rate, kind=kind, s=s,
                m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda, class_weight=class_weight,
                ignore_index=ignore_index, reduction=reduction, backend=backend,
                generator=generator, sample_correction=sample_correction, row_margin=row_margin)
    return _margin_cross_entropy(
        features, weight_shard, labels, class_start=class_start, num_classes=num_classes,
        group=group, sample_rate=sample_rate, kind=kind, s=s, m=m, m1=m1, m2=m2, m3=m3,
        elm_lambda=elm_lambda, class_weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, backend=backend, generator=generator,
        sample_correction=sample_correction, row_margin=row_margin)


def _margin_cross_entropy(features, weight_shard, labels, *, class_start, num_classes, group,
                          sample_rate, kind, s, m, m1, m2, m3, elm_lambda, class_weight,
                          ignore_index, reduction, backend, generator, sample_correction,
                          row_margin):
    config = (kind, _num(s), ("tensor", tuple(m.shape)) if isinstance(m, torch.Tensor) else _num(m),
              _num(m1), _num(m2), _num(m3), _num(elm_lambda), class_weight is None, ignore_index,
              reduction, _num(sample_rate), backend, sample_correction, row_margin is None)
    local_error = _local_problem(features, weight_shard, labels, class_start=class_start,
                                 num_classes=num_classes, sample_rate=sample_rate, kind=kind, s=s,
                                 m=m, m1=m1, m2=m2, m3=m3, elm_lambda=elm_lambda,
                                 class_weight=class_weight, ignore_index=ignore_index,
                                 reduction=reduction, backend=backend,
                                 sample_correction=sample_correction)
    meta = _exchange_metadata(features, weight_shard, labels, class_start, num_classes, config,
                              group, local_error)
    rank = dist.get_rank(group)
    sizes = [r[1] for r in meta]
    if sum(sizes) == 0:  # every rank knows: no collective, a zero loss tied to both inputs
        dt = compute_dtype(features.dtype)
        zero = torch.zeros((), dtype=dt, device=features.device) + 0 * (
            features.to(dt).sum() + weight_shard.to(dt).sum())
        return zero.reshape(1)[:0] if reduction == "none" else zero

    x = _GatherRows.apply(features, sizes, rank, group)
    y = _gather_rows(labels, sizes, group)
    shard_size = weight_shard.shape[0]

    keep = offset = None
    if sample_rate < 1:
        keep, offset = _sampled_shard(y, class_start=class_start, shard_size=shard_size,
                                      sample_rate=sample_rate, ignore_index=ignore_index,
                                      generator=generator, sample_correction=sample_correction,
                                      dtype=compute_dtype(features.dtype),
                                      device=weight_shard.device)

    partials = _partials_fn(backend, features.device)
    p = partials(x, weight_shard, y, class_start=class_start, kind=kind, s=s, m=m, m1=m1, m2=m2,
                 m3=m3, ignore_index=ignore_index, keep=keep, logit_offset=offset)
    if row_margin is not None:
        p = _shift_targets(p, y, row_margin, s=s, m=m, class_start=class_start,
                           shard_size=shard_size, ignore_index=ignore_index)
    return _combine(p, y, kind=kind, s=s, m=m, elm_lambda=elm_lambda, class_weight=class_weight,
                    ignore_index=ignore_index, reduction=reduction, group=group)


def _shift_targets(p: sharded.ShardPartials, labels: torch.Tensor, row_margin, *, s, m,
                   class_start: int, shard_size: int, ignore_index: int) -> sharded.ShardPartials:
    """The targets this rank owns minus s * row_margin(cos_y), detached (O(N))."""
    local = labels - class_start
    owner = (labels != ignore_index) & (local >= 0) & (local < shard_size)
    if float(s) == 0.0:
        return p
    safe = torch.where(owner, labels, torch.zeros_like(labels))
    with torch.no_grad():
        # the cosface target is s*(cos_y - m_y): recover cos_y from it (elsewhere any
        # cosine in [-1, 1] will do: its shift is discarded; no host sync)
        cos_y = torch.where(owner, p.target.detach() / s + _per_row(m, safe, p.target.detach()),
                            torch.zeros_like(p.target))
        shift = torch.where(owner, row_margin(cos_y).to(cos_y.dtype), torch.zeros_like(cos_y))
    return p._replace(target=p.target - s * shift)


def _combine(p: sharded.ShardPartials, labels: torch.Tensor, *, kind, s, m, elm_lambda,
             class_weight, ignore_index, reduction, group) -> torch.Tensor:
    """The global loss from every rank's partials: MAX, then SUM, all-reduced."""
    highs = torch.stack([p.row_max, p.wrong_cos]).detach()
    dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=group)
    top, best_wrong = highs[0], highs[1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rescale = torch.exp(p.row_max - top)  # 0 where this shard has no non-target class
    sums = _SumReplicated.apply(torch.stack([p.sum_exp * rescale, p.target]), group)
    sum_wrong, target = sums[0], sums[1]

    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    if kind == "elm":
        # c*: the global argmax of the wrong cosines, the lowest index on ties
        cand = torch.where(p.wrong_cos == best_wrong, p.wrong_index,
                           torch.full_like(p.wrong_index, sharded.NO_CLASS))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
        has_wrong = torch.isfinite(best_wrong)
        c_star = torch.where(has_wrong, cand, torch.zeros_like(cand))
        extra = s * elm_lambda * _per_row(m, c_star, target)
        target = target + torch.where(has_wrong, extra, torch.zeros_like(extra))

    hi = torch.maximum(top, torch.where(valid, target, top)).detach()
    total = sum_wrong * torch.exp(top - hi) + torch.where(
        valid, torch.exp(target - hi), torch.zeros_like(target))
    per = hi + torch.log(total) - target
    w = valid.to(per.dtype)
    if class_weight is not None:
        w = w * class_weight.to(per.dtype)[y]
    return reduce_loss(torch.where(valid, per * w, torch.zeros_like(per)), w, reduction)


@torch.no_grad()
def sharded_argmax(features: torch.Tensor, weight_shard: torch.Tensor, *, class_start: int,
                   group=None, backend: str = "auto") -> torch.Tensor:
    """Predicted class (argmax of cos over all ranks' classes, lowest index on
    ties) of this rank's samples [N_r]. A collective: every rank calls it. The
    shard's best class comes from the partials kernel of `backend` (every row
    unlabelled, so every class is a "wrong" one)."""
    if group is None:
        group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([features.shape[0]], device=features.device)
    ns = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    sizes = [int(v) for v in torch.cat(ns).tolist()]
    x = _gather_rows(features, sizes, group)
    unlabelled = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    p = _partials_fn(backend, x.device)(x, weight_shard, unlabelled, class_start=class_start,
                                        kind="normface", s=1.0, ignore_index=-1)
    mine, index = p.wrong_cos, p.wrong_index
    best = mine.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    cand = torch.where(mine == best, index, torch.full_like(index, sharded.NO_CLASS))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    start = sum(sizes[:rank])
    return cand[start:start + sizes[rank]]
