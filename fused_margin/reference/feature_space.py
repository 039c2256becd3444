"""Feature-space (intra-class) losses, eager PyTorch: center, contrastive center,
k-NN standard deviations, sigma^2R, soft nearest neighbour, triplet.

Conventions every backend follows:
- float16/bfloat16 inputs are computed in float32 and the loss (and knn_std's
  stds) is returned in float32; float32/float64 inputs stay in their dtype;
- differentiable pairwise squared distances use the expansion
  ||a||^2 + ||b||^2 - 2 a.b (one matmul, as a fused kernel computes them),
  clamped at 0, with self-distances set to exactly 0;
- discrete choices (k-NN neighbours, semi-hard/hard negatives and positives) are
  made under no_grad and held fixed for the gradient. k-NN neighbours are chosen
  on exact squared differences, ties to the lower index;
- square roots are "safe": sqrt(v) is 0 with gradient 0 where v <= 0, so
  identical points give no NaN; a NaN stays NaN (a NaN feature row gives a NaN
  loss in every loss here, never a silent 0);
- "mean" over an empty set (no samples, no sample with a same-class partner, no
  valid triplet) is 0 with zero gradients, never NaN.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .reduction import reduce_loss

# rows of the [rows, N, D] difference tensor built at once when choosing neighbours
_SELECT_CHUNK_ELEMS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) where v > 0, else 0 with zero gradient (not inf * 0 = NaN); NaN
    passes through (a comparison alone would turn it into 0)."""
    pos = v > 0
    rest = torch.where(torch.isnan(v), v, torch.zeros_like(v))
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), rest)


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor, *,
                      self_pairs: bool = False) -> torch.Tensor:
    """[M, K] squared Euclidean distances by expansion, clamped at 0; with
    `self_pairs` (b is a) the diagonal is exactly 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    d = d.clamp_min(0)
    if self_pairs:
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        d = d.masked_fill(eye, 0)
    return d


@torch.no_grad()
def _exact_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, K] squared distances from explicit differences (no cancellation), so
    duplicate points tie exactly; chunked over rows of a to bound memory."""
    rows = max(1, _SELECT_CHUNK_ELEMS // max(1, b.shape[0] * b.shape[1]))
    out = [((a[i:i + rows, None, :] - b[None, :, :]) ** 2).sum(-1)
           for i in range(0, a.shape[0], rows)]
    return torch.cat(out) if out else a.new_zeros(0, b.shape[0])


@torch.no_grad()
def _nearest(dist: torch.Tensor, allowed: torch.Tensor,
             k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the k nearest allowed columns (ties to the lower
    index) and a mask of which of those k slots hold an allowed column. A NaN
    distance ranks as +inf: after every number, still before any column that is
    not allowed."""
    k = min(k, dist.shape[1])
    key = dist.masked_fill(torch.isnan(dist), float("inf"))
    # stable sorts: by distance (equal ones stay in index order), then allowed
    # columns first, so that an allowed column at +inf is never displaced by one
    # that is not allowed
    order = torch.sort(key, dim=1, stable=True).indices
    barred = (~allowed).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(barred, dim=1, stable=True).indices)[:, :k]
    have = allowed.sum(1, keepdim=True)
    slot = torch.arange(k, device=dist.device)[None, :]
    return order, slot < have


def _std_with(anchor: torch.Tensor, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sample std (divisor |S| - 1) of S = {anchor_r} + points[r, valid[r]], per
    row r; 0 where |S| < 2."""
    w = valid.to(anchor.dtype)
    size = 1 + w.sum(1)
    # slots that hold no neighbour are masked with where(), not multiplied by 0: the
    # point parked there may be NaN or inf (0 * NaN would leak into this std)
    pts = torch.where(valid[..., None], points, torch.zeros_like(points))
    mean = (anchor + pts.sum(1)) / size[:, None]
    dev2 = torch.where(valid, ((pts - mean[:, None, :]) ** 2).sum(2), torch.zeros_like(w))
    ss = ((anchor - mean) ** 2).sum(1) + dev2.sum(1)
    var = torch.where(size > 1, ss / torch.clamp(size - 1, min=1), torch.zeros_like(ss))
    return safe_sqrt(var)


# ------------------------------------------------------------------ centres

def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                reduction: str = "mean") -> torch.Tensor:
    """0.5 * ||x_i - c_{y_i}||^2 per sample, mean over samples (0 for N = 0)."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    per = 0.5 * ((x - c[labels]) ** 2).sum(1)
    return reduce_loss(per, torch.ones_like(per), reduction)


@torch.no_grad()
def center_update(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Wen et al.'s centre step (ECCV 2016, Eq. 4): c_j - alpha * delta_j with
    delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j); classes absent from the
    batch keep their centre. Returns the new centres (centers' dtype)."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    diff = torch.zeros_like(c).index_add_(0, labels, c[labels] - x)
    n = torch.zeros(c.shape[0], dtype=dt, device=c.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=dt))
    return (c - alpha * diff / (1 + n)[:, None]).to(centers.dtype)


def contrastive_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                            *, delta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Eq. 5 of the sigma^2R paper (Qi et al.), per sample
    0.5 * ||x_i - c_{y_i}||^2 / (sum_{j != y_i} ||x_i - c_j||^2 + delta).
    The paper writes the 1/2 outside a sum over the batch; we keep it per sample
    and take the mean over samples (its sum is reduction="sum")."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    own = ((x - c[labels]) ** 2).sum(1)
    d = pairwise_sq_dists(x, c)
    target = torch.zeros_like(d, dtype=torch.bool).scatter(1, labels[:, None], True)
    others = d.masked_fill(target, 0).sum(1)
    per = 0.5 * own / (others + delta)
    return reduce_loss(per, torch.ones_like(per), reduction)


# --------------------------------------------------------------- sigma^2R

def knn_std(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
            n_neighbors: int = 7) -> Tuple[torch.Tensor, torch.Tensor]:
    """sigma_x [N]: std of x_i and its n nearest other samples of class y_i;
    sigma_c [C]: std of c_c and its n nearest samples of class c. Fewer
    neighbours when the class has fewer; 0 when the set has one point (a lone
    sample; a class absent from the batch). The neighbours are held fixed for
    the gradient, which flows to features and centers."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    n, num_classes = x.shape[0], c.shape[0]
    classes = torch.arange(num_classes, device=x.device)

    same = labels[:, None] == labels[None, :]
    same &= ~torch.eye(n, dtype=torch.bool, device=x.device)
    idx, valid = _nearest(_exact_sq_dists(x, x), same, n_neighbors)
    sigma_x = _std_with(x, x[idx], valid)

    member = classes[:, None] == labels[None, :]
    idx_c, valid_c = _nearest(_exact_sq_dists(c, x), member, n_neighbors)
    sigma_c = _std_with(c, x[idx_c], valid_c)
    return sigma_x, sigma_c


def sigma2r_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                 w_k: torch.Tensor, *, n_neighbors: int = 7, z: float = 40.0, eps: float = 1e-3,
                 reduction: str = "mean") -> torch.Tensor:
    """Eq. 8-10: beta_i * ||x_i - c_{y_i}||^2 per sample, mean over samples, with
    beta_i = z * sigmoid(K_{y_i} (sigma_x[i] - sigma_c[y_i])), K = eps + z * sigmoid(w_k).
    Gradients reach features, centers and w_k, also through the stds."""
    return sigma2r_with(knn_std, features, labels, centers, w_k, n_neighbors=n_neighbors, z=z,
                        eps=eps, reduction=reduction)


def sigma2r_with(knn_std_fn, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                 w_k: torch.Tensor, *, n_neighbors: int, z: float, eps: float,
                 reduction: str) -> torch.Tensor:
    """sigma^2R's O(N D) formula on the stds of `knn_std_fn` (a backend's k-NN
    std with knn_std's signature): the fused backends share this with the reference."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    sigma_x, sigma_c = knn_std_fn(x, labels, c, n_neighbors=n_neighbors)
    k = eps + z * torch.sigmoid(w_k.to(dt))
    beta = z * torch.sigmoid(k[labels] * (sigma_x - sigma_c[labels]))
    per = beta * ((x - c[labels]) ** 2).sum(1)
    return reduce_loss(per, torch.ones_like(per), reduction)


# ----------------------------------------------------- soft nearest neighbour

def soft_nearest_neighbor_loss(features: torch.Tensor, labels: torch.Tensor, *,
                               temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Eq. 2 of the sigma^2R paper (Frosst et al.), d_ij = ||x_i - x_j||^2:
    l_i = -log(sum_{j != i, y_j = y_i} e^{-d_ij/T} / sum_{k != i} e^{-d_ik/T}),
    by logsumexp. A sample with no same-class partner in the batch has no
    defined l_i: it is left out of the mean, and "none" gives it 0."""
    dt = compute_dtype(features.dtype)
    x = features.to(dt)
    n = x.shape[0]
    logits = -pairwise_sq_dists(x, x, self_pairs=True) / temperature
    others = ~torch.eye(n, dtype=torch.bool, device=x.device)
    positive = (labels[:, None] == labels[None, :]) & others
    has = positive.any(1)
    # rows without a partner get a finite dummy row so that no -inf reaches
    # logsumexp's backward; their value is discarded below
    pos_mask = positive | ~has[:, None]
    den_mask = others | ~has[:, None]
    num = torch.logsumexp(logits.masked_fill(~pos_mask, float("-inf")), dim=1)
    den = torch.logsumexp(logits.masked_fill(~den_mask, float("-inf")), dim=1)
    per = torch.where(has, den - num, torch.zeros_like(num))
    return reduce_loss(per, has.to(dt), reduction)


# ------------------------------------------------------------------ triplet

def triplet_distances(x: torch.Tensor, distance: str) -> torch.Tensor:
    """[N, N] distances: "l2" Euclidean (safe sqrt), "squared_l2", "cosine" 1 - cos
    (a zero vector has cosine 0 with everything)."""
    if distance == "squared_l2":
        return pairwise_sq_dists(x, x, self_pairs=True)
    if distance == "l2":
        return safe_sqrt(pairwise_sq_dists(x, x, self_pairs=True))
    if distance == "cosine":
        sq = (x * x).sum(1)
        big = sq > 0
        inv = torch.where(big, torch.rsqrt(torch.where(big, sq, torch.ones_like(sq))),
                          torch.zeros_like(sq))
        u = x * inv[:, None]
        return 1 - u @ u.T
    raise ValueError(f"unknown distance {distance!r}")


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2,
                        mining: str = "semihard", distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    """relu(d(a, p) - d(a, n) + margin) over in-batch triplets.

    - "semihard" (TensorFlow-Addons triplet_semihard_loss): one term per positive
      pair (a, p), a != p; n is the closest negative with d(a, n) > d(a, p), else
      the farthest negative (lower index on ties). An anchor with no negative at
      all (only in a batch of one class) takes d_an = the minimum of its distance
      row, which is its self-distance d(a, a) (0; for "cosine" 1 - |u_a|^2), held
      constant, as TF-Addons' masked maximum over an empty mask does: its pairs
      give relu(d_ap - d(a, a) + margin) and count in the mean. "none" returns
      the [P] pair terms, pairs in row-major (a, p) order.
    - "hard" (batch-hard): one term per anchor with a positive and a negative,
      relu(max_p d(a, p) - min_n d(a, n) + margin). "none" returns [N] with 0 for
      anchors without a positive or a negative; "mean" averages over the others.
    - "all": every valid triplet; "mean" averages over the terms that are > 0
      (0 if none). "none" returns the [T] terms in (a, p, n) lexicographic order.
    "sum" sums the same terms as "mean" averages over. Mined positives and
    negatives are chosen under no_grad, the lower index on equal distances.
    Memory: the reference holds [P, N] rows for "semihard" and [N, N, N] for
    "all"; it is meant for the batch sizes of metric learning.
    """
    dt = compute_dtype(embeddings.dtype)
    x = embeddings.to(dt)
    n = x.shape[0]
    d = triplet_distances(x, distance)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=x.device)
    neg = ~same
    if n == 0:  # argmin/argmax cannot reduce an empty row
        empty = d.sum(1)
        return reduce_loss(empty, torch.zeros_like(empty), reduction)

    if mining == "semihard":
        a, p = torch.nonzero(pos, as_tuple=True)
        d_ap = d[a, p]
        with torch.no_grad():
            row, row_neg = d[a], neg[a]
            outside = row_neg & (row > d_ap[:, None])
            closest = row.masked_fill(~outside, float("inf")).argmin(1)
            farthest = row.masked_fill(~row_neg, float("-inf")).argmax(1)
            has_neg = row_neg.any(1)
            choice = torch.where(outside.any(1), closest, torch.where(has_neg, farthest, a))
        d_an = torch.where(has_neg, d[a, choice], d[a, a].detach())
        per = torch.relu(d_ap - d_an + margin)
        return reduce_loss(per, torch.ones_like(per), reduction)

    if mining == "hard":
        valid = pos.any(1) & neg.any(1)
        with torch.no_grad():
            hardest_p = d.masked_fill(~pos, float("-inf")).argmax(1)
            hardest_n = d.masked_fill(~neg, float("inf")).argmin(1)
        rows = torch.arange(n, device=x.device)
        per = torch.relu(d[rows, hardest_p] - d[rows, hardest_n] + margin)
        per = torch.where(valid, per, torch.zeros_like(per))
        return reduce_loss(per, valid.to(dt), reduction)

    if mining == "all":
        mask = pos[:, :, None] & neg[:, None, :]
        per = torch.relu(d[:, :, None] - d[:, None, :] + margin)[mask]
        if reduction == "none":
            return per
        return reduce_loss(per, (per > 0).to(dt), reduction)

    raise ValueError(f"unknown mining {mining!r}")


# ------------------------------------------- Git, triplet-center, contrastive

def _sq_to(distance: str, sq: torch.Tensor) -> torch.Tensor:
    """A squared distance as the distance `distance` names ("l2": safe sqrt)."""
    if distance == "squared_l2":
        return sq
    if distance == "l2":
        return safe_sqrt(sq)
    raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")


def git_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
             lambda_c: float = 1.0, lambda_g: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """Git loss (Calefati et al.; Eq. 3 of the sigma^2R paper) less its cross-entropy:
    per sample lambda_c * 0.5 ||x_i - c_{y_i}||^2 (center_loss's term, which holds
    the paper's 1/2) + lambda_g * sum_{j != y_i} 1 / (1 + ||x_i - c_j||^2), mean over
    samples. The push term reads the paper's pair (i, j) as sample i and every
    centre c_j of another class, as the authors' code does. The pull distance is
    formed from explicit differences, the push distances by expansion (clamped at 0)."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    pull = 0.5 * ((x - c[labels]) ** 2).sum(1)
    d = pairwise_sq_dists(x, c)
    target = torch.zeros_like(d, dtype=torch.bool).scatter(1, labels[:, None], True)
    push = (1.0 / (1.0 + d)).masked_fill(target, 0).sum(1)
    per = lambda_c * pull + lambda_g * push
    return reduce_loss(per, torch.ones_like(per), reduction)


def triplet_center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *,
                        margin: float = 5.0, distance: str = "l2",
                        reduction: str = "mean") -> torch.Tensor:
    """Triplet-center loss (He et al. 2018; Eq. 6 of the sigma^2R paper with the
    positives replaced by learnable centres, as He et al. define it): per sample
    max(0, margin + D(x_i, c_{y_i}) - min_{j != y_i} D(x_i, c_j)), mean over samples.
    D is "l2" (safe sqrt) or "squared_l2" (He et al.'s choice). The own distance
    uses explicit differences, the others the expansion; the nearest other centre
    is chosen under no_grad, the lower index on ties. With one class there is no
    other centre: every term is 0 (and counts in the mean)."""
    dt = compute_dtype(features.dtype)
    x, c = features.to(dt), centers.to(dt)
    own = _sq_to(distance, ((x - c[labels]) ** 2).sum(1))
    if c.shape[0] < 2:
        per = own * 0
        return reduce_loss(per, torch.ones_like(per), reduction)
    d = _sq_to(distance, pairwise_sq_dists(x, c))
    target = torch.zeros_like(d, dtype=torch.bool).scatter(1, labels[:, None], True)
    with torch.no_grad():
        key = d.masked_fill(torch.isnan(d), float("inf")).masked_fill(target, float("inf"))
        nearest = key.argmin(1)
    near = d.gather(1, nearest[:, None]).squeeze(1)
    per = torch.relu(margin + own - near)
    return reduce_loss(per, torch.ones_like(per), reduction)


def triplet_center_grads(grad, x, labels, c, per, own, near, idx, distance):
    """(dL/dx, dL/dc) of the triplet-center terms `per` from the per-row values a
    fused forward saves (own and nearest-other distances, that centre's index, -1
    with one class), O(N D), shared by the fused backends:
    relu passes where the term is > 0; d/dx of D(x_i, c) is 2 (x_i - c) (squared)
    or (x_i - c) / D (l2; 0 at D = 0). The clamp of the expanded distance to the
    nearest other centre is not reproduced (zero gradient on a measure-zero set)."""
    g = torch.where(per > 0, grad, torch.zeros_like(grad))
    has = idx >= 0
    g = torch.where(has, g, torch.zeros_like(g))
    j = torch.where(has, idx, torch.zeros_like(idx))

    def scale(dist):
        if distance == "squared_l2":
            return 2 * g
        pos = dist > 0
        return torch.where(pos, g / torch.where(pos, dist, torch.ones_like(dist)),
                           torch.zeros_like(dist))

    a = scale(own)[:, None] * (x - c[labels])
    b = scale(near)[:, None] * (x - c[j])
    gx = a - b
    gc = torch.zeros_like(c).index_add_(0, labels, -a).index_add_(0, j, b)
    return gx, gc


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0,
                     distance: str = "l2", reduction: str = "mean") -> torch.Tensor:
    """Contrastive loss, Eq. 7 of the sigma^2R paper: over ordered in-batch pairs
    a != b, d_ab if y_a = y_b else max(0, margin - d_ab), d "l2" (safe sqrt) or
    "squared_l2" (the same formula on squared distances). "none" gives per anchor
    the sum over its N - 1 partners; "mean" is the mean over the N (N - 1) pairs
    (0 for N < 2), "sum" their sum. The reference holds N x N; the fused backends do not."""
    dt = compute_dtype(embeddings.dtype)
    x = embeddings.to(dt)
    n = x.shape[0]
    d = _sq_to(distance, pairwise_sq_dists(x, x, self_pairs=True))
    same = labels[:, None] == labels[None, :]
    others = ~torch.eye(n, dtype=torch.bool, device=x.device)
    term = torch.where(same, d, torch.relu(margin - d))
    per = term.masked_fill(~others, 0).sum(1)
    return reduce_loss(per, torch.full_like(per, float(max(n - 1, 0))), reduction)


# ------------------------------------------- translation-invariant distances
# (the public functions call these before any backend)

def centred(x: torch.Tensor, *others: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """x and `others` in the compute dtype, less one common, detached shift per
    column (issue 15 item 7). The losses that call this depend only on differences of
    these points, so values and gradients do not change, but the kernels'
    ||a||^2 + ||b||^2 - 2ab expansion then works on the spread of the batch, not its
    offset: a common offset of 1e4 with spread 1e-2 cancels every digit of float32
    otherwise.

    A column is shifted only where its offset is large against its spread
    (|mean| > 4 max|x - mean| over the finite rows), and by the mean rounded to a
    power of two q no smaller than that spread nor x's own ulp there: then every
    x_i - shift is exact in floating point (no rounding, so exact ties stay exact
    and small batches keep their bits). NaN and inf rows take no part in the
    shift (they stay NaN / inf and poison only their own terms)."""
    dt = compute_dtype(x.dtype)
    x = x.to(dt)
    others = tuple(o.to(dt) for o in others)
    if x.numel() == 0:
        return (x,) + others
    with torch.no_grad():
        keep = torch.isfinite(x).all(1)
        if not bool(keep.any()):
            return (x,) + others
        v = x[keep].to(torch.float64)
        mean = v.mean(0)
        dev = (v - mean).abs().amax(0)
        top = v.abs().amax(0)
        bits = 53 if dt == torch.float64 else 24
        _, e_top = torch.frexp(top)
        ulp = torch.ldexp(torch.ones_like(top), e_top - bits)
        _, e_q = torch.frexp(torch.maximum(dev, ulp))
        q = torch.ldexp(torch.ones_like(top), e_q)  # a power of two >= both
        shift = torch.where(mean.abs() > 4 * dev, torch.round(mean / q) * q,
                            torch.zeros_like(mean))
        if not bool(shift.any()):
            return (x,) + others
        shift = shift.to(dt)
    return (x - shift,) + tuple(o - shift for o in others)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows as unit vectors, in x's compute dtype, for the cosine distance
    (issue 15 item 5). Each row is first multiplied by the power of two that puts its
    largest |entry| in [0.5, 1) (exact), so that its squared norm cannot overflow
    (norms >= 1e19 in float32) or underflow (<= 3e-20) into a zero vector or NaN;
    then divided by its norm, which is exact where the rows are parallel in one
    dimension (u = x / |x| = +-1 and d = 0 or 2 exactly, so every backend breaks
    semi-hard ties alike). A zero row stays zero (cosine 0 with everything, no
    gradient); inf and NaN rows give NaN, as in the reference. Differentiable."""
    x = x.to(compute_dtype(x.dtype))
    if x.numel() == 0:
        return x
    with torch.no_grad():
        top = x.abs().amax(1)
        ok = torch.isfinite(top) & (top > 0)
        _, e = torch.frexp(torch.where(ok, top, torch.ones_like(top)))
        scale = torch.ldexp(torch.ones_like(top), -e)
    v = x * scale[:, None]
    sq = (v * v).sum(1)
    big = (sq > 0) | torch.isnan(sq)  # a NaN row stays NaN
    norm = torch.sqrt(torch.where(big, sq, torch.ones_like(sq)))
    return torch.where(big[:, None], v / norm[:, None], torch.zeros_like(v))
