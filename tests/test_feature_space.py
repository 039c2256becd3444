"""Feature-space losses (center, contrastive center, k-NN stds, sigma^2R, soft
nearest neighbour, triplet): the reference against loop implementations written
here, gradcheck, pytorch-metric-learning, ties, edge cases, low precision, bad
input, the nn modules, and every fused backend against the reference."""
import math

import pytest
import torch

import fused_margin as fm
from fused_margin import nn as fnn

from conftest import device_for, fused_backends

REDUCTIONS = ("mean", "sum", "none")
MININGS = ("semihard", "hard", "all")
DISTANCES = ("l2", "squared_l2", "cosine")
REF = dict(backend="reference")

# Tolerances, named once. EXACT: float64 reference vs the float64 loops here.
# LOW: float16/bfloat16 inputs (computed in float32) vs float32 inputs, relative
# to the rounding of the inputs themselves.
EXACT = dict(rtol=1e-9, atol=1e-11)
LOW = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
FUSED = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}

# (N, D, C, label pattern): classes of size 1, 2 and many, an absent class
SHAPES = [
    (7, 3, 3, [0, 0, 0, 0, 1, 1, 2]),       # sizes 4, 2, 1
    (9, 5, 4, [2, 0, 2, 2, 0, 3, 2, 2, 0]),  # sizes 3, 0, 5, 1
    (5, 2, 2, [1, 1, 1, 1, 1]),             # one class, class 0 absent
]


def make(shape, dtype=torch.float64, requires_grad=False):
    n, d, c, labels = shape
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    centers = torch.randn(c, d, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return x, torch.tensor(labels, dtype=torch.long), centers


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}c{shape[2]}"


# ------------------------------------------------------ loop implementations

def _sq(a, b):
    return float(((a - b) ** 2).sum())


def _reduce(terms, reduction, count=None):
    if reduction == "none":
        return torch.tensor(terms, dtype=torch.float64)
    total = sum(terms)
    if reduction == "sum":
        return torch.tensor(total, dtype=torch.float64)
    count = len(terms) if count is None else count
    return torch.tensor(total / count if count else 0.0, dtype=torch.float64)


def loop_center(x, y, c, reduction):
    return _reduce([0.5 * _sq(x[i], c[y[i]]) for i in range(len(y))], reduction)


def loop_contrastive(x, y, c, delta, reduction):
    terms = []
    for i in range(len(y)):
        others = sum(_sq(x[i], c[j]) for j in range(c.shape[0]) if j != y[i])
        terms.append(0.5 * _sq(x[i], c[y[i]]) / (others + delta))
    return _reduce(terms, reduction)


def _std(points):
    if len(points) < 2:
        return 0.0
    mean = sum(points) / len(points)
    return math.sqrt(sum(_sq(p, mean) for p in points) / (len(points) - 1))


def _nearest_same(anchor, x, y, cls, n, skip=None):
    cand = [j for j in range(len(y)) if y[j] == cls and j != skip]
    cand.sort(key=lambda j: (_sq(anchor, x[j]), j))
    return cand[:n]


def loop_knn(x, y, c, n):
    sx = [_std([x[i]] + [x[j] for j in _nearest_same(x[i], x, y, y[i], n, skip=i)])
          for i in range(len(y))]
    sc = [_std([c[k]] + [x[j] for j in _nearest_same(c[k], x, y, k, n)]) for k in range(c.shape[0])]
    return torch.tensor(sx, dtype=torch.float64), torch.tensor(sc, dtype=torch.float64)


def loop_sigma2r(x, y, c, w_k, n, z, eps, reduction):
    sx, sc = loop_knn(x, y, c, n)
    terms = []
    for i in range(len(y)):
        k = eps + z / (1 + math.exp(-float(w_k[y[i]])))
        beta = z / (1 + math.exp(-k * float(sx[i] - sc[y[i]])))
        terms.append(beta * _sq(x[i], c[y[i]]))
    return _reduce(terms, reduction)


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def loop_snn(x, y, temperature, reduction):
    terms, count = [], 0
    for i in range(len(y)):
        num = [-_sq(x[i], x[j]) / temperature for j in range(len(y)) if j != i and y[j] == y[i]]
        den = [-_sq(x[i], x[k]) / temperature for k in range(len(y)) if k != i]
        if num:
            terms.append(_lse(den) - _lse(num))
            count += 1
        else:
            terms.append(0.0)
    return _reduce(terms, reduction, count)


def _dist(a, b, distance):
    if distance == "squared_l2":
        return _sq(a, b)
    if distance == "l2":
        return math.sqrt(_sq(a, b))
    na, nb = float(a.norm()), float(b.norm())
    return 1.0 - (float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0)


def loop_triplet(x, y, margin, mining, distance, reduction):
    n = len(y)
    d = [[_dist(x[i], x[j], distance) for j in range(n)] for i in range(n)]
    terms, count = [], None
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [k for k in range(n) if y[k] != y[a]]
        if mining == "semihard":
            for p in pos:
                outside = [d[a][k] for k in neg if d[a][k] > d[a][p]]
                if outside:
                    d_an = min(outside)
                elif neg:
                    d_an = max(d[a][k] for k in neg)
                else:  # one class in the batch: TF-Addons takes the row minimum
                    d_an = min(d[a])
                terms.append(max(0.0, d[a][p] - d_an + margin))
        elif mining == "hard":
            if pos and neg:
                hardest = max(d[a][p] for p in pos) - min(d[a][k] for k in neg)
                terms.append(max(0.0, hardest + margin))
            elif reduction == "none":
                terms.append(0.0)
        else:
            terms += [max(0.0, d[a][p] - d[a][k] + margin) for p in pos for k in neg]
    if mining == "all":  # "mean" averages over the terms that are > 0
        count = sum(t > 0 for t in terms)
    return _reduce(terms, reduction, count)


def _labels(y):
    return [int(v) for v in y]


# --------------------------------------------------------- against the loops

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_center_loss_matches_loop(shape, reduction):
    x, y, c = make(shape)
    got = fm.center_loss(x, y, c, reduction=reduction, **REF)
    torch.testing.assert_close(got, loop_center(x, _labels(y), c, reduction), **EXACT)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("delta", [1.0, 0.05])
def test_contrastive_center_loss_matches_loop(shape, reduction, delta):
    x, y, c = make(shape)
    got = fm.contrastive_center_loss(x, y, c, delta=delta, reduction=reduction, **REF)
    torch.testing.assert_close(got, loop_contrastive(x, _labels(y), c, delta, reduction), **EXACT)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("n_neighbors", [1, 2, 7])
def test_knn_std_matches_loop(shape, n_neighbors):
    x, y, c = make(shape)
    sx, sc = fm.knn_std(x, y, c, n_neighbors=n_neighbors, **REF)
    want_x, want_c = loop_knn(x, _labels(y), c, n_neighbors)
    torch.testing.assert_close(sx, want_x, **EXACT)
    torch.testing.assert_close(sc, want_c, **EXACT)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_neighbors,z,eps", [(2, 40.0, 1e-3), (7, 1.5, 0.2)])
def test_sigma2r_matches_loop(shape, reduction, n_neighbors, z, eps):
    x, y, c = make(shape)
    w_k = torch.randn(shape[2], dtype=torch.float64)
    got = fm.sigma2r_loss(x, y, c, w_k, n_neighbors=n_neighbors, z=z, eps=eps,
                          reduction=reduction, **REF)
    want = loop_sigma2r(x, _labels(y), c, w_k, n_neighbors, z, eps, reduction)
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_soft_nearest_neighbor_matches_loop(shape, reduction, temperature):
    x, y, _ = make(shape)
    got = fm.soft_nearest_neighbor_loss(x, y, temperature=temperature, reduction=reduction, **REF)
    want = loop_snn(x, _labels(y), temperature, reduction)
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triplet_matches_loop(shape, mining, distance, reduction):
    x, y, _ = make(shape)
    margin = 0.5 if distance == "cosine" else 1.0
    got = fm.triplet_margin_loss(x, y, margin=margin, mining=mining, distance=distance,
                                 reduction=reduction, **REF)
    want = loop_triplet(x, _labels(y), margin, mining, distance, reduction)
    torch.testing.assert_close(got, want, **EXACT)


def test_triplet_semihard_picks_closest_farther_else_farthest():
    # 1-D, l2, margin 3.5; class 0 at 0 and 5, class 1 at 1 and 2. Pairs in row-major order:
    # (0,1): d_ap 5, negatives at 1, 2, none farther -> the farthest, 2: 5 - 2 + 3.5
    # (1,0): d_ap 5, negatives at 4, 3 -> the farthest, 4: 5 - 4 + 3.5
    # (2,3): d_ap 1, negatives at 1 (not strictly farther) and 4 -> 4: 1 - 4 + 3.5
    # (3,2): d_ap 1, negatives at 2 and 3 -> the closest farther one, 2: 1 - 2 + 3.5
    x = torch.tensor([[0.0], [5.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    got = fm.triplet_margin_loss(x, y, margin=3.5, mining="semihard", distance="l2",
                                 reduction="none", **REF)
    torch.testing.assert_close(got, torch.tensor([6.5, 4.5, 0.5, 2.5], dtype=torch.float64),
                               **EXACT)
    mean = fm.triplet_margin_loss(x, y, margin=3.5, mining="semihard", **REF)
    assert mean.item() == pytest.approx(14.0 / 4)


def test_snn_stable_for_large_distances():
    # naive exp underflows to 0/0 here; by logsumexp l = log(1 + e^{-1100}) and
    # log(1 + e^{2400}) for the two class-0 samples.
    x = torch.tensor([[0.0], [50.0], [60.0], [61.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    per = fm.soft_nearest_neighbor_loss(x, y, reduction="none", **REF)
    assert per[0].item() == pytest.approx(0.0, abs=1e-12)
    assert per[1].item() == pytest.approx(2400.0 + math.log1p(math.exp(-21.0)), rel=1e-12)
    per.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_snn_sample_without_partner_left_out():
    x, y, _ = make(SHAPES[0])  # sample 6 is alone in class 2
    per = fm.soft_nearest_neighbor_loss(x, y, reduction="none", **REF)
    assert per[6].item() == 0.0
    mean = fm.soft_nearest_neighbor_loss(x, y, **REF)
    torch.testing.assert_close(mean, per[:6].mean(), **EXACT)


# ------------------------------------------------------------------ gradcheck

def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_center_losses(reduction):
    x, y, c = make(SHAPES[1], requires_grad=True)
    _gc(lambda a, b: fm.center_loss(a, y, b, reduction=reduction, **REF), x, c)
    _gc(lambda a, b: fm.contrastive_center_loss(a, y, b, delta=0.5, reduction=reduction, **REF),
        x, c)


def test_gradcheck_knn_std():
    x, y, c = make(SHAPES[1], requires_grad=True)
    _gc(lambda a, b: fm.knn_std(a, y, b, n_neighbors=2, **REF), x, c)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_sigma2r(reduction):
    x, y, c = make(SHAPES[1], requires_grad=True)
    w_k = torch.randn(c.shape[0], dtype=torch.float64, requires_grad=True)
    _gc(lambda a, b, w: fm.sigma2r_loss(a, y, b, w, n_neighbors=2, z=2.0, eps=0.1,
                                        reduction=reduction, **REF), x, c, w_k)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_soft_nearest_neighbor(reduction):
    x, y, _ = make(SHAPES[0], requires_grad=True)
    _gc(lambda a: fm.soft_nearest_neighbor_loss(a, y, temperature=0.7, reduction=reduction,
                                                **REF), x)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_triplet(mining, distance):
    x, y, _ = make(SHAPES[1], requires_grad=True)
    _gc(lambda a: fm.triplet_margin_loss(a, y, margin=0.7, mining=mining, distance=distance,
                                         reduction="none", **REF), x)


# ------------------------------------------------------------------------ ties

def test_knn_ties_broken_by_index():
    # sample 0 at the origin; samples 1 and 3 duplicate points at distance 1,
    # sample 2 the mirror image of them (also distance 1): with one neighbour,
    # sample 1 (the lowest index) is the neighbour, so only it gets a gradient.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [5.0, 5.0]],
                     dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 1])
    c = torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    sx, sc = fm.knn_std(x, y, c, n_neighbors=1, **REF)
    assert sx[0].item() == pytest.approx(math.sqrt(0.5))
    (gx,) = torch.autograd.grad(sx[0], x, retain_graph=True)
    assert gx[1].abs().sum() > 0 and gx[2].abs().sum() == 0 and gx[3].abs().sum() == 0
    # the duplicates 1 and 3 are each other's nearest (distance 0): std 0, gradient 0, no NaN
    assert sx[1].item() == 0.0 and sx[3].item() == 0.0
    (gx,) = torch.autograd.grad(sx[1] + sx[3], x, retain_graph=True)
    assert torch.isfinite(gx).all() and gx.abs().sum() == 0
    # centre 0 at (0, 0.5): samples 0, 1, 2, 3 at distances 0.25, 1.25, 1.25, 1.25;
    # with two neighbours: 0 and 1 (lowest index among the tied)
    sx, sc = fm.knn_std(x, y, c, n_neighbors=2, **REF)
    (gx,) = torch.autograd.grad(sc[0], x)
    assert gx[1].abs().sum() > 0 and gx[2].abs().sum() == 0 and gx[3].abs().sum() == 0


def test_triplet_ties_pick_lower_index():
    # anchor 0 has two hardest negatives at equal distance: the gradient of the
    # batch-hard term goes to the first only
    x = torch.tensor([[0.0], [0.5], [1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    per = fm.triplet_margin_loss(x, y, margin=2.0, mining="hard", reduction="none", **REF)
    (gx,) = torch.autograd.grad(per[0], x)
    assert gx[2].item() != 0 and gx[3].item() == 0


# ------------------------------------------------------------------ edge cases

def _all_losses(x, y, c):
    w_k = torch.zeros(c.shape[0], dtype=c.dtype, requires_grad=c.requires_grad)
    out = {
        "center": fm.center_loss(x, y, c, **REF),
        "contrastive": fm.contrastive_center_loss(x, y, c, **REF),
        "sigma2r": fm.sigma2r_loss(x, y, c, w_k, n_neighbors=2, **REF),
        "snn": fm.soft_nearest_neighbor_loss(x, y, **REF),
        "knn": sum(s.sum() for s in fm.knn_std(x, y, c, n_neighbors=2, **REF)),
    }
    for mining in MININGS:
        for distance in DISTANCES:
            out[f"triplet_{mining}_{distance}"] = fm.triplet_margin_loss(
                x, y, mining=mining, distance=distance, **REF)
    return out, w_k


def _grads_finite(x, c, w_k, loss):
    x.grad = c.grad = w_k.grad = None
    loss.backward()
    for t in (x, c, w_k):
        if t.grad is not None:
            assert torch.isfinite(t.grad).all()
    return x.grad, c.grad


def test_empty_batch_is_zero_with_zero_grads():
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    losses, w_k = _all_losses(x, y, c)
    for name, loss in losses.items():
        if name == "knn":
            continue
        assert loss.item() == 0.0, name
        gx, gc = _grads_finite(x, c, w_k, loss)
        assert gx.shape == (0, 3)
        assert gc is None or gc.abs().sum() == 0
    sx, sc = fm.knn_std(x, y, c, **REF)
    assert sx.shape == (0,) and torch.equal(sc, torch.zeros(2, dtype=torch.float64))
    assert fm.center_loss(x, y, c, reduction="none", **REF).shape == (0,)


def test_single_sample():
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    losses, w_k = _all_losses(x, y, c)
    torch.testing.assert_close(losses["center"], 0.5 * ((x[0] - c[1]) ** 2).sum(), **EXACT)
    assert losses["snn"].item() == 0.0
    for name, loss in losses.items():
        if name.startswith("triplet"):
            assert loss.item() == 0.0, name
        _grads_finite(x, c, w_k, loss)
    sx, sc = fm.knn_std(x, y, c, **REF)
    assert sx.item() == 0.0 and sc[0].item() == 0.0
    torch.testing.assert_close(sc[1], (x[0] - c[1]).norm() / math.sqrt(2), **EXACT)


def test_one_class():
    x, y, _ = make((6, 3, 1, [0] * 6), requires_grad=True)
    c = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    losses, w_k = _all_losses(x, y, c)
    # no negatives: no "hard" or "all" triplet; every other sample is a partner:
    # snn term log(1) = 0; "semihard" (TF-Addons) takes d_an = 0 for every pair
    for name, loss in losses.items():
        if name.startswith(("triplet_hard", "triplet_all")) or name == "snn":
            assert loss.item() == pytest.approx(0.0, abs=1e-12), name
        _grads_finite(x, c, w_k, loss)
    want = (torch.cdist(x, x)[~torch.eye(6, dtype=torch.bool)] + 0.2).mean()
    torch.testing.assert_close(losses["triplet_semihard_l2"], want, **EXACT)
    # one class: the contrastive denominator is delta alone
    got = fm.contrastive_center_loss(x, y, c, delta=2.0, **REF)
    torch.testing.assert_close(got, (0.25 * ((x - c[0]) ** 2).sum(1)).mean(), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_points_no_nan(dtype):
    x = torch.zeros(6, 4, dtype=dtype, requires_grad=True)
    c = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    losses, w_k = _all_losses(x, y, c)
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        _grads_finite(x, c, w_k, loss)
    # repeated non-zero points too
    x = torch.randn(1, 4, dtype=dtype).repeat(6, 1).requires_grad_(True)
    c = x.detach()[:3].clone().requires_grad_(True)
    losses, w_k = _all_losses(x, y, c)
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        _grads_finite(x, c, w_k, loss)


# --------------------------------------------------- dtypes and memory layout

def _everything(x, y, c, w_k):
    """Every loss (mean) and knn_std, as one flat list of tensors."""
    out = [fm.center_loss(x, y, c, **REF),
           fm.contrastive_center_loss(x, y, c, **REF),
           fm.sigma2r_loss(x, y, c, w_k, n_neighbors=3, z=2.0, **REF),
           fm.soft_nearest_neighbor_loss(x, y, **REF),
           *fm.knn_std(x, y, c, n_neighbors=3, **REF)]
    for mining in MININGS:
        for distance in DISTANCES:
            out.append(fm.triplet_margin_loss(x, y, mining=mining, distance=distance, **REF))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float32(dtype):
    x32, y, c32 = make(SHAPES[1], dtype=torch.float32)
    x32 = x32.to(dtype).float()  # the same rounded values in both runs
    c32 = c32.to(dtype).float()
    w_k = torch.randn(SHAPES[1][2])
    x, c = x32.to(dtype).requires_grad_(True), c32.to(dtype).requires_grad_(True)
    want = _everything(x32, y, c32, w_k)
    got = _everything(x, y, c, w_k)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **LOW[dtype])
    sum(g.sum() for g in got).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    assert torch.isfinite(c.grad.float()).all()


def test_non_contiguous_inputs():
    x, y, c = make(SHAPES[1])
    w_k = torch.randn(SHAPES[1][2], dtype=torch.float64)
    xt = x.T.contiguous().T                      # column-major
    ct = torch.cat([c, c], 1)[:, ::2]            # strided view of the same values
    ct[:] = c
    wt = torch.stack([w_k, w_k], 1)[:, 0]
    yt = torch.stack([y, y], 1)[:, 1]
    assert not (xt.is_contiguous() or ct.is_contiguous() or wt.is_contiguous()
                or yt.is_contiguous())
    for g, w in zip(_everything(xt, yt, ct, wt), _everything(x, y, c, w_k)):
        torch.testing.assert_close(g, w, **EXACT)


# ---------------------------------------------------------- pytorch-metric-learning

@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_triplet_all_and_hard_match_pml(distance):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    x, y, _ = make((12, 4, 3, [0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0]))
    dist = (distances.LpDistance(normalize_embeddings=False) if distance == "l2"
            else distances.CosineSimilarity())
    want = losses.TripletMarginLoss(margin=0.3, distance=dist)(x, y)
    got = fm.triplet_margin_loss(x, y, margin=0.3, mining="all", distance=distance, **REF)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    pairs = miners.BatchHardMiner(distance=dist)(x, y)
    want = losses.TripletMarginLoss(margin=0.3, distance=dist,
                                    reducer=reducers.MeanReducer())(x, y, pairs)
    got = fm.triplet_margin_loss(x, y, margin=0.3, mining="hard", distance=distance, **REF)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert pml is not None


# --------------------------------------------------------------------- bad input

def test_bad_input_raises():
    x, y, c = make(SHAPES[0])
    w_k = torch.zeros(SHAPES[0][2], dtype=torch.float64)
    bad_y = y.clone()
    bad_y[2] = 3
    for fn in (lambda yy: fm.center_loss(x, yy, c, **REF),
               lambda yy: fm.contrastive_center_loss(x, yy, c, **REF),
               lambda yy: fm.knn_std(x, yy, c, **REF),
               lambda yy: fm.sigma2r_loss(x, yy, c, w_k, **REF)):
        with pytest.raises(ValueError, match="found 3"):
            fn(bad_y)
        with pytest.raises(ValueError, match="found -1"):
            fn(torch.full_like(y, -1))
    with pytest.raises(ValueError, match="disagree on D"):
        fm.center_loss(x, y, c[:, :2], **REF)
    with pytest.raises(ValueError, match="2-D"):
        fm.center_loss(x[0], y, c, **REF)
    with pytest.raises(ValueError, match="entries"):
        fm.soft_nearest_neighbor_loss(x, y[:3], **REF)
    with pytest.raises(TypeError, match="int64"):
        fm.triplet_margin_loss(x, y.int(), **REF)
    with pytest.raises(ValueError, match="found -2"):
        fm.triplet_margin_loss(x, torch.full_like(y, -2), **REF)
    with pytest.raises(ValueError, match="mining"):
        fm.triplet_margin_loss(x, y, mining="foo", **REF)
    with pytest.raises(ValueError, match="distance"):
        fm.triplet_margin_loss(x, y, distance="foo", **REF)
    with pytest.raises(ValueError, match="reduction"):
        fm.center_loss(x, y, c, reduction="avg", **REF)
    with pytest.raises(ValueError, match="n_neighbors"):
        fm.knn_std(x, y, c, n_neighbors=0, **REF)
    with pytest.raises(ValueError, match="delta"):
        fm.contrastive_center_loss(x, y, c, delta=0.0, **REF)
    with pytest.raises(ValueError, match="temperature"):
        fm.soft_nearest_neighbor_loss(x, y, temperature=-1.0, **REF)
    with pytest.raises(ValueError, match="w_k"):
        fm.sigma2r_loss(x, y, c, w_k[:2], **REF)
    # mixed dtypes promote (issue 15 item 6); an integer tensor is still a TypeError
    assert fm.center_loss(x, y, c.float(), **REF).dtype == torch.float64
    with pytest.raises(TypeError, match="centers must be float"):
        fm.center_loss(x, y, c.long(), **REF)


# ------------------------------------------------------------------ nn modules

def test_modules_own_parameters_and_match_functional():
    x, y, _ = make(SHAPES[1], dtype=torch.float32)
    center = fnn.CenterLoss(4, 5, backend="reference")
    assert isinstance(center.centers, torch.nn.Parameter)
    loss = center(x, y)
    torch.testing.assert_close(loss, fm.center_loss(x, y, center.centers, **REF))
    loss.backward()
    assert center.centers.grad is not None and center.centers.grad.abs().sum() > 0

    s2r = fnn.Sigma2R(4, 5, n_neighbors=2, z=2.0, backend="reference")
    assert isinstance(s2r.centers, torch.nn.Parameter) and isinstance(s2r.w_k, torch.nn.Parameter)
    assert dict(s2r.named_parameters()).keys() == {"centers", "w_k"}
    loss = s2r(x, y)
    torch.testing.assert_close(loss, fm.sigma2r_loss(x, y, s2r.centers, s2r.w_k, n_neighbors=2,
                                                     z=2.0, **REF))
    loss.backward()
    assert s2r.centers.grad.abs().sum() > 0 and s2r.w_k.grad.abs().sum() > 0

    trip = fnn.TripletMarginLoss(margin=0.4, mining="hard", backend="reference")
    torch.testing.assert_close(trip(x, y), fm.triplet_margin_loss(x, y, margin=0.4,
                                                                  mining="hard", **REF))
    snn = fnn.SoftNearestNeighborLoss(temperature=0.5, backend="reference")
    torch.testing.assert_close(snn(x, y), fm.soft_nearest_neighbor_loss(x, y, temperature=0.5,
                                                                        **REF))


# ------------------------------------------------------------ TF-Addons semi-hard

def tfa_semihard(pdist, labels, margin):
    """A port of TensorFlow-Addons' triplet_semihard_loss (losses/triplet.py) on a
    given [N, N] distance matrix: the [N * N, N] tiled mask, the masked minimum /
    maximum by its shift-by-the-row-extremum trick, the mean over every positive
    pair. Where an anchor has no negative, the masked maximum over an empty mask
    returns the row minimum."""
    n = labels.shape[0]

    def masked_minimum(data, mask):
        top = data.max(1, keepdim=True).values
        return ((data - top) * mask).min(1, keepdim=True).values + top

    def masked_maximum(data, mask):
        low = data.min(1, keepdim=True).values
        return ((data - low) * mask).max(1, keepdim=True).values + low

    adjacency = labels[:, None] == labels[None, :]
    adjacency_not = ~adjacency
    pdist_tile = pdist.repeat(n, 1)
    mask = adjacency_not.repeat(n, 1) & (pdist_tile > pdist.T.reshape(-1, 1))
    mask_final = (mask.double().sum(1, keepdim=True) > 0).reshape(n, n).T
    outside = masked_minimum(pdist_tile, mask.double()).reshape(n, n).T
    inside = masked_maximum(pdist, adjacency_not.double()).repeat(1, n)
    semi_hard = torch.where(mask_final, outside, inside)
    loss_mat = margin + pdist - semi_hard
    mask_positives = adjacency.double() - torch.eye(n, dtype=torch.float64)
    return torch.clamp(loss_mat * mask_positives, min=0).sum() / mask_positives.sum()


def _pdist(x, distance):
    """[N, N] distances from explicit differences (not the expansion the library
    uses), the diagonal a constant 0 (a differentiable sqrt(0) has no gradient)."""
    if distance == "cosine":
        u = x / x.norm(dim=1, keepdim=True)
        return 1 - u @ u.T
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    sq = torch.where(off, sq, torch.zeros_like(sq))
    if distance == "squared_l2":
        return sq
    return torch.where(off, torch.sqrt(torch.where(off, sq, torch.ones_like(sq))), sq)


SEMIHARD_BACKENDS = [pytest.param("reference", id="reference")] + fused_backends(
    "triplet_margin_loss")


@pytest.mark.parametrize("backend", SEMIHARD_BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("labels", [[3] * 6, [0, 0, 0, 0, 1, 1, 2, 0, 1]],
                         ids=["one_class", "sizes_1_2_5"])
def test_semihard_matches_tf_addons(labels, distance, backend):
    # loss and gradient; the single-class batch is where "no negative" matters:
    # every pair gives relu(d_ap - 0 + margin) and counts in the mean
    dev = device_for(backend)
    y = torch.tensor(labels)
    x0 = torch.randn(len(labels), 5, dtype=torch.float64)
    margin = 0.3 if distance == "cosine" else 1.0
    results = []
    for fn in (lambda a: tfa_semihard(_pdist(a, distance), y, margin),
               lambda a: fm.triplet_margin_loss(a.to(dev), y.to(dev), margin=margin,
                                                mining="semihard", distance=distance,
                                                backend=backend).cpu()):
        x = x0.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got_g, want_g, **EXACT)
    if len(set(labels)) == 1 and distance != "cosine":
        d = _pdist(x0, distance)[~torch.eye(len(labels), dtype=torch.bool)]
        torch.testing.assert_close(got, (d + margin).mean(), **EXACT)


# ---------------------------------------------------------------------------- NaN

NAN_OPS = ("center_loss", "contrastive_center_loss", "knn_std", "sigma2r_loss",
           "soft_nearest_neighbor_loss", "triplet_margin_loss")
NAN_PARAMS = [pytest.param(op, "reference", id=f"{op}-reference") for op in NAN_OPS] + [
    pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}")
    for op in NAN_OPS for p in fused_backends(op)]


@pytest.mark.parametrize("op,backend", NAN_PARAMS)
def test_nan_feature_row_gives_nan_loss(op, backend):
    # a clamp `v > 0 ? v : 0`, a NaN-dropping max or a comparison-based sqrt
    # would turn the NaN into a finite loss
    dev = device_for(backend)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 0, 1], device=dev)
    x = torch.randn(10, 4, dtype=torch.float64, device=dev)
    x[4, 2] = float("nan")
    c = torch.randn(3, 4, dtype=torch.float64, device=dev)
    w_k = torch.zeros(3, dtype=torch.float64, device=dev)
    b = dict(backend=backend)
    if op == "knn_std":
        sx, sc = fm.knn_std(x, y, c, n_neighbors=2, **b)
        # the NaN sample's own std; every other sample has two finite neighbours
        assert torch.isnan(sx[4]) and torch.isfinite(sx[torch.arange(10) != 4]).all()
        return
    outs = {"center_loss": lambda: [fm.center_loss(x, y, c, **b)],
            "contrastive_center_loss": lambda: [fm.contrastive_center_loss(x, y, c, **b)],
            "sigma2r_loss": lambda: [fm.sigma2r_loss(x, y, c, w_k, n_neighbors=2, **b)],
            "soft_nearest_neighbor_loss": lambda: [fm.soft_nearest_neighbor_loss(x, y, **b)],
            "triplet_margin_loss": lambda: [
                fm.triplet_margin_loss(x, y, mining=m, distance=d, **b)
                for m in MININGS for d in DISTANCES]}[op]()
    assert all(torch.isnan(o) for o in outs), outs


# ------------------------------------------------ fused backends vs the reference

def _cases(x, y, c, w_k):
    yield "center_loss", lambda **b: fm.center_loss(x, y, c, **b)
    yield "contrastive_center_loss", lambda **b: fm.contrastive_center_loss(x, y, c, **b)
    yield "knn_std", lambda **b: torch.cat(fm.knn_std(x, y, c, n_neighbors=3, **b))
    yield "sigma2r_loss", lambda **b: fm.sigma2r_loss(x, y, c, w_k, n_neighbors=3, z=2.0, **b)
    yield "soft_nearest_neighbor_loss", lambda **b: fm.soft_nearest_neighbor_loss(x, y, **b)
    for mining in MININGS:
        yield "triplet_margin_loss", (lambda m: lambda **b: fm.triplet_margin_loss(
            x, y, mining=m, **b))(mining)


FUSED_PARAMS = [pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}")
                for op in ("center_loss", "contrastive_center_loss", "knn_std", "sigma2r_loss",
                           "soft_nearest_neighbor_loss", "triplet_margin_loss")
                for p in fused_backends(op)]


@pytest.mark.parametrize("op,backend", FUSED_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference(op, backend, dtype):
    dev = device_for(backend)
    n, d, k = 37, 19, 5
    y = torch.randint(0, k, (n,), device=dev)
    base = [torch.randn(n, d, dtype=dtype, device=dev), torch.randn(k, d, dtype=dtype, device=dev),
            torch.randn(k, dtype=dtype, device=dev)]
    results = {}
    for b in ("reference", backend):
        x, c, w_k = (t.clone().requires_grad_(True) for t in base)
        outs = [fn(backend=b) for name, fn in _cases(x, y, c, w_k) if name == op]
        sum(o.sum() for o in outs).backward()
        results[b] = (outs, [t.grad for t in (x, c, w_k)])
    (ro, rg), (fo, fg) = results["reference"], results[backend]
    for r, f in zip(ro, fo):
        torch.testing.assert_close(f, r, **FUSED[dtype])
    for r, f in zip(rg, fg):
        if r is None:
            assert f is None or f.abs().sum() == 0
        else:
            torch.testing.assert_close(f, r, **FUSED[dtype])


# ------------------------------------------------- CenterLoss, Wen et al.'s update

def test_center_update_formula():
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 2, 2, 2, 0, 3, 3, 0])
    c = torch.randn(5, 4, dtype=torch.float64)
    alpha = 0.3
    want = c.clone()
    for j in range(5):
        members = x[y == j]
        delta = (c[j] - members).sum(0) / (1 + len(members))  # Wen et al., Eq. 4
        want[j] = c[j] - alpha * delta
    torch.testing.assert_close(fm.functional.center_update(x, y, c, alpha), want)
    assert torch.equal(want[[1, 4]], c[[1, 4]])  # absent classes keep their centre
    with pytest.raises(ValueError, match="alpha"):
        fm.functional.center_update(x, y, c, 1.5)


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("center_loss"))
def test_center_loss_module_alpha_rule(backend):
    """alpha: the loss uses the current centres and gives them no gradient; training-mode
    forwards then move them by Wen et al.'s step; eval leaves them alone."""
    dev = device_for(backend)
    mod = fnn.CenterLoss(4, 3, alpha=0.5, backend=backend).to(dev)
    assert not mod.centers.requires_grad
    x = torch.randn(10, 3, device=dev, requires_grad=True)
    y = torch.randint(0, 4, (10,), device=dev)
    c0 = mod.centers.detach().clone()
    loss = mod(x, y)
    loss.backward()
    want = fm.center_loss(x.detach(), y, c0, backend="reference")
    torch.testing.assert_close(loss, want)
    # the feature gradient is the one of the centres the loss saw, not the updated ones
    torch.testing.assert_close(x.grad, (x.detach() - c0[y]) / 10)
    torch.testing.assert_close(mod.centers.detach(),
                               fm.functional.center_update(x.detach(), y, c0, 0.5))
    mod.eval()
    c1 = mod.centers.detach().clone()
    mod(x, y)
    assert torch.equal(mod.centers.detach(), c1)
    with pytest.raises(ValueError, match="alpha"):
        fnn.CenterLoss(4, 3, alpha=0.0)


# ------------------------------------------- issue 15 item 7: a large common offset

OFFSET_CASES = [
    ("triplet-hard-sq", "triplet_margin_loss",
     lambda be, x, y, c: fm.triplet_margin_loss(x, y, mining="hard", distance="squared_l2",
                                                backend=be)),
    ("triplet-semihard-l2", "triplet_margin_loss",
     lambda be, x, y, c: fm.triplet_margin_loss(x, y, mining="semihard", distance="l2",
                                                backend=be)),
    ("triplet-all-sq", "triplet_margin_loss",
     lambda be, x, y, c: fm.triplet_margin_loss(x, y, mining="all", distance="squared_l2",
                                                backend=be)),
    ("soft-nn", "soft_nearest_neighbor_loss",
     lambda be, x, y, c: fm.soft_nearest_neighbor_loss(x, y, temperature=1e-4, backend=be)),
    ("center", "center_loss", lambda be, x, y, c: fm.center_loss(x, y, c, backend=be)),
    ("contrastive-center", "contrastive_center_loss",
     lambda be, x, y, c: fm.contrastive_center_loss(x, y, c, delta=1e-4, backend=be)),
    ("knn-std", "knn_std",
     lambda be, x, y, c: torch.cat(fm.knn_std(x, y, c, n_neighbors=2, backend=be))),
    ("sigma2r", "sigma2r_loss",
     lambda be, x, y, c: fm.sigma2r_loss(x, y, c, torch.zeros(4, device=x.device),
                                         n_neighbors=2, z=4.0, backend=be)),
]


@pytest.mark.parametrize("case,backend", [
    pytest.param(case, p.values[0], marks=p.marks, id=f"{case[0]}-{p.id}")
    for case in OFFSET_CASES for p in [pytest.param("reference", id="reference")]
    + fused_backends(case[1])])
def test_large_common_offset_keeps_the_spread(case, backend):
    # features 1e4 + 0.01 * noise: the squared-distance expansion cancelled every
    # digit in float32 (hard squared-l2 triplet 24.2 on cpu, 8.17 on triton against
    # 0.2007); centring the batch first keeps the float64 value of the same inputs
    _, _, fn = case
    g = torch.Generator().manual_seed(5)
    x = (1e4 + 0.01 * torch.randn(16, 8, generator=g, dtype=torch.float64)).float()
    c = (1e4 + 0.01 * torch.randn(4, 8, generator=g, dtype=torch.float64)).float()
    y = torch.arange(16) % 4
    dev = device_for(backend)
    xx = x.clone().to(dev).requires_grad_(True)
    got = fn(backend, xx, y.to(dev), c.to(dev))
    got.sum().backward()
    x64 = x.double().requires_grad_(True)
    want = fn("reference", x64, y, c.double())
    want.sum().backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-4, atol=1e-6)
    scale = x64.grad.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(xx.grad.double().cpu() / scale, x64.grad / scale,
                               rtol=1e-3, atol=1e-3)


# ------------------------------------------------ issue 15 item 6: mixed precision

CENTRE_MODULES = [
    ("CenterLoss", "center_loss", lambda be: fnn.CenterLoss(4, 6, backend=be)),
    ("CenterLoss-alpha", "center_loss", lambda be: fnn.CenterLoss(4, 6, alpha=0.5, backend=be)),
    ("Sigma2R", "sigma2r_loss", lambda be: fnn.Sigma2R(4, 6, n_neighbors=2, z=4.0, backend=be)),
]


@pytest.mark.parametrize("case,backend", [
    pytest.param(case, p.values[0], marks=p.marks, id=f"{case[0]}-{p.id}")
    for case in CENTRE_MODULES for p in [pytest.param("reference", id="reference")]
    + fused_backends(case[1])])
def test_centre_modules_under_cpu_autocast(case, backend):
    # bf16 activations against fp32 centres raised a TypeError (issue 15 item 6)
    _, _, make = case
    torch.manual_seed(3)
    dev = device_for(backend)
    mod = make(backend).to(dev)
    x = torch.randn(12, 6, device=dev, requires_grad=True)
    y = (torch.arange(12) % 4).to(dev)
    c0 = mod.centers.detach().clone()
    with torch.autocast(device_for(backend).type, dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.eye(6, device=dev))
        assert h.dtype == torch.bfloat16
        loss = mod(h, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert mod.centers.dtype == torch.float32
    if mod.centers.requires_grad:
        assert mod.centers.grad.dtype == torch.float32
        assert torch.isfinite(mod.centers.grad).all()
    else:  # Wen et al.'s rule moved the centres, in their own dtype
        assert not torch.equal(c0, mod.centers.detach())
    # outside autocast: bf16 features with fp32 centres promote to fp32
    xb = x.detach().bfloat16().requires_grad_(True)
    got = fm.center_loss(xb, y, c0.requires_grad_(True), backend=backend)
    got.backward()
    assert got.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert c0.grad.dtype == torch.float32
    torch.testing.assert_close(got, fm.center_loss(xb.detach().float(), y, c0.detach(), **REF))


# ------------------------------------- issue 15 item 5: cosine triplet magnitudes and ties

TRIPLET_BACKENDS = [pytest.param("reference", id="reference")] + fused_backends(
    "triplet_margin_loss")


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("mining", MININGS)
def test_cosine_triplet_huge_and_tiny_norms(mining, backend):
    # cpu gave NaN for row norms <= 3e-20 or >= 1e19 (the squared norm under- or
    # overflowing float32); only directions matter, on every backend
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 4, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    sc = torch.tensor([1e20, 3e-21, 1.0, 1.0, 1e25, 1e-25, 1e19, 3e-20])[:, None]
    dev = device_for(backend)
    xs = (x * sc).to(dev).requires_grad_(True)
    kw = dict(mining=mining, distance="cosine", margin=0.5)
    got = fm.triplet_margin_loss(xs, y.to(dev), backend=backend, **kw)
    got.backward()
    x64 = x.double().requires_grad_(True)
    want = fm.triplet_margin_loss(x64, y, **kw, **REF)
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(xs.grad).all()
    torch.testing.assert_close(xs.grad.double().cpu() * sc.double(), x64.grad, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
def test_cosine_semihard_exact_ties_in_one_dimension(backend):
    # D = 1: every cosine distance is exactly 0 or 2; x * rsqrt(x^2) is not exactly
    # +-1, so the backends broke the d_an > d_ap ties differently (0.400 vs 0.3714)
    dev = device_for(backend)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 10, (1,), generator=g))
        x = torch.randn(n, 1, generator=g) * torch.rand(n, 1, generator=g) * 10
        y = torch.randint(0, 3, (n,), generator=g)
        got = fm.triplet_margin_loss(x.to(dev), y.to(dev), mining="semihard",
                                     distance="cosine", backend=backend)
        want = fm.triplet_margin_loss(x.double(), y, mining="semihard", distance="cosine",
                                      **REF)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("spread", [1e-12, 1e10], ids=["tiny", "huge"])
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("contrastive_center_loss"))
def test_contrastive_center_gradient_at_tiny_and_huge_spreads(backend, spread):
    # found by tests/test_fuzz.py (issue 15 item 9): the fused backwards formed
    # own / den^2, and den^2 under- (spread 1e-12, delta 1e-24) or overflows (1e10)
    # float32: an inf / NaN or zero gradient where the float64 reference's is finite
    g = torch.Generator().manual_seed(2)
    x = spread * torch.randn(5, 3, generator=g, dtype=torch.float64)
    c = spread * torch.randn(2, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])
    dev = device_for(backend)
    xx = x.float().to(dev).requires_grad_(True)
    loss = fm.contrastive_center_loss(xx, y.to(dev), c.float().to(dev), delta=spread ** 2,
                                      backend=backend)
    loss.backward()
    x64 = x.float().double().requires_grad_(True)
    want = fm.contrastive_center_loss(x64, y, c.float().double(), delta=spread ** 2, **REF)
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-4, atol=1e-6)
    scale = x64.grad.abs().max()
    torch.testing.assert_close(xx.grad.double().cpu() / scale, x64.grad / scale, rtol=1e-3,
                               atol=1e-4)


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("knn_std"))
def test_knn_std_nan_outside_the_class_does_not_leak(backend):
    # found by tests/test_fuzz.py: the reference's std weighted the unused neighbour
    # slots by 0, and 0 * NaN is NaN, so a NaN sample of class 0 made class 1's
    # sigma_c NaN (the fused backends, whose unused slots point elsewhere, did not)
    x = torch.tensor([[1.0, 0.0], [float("nan"), -1.0], [-2.0, -1.0]])
    c = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    y = torch.tensor([1, 0, 0])
    dev = device_for(backend)
    sx, sc = fm.knn_std(x.to(dev), y.to(dev), c.to(dev), n_neighbors=3, backend=backend)
    assert torch.isnan(sc[0]) and torch.isnan(sx[1:]).all()
    torch.testing.assert_close(sc[1].cpu(), torch.tensor(2.0).sqrt())
    assert sx[0] == 0
