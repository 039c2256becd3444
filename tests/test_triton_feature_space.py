"""What is specific to the Triton feature-space losses (fused_margin/triton/feature_space.py):
each op against the reference (loss and gradients) at odd shapes and several tiles,
classes of size 1 and 2, the tie rules of the k-NN and triplet selections on
tie-heavy integer data, empty and single-sample batches, and no N x N allocation.

Runs on the Triton interpreter where there is no GPU (conftest sets TRITON_INTERPRET)."""
import inspect

import pytest
import torch

from fused_margin import dispatch
from fused_margin.reference import feature_space as ref
from fused_margin.triton import feature_space as tfs

from conftest import AllocationRecorder

_ok, _why = dispatch._status("triton")
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances, named once, by input dtype: outputs (float32 for 16-bit inputs, computed
# in float32 by both sides) and gradients (rounded back to the input dtype).
OUT_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-4, atol=2e-5),
           torch.float64: dict(rtol=1e-9, atol=1e-11)}
GRAD_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
            torch.float64: dict(rtol=1e-9, atol=1e-11)}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]

# small tiles: several row blocks, column tiles and D chunks at these sizes
SMALL = tfs.Blocks(m=16, n=16, d=16, do=16)

# (N, D, labels): random labels over 5 classes; classes of size 1 and 2 (and an
# anchor-less class of one); one class holding every sample but one
SHAPES = {
    "37x19c5": (37, 19, torch.randint(0, 5, (37,), generator=torch.Generator().manual_seed(3))),
    "13x7sizes1,2": (13, 7, torch.tensor([3, 0, 0, 1, 2, 2, 2, 4, 4, 4, 4, 5, 2])),
    "6x3lone": (6, 3, torch.tensor([1, 1, 1, 1, 1, 0])),
}
# (shape, tiles) pairs every op runs over in float64; the other dtypes run the first two
CONFIGS = [pytest.param("37x19c5", None, id="37x19c5-default"),
           pytest.param("37x19c5", SMALL, id="37x19c5-small"),
           pytest.param("13x7sizes1,2", SMALL, id="13x7sizes1,2-small"),
           pytest.param("6x3lone", None, id="6x3lone-default")]
DTYPE_CONFIGS = [pytest.param(dt, *c.values, id=f"{str(dt)[6:]}-{c.id}")
                 for dt in DTYPES for c in (CONFIGS if dt == torch.float64 else CONFIGS[:2])]


def inputs(shape, dtype, n_classes=6):
    n, d, labels = SHAPES[shape]
    g = torch.Generator().manual_seed(n * 100 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(n_classes, d, generator=g, dtype=torch.float64).to(dtype)
    return x.to(DEV), labels.to(DEV), c.to(DEV)


def grads(fn, *tensors):
    """fn's outputs (tuple) and d(sum of outputs * fixed random weights)/d(tensors)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(7)
    total = sum((o * torch.rand(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
                for o in outs)
    got = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(t) if d is None else d
                                        for t, d in zip(leaves, got)]


def assert_matches(fused, reference, dtype):
    (fo, fg), (ro, rg) = fused, reference
    for f, r in zip(fo, ro):
        assert f.dtype == r.dtype and f.shape == r.shape
        torch.testing.assert_close(f, r, **OUT_TOL[dtype])
    for f, r in zip(fg, rg):
        assert f.dtype == r.dtype and torch.isfinite(f.double()).all()
        torch.testing.assert_close(f, r, **GRAD_TOL[dtype])


# ------------------------------------------------------------ the backend's entries

def test_registered_with_reference_signatures():
    for op in ("soft_nearest_neighbor_loss", "knn_std", "sigma2r_loss", "triplet_margin_loss"):
        fn = dispatch.resolve(op, "triton", DEV)
        assert fn is getattr(tfs, op)
        assert inspect.signature(fn) == inspect.signature(getattr(ref, op)), op


# ----------------------------------------------------------- soft nearest neighbour

@pytest.mark.parametrize("dtype,shape,blocks", DTYPE_CONFIGS)
@pytest.mark.parametrize("reduction,temperature", [("mean", 0.7), ("none", 2.0), ("sum", 0.3)])
def test_soft_nearest_neighbor_matches_reference(shape, dtype, reduction, temperature, blocks):
    x, y, _ = inputs(shape, dtype)
    kw = dict(temperature=temperature, reduction=reduction)
    got = grads(lambda a: tfs.soft_nearest_neighbor(a, y, blocks=blocks, **kw), x)
    want = grads(lambda a: ref.soft_nearest_neighbor_loss(a, y, **kw), x)
    assert_matches(got, want, dtype)


def test_soft_nearest_neighbor_far_points_stay_finite():
    # the reference's large-distance case: per-row log-sum-exps must not under/overflow
    x = torch.tensor([[0.0], [50.0], [60.0], [61.0]], dtype=torch.float64, device=DEV)
    y = torch.tensor([0, 0, 1, 1], device=DEV)
    got = grads(lambda a: tfs.soft_nearest_neighbor_loss(a, y, reduction="none"), x)
    want = grads(lambda a: ref.soft_nearest_neighbor_loss(a, y, reduction="none"), x)
    assert_matches(got, want, torch.float64)


# ------------------------------------------------------------------ k-NN and sigma^2R

@pytest.mark.parametrize("dtype,shape,blocks", DTYPE_CONFIGS)
@pytest.mark.parametrize("n_neighbors", [1, 7])
def test_knn_std_matches_reference(shape, dtype, n_neighbors, blocks):
    x, y, c = inputs(shape, dtype)
    got = grads(lambda a, b: tfs.knn_stds(a, y, b, n_neighbors=n_neighbors, blocks=blocks), x, c)
    want = grads(lambda a, b: ref.knn_std(a, y, b, n_neighbors=n_neighbors), x, c)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("blocks", [None, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("n,n_classes,n_neighbors", [
    (45, 6, 2), (45, 6, 9),  # some classes hold fewer than 9 + 1
    (150, 2, tfs.MAX_TOP_K + 1)])  # above the kernel's top-K: the fallback, same rule
def test_knn_indices_tie_rule(n, n_classes, n_neighbors, blocks):
    # coordinates in {0, 1, 2}: most distances tie exactly; the reference's stable
    # sort takes the lower index among equals, so must the running top-K
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (n, 3), generator=g).double().to(DEV)
    y = torch.randint(0, n_classes, (n,), generator=g).to(DEV)
    c = torch.randint(0, 3, (n_classes + 1, 3), generator=g).double().to(DEV)
    classes = torch.arange(n_classes + 1, device=DEV)
    for q, qy, exclude in ((x, y, True), (c, classes, False)):
        got = tfs.knn_indices(q, qy, x, y, n_neighbors, exclude_self=exclude, blocks=blocks)
        allowed = qy[:, None] == y[None, :]
        if exclude:
            allowed &= ~torch.eye(n, dtype=torch.bool, device=DEV)
        want, valid = ref._nearest(ref._exact_sq_dists(q, x), allowed, n_neighbors)
        assert torch.equal(got, torch.where(valid, want, torch.full_like(want, -1)))


@pytest.mark.parametrize("dtype,shape,blocks", DTYPE_CONFIGS)
@pytest.mark.parametrize("reduction,n_neighbors,z,eps", [("mean", 3, 2.0, 0.1),
                                                         ("none", 7, 40.0, 1e-3)])
def test_sigma2r_matches_reference(shape, dtype, reduction, n_neighbors, z, eps, blocks):
    x, y, c = inputs(shape, dtype)
    w_k = torch.randn(c.shape[0], generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    kw = dict(n_neighbors=n_neighbors, z=z, eps=eps, reduction=reduction)
    got = grads(lambda a, b, w: tfs.sigma2r(a, y, b, w, blocks=blocks, **kw), x, c, w_k)
    want = grads(lambda a, b, w: ref.sigma2r_loss(a, y, b, w, **kw), x, c, w_k)
    assert_matches(got, want, dtype)


# ------------------------------------------------------------------------- triplet

@pytest.mark.parametrize("dtype,shape,blocks,distance,reduction", [
    pytest.param(*c.values, dist, red, id=f"{c.id}-{dist}-{red}")
    for c in DTYPE_CONFIGS
    for dist, red in (("l2", "mean"), ("squared_l2", "none"), ("cosine", "sum"))
    if c.values[0] == torch.float64 or dist == "l2"])
@pytest.mark.parametrize("mining", ["hard", "semihard"])
def test_triplet_matches_reference(shape, dtype, mining, distance, reduction, blocks):
    x, y, _ = inputs(shape, dtype)
    kw = dict(margin=0.4 if distance == "cosine" else 1.0, mining=mining, distance=distance,
              reduction=reduction)
    got = grads(lambda a: tfs.triplet(a, y, blocks=blocks, **kw), x)
    want = grads(lambda a: ref.triplet_margin_loss(a, y, **kw), x)
    assert_matches(got, want, dtype)


# "all" sweeps one row per positive pair: wider tiles keep the interpreter quick,
# still two row blocks, two column tiles and two D chunks at 37 x 19
WIDE = tfs.Blocks(m=32, n=32, d=16, do=16)


@pytest.mark.parametrize("dtype,shape,blocks,distance,reduction", [
    pytest.param(*c.values[:2], WIDE if c.values[2] is SMALL else c.values[2], dist, red,
                 id=f"{c.id.replace('37x19c5-small', '37x19c5-wide')}-{dist}-{red}")
    for c in DTYPE_CONFIGS
    for dist, red in (("l2", "mean"), ("squared_l2", "sum"), ("cosine", "mean"))
    if c.values[0] == torch.float64 or (dist == "l2" and c.values[2] is None)])
def test_triplet_all_matches_reference(shape, dtype, distance, reduction, blocks):
    x, y, _ = inputs(shape, dtype)
    kw = dict(margin=0.4 if distance == "cosine" else 3.0, mining="all", distance=distance,
              reduction=reduction)
    got = grads(lambda a: tfs.triplet(a, y, blocks=blocks, **kw), x)
    want = grads(lambda a: ref.triplet_margin_loss(a, y, **kw), x)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("blocks", [None, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("mining,reduction", [("hard", "none"), ("semihard", "none"),
                                              ("all", "sum")])
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_triplet_tie_rule(mining, reduction, distance, blocks):
    # integer coordinates: equal distances everywhere (d(a, n) == d(a, p) for
    # semi-hard's strict "farther"; terms exactly 0 for "all", which counts only
    # terms > 0); gradients show which index was chosen
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 3, (29, 2), generator=g).double().to(DEV)
    y = torch.randint(0, 4, (29,), generator=g).to(DEV)
    margin = 1.0 if mining == "all" else 1.5
    kw = dict(margin=margin, mining=mining, distance=distance, reduction=reduction)
    got = grads(lambda a: tfs.triplet(a, y, blocks=blocks, **kw), x)
    want = grads(lambda a: ref.triplet_margin_loss(a, y, **kw), x)
    assert_matches(got, want, torch.float64)


# --------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_sample(n):
    x = torch.randn(n, 4, dtype=torch.float64, device=DEV)
    y = torch.zeros(n, dtype=torch.long, device=DEV)
    c = torch.randn(2, 4, dtype=torch.float64, device=DEV)
    w_k = torch.zeros(2, dtype=torch.float64, device=DEV)
    calls = {
        "snn": (lambda a, b, w: tfs.soft_nearest_neighbor_loss(a, y),
                lambda a, b, w: ref.soft_nearest_neighbor_loss(a, y)),
        "knn": (lambda a, b, w: tfs.knn_std(a, y, b, n_neighbors=3),
                lambda a, b, w: ref.knn_std(a, y, b, n_neighbors=3)),
        "sigma2r": (lambda a, b, w: tfs.sigma2r_loss(a, y, b, w, n_neighbors=3),
                    lambda a, b, w: ref.sigma2r_loss(a, y, b, w, n_neighbors=3)),
    }
    for mining in ("hard", "semihard", "all"):
        calls[mining] = (lambda m: (lambda a, b, w: tfs.triplet_margin_loss(a, y, mining=m),
                                    lambda a, b, w: ref.triplet_margin_loss(a, y, mining=m)))(
            mining)
    for name, (fused, reference) in calls.items():
        assert_matches(grads(fused, x, c, w_k), grads(reference, x, c, w_k), torch.float64)


# --------------------------------------------------------------------------- memory

# N = 40, D = 12 >= N / 4, four classes of ten: P = 360 positive pairs, so that
# P x D (4320) and N^3 lie above N^2 (1600) and every bound below is the N^2 one
MEM_N, MEM_D, MEM_K, MEM_NB = 40, 12, 4, 5


def _mem_run(op, x, y, c, w_k, mod):
    return {
        "snn": lambda: mod.soft_nearest_neighbor_loss(x, y),
        "knn_std": lambda: sum(s.sum() for s in mod.knn_std(x, y, c, n_neighbors=MEM_NB)),
        "sigma2r": lambda: mod.sigma2r_loss(x, y, c, w_k, n_neighbors=MEM_NB),
        "hard": lambda: mod.triplet_margin_loss(x, y, mining="hard"),
        "semihard": lambda: mod.triplet_margin_loss(x, y, mining="semihard"),
        "all": lambda: mod.triplet_margin_loss(x, y, mining="all"),
    }[op]


@pytest.mark.parametrize("op", ["snn", "knn_std", "sigma2r", "hard", "semihard", "all"])
def test_no_n_by_n_allocation(op):
    n, d, k = MEM_N, MEM_D, MEM_K
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(DEV).requires_grad_(True)
    c = torch.randn(k, d, generator=g).to(DEV).requires_grad_(True)
    w_k = torch.zeros(k, device=DEV, requires_grad=True)
    y = (torch.arange(n) % k).to(DEV)
    pairs = k * (n // k) * (n // k - 1)
    assert n * n < pairs * d < n ** 3

    def big(rec):
        # the k-NN stds are formed on the gathered [rows, n_neighbors, D] neighbours
        # (O(N k D) by design); nothing else may reach N^2 elements
        return [s for s in rec.shapes if torch.Size(s).numel() >= n * n
                and not (op in ("knn_std", "sigma2r") and tuple(s[-2:]) == (MEM_NB, d))]

    with AllocationRecorder() as rec:
        _mem_run(op, x, y, c, w_k, tfs)().backward()
    assert rec.shapes, "nothing recorded"
    assert not big(rec), f"{op} allocated N^2-sized (or larger) tensors: {big(rec)}"
    # the same recorder and rule catch the reference: [N, N] distances, the [P, N]
    # semi-hard rows, the [N, N, N] "all" terms
    with AllocationRecorder() as rec:
        _mem_run(op, x, y, c, w_k, ref)().backward()
    assert big(rec)


@pytest.mark.parametrize("mining,distance", [("semihard", "l2"), ("all", "cosine")])
def test_triplet_positive_chunks(mining, distance):
    # classes of up to 12 samples with 4 positives per chunk: several chunks per
    # anchor, anchor blocks mixing classes, the last chunk partly empty
    x, y, _ = inputs("37x19c5", torch.float64)
    y = torch.tensor([0] * 12 + [1] * 9 + [2] * 2 + [3] * 13 + [4], device=DEV)[
        torch.randperm(37, generator=torch.Generator().manual_seed(4))]
    kw = dict(margin=1.0, mining=mining, distance=distance, reduction="sum")
    got = grads(lambda a: tfs.triplet(a, y, blocks=tfs.Blocks(m=16, n=16, d=16, do=16, p=4),
                                      **kw), x)
    want = grads(lambda a: ref.triplet_margin_loss(a, y, **kw), x)
    assert_matches(got, want, torch.float64)


def test_strided_inputs():
    # column-major features, strided centres and labels: the kernels read by strides
    x, y, c = inputs("37x19c5", torch.float64)
    yt = torch.stack([y, y], 1)[:, 1]
    w_k = torch.randn(c.shape[0], dtype=torch.float64, device=DEV)

    def strided(a, b):
        a = a.T.contiguous().T
        b = torch.stack([b, torch.zeros_like(b)], 2)[..., 0]
        assert not (a.is_contiguous() or b.is_contiguous() or yt.is_contiguous())
        return a, b

    for fn in (lambda a, b, yy: tfs.soft_nearest_neighbor_loss(a, yy, reduction="none"),
               lambda a, b, yy: tfs.knn_std(a, yy, b, n_neighbors=3),
               lambda a, b, yy: tfs.sigma2r_loss(a, yy, b, w_k, n_neighbors=3),
               lambda a, b, yy: tfs.triplet_margin_loss(a, yy, mining="hard"),
               lambda a, b, yy: tfs.triplet_margin_loss(a, yy, mining="semihard"),
               lambda a, b, yy: tfs.triplet_margin_loss(a, yy, mining="all")):
        got = grads(lambda a, b: fn(*strided(a, b), yt), x, c)
        want = grads(lambda a, b: fn(a, b, y), x, c)
        assert_matches(got, want, torch.float64)


@pytest.mark.parametrize("mining", ["semihard", "all"])
@pytest.mark.parametrize("view", ["rows", "cols", "overlap"])
def test_cosine_triplet_backward_strided(mining, view):
    # issue 15 item 1: the backward read the contiguous unit rows u with x's
    # strides, past u's end for x[::2] / x[:, ::2] / an overlapping as_strided x
    base = torch.randn(24, 10, dtype=torch.float64, device=DEV)
    y = torch.tensor([0, 1, 2] * 4, device=DEV)
    if view == "rows":
        make = lambda b: b[::2, :5]  # noqa: E731
    elif view == "cols":
        make = lambda b: b[:12, ::2]  # noqa: E731
    else:  # rows overlap: row i is base.flatten()[3i : 3i + 5]
        make = lambda b: b.as_strided((12, 5), (3, 1))  # noqa: E731
    kw = dict(margin=0.5, mining=mining, distance="cosine", reduction="sum")
    got = grads(lambda b: tfs.triplet_margin_loss(make(b), y, **kw), base)
    want = grads(lambda b: ref.triplet_margin_loss(make(b), y, **kw), base)
    assert_matches(got, want, torch.float64)


def test_soft_nearest_neighbor_nan_row_in_one_class_is_nan():
    # found by tests/test_fuzz.py (issue 15 item 9): "has a partner" was s_same > 0,
    # which a NaN distance fails, so a NaN feature in a one-class batch gave loss 0
    x = torch.tensor([[float("nan")], [2.0], [3.0]], device=DEV)
    y = torch.zeros(3, dtype=torch.long, device=DEV)
    got = tfs.soft_nearest_neighbor_loss(x, y, temperature=0.5, reduction="none")
    want = ref.soft_nearest_neighbor_loss(x, y, temperature=0.5, reduction="none")
    assert torch.isnan(want).all() and torch.isnan(got).all()
