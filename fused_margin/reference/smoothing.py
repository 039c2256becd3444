"""Label smoothing (F.cross_entropy's, class weights included) for the fused backends,
shared by fused_margin.cpu and fused_margin.triton: no N x C tensor.

Per valid row, with class weights w (1 without), W = sum_j w_j and the margined
logits z:
  (1 - eps) w_y (lse - z_y) + eps/C sum_j w_j (lse - z_j)
    = a_i (lse - z_y) + eps/C ((W - w_y) z_y - sum_{j != y} w_j z_j),
a_i = (1 - eps) w_y + eps W / C: the backend's fused cross-entropy with row weight a_i,
plus an O(N D + C D) term in PyTorch, since every non-target logit is linear in x_i
(s * rx_i rw_j x_i.W_j, or s * (x_i.W_j + b_j)): sum_j w_j z_j = s * rx_i x_i .
(W^T (w * rw)) (+ s w.b). "mean" divides both by sum_i w_{y_i}. arcgrad (non-target
logits -s*theta_j, not linear) and elm with a per-class margin (its target needs c*)
with label smoothing are served by the reference (N x C): needs_reference.
"""
from __future__ import annotations

import torch

from . import angular as ref
from .reduction import reduce_loss


def needs_reference(kind: str, m, normalize: bool, eps: float) -> bool:
    """Whether this smoothed call has no O(N D + C D) split (see the module header)."""
    return bool(eps) and normalize and (kind == "arcgrad"
                                        or (kind == "elm" and isinstance(m, torch.Tensor)))


def smoothed_cross_entropy(ce, features, weight, labels, *, kind, s, m, m1, m2, m3, elm_lambda,
                           class_weight, ignore_index, reduction, normalize, bias, eps):
    """The loss, with ce(row_w, red_w) the backend's fused cross-entropy (no class
    weights of its own) whose per-row losses carry weights row_w [N] and whose
    reduction divides by sum(red_w) ("mean"); eps = 0 is ce(w_y, w_y)."""
    dt = ref.compute_dtype(features.dtype)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    num_classes = weight.shape[0]
    cw = None if class_weight is None else class_weight.to(dt)
    w_y = valid.to(dt) if cw is None else valid.to(dt) * cw[y]
    if not eps:
        return ce(w_y, w_y)
    total_w = float(num_classes) if cw is None else cw.sum()
    row_w = (1 - eps) * w_y + valid.to(dt) * (eps / num_classes) * total_w
    main = ce(row_w, w_y)
    # eps/C ((W - w_y) z_y - sum_{j != y} w_j z_j), O(N D + C D)
    x, wt = features.to(dt), weight.to(dt)
    wvec = torch.ones(num_classes, dtype=dt, device=x.device) if cw is None else cw
    w_at_y = wvec[y]
    if normalize:
        rx, rw = ref.inv_norm(x), ref.inv_norm(wt)
        dot_y = (x * wt[y]).sum(1)
        cos_y = dot_y * rx * rw[y]
        z_all = s * rx * (x @ (wt.T @ (wvec * rw)))
        m_y = ref._per_row(m, y, cos_y)
        t = ref.target_transform(cos_y, kind, m_y, m1, m2, m3)
        if kind == "elm" and num_classes > 1:
            t = t + elm_lambda * float(m)
        z_y = s * cos_y
        z_y_m = s * t
    else:
        bb = None if bias is None else bias.to(dt)
        z_all = s * (x @ (wt.T @ wvec))
        z_y = s * (x * wt[y]).sum(1)
        if bb is not None:
            z_all = z_all + s * (wvec * bb).sum()
            z_y = z_y + s * bb[y]
        z_y_m = z_y - s * ref._per_row(m, y, z_y) if kind in ("cosface", "ldam") else z_y
    extra = (eps / num_classes) * ((total_w - w_at_y) * z_y_m - (z_all - w_at_y * z_y))
    extra = torch.where(valid, extra, torch.zeros_like(extra))
    return main + reduce_loss(extra, w_y, reduction)
