"""Cost-sensitive losses, eager PyTorch: weighted cross-entropy (WCE), categorical
real-world-weight cross-entropy (CRWWCE), log-domain Sinkhorn and the entropic
Wasserstein loss (Eq. 2-5 of the CAMRI paper).

Conventions every backend follows:
- h = softmax(logits); float16/bfloat16 logits are computed in float32 and the
  loss is returned in float32, float32/float64 logits stay in their dtype; the
  weights, costs and targets are cast to that dtype;
- WCE "mean" divides by the number of non-ignored samples, the paper's 1/N.
  torch.nn.functional.cross_entropy(weight=w) instead divides by sum_n w_{t_n},
  so the two agree only when every weight is 1 (or up to that constant factor);
- CRWWCE needs log(1 - h_k) for classes the model is sure of: for the arg-max
  class it is lse_{j != k} z_j - lse_j z_j (no cancellation as h_k -> 1), for
  every other class h_k <= 1/2 and log1p(-h_k) is accurate;
- Sinkhorn works on the dual potentials scaled by 1/eps, F and G, with the plan
  T_ij = exp(F_i + G_j - C_ij / eps): each iteration sets F (rows match a), then
  G (columns match b), so after any number of iterations the columns are exact
  and `tol` measures the row error max_n sum_i |sum_j T_nij - a_ni|, checked
  every 10 iterations. Zero marginal entries have log-marginal -inf, which gives
  exactly zero rows/columns; a sample whose a or b is all zero has a zero plan.
  Plans come back in the dtype of a and b (computed in float32 for half inputs);
  gradients flow by autograd through the unrolled iterations. a and b must have
  equal mass per sample (checks.equal_mass, before any backend: with unequal
  masses no plan has both marginals and solvers disagree), except that an
  all-zero a or b is allowed;
- Wasserstein with label targets uses the closed form (the only plan with a
  one-hot column marginal is T[:, y] = h): sum_i h_i C[i, y], plus
  eps * sum_i h_i (log h_i - 1) when `entropic` (i.e. - eps * H(T), Eq. 5);
  with distribution targets (rows summing to 1, or all zero: checks) it is
  <T, C>, plus eps * sum_ij T_ij (log T_ij - 1) when `entropic`: for unit mass
  that is eps below POT's regularised objective <T, C> + eps * sum T log T;
- "mean" over no samples (empty, or every label ignored) is 0 with zero
  gradients, never NaN.

The fused backends do not unroll the iterations: they differentiate the fixed
point (fixed_point_grads, ot_cost_grads below, shared by cpu and triton so the
two give one answer, degenerate plans included).
"""
from __future__ import annotations

from typing import Optional

import torch

from .reduction import reduce_loss

# rows of the marginal error are checked this often when `tol` is given
TOL_EVERY = 10


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_labels(labels: torch.Tensor, ignore_index: int):
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x where x > 0, -inf where x == 0, with zero gradient there (not 1/0)."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))),
                       torch.full_like(x, float("-inf")))


# ------------------------------------------------------------------ WCE

def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           class_weight: torch.Tensor, *, ignore_index: int = -100,
                           reduction: str = "mean") -> torch.Tensor:
    """-w_{t_n} log softmax(z_n)_{t_n} per sample; "mean" over non-ignored samples."""
    dt = compute_dtype(logits.dtype)
    z = logits.to(dt)
    valid, y = _valid_labels(labels, ignore_index)
    logp_t = torch.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    per = -class_weight.to(dt)[y] * logp_t
    per = torch.where(valid, per, torch.zeros_like(per))
    return reduce_loss(per, valid.to(dt), reduction)


# --------------------------------------------------------------- CRWWCE

def log1m_softmax(z: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(z)_k), [N, K], finite for finite z with K >= 2."""
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    h = torch.exp(z - lse)
    top = z.detach().argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(z, dtype=torch.bool).scatter(1, top, True)
    # the arg-max class: log of the other classes' mass, in log space
    lse_others = torch.logsumexp(z.masked_fill(is_top, float("-inf")), dim=1, keepdim=True)
    # every other class has h <= 1/2; the arg-max's h is replaced so that
    # log1p(-1) never enters the graph (its zero gradient would be 0 * inf)
    rest = torch.log1p(-torch.where(is_top, torch.zeros_like(h), h))
    return torch.where(is_top, lse_others - lse, rest)


def crwwce_loss(logits: torch.Tensor, labels: torch.Tensor, fn_weight: torch.Tensor,
                fp_weight: torch.Tensor, *, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
    """-(fn[t] log h_t + sum_{k != t} fp[k, t] log(1 - h_k)) per sample."""
    dt = compute_dtype(logits.dtype)
    z = logits.to(dt)
    valid, y = _valid_labels(labels, ignore_index)
    logp_t = torch.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    per = -fn_weight.to(dt)[y] * logp_t
    if z.shape[1] > 1:
        fp_cols = fp_weight.to(dt).t()[y]          # [N, K]: fp[k, t_n] along k
        off_target = torch.ones_like(z, dtype=torch.bool).scatter(1, y[:, None], False)
        fp_term = torch.where(off_target, fp_cols * log1m_softmax(z), torch.zeros_like(z))
        per = per - fp_term.sum(dim=1)
    per = torch.where(valid, per, torch.zeros_like(per))
    return reduce_loss(per, valid.to(dt), reduction)


# ------------------------------------------------------------- Sinkhorn

def sinkhorn_log_plan(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float,
                      n_iter: int, tol: Optional[float]) -> torch.Tensor:
    """log T [N, K, K] of the entropic plans, computed in float64 if a or b is
    float64, else in float32 (cost is cast to that dtype).

    -inf marks exact zeros (rows with a_i = 0, columns with b_j = 0, and every
    entry of a sample whose a or b is all zero).
    """
    dt = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    a, b, c = a.to(dt), b.to(dt), cost.to(dt)
    n, k = a.shape
    cs = (c / eps).expand(n, k, k) if c.dim() == 2 else c / eps
    # a sample with no mass on one side has no plan; solve a dummy uniform
    # problem for it (so no log-sum-exp runs over -inf only) and zero it after
    empty = ((a > 0).sum(1) == 0) | ((b > 0).sum(1) == 0)
    if bool(empty.any()):
        a = torch.where(empty[:, None], torch.ones_like(a), a)
        b = torch.where(empty[:, None], torch.ones_like(b), b)
    log_a, log_b = _safe_log(a), _safe_log(b)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for it in range(n_iter):
        f = log_a - torch.logsumexp(g[:, None, :] - cs, dim=2)
        g = log_b - torch.logsumexp(f[:, :, None] - cs, dim=1)
        if tol is not None and (it + 1) % TOL_EVERY == 0 and it + 1 < n_iter:
            with torch.no_grad():
                rows = torch.exp(f + torch.logsumexp(g[:, None, :] - cs, dim=2))
                err = (rows - a).abs().sum(dim=1)
                if n == 0 or float(err.max()) < tol:
                    break
    log_t = f[:, :, None] + g[:, None, :] - cs
    if bool(empty.any()):
        log_t = log_t.masked_fill(empty[:, None, None], float("-inf"))
    return log_t


def sinkhorn(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, *, eps: float = 0.1,
             n_iter: int = 100, tol: Optional[float] = None) -> torch.Tensor:
    """Entropic OT plans [N, K, K] (rows follow a, columns follow b), log domain."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.exp(sinkhorn_log_plan(a, b, cost, eps=eps, n_iter=n_iter,
                                       tol=tol)).to(out_dtype)


# ---------------------------------------------------------- Wasserstein

def wasserstein_loss(logits: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, *,
                     eps: float = 0.1, n_iter: int = 100, entropic: bool = False,
                     tol: Optional[float] = None, ignore_index: int = -100,
                     reduction: str = "mean") -> torch.Tensor:
    """<T, C> (plus eps * sum T (log T - 1), i.e. minus eps*H(T), when `entropic`)
    between h = softmax(logits), the plan's rows, and the target (labels [N] or
    distributions [N, K]), the columns."""
    dt = compute_dtype(logits.dtype)
    z, c = logits.to(dt), cost.to(dt)
    logh = torch.log_softmax(z, dim=1)
    h = torch.exp(logh)
    if target.dim() == 1:
        valid, y = _valid_labels(target, ignore_index)
        if c.dim() == 2:
            c_y = c.t()[y]                                   # [N, K]: C[i, y_n] along i
        else:
            c_y = c.gather(2, y[:, None, None].expand(-1, c.shape[1], 1)).squeeze(2)
        per = (h * c_y).sum(dim=1)
        if entropic:
            per = per + eps * (h * (logh - 1)).sum(dim=1)
        per = torch.where(valid, per, torch.zeros_like(per))
        return reduce_loss(per, valid.to(dt), reduction)
    log_t = sinkhorn_log_plan(h, target.to(dt), c, eps=eps, n_iter=n_iter, tol=tol)
    t = torch.exp(log_t)
    cc = c if c.dim() == 3 else c.expand_as(t)
    per = (t * cc).sum(dim=(1, 2))
    if entropic:
        # 0 log 0 = 0: the -inf entries are exact zeros of the plan
        nz = torch.isfinite(log_t)
        per = per + eps * torch.where(nz, t * (torch.where(nz, log_t, torch.zeros_like(log_t))
                                               - 1), torch.zeros_like(t)).sum(dim=(1, 2))
    return reduce_loss(per, torch.ones_like(per), reduction)


# ------------------------------------------- implicit gradients (fused backends)

# Eigenvalues of the normalised dual Hessian below this (times K) count as zero:
# rounding in forming it is ~K unit roundoffs, so anything above is solved exactly.
PINV_RTOL = 100 * torch.finfo(torch.float64).eps
# the Cholesky fast path is trusted only when its smallest-eigenvalue estimate
# is above this; below, the sample goes to the eigendecomposition
FAST_MIN_EIG = 1e-8
# samples per eigendecomposition call (large batches of small eigh are slow)
_EIGH_CHUNK = 256


def centred(x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """x minus its mean over `support` on the support, 0 off it: the part of a
    marginal's gradient tangent to the simplex (the only part that is defined)."""
    x = torch.where(support, x, torch.zeros_like(x))
    cnt = support.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
    return torch.where(support, x - x.sum(1, keepdim=True) / cnt, torch.zeros_like(x))


def _adjoint(plan: torch.Tensor, rhs_rows: torch.Tensor, rhs_cols: torch.Tensor):
    """(p, q) [N, K] solving H [p; q] = [rhs_rows; rhs_cols] for the dual Hessian
    H = [[diag r, T], [T^T, diag c]] of each plan (r, c its row / column sums),
    in float64; 0 off the support.

    The column block is eliminated (q = (rhs_cols - T^T p) / c) and the row system
    Jacobi-scaled: with p = r^-1/2 y, y solves S' y = r^-1/2 (rhs_rows - T (rhs_cols / c)),
    S' = I - M M^T, M_ij = T_ij / sqrt(r_i c_j), eigenvalues in [0, 1]. S' has one
    null vector sqrt(r) 1_B per block B of the plan (rows and columns connected
    through nonzero entries), and the right side is orthogonal to each, so the
    system is consistent. One block (the usual case): S' + w w^T, w = sqrt(r / sum r),
    is definite and a Cholesky solve gives the exact solution with w^T y = 0. When
    the plan decouples into several blocks (entries underflowed to 0 at small eps)
    or is nearly so, S' is singular and the pseudo-inverse (eigendecomposition,
    eigenvalues below PINV_RTOL * K dropped) gives the solution with
    sum_{i in B} r_i p_i = 0 on every block: no mass moves between blocks. Both
    branches give the same gauge, so the answer does not jump between them."""
    n, k, _ = plan.shape
    t = plan.double()
    u, v = rhs_rows.double(), rhs_cols.double()
    if n == 0:
        return torch.zeros_like(u), torch.zeros_like(v)
    r, c = t.sum(2), t.sum(1)
    on_r, on_c = r > 0, c > 0
    ir = torch.where(on_r, torch.rsqrt(torch.where(on_r, r, torch.ones_like(r))),
                     torch.zeros_like(r))
    ic = torch.where(on_c, 1 / torch.where(on_c, c, torch.ones_like(c)), torch.zeros_like(c))
    m = t * torch.sqrt(ic)[:, None, :]
    m.mul_(ir[:, :, None])
    w = torch.sqrt(r / r.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
    s = w[:, :, None] * w[:, None, :]
    s.diagonal(dim1=1, dim2=2).add_(1.0)
    s = torch.baddbmm(s, m, m.transpose(1, 2), alpha=-1.0)
    del m
    rhs = ir * (u - (t @ (ic * v)[:, :, None]).squeeze(2))

    # Cholesky of every sample, with two steps of inverse iteration from a fixed
    # start of mixed signs (golden angle: nothing a block indicator could be
    # orthogonal to) solved alongside: an eigenvalue delta << 1 shows as a
    # Rayleigh quotient of order delta
    chol, info = torch.linalg.cholesky_ex(s)
    x0 = torch.cos(2.399963 * torch.arange(k, dtype=t.dtype, device=t.device)).expand(n, k)
    sol = torch.cholesky_solve(torch.stack([rhs, x0], dim=2), chol)
    y = sol[:, :, 0]
    x = sol[:, :, 1]
    x = torch.cholesky_solve((x / x.norm(dim=1, keepdim=True))[:, :, None], chol).squeeze(2)
    x = x / x.norm(dim=1, keepdim=True)
    lam = (x * (s @ x[:, :, None]).squeeze(2)).sum(1)
    ok = (info == 0) & (lam > FAST_MIN_EIG)       # NaN (failed factor) is not ok
    slow = (~ok).nonzero().squeeze(1)
    if slow.numel():
        y = y.clone()
        for idx in slow.split(_EIGH_CHUNK):
            evals, evecs = torch.linalg.eigh(s[idx])
            keep = evals > PINV_RTOL * k
            inv = torch.where(keep, 1 / torch.where(keep, evals, torch.ones_like(evals)),
                              torch.zeros_like(evals))
            proj = (evecs.transpose(1, 2) @ rhs[idx][:, :, None]).squeeze(2)
            y[idx] = (evecs @ (inv * proj)[:, :, None]).squeeze(2)
    p = ir * y
    q = torch.where(on_c, ic * (v - (t.transpose(1, 2) @ p[:, :, None]).squeeze(2)),
                    torch.zeros_like(v))
    return p, q


def fixed_point_grads(plan: torch.Tensor, grad_plan: torch.Tensor, eps: float):
    """(dL/da, dL/db, dL/dC [N, K, K]) of L(T) at a Sinkhorn fixed point, by the
    implicit function theorem. With T_ij = exp(F_i + G_j - C_ij / eps), a
    perturbation moves T by dT_ij = T_ij (dF_i + dG_j - dC_ij / eps) and the
    marginal constraints give H [dF; dG] = [da; db] + (rows, columns of T * dC) / eps,
    so with Gamma = dL/dT the adjoint solves H [p; q] = [rows; columns of Gamma * T]
    (_adjoint) and dL/da = p, dL/db = q, dL/dC = T * (p_i + q_j - Gamma_ij) / eps.
    p and q are defined up to (p + s, q - s) per block of the plan: directions that
    change a block's mass have no fixed point; _adjoint fixes the gauge. Computed in
    float64, returned in the plan's dtype. O(N K^3): not fused."""
    t, gam = plan.double(), grad_plan.double()
    gt = gam * t
    p, q = _adjoint(t, gt.sum(2), gt.sum(1))
    del gt
    dc = (p[:, :, None] + q[:, None, :]).sub_(gam).mul_(t).div_(eps)
    return p.to(plan.dtype), q.to(plan.dtype), dc.to(plan.dtype)


def ot_cost_grads(plan: torch.Tensor, cost: torch.Tensor, eps: float):
    """(d/da, d/db, d/dC) of <T, C> at the entropic plan T(a, b, C): the chain rule
    through the fixed point (Gamma = C) plus the explicit T of d<T, C>/dC. The exact
    gradient of what wasserstein_loss(entropic=False) returns (no O(eps) envelope
    approximation)."""
    t = plan.double()
    c = cost.double().expand_as(t)
    tc = t * c
    p, q = _adjoint(t, tc.sum(2), tc.sum(1))
    del tc
    # T * (p_i + q_j - C_ij) / eps from the fixed point, + T from the explicit C
    dc = (p[:, :, None] + q[:, None, :]).sub_(c).div_(eps).add_(1.0).mul_(t)
    return p.to(plan.dtype), q.to(plan.dtype), dc.to(plan.dtype)
