"""Reduction of per-sample losses, shared by every family's reference."""
import torch


def reduce_loss(per_sample: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none" -> per_sample; "sum" -> its sum; "mean" -> sum / sum(weight).

    `weight` is 0 for ignored samples and the class weight (or 1) otherwise; a
    batch whose weights sum to 0 (empty, or all ignored) has mean 0, not NaN,
    and still carries a (zero) gradient to every input.
    """
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    denom = weight.sum()
    return torch.where(denom > 0, total / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       total * 0)


def class_weighted(per: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor,
                    ignore_index: int, reduction: str) -> torch.Tensor:
    """The class-weighted reduction of unweighted per-row losses (0 on ignored
    rows), differentiable in class_weight: w_i * l_i summed, or over sum(w)."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    w = valid.to(per.dtype) * class_weight.to(per.dtype)[y]
    return reduce_loss(torch.where(valid, per * w, torch.zeros_like(per)), w, reduction)
