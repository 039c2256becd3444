"""Class-sharded margin cross-entropy (fused_margin.distributed) against the
single-process reference, in real gloo process groups over 127.0.0.1.

Process start-up is amortised: one group per world size runs every case (this
file run as a script, `_worker`) and saves its losses, gradients and error
messages; the tests compare them with the reference computed here. Each group
run has a wall-clock limit and the gloo collectives a timeout of their own, so
a hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import pytest
import torch

import fused_margin as fm
from fused_margin import distributed as fd
from fused_margin import nn as fnn
from fused_margin.reference import sharded_tiles as sp
from fused_margin.reference import angular as ref
from fused_margin.reference import sharded as ref_sharded

from conftest import (AllocationRecorder, NativeAllocationRecorder, device_for, fused_backends,
                      requires_cuda)

# Tolerances, named once: sharded vs single-process, by dtype (the sums run in
# another order, nothing else differs).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
GROUP_TIMEOUT_S = 150       # one whole group's run, start-up included
COLLECTIVE_TIMEOUT_S = 60   # gloo's own limit on any one collective
EXAMPLE_TIMEOUT_S = 150

C, D = 11, 6
# world -> per-rank batch sizes and weight shards (class_start, C_r); 3 ranks:
# shards out of rank order and a rank with no samples
LAYOUT = {2: ([5, 8], [(0, 4), (4, 7)]), 3: ([4, 0, 9], [(5, 6), (0, 2), (2, 3)])}
EMPTY_SHARD = {2: [(0, 11), (11, 0)], 3: [(0, 6), (6, 0), (6, 5)]}
SAMPLED_C, SAMPLE_RATE = 40, 0.4
# (kind, sample_correction); the correction shifts logits, not the cosines elm's c* uses,
# so elm is checked uncorrected only (its subset reference shifts cosines)
SAMPLED = [("arcface", False), ("arcface", True), ("elm", False)]
WORLDS = (2, 3)
# the workers' tiles: 4 rows x 1 to 3 classes at these shard sizes, so every
# distributed case runs each backend's partials over several row and column blocks
WORKER_TILE_BYTES, WORKER_MIN_ROWS = 96, 4      # reference (sharded_tiles)
WORKER_CPU_CLASS_BLOCK, WORKER_CPU_ROW_BLOCK = 3, 4
WORKER_TRITON_BLOCK = 4                         # rows, classes, D step, D chunk
# the partials backends the distributed cases run on, in the ranks' processes (cpu is
# what backend="auto" picks for CPU tensors). Triton runs there under the
# interpreter, slowly, so on a subset that still covers every code path: the
# theta kinds, elm's c* across ranks, per-class m, class weights, ignore_index,
# reduction="none", float32, an empty shard.
PARTIAL_BACKENDS = ("cpu", "reference", "triton")
TRITON_CASES = ("arcface", "elm", "arcgrad", "sphereface-weighted-ignore",
                "camri-weighted-ignore", "elm-none-ignore", "cosface-float32",
                "elm-empty-shard")
# the allocation check: classes, kinds, and one world only (the recorder's first use
# imports torch._dynamo, about 2 s of CPU in each rank's process)
ALLOC_C, ALLOC_KINDS, ALLOC_WORLD = 60, ("elm", "arcgrad"), 2


# ------------------------------------------------------------------ the cases

@dataclass
class Case:
    name: str
    kw: dict
    ignore: bool = False
    dtype: torch.dtype = torch.float64
    shards: Optional[dict] = None


def _margins(c):
    return fm.ldam_margins(torch.arange(1, c + 1).flip(0) * 3)


def kinds(c=C):
    return [
        ("normface", dict(kind="normface", s=30.0)),
        ("arcface", dict(kind="arcface", s=30.0, m=0.5)),
        ("camri", dict(kind="arcface", s=30.0, m=fm.camri_margins(c, [1, 6], 0.6))),
        ("cosface", dict(kind="cosface", s=30.0, m=0.35)),
        ("sphereface", dict(kind="sphereface", s=30.0, m=1.7)),
        ("combined", dict(kind="combined", s=30.0, m1=1.2, m2=0.3, m3=0.1)),
        ("ldam", dict(kind="ldam", s=30.0, m=_margins(c))),
        ("elm", dict(kind="elm", s=30.0, m=_margins(c), elm_lambda=0.5)),
        ("arcgrad", dict(kind="arcgrad", s=fm.arcgrad_scale(c, 0.3))),
    ]


def cases():
    cw = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    out = []
    for name, kw in kinds():
        out.append(Case(name, kw))
        out.append(Case(name + "-weighted-ignore", dict(kw, class_weight=cw, ignore_index=-1),
                        ignore=True))
    arc, elm = dict(kinds())["arcface"], dict(kinds())["elm"]
    out += [
        Case("arcface-sum", dict(arc, reduction="sum")),
        Case("elm-none-ignore", dict(elm, reduction="none", ignore_index=-1), ignore=True),
        Case("cosface-float32", dict(kinds())["cosface"], dtype=torch.float32),
        Case("elm-empty-shard", elm, shards=EMPTY_SHARD),
        Case("arcface-empty-shard", arc, shards=EMPTY_SHARD),
    ]
    return out


CASES = {c.name: c for c in cases()}


def inputs(name, world, c=C, dtype=torch.float64):
    """The global batch (x [N, D], y [N]) and full weight W [C, D] of a case:
    row 0 at theta = 0, row 1 at theta = pi, row 2 zero (ties in elm's c* across
    ranks), class c-1 a zero weight row; rows 3 and N-1 ignored in -ignore cases."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{world}".encode()))
    n = sum(LAYOUT[world][0])
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(c, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x[0] = 2.5 * w[y[0]]
    x[1] = -0.7 * w[y[1]]
    x[2] = 0.0
    w[c - 1] = 0.0
    case = CASES.get(name)
    if case is not None and case.ignore:
        y[3] = y[n - 1] = -1
    return x.to(dtype), w.to(dtype), y


def rows_of(world, rank):
    sizes = LAYOUT[world][0]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def shard_of(case_shards, world, rank):
    return case_shards[world][rank] if case_shards else LAYOUT[world][1][rank]


# ------------------------------------------------------------- worker (ranks)

def backend_runs_here(backend) -> bool:
    """Whether the ranks' processes can run `backend` on their CPU tensors."""
    from fused_margin import dispatch

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # a GPU machine: the ranks hold CPU tensors, the kernels want CUDA
    return dispatch._status(backend)[0]


def case_runs():
    """(backend, case name) of every distributed case the workers run."""
    return ([(b, name) for b in ("cpu", "reference") for name in CASES]
            + [("triton", name) for name in TRITON_CASES])


def backend_param(backend, *more, id=None):
    """A pytest param (backend, *more), skipped where the workers cannot run `backend`."""
    marks = [] if backend == "reference" or backend_runs_here(backend) else [pytest.mark.skip(
        reason=f"the {backend} backend cannot run in the ranks' processes here")]
    return pytest.param(backend, *more, id=id or backend, marks=marks)


def _run_case(case, rank, world, backend):
    x, w, y = inputs(case.name, world, dtype=case.dtype)
    start, size = shard_of(case.shards, world, rank)
    xr = x[rows_of(world, rank)].clone().requires_grad_()
    wr = w[start:start + size].clone().requires_grad_()
    loss = fd.margin_cross_entropy(xr, wr, y[rows_of(world, rank)], class_start=start,
                                   num_classes=C, backend=backend, **case.kw)
    (loss.sum() if loss.dim() else loss).backward()
    return dict(loss=loss.detach(), gx=xr.grad, gw=wr.grad)


def _sampled_kw():
    return {"arcface": dict(kinds(SAMPLED_C))["arcface"], "elm": dict(kinds(SAMPLED_C))["elm"]}


def _run_sampled(rank, world, backend):
    out = {}
    x, w, y = inputs("sampled", world, c=SAMPLED_C)
    y[4] = -1
    start, size = fd.shard_range(SAMPLED_C, rank, world)
    for name, corrected in SAMPLED:
        kw = _sampled_kw()[name]
        seed = 1000 + rank
        keep = fd.sample_classes(y, class_start=start, shard_size=size,
                                 sample_rate=SAMPLE_RATE, ignore_index=-1,
                                 generator=torch.Generator().manual_seed(seed),
                                 min_negatives=int(corrected))
        xr = x[rows_of(world, rank)].clone().requires_grad_()
        wr = w[start:start + size].clone().requires_grad_()
        loss = fd.margin_cross_entropy(
            xr, wr, y[rows_of(world, rank)], class_start=start, num_classes=SAMPLED_C,
            sample_rate=SAMPLE_RATE, ignore_index=-1, sample_correction=corrected,
            generator=torch.Generator().manual_seed(seed), backend=backend, **kw)
        loss.backward()
        out[(name, corrected)] = dict(keep=keep, loss=loss.detach(), gx=xr.grad, gw=wr.grad)
    return out


def _attempt(fn):
    try:
        fn()
    except ValueError as exc:
        return "ValueError: " + str(exc)
    except Exception as exc:  # noqa: BLE001  (recorded, the test says what it expected)
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _run_errors(rank, world):
    x, w, y = inputs("errors", world)
    start, size = LAYOUT[world][1][rank]
    xr, yr, wr = x[rows_of(world, rank)], y[rows_of(world, rank)], w[start:start + size]
    last = rank == world - 1

    def call(xr=xr, wr=wr, yr=yr, start=start, num_classes=C, kind="arcface", **kw):
        return fd.margin_cross_entropy(xr, wr, yr, class_start=start, num_classes=num_classes,
                                       kind=kind, s=30.0, **kw)

    out = {
        "label_out_of_range": _attempt(lambda: call(yr=torch.where(
            torch.arange(yr.numel()) == 0, torch.full_like(yr, C), yr) if last else yr)),
        "negative_label": _attempt(lambda: call(yr=-yr - 2 if last else yr)),
        "shard_gap": _attempt(lambda: call(start=start + 1 if rank == 0 else start)),
        "shards_short": _attempt(lambda: call(num_classes=C + 1)),
        "shard_overlap": _attempt(lambda: call(  # the rank holding class 0 takes one more
            wr=w[start:start + size + 1] if start == 0 else wr)),
        "dim_mismatch": _attempt(lambda: call(
            xr=torch.cat([xr, xr[:, :1]], 1) if last else xr,
            wr=torch.cat([wr, wr[:, :1]], 1) if last else wr)),
        "requires_grad_mismatch": _attempt(lambda: call(
            xr=xr.clone().requires_grad_() if rank == 0 else xr)),
        "config_mismatch": _attempt(lambda: call(m=0.4 if last else 0.5)),
        "bad_sample_rate": _attempt(lambda: call(sample_rate=1.5 if last else 1.0)),
        "shard_sized_margin": _attempt(lambda: call(kind="cosface", m=torch.full((size,), 0.2))),
        "dtype_mismatch": _attempt(lambda: call(  # gloo itself would abort the process
            xr=xr.float() if last else xr, wr=wr.float() if last else wr)),
    }
    out["after"] = call().detach()  # the group is still in step
    return out


def _run_module(rank, world):
    x, w, y = inputs("module", world)
    xr, yr = x[rows_of(world, rank)], y[rows_of(world, rank)]
    kw = dict(kind="elm", s=30.0, m=_margins(C), class_weight=torch.linspace(0.5, 2.0, C),
              backend="reference")
    mod = fnn.ShardedMarginLoss(D, C, init_seed=7, **kw)
    init_sd = mod.gather_state_dict()
    mod.double()
    loss = mod(xr, yr)
    loss.backward()
    sd = mod.gather_state_dict()
    other = fnn.ShardedMarginLoss(D, C, init_seed=8, **kw).double()
    other.load_full_state_dict(sd)
    return dict(init_sd=init_sd, sd=sd, loss=loss.detach(), class_start=mod.class_start,
                shard=mod.weight.detach().clone(), gw=mod.weight.grad,
                reloaded_equal=torch.equal(other.weight, mod.weight),
                reloaded_loss=other(xr, yr).detach(), pred=mod.predict(xr))


def _run_allocations(rank, world, backend):
    """Largest allocation (in elements) of one forward + backward, and N_global * C_r:
    tensors ops return (reference: eager tiles), every ATen allocation inside the
    ops, the C++ kernels' scratch included (cpu)."""
    x, w, y = inputs("alloc", world, c=ALLOC_C)
    start, size = fd.shard_range(ALLOC_C, rank, world)
    out = {}
    for kind in ALLOC_KINDS:
        xr = x[rows_of(world, rank)].clone().requires_grad_()
        wr = w[start:start + size].clone().requires_grad_()
        recorder = NativeAllocationRecorder() if backend == "cpu" else AllocationRecorder()
        with recorder as rec:
            loss = fd.margin_cross_entropy(xr, wr, y[rows_of(world, rank)], class_start=start,
                                           num_classes=ALLOC_C, backend=backend,
                                           **dict(kinds(ALLOC_C))[kind])
            loss.backward()
        largest = max(b // x.element_size() for b in rec.bytes) if backend == "cpu" else max(
            rec.sizes)
        out[kind] = dict(largest=largest, n_by_c=x.shape[0] * size,
                         ops=len(rec.allocs))
    return out


def _worker(out_dir):
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    sp.TILE_BYTES, sp.MIN_ROWS = WORKER_TILE_BYTES, WORKER_MIN_ROWS
    here = [b for b in PARTIAL_BACKENDS if backend_runs_here(b)]
    if "cpu" in here:
        from fused_margin.cpu import angular as cpu
        cpu.CLASS_BLOCK, cpu.ROW_BLOCK = WORKER_CPU_CLASS_BLOCK, WORKER_CPU_ROW_BLOCK
    if "triton" in here:
        from fused_margin.triton import angular as ta
        t = WORKER_TRITON_BLOCK
        ta.default_blocks = lambda dtype, d: ta.Blocks(outer=t, sweep=t, d=t, do=t)
    results = {"cases": {(b, name): _run_case(CASES[name], rank, world, b)
                         for b, name in case_runs() if b in here},
               "sampled": {b: _run_sampled(rank, world, b) for b in here},
               "errors": _run_errors(rank, world),
               "module": _run_module(rank, world),
               "alloc": ({b: _run_allocations(rank, world, b) for b in ("cpu", "reference")
                          if b in here} if world == ALLOC_WORLD else None)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------- the harness

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(world, rank=None):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo binds the loopback device
    env.pop("TRITON_INTERPRET", None)
    if rank is not None:
        env["RANK"] = str(rank)
    return env


def run_bounded(procs, timeout):
    """Wait for every process; kill them all (by their own handles) past the limit."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"process group passed {timeout}s; output:\n" + "\n".join(
            f"--- rank {r}\n{(log or '')[-3000:]}" for r, log in enumerate(logs)))
    return [(p.returncode, o[0]) for p, o in zip(procs, outs)]


def run_group(world):
    out_dir = tempfile.mkdtemp(prefix=f"fm_dist{world}_")
    env = loopback_env(world)
    if os.environ.get("TRITON_INTERPRET") == "1":  # conftest's: the ranks run Triton too
        env["TRITON_INTERPRET"] = "1"
    procs = [subprocess.Popen([sys.executable, __file__, out_dir], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    done = run_bounded(procs, GROUP_TIMEOUT_S)
    if any(rc != 0 for rc, _ in done):
        pytest.fail("worker failed:\n" + "\n".join(
            f"--- rank {r} rc={rc}\n{log[-4000:]}" for r, (rc, log) in enumerate(done)))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


_GROUPS: dict = {}


@pytest.fixture(scope="module")
def group():
    def get(world):
        if world not in _GROUPS:
            _GROUPS[world] = run_group(world)
        return _GROUPS[world]
    return get


def single_process(x, w, y, kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ref.margin_cross_entropy(x, w, y, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad, w.grad


# --------------------------------------------------------------------- tests

@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend,name", [backend_param(b, name, id=f"{b}-{name}")
                                          for b, name in case_runs()])
def test_loss_and_gradients_match_single_process(group, world, backend, name):
    case = CASES[name]
    results = group(world)
    x, w, y = inputs(name, world, dtype=case.dtype)
    loss, gx, gw = single_process(x, w, y, case.kw)
    tol = TOL[case.dtype]
    for rank, res in enumerate(results):
        got = res["cases"][(backend, name)]
        start, size = shard_of(case.shards, world, rank)
        torch.testing.assert_close(got["loss"], loss, **tol, msg=f"loss on rank {rank}")
        torch.testing.assert_close(got["gx"], gx[rows_of(world, rank)], **tol,
                                   msg=f"features.grad on rank {rank}")
        torch.testing.assert_close(got["gw"], gw[start:start + size], **tol,
                                   msg=f"weight_shard.grad on rank {rank}")
    # the losses are not only close to the reference but the same on every rank
    key = (backend, name)
    assert all(torch.equal(r["cases"][key]["loss"], results[0]["cases"][key]["loss"])
               for r in results)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", [backend_param(b) for b in PARTIAL_BACKENDS])
@pytest.mark.parametrize("kind,corrected", SAMPLED, ids=["arcface", "arcface-corrected", "elm"])
def test_sampled_softmax_keeps_positives_and_matches_subset_reference(group, world, backend, kind,
                                                                      corrected):
    results = group(world)
    x, w, y = inputs("sampled", world, c=SAMPLED_C)
    y[4] = -1
    kw = dict(_sampled_kw()[kind], ignore_index=-1)
    kept, offsets = [], []
    for rank, res in enumerate(results):
        got = res["sampled"][backend][(kind, corrected)]
        start, size = fd.shard_range(SAMPLED_C, rank, world)
        keep = got["keep"]
        local_pos = {int(v) - start for v in y if start <= v < start + size}
        assert local_pos <= set(keep.tolist()), "a positive class was dropped"
        # the correction needs a negative on every shard that has one
        assert keep.numel() == min(size, max(len(local_pos) + int(corrected),
                                             math.ceil(SAMPLE_RATE * size)))
        assert keep.unique().numel() == keep.numel()
        dropped = torch.ones(size, dtype=torch.bool)
        dropped[keep] = False
        assert bool((got["gw"][dropped] == 0).all()), "a dropped class got a gradient"
        kept.append(keep + start)
        n_rand = keep.numel() - len(local_pos)
        off = [0.0 if int(k) in local_pos else math.log((size - len(local_pos)) / n_rand)
               for k in keep]
        offsets.append(torch.tensor(off, dtype=torch.float64))
    kept_ids, offset = torch.cat(kept), torch.cat(offsets)

    # the reference: the same loss over the kept classes only
    pos = {int(c): i for i, c in enumerate(kept_ids)}
    y_sub = torch.tensor([pos[int(v)] if v >= 0 else -1 for v in y])
    sub_kw = dict(kw, m=kw["m"][kept_ids]) if isinstance(kw.get("m"), torch.Tensor) else kw
    xs, ws = x.clone().requires_grad_(), w[kept_ids].clone().requires_grad_()
    cos = ref.cosine(xs, ws)
    if corrected:  # non-target logits s*cos + offset: shift the cosines (targets have offset 0)
        cos = cos + offset[None, :] / kw["s"]
    loss = ref.margin_cross_entropy_from_cosine(cos, y_sub, **sub_kw)
    loss.backward()
    for rank, res in enumerate(results):
        got = res["sampled"][backend][(kind, corrected)]
        start, _ = fd.shard_range(SAMPLED_C, rank, world)
        torch.testing.assert_close(got["loss"], loss.detach(), **TOL[torch.float64])
        torch.testing.assert_close(got["gx"], xs.grad[rows_of(world, rank)],
                                   **TOL[torch.float64])
        lo = sum(k.numel() for k in kept[:rank])
        torch.testing.assert_close(got["gw"][kept[rank] - start],
                                   ws.grad[lo:lo + kept[rank].numel()], **TOL[torch.float64])
    if corrected:
        full = ref.margin_cross_entropy(x, w, y, **kw)
        assert not torch.allclose(loss.detach(), full)  # an estimate, not the full loss


ERRORS = ["label_out_of_range", "negative_label", "shard_gap", "shards_short", "shard_overlap",
          "dim_mismatch", "requires_grad_mismatch", "config_mismatch", "bad_sample_rate",
          "shard_sized_margin", "dtype_mismatch"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("error", ERRORS)
def test_bad_input_raises_value_error_on_every_rank(group, world, error):
    results = group(world)
    for rank, res in enumerate(results):
        msg = res["errors"][error]
        assert msg.startswith("ValueError"), f"rank {rank}: {msg}"
    if error in ("label_out_of_range", "negative_label"):
        assert all(f"rank {world - 1}" in r["errors"][error] for r in results)
    if error == "dtype_mismatch":
        assert all(f"rank {world - 1}: float32/float32/int64" in r["errors"][error]
                   for r in results)
    # and afterwards the group is still in step: a good call gives one loss everywhere
    x, w, y = inputs("errors", world)
    want = ref.margin_cross_entropy(x, w, y, kind="arcface", s=30.0)
    for res in results:
        torch.testing.assert_close(res["errors"]["after"], want, **TOL[torch.float64])


@pytest.mark.parametrize("world", WORLDS)
def test_module_state_dict_round_trip(group, world):
    results = group(world)
    x, w, y = inputs("module", world)
    kw = dict(kind="elm", s=30.0, m=_margins(C), class_weight=torch.linspace(0.5, 2.0, C),
              backend="reference")
    torch.manual_seed(7)
    single = fnn.MarginLoss(D, C, **kw)
    sd0 = results[0]["module"]["sd"]
    assert set(sd0) == set(single.state_dict())
    for rank, res in enumerate(results):
        mod = res["module"]
        # a seeded sharded init is the seeded single-process init
        torch.testing.assert_close(mod["init_sd"]["weight"], single.weight.detach(), rtol=0, atol=0)
        for key in sd0:
            assert torch.equal(mod["sd"][key], sd0[key]), f"{key} differs on rank {rank}"
        start, size = fd.shard_range(C, rank, world)
        assert mod["class_start"] == start and mod["shard"].shape[0] == size
        assert torch.equal(mod["shard"], sd0["weight"][start:start + size])
        assert mod["reloaded_equal"]
        torch.testing.assert_close(mod["reloaded_loss"], mod["loss"], rtol=0, atol=0)
    single.double().load_state_dict(sd0)
    torch.testing.assert_close(single(x, y), results[0]["module"]["loss"], **TOL[torch.float64])
    pred = ref.cosine(x, sd0["weight"]).argmax(dim=1)
    for rank, res in enumerate(results):
        assert torch.equal(res["module"]["pred"], pred[rows_of(world, rank)])


@pytest.mark.parametrize("backend", [backend_param(b) for b in ("cpu", "reference")])
@pytest.mark.parametrize("kind", ALLOC_KINDS)
def test_no_n_global_by_c_r_tensor(group, backend, kind):
    """Forward and backward on every rank allocate nothing of N_global x C_r
    elements (the workers' tiles are smaller; the single-process test below
    shows the recorders do see an N x C_r tile)."""
    for rank, res in enumerate(group(ALLOC_WORLD)):
        got = res["alloc"][backend][kind]
        assert got["ops"] > 0, "the recorder saw no op"
        assert got["largest"] < got["n_by_c"], f"rank {rank}: {got}"


# --------------------------------------------- single-process pieces (no group)

def _shard_case(kind_kw, keep, dtype, seed=0):
    """A gathered batch against one shard [4, 11) of C classes: rows at theta = 0
    and pi from their targets, a zero row, a zero weight row, two equal weight
    rows (a tie for elm's c*, across a column block of 3), an ignored row,
    targets here and elsewhere."""
    g = torch.Generator().manual_seed(seed)
    n, start, size = 13, 4, 7
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(size, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    y[0], y[1], y[4] = start + 1, start + 5, 0
    w[3] = w[2]
    x[0] = 1.5 * w[1]
    x[1] = -0.5 * w[5]
    x[2] = 0.0
    w[size - 1] = 0.0
    y[3] = -1
    offset = None
    if keep is not None:
        keep = torch.tensor(keep)
        offset = torch.rand(keep.numel(), generator=g, dtype=torch.float64)
    up = torch.randn(2, n, generator=g, dtype=torch.float64)  # d loss / d (sum_exp, target)
    return x.to(dtype), w.to(dtype), y, dict(kind_kw, class_start=start, ignore_index=-1,
                                             keep=keep, logit_offset=offset), up.to(dtype)


def _partials_and_grads(fn, x, w, y, kw, up, device=None, **extra):
    """Partials and both gradients of sum(up[0] * sum_exp + up[1] * target), on
    `device` (results back on the CPU)."""
    dev = device or x.device
    x, w = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()
          if k != "elm_lambda"}
    p = fn(x, w, y.to(dev), **kw, **extra)
    up = up.to(dev)
    (p.sum_exp * up[0] + p.target * up[1]).sum().backward()
    return (ref_sharded.ShardPartials(*(t.cpu() for t in p)), x.grad.cpu(), w.grad.cpu())


# (rows, columns) of a tile: row blocks over whole shard rows; several column blocks
BLOCKS = {"rows": (3, 7), "tiles": (4, 3)}
# 16-bit inputs: the reference computes in float32 from the same rounded inputs; the
# fused backends round their gradients to the input dtype
TOL16 = dict(rtol=2e-2, atol=2e-3)
# the Triton backward rounds its gradient tile to the input dtype (one bf16 product, as
# every peer): its gradients are off by a few bf16 steps of the tensor's largest entry
GRAD16_SCALE = 2e-2


def _partials_impl(backend, block):
    """(the backend's margin_shard_partials, its tile-size keyword) for tiles of
    BLOCKS[block] = (rows, classes)."""
    rows, cols = BLOCKS[block]
    if backend == "reference":
        return sp.margin_shard_partials, dict(block=(rows, cols))
    if backend == "cpu":
        from fused_margin.cpu import angular as cpu
        return cpu.margin_shard_partials, dict(block=(cols, rows))
    from fused_margin.triton import angular as ta
    # tl.arange needs powers of two; 4 x 4 tiles, D in steps of 4 (D = 6: a ragged step)
    return ta.margin_shard_partials, dict(blocks=ta.Blocks(outer=4, sweep=4, d=4, do=4))


PARTIAL_PARAMS = [pytest.param("reference", id="reference")] + fused_backends(
    "margin_shard_partials")


@pytest.mark.parametrize("backend", PARTIAL_PARAMS)
@pytest.mark.parametrize("block,dtype", [("rows", torch.float64), ("tiles", torch.float64),
                                         ("tiles", torch.float32)],
                         ids=["rows-f64", "tiles-f64", "tiles-f32"])
@pytest.mark.parametrize("keep", [None, [0, 2, 3, 6]], ids=["full", "sampled"])
@pytest.mark.parametrize("name", [k for k, _ in kinds()])
def test_partials_match_reference(name, keep, block, dtype, backend):
    """Each backend's margin_shard_partials (tiled eager, C++, Triton: custom
    backwards) equals the eager N x C_r reference: every per-row statistic
    and both gradients."""
    if backend == "triton" and block == "rows":
        pytest.skip("Triton tiles are powers of two: one shape covers it")
    x, w, y, kw, up = _shard_case(dict(kinds())[name], keep, dtype)
    want = _partials_and_grads(ref_sharded.margin_shard_partials, x, w, y, kw, up)
    fn, extra = _partials_impl(backend, block)
    got = _partials_and_grads(fn, x, w, y, kw, up, device=device_for(backend), **extra)
    tol = TOL[dtype]
    for field in ref_sharded.ShardPartials._fields:
        torch.testing.assert_close(getattr(got[0], field), getattr(want[0], field), **tol,
                                   msg=field)
    torch.testing.assert_close(got[1], want[1], **tol, msg="features.grad")
    torch.testing.assert_close(got[2], want[2], **tol, msg="weight_shard.grad")
    if keep is not None:  # only kept classes get a gradient
        dropped = torch.ones(w.shape[0], dtype=torch.bool)
        dropped[torch.tensor(keep)] = False
        assert bool((got[2][dropped] == 0).all())


@pytest.mark.parametrize("backend", fused_backends("margin_shard_partials"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["arcface", "elm", "arcgrad"])
def test_fused_partials_16_bit(name, dtype, backend):
    """float16 / bfloat16 features and weights: float32 statistics, gradients in
    the input dtype, close to the float32 reference on the same rounded inputs."""
    x, w, y, kw, up = _shard_case(dict(kinds())[name], None, torch.float64)
    # off the poles: at theta = 0 or pi, 1/sin(theta) turns float32's rounding of the
    # cosine (which differs between any two summation orders) into O(1) gradient noise
    x[:2] += 0.5 * torch.randn(2, D, generator=torch.Generator().manual_seed(1),
                               dtype=x.dtype)
    x, w, up = x.to(dtype), w.to(dtype), up.float()
    want = _partials_and_grads(ref_sharded.margin_shard_partials, x.float(), w.float(), y, kw,
                               up)
    fn, extra = _partials_impl(backend, "tiles")
    got = _partials_and_grads(fn, x, w, y, kw, up, device=device_for(backend), **extra)
    for field in ("row_max", "sum_exp", "target", "wrong_cos"):
        value = getattr(got[0], field)
        assert value.dtype == torch.float32, field
        torch.testing.assert_close(value, getattr(want[0], field), **TOL16, msg=field)
    assert torch.equal(got[0].wrong_index, want[0].wrong_index)
    for g, ref_g, t in ((got[1], want[1], x), (got[2], want[2], w)):
        assert g.dtype == dtype
        if backend == "triton":  # one 16-bit gradient tile, as every peer: error on the
            # tensor's scale (issue 13; tests/test_triton.py bounds it by eager's)
            assert float((g.float() - ref_g).abs().max()) <= GRAD16_SCALE * float(
                ref_g.abs().max()) + TOL16["atol"]
        else:
            torch.testing.assert_close(g.float(), ref_g, **TOL16)


@pytest.mark.parametrize("backend", PARTIAL_PARAMS)
def test_partials_labels_outside_the_shard_never_reach_a_kernel(backend):
    """Labels of other shards, past num_classes or huge, are 'elsewhere': the
    kernels get target columns in [-1, K) only, and the result is the
    reference's."""
    x, w, y, kw, up = _shard_case(dict(kinds())["arcface"], None, torch.float64)
    y = y.clone()
    y[5], y[6], y[7] = 2 ** 40, -(2 ** 40), 11 + 4  # beyond every shard
    want = _partials_and_grads(ref_sharded.margin_shard_partials, x, w, y, kw, up)
    fn, extra = _partials_impl(backend, "tiles")
    got = _partials_and_grads(fn, x, w, y, kw, up, device=device_for(backend), **extra)
    for field in ref_sharded.ShardPartials._fields:
        torch.testing.assert_close(getattr(got[0], field), getattr(want[0], field),
                                   **TOL[torch.float64], msg=field)
    col = ref_sharded.target_columns(y, class_start=4, shard_size=w.shape[0], keep=None,
                                     ignore_index=-1)
    assert int(col.min()) >= -1 and int(col.max()) < w.shape[0]


def test_cpu_partials_reject_a_column_outside_the_shard():
    """The C++ op checks its target columns like labels, and the kept rows of a
    sampled shard, before any tile runs."""
    if not backend_runs_here("cpu"):
        pytest.skip("the C++ extension is not built")
    from fused_margin.cpu import angular as cpu
    x, w = torch.randn(3, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    for bad in (4, -2):
        col = torch.tensor([0, bad, -1])
        with pytest.raises(RuntimeError, match="outside"):
            cpu.ops.shard_partials_fwd(x, w, col, None, None, 1, 30.0, 2, 2)
    # and the kept rows of a sampled shard: inside the shard, distinct, increasing
    col = torch.tensor([0, 1, -1])
    for keep in ([0, 4], [-1, 2], [2, 1], [1, 1]):
        with pytest.raises(RuntimeError, match="keep must list"):
            cpu.ops.shard_partials_fwd(x, w, col, None, torch.tensor(keep), 1, 30.0, 2, 2)



@pytest.mark.parametrize("kind", ["normface", "arcgrad"])
def test_class_logit_backward_matches_autograd(kind):
    """The hand-written derivative of reference.sharded.class_logit, at cosines
    inside, on and outside the clamp."""
    eps = ref.COS_EPS
    cos = torch.tensor([[-1.0, -1 + eps, -1 + eps / 2, -0.3, 0.0, 0.7],
                        [1 - 2 * eps, 1 - eps, 1 - eps / 2, 1.0, 0.999, -0.999]],
                       dtype=torch.float64)
    grad = torch.linspace(-2.0, 3.0, cos.numel(), dtype=torch.float64).reshape(cos.shape)
    leaf = cos.clone().requires_grad_()
    ref_sharded.class_logit(leaf, kind, 3.0).backward(grad)
    got = sp.class_logit_backward_(cos.clone(), grad.clone(), kind, 3.0)
    torch.testing.assert_close(got, leaf.grad, **TOL[torch.float64])


def test_unit_backward_matches_autograd():
    t = torch.randn(5, D, dtype=torch.float64)
    t[1] = 0.0
    grad = torch.randn(5, D, dtype=torch.float64)
    leaf = t.clone().requires_grad_()
    (leaf * ref.inv_norm(leaf)[:, None]).backward(grad)
    torch.testing.assert_close(sp.unit_backward(t, grad, torch.float64), leaf.grad,
                               **TOL[torch.float64])


def test_tiling_bounds_the_tile():
    mib8 = 8 << 20
    # whole rows while that leaves min_rows rows a block
    assert sp.tiling(8192, 4000, torch.float32, mib8, 256) == (mib8 // 16000, 4000)
    assert sp.tiling(100, 4000, torch.float32, mib8, 256) == (100, 4000)
    # a wide shard: min_rows rows, the columns split to fit
    assert sp.tiling(8192, 125_000, torch.float32, mib8, 256) == (256, mib8 // (256 * 4))
    assert sp.tiling(10, 10 ** 7, torch.float64, mib8, 256) == (10, mib8 // 80)
    assert sp.tiling(8192, 10 ** 9, torch.float32, 64, 256) == (256, 1)  # never empty
    for n, k in ((8192, 4000), (8192, 125_000), (3, 10 ** 7)):
        rows, cols = sp.tiling(n, k, torch.float32, mib8, 256)
        assert rows * cols * 4 <= mib8


@pytest.mark.parametrize("keep", [None, list(range(0, 40, 2))], ids=["full", "sampled"])
def test_chunked_partials_make_no_n_by_c_tensor(keep):
    n, c_r, d = 16, 40, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c_r, d, generator=g, requires_grad=True)
    y = torch.randint(0, 2 * c_r, (n,), generator=g)
    keep = None if keep is None else torch.tensor(keep)
    k = c_r if keep is None else keep.numel()
    for fn, extra in ((sp.margin_shard_partials, dict(block=(2, 5))),
                      (ref_sharded.margin_shard_partials, {})):
        with AllocationRecorder() as rec:
            p = fn(x, w, y, class_start=c_r // 2, kind="arcgrad", s=4.0, keep=keep, **extra)
            (p.sum_exp.sum() + p.target.sum()).backward()
        if fn is sp.margin_shard_partials:
            assert max(rec.sizes) <= max(n * d, c_r * d, 2 * 5), max(rec.shapes, key=math.prod)
        else:  # the recorder does see the reference's tile
            assert max(rec.sizes) >= n * k


@pytest.mark.parametrize("backend", fused_backends("margin_shard_partials"))
@pytest.mark.parametrize("keep", [None, list(range(0, 40, 2))], ids=["full", "sampled"])
def test_fused_partials_make_no_n_by_c_tensor(backend, keep):
    """The C++ op's scratch (seen by the profiler) and everything the Triton
    path allocates stay below N x K; a whole-shard C++ tile is seen, so the
    check can fail. A sampled shard's kept rows are never gathered whole."""
    n, c_r, d = 16, 40, 4
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    x = torch.randn(n, d, generator=g).to(dev).requires_grad_()
    w = torch.randn(c_r, d, generator=g).to(dev).requires_grad_()
    y = torch.randint(0, 2 * c_r, (n,), generator=g).to(dev)
    keep = None if keep is None else torch.tensor(keep, device=dev)
    k = c_r if keep is None else keep.numel()
    bound = max(n * d, c_r * d, 6 * n)  # inputs' size, W's gradient, the [6, N] statistics

    def run(**extra):
        recorder = NativeAllocationRecorder() if backend == "cpu" else AllocationRecorder()
        with recorder as rec:
            p = fn(x, w, y, class_start=c_r // 2, kind="arcgrad", s=4.0, keep=keep, **extra)
            (p.sum_exp.sum() + p.target.sum()).backward()
        return rec

    if backend == "cpu":
        from fused_margin.cpu import angular as cpu
        fn = cpu.margin_shard_partials
        assert max(run(block=(5, 2)).bytes) // 4 <= bound
        assert max(run(block=(k, n)).bytes) // 4 >= n * k  # a whole-shard tile is seen
    else:
        from fused_margin.triton import angular as ta
        fn = ta.margin_shard_partials
        rec = run(blocks=ta.Blocks(outer=4, sweep=4, d=4, do=4))
        assert max(rec.sizes) <= bound
        if keep is not None:  # the kept rows are read in place: no [K, D] gather
            assert (k, d) not in rec.shapes, rec.shapes



@pytest.mark.parametrize("rate", [0.01, 0.3, 0.5, 1.0])
def test_sample_classes_keeps_positives_and_count(rate):
    labels = torch.tensor([3, 17, 17, -100, 25, 40, 9])
    start, size = 10, 20  # positives here: 17 and 25 -> local 7, 15
    keep = fd.sample_classes(labels, class_start=start, shard_size=size, sample_rate=rate,
                             generator=torch.Generator().manual_seed(0))
    assert {7, 15} <= set(keep.tolist())
    assert keep.numel() == max(2, math.ceil(rate * size))
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
    again = fd.sample_classes(labels, class_start=start, shard_size=size, sample_rate=rate,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_sample_classes_is_uniform_over_the_others():
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(10)
    for _ in range(2000):
        hits[fd.sample_classes(labels, class_start=0, shard_size=10, sample_rate=0.4,
                               generator=g)] += 1
    assert hits[0] == hits[1] == 2000
    # 2 of the 8 others each time: 500 expected, binomial sd ~19
    assert bool(((hits[2:] - 500).abs() < 100).all()), hits


NORMALISER_DRAWS = 3000
NORMALISER_SIGMAS = 5.0  # |mean - truth| allowed, in standard errors of the mean over the draws


def _normaliser_draws(labels, z, *, shard_size, rate, correction):
    """The shard's estimated normaliser sum_kept exp(z + offset) per row, one row
    of the result per draw (each with its own generator), by the code path
    margin_cross_entropy takes."""
    est = []
    for seed in range(NORMALISER_DRAWS):
        keep, offset = fd._sampled_shard(
            labels, class_start=0, shard_size=shard_size, sample_rate=rate,
            ignore_index=-100, generator=torch.Generator().manual_seed(seed),
            sample_correction=correction, dtype=torch.float64, device=torch.device("cpu"))
        zk = z[:, keep] + (0.0 if offset is None else offset[None, :])
        est.append(torch.exp(zk).sum(dim=1))
    return torch.stack(est)


def _shard_logits(shard_size, n_rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n_rows, shard_size, generator=g, dtype=torch.float64)


def test_sample_correction_normaliser_is_unbiased():
    """ceil(rate * C_r) > P: the corrected estimate averages to the full sum of
    exp over the shard; the uncorrected (plain PartialFC) one falls short."""
    c_r, rate = 50, 0.3
    labels = torch.tensor([3, 3, 10, 17, 41, 49, 60, -100])  # P = 5 positives here, 60 elsewhere
    z = _shard_logits(c_r)
    truth = torch.exp(z).sum(dim=1)
    est = _normaliser_draws(labels, z, shard_size=c_r, rate=rate, correction=True)
    se = est.std(dim=0) / math.sqrt(est.shape[0])
    assert bool(((est.mean(dim=0) - truth).abs() < NORMALISER_SIGMAS * se).all()), (
        est.mean(dim=0), truth, se)
    plain = _normaliser_draws(labels, z, shard_size=c_r, rate=rate, correction=False)
    assert bool((truth - plain.mean(dim=0) > NORMALISER_SIGMAS * se).all())


def test_sample_correction_keeps_a_negative_when_positives_fill_the_quota():
    """ceil(rate * C_r) <= P: plain PartialFC keeps the positives only, so a
    corrected normaliser would be the positives' sum whatever the draw (biased
    low); sample_correction therefore keeps one negative, and is unbiased again."""
    c_r, rate = 20, 0.1  # ceil(0.1 * 20) = 2 <= P = 5
    labels = torch.tensor([0, 4, 4, 9, 13, 19])
    positive = torch.zeros(c_r, dtype=torch.bool)
    positive[labels] = True
    z = _shard_logits(c_r, seed=1)
    truth = torch.exp(z).sum(dim=1)
    bare = fd.sample_classes(labels, class_start=0, shard_size=c_r, sample_rate=rate,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(bare, positive.nonzero().squeeze(1))  # the degenerate draw
    offset = ref_sharded.sampled_logit_offset(bare, positive, c_r, torch.float64)
    degenerate = torch.exp(z[:, bare] + offset).sum(dim=1)
    torch.testing.assert_close(degenerate, torch.exp(z[:, positive]).sum(dim=1))
    assert bool((degenerate < truth).all())

    est = _normaliser_draws(labels, z, shard_size=c_r, rate=rate, correction=True)
    keep, _ = fd._sampled_shard(labels, class_start=0, shard_size=c_r, sample_rate=rate,
                                ignore_index=-100, generator=torch.Generator().manual_seed(0),
                                sample_correction=True, dtype=torch.float64,
                                device=torch.device("cpu"))
    assert keep.numel() == int(positive.sum()) + 1
    se = est.std(dim=0) / math.sqrt(est.shape[0])
    assert bool(((est.mean(dim=0) - truth).abs() < NORMALISER_SIGMAS * se).all()), (
        est.mean(dim=0), truth, se)


def test_sample_correction_keeps_every_class_when_all_are_positive():
    labels = torch.arange(6)
    keep, offset = fd._sampled_shard(labels, class_start=0, shard_size=6, sample_rate=0.2,
                                     ignore_index=-100, generator=torch.Generator().manual_seed(0),
                                     sample_correction=True, dtype=torch.float64,
                                     device=torch.device("cpu"))
    assert torch.equal(keep, labels) and bool((offset == 0).all())


@pytest.mark.parametrize("spans,ok", [
    ([(0, 4), (4, 7)], True), ([(4, 7), (0, 4)], True), ([(0, 11), (11, 0)], True),
    ([(1, 4), (4, 7)], False), ([(0, 5), (4, 7)], False), ([(0, 4), (4, 6)], False),
    ([(0, 4), (5, 6)], False)])
def test_tiling_check(spans, ok):
    f64, i64 = (fd._dtype_code(torch.zeros(0, dtype=t)) for t in (torch.float64, torch.int64))
    meta = [[1, 3, D, D, start, size, C, 0, 1, f64, f64, i64] for start, size in spans]
    assert all(len(r) == fd._META for r in meta)
    problem = fd._global_problem(meta)
    assert (problem is None) == ok, problem


def test_shard_range_splits_evenly():
    spans = [fd.shard_range(11, r, 3) for r in range(3)]
    assert spans == [(0, 4), (4, 4), (8, 3)]
    assert [fd.shard_range(2, r, 3) for r in range(3)] == [(0, 1), (1, 1), (2, 0)]


# ------------------------------------------------------------------- example

def _example_epoch(cmd, env):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    (rc, log), = run_bounded([proc], EXAMPLE_TIMEOUT_S)
    assert rc == 0, log[-4000:]
    lines = [ln.split() for ln in log.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 1, log[-4000:]
    return {k: float(v) for k, v in zip(lines[0][2:8:2], lines[0][3:8:2])}


def test_torchrun_example_trains():
    """The torchrun example runs, learns, and its two ranks train exactly what one
    process trains (same global batches, same seeded init, summed backbone grads)."""
    # --scale/--margin pass through torchrun (--s/--m were ambiguous prefixes of its own options)
    example = ["-m", "fused_margin.examples.sharded_train", "--epochs", "1", "--scale", "16",
               "--margin", "0.3"]
    env = loopback_env(2)
    two = _example_epoch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_addr={env['MASTER_ADDR']}",
                          f"--master_port={env['MASTER_PORT']}"] + example, env)
    env = loopback_env(1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    one = _example_epoch([sys.executable] + example, env)
    assert two["test_acc"] > 0.5, two
    assert abs(two["loss"] - one["loss"]) < 1e-2 and abs(two["test_acc"] - one["test_acc"]) < 0.02


# gloo's worker threads live as long as the ProcessGroup object; one that outlives
# destroy_process_group() may free its last tensor while the interpreter shuts down,
# which aborts the process (seen in CI as a rare SIGABRT at the example's exit).
_THREADS = """
import os
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads:", sorted(t for t in threads if "gloo" in t))
"""
_MODULE_ACROSS_DESTROY = """
import torch, torch.distributed as dist
from fused_margin.nn import ShardedMarginLoss
dist.init_process_group("gloo")
head = ShardedMarginLoss(6, 11, kind="arcface", s=16.0, m=0.3)
x = torch.randn(5, 6, requires_grad=True)
head(x, torch.arange(5)).backward()
dist.destroy_process_group()   # head is still alive here
"""
_EXAMPLE = """
from fused_margin.examples import sharded_train
sharded_train.main(["--epochs", "1"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
@pytest.mark.parametrize("script", [_MODULE_ACROSS_DESTROY, _EXAMPLE], ids=["module", "example"])
def test_destroy_process_group_releases_gloo_threads(script):
    """Neither a live ShardedMarginLoss nor the example keeps the group past its destruction."""
    env = loopback_env(1, rank=0)
    proc = subprocess.Popen([sys.executable, "-c", script + _THREADS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (rc, log), = run_bounded([proc], EXAMPLE_TIMEOUT_S)
    assert rc == 0, log[-4000:]
    assert "gloo threads: []" in log, log[-4000:]


# world size 1 over NCCL: the same code path as the gloo groups, on the Triton partials
_NCCL_WORLD_ONE = """
import torch, torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before the group)
from fused_margin import distributed as fd
from fused_margin.reference import angular as ref
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 64, generator=g).cuda().requires_grad_()
w = torch.randn(1000, 64, generator=g).cuda().requires_grad_()
y = torch.randint(0, 1000, (37,), generator=g).cuda()
y[3] = -100
for kind, kw in (("arcface", dict(s=30.0, m=0.5)), ("elm", dict(s=30.0, m=0.3, elm_lambda=0.5)),
                 ("arcgrad", dict(s=8.0))):
    for rate in (1.0, 0.5):
        x.grad = w.grad = None
        loss = fd.margin_cross_entropy(x, w, y, class_start=0, num_classes=1000, kind=kind,
                                       sample_rate=rate, **kw)
        loss.backward()
        if rate < 1:  # PartialFC: finite, and dropped classes get no gradient
            assert torch.isfinite(loss) and bool((w.grad.abs().sum(1) == 0).any()), kind
            continue
        x2 = x.detach().double().requires_grad_()
        w2 = w.detach().double().requires_grad_()
        want = ref.margin_cross_entropy(x2, w2, y, kind=kind, **kw)
        want.backward()
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-3, atol=1e-5)
dist.destroy_process_group()
print("nccl world 1: ok")
"""


@requires_cuda
def test_nccl_world_one_matches_single_process():
    """On a GPU: distributed.margin_cross_entropy over NCCL (world 1), Triton
    partials, equals the single-process reference loss and gradients."""
    proc = subprocess.Popen([sys.executable, "-c", _NCCL_WORLD_ONE],
                            env=loopback_env(1, rank=0), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    (rc, log), = run_bounded([proc], EXAMPLE_TIMEOUT_S)
    assert rc == 0 and "nccl world 1: ok" in log, log[-4000:]


if __name__ == "__main__":
    _worker(sys.argv[1])


# issue 15 item 6 for the sharded module: under autocast its features and weight take the
# autocast dtype, as nn's margin modules do (world 1 over gloo, in its own process)
_SHARDED_AUTOCAST = """
import torch, torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before the group)
import fused_margin as fm
from fused_margin.nn import ShardedMarginLoss
dist.init_process_group("gloo")
torch.manual_seed(0)
head = ShardedMarginLoss(8, 7, kind="arcface", s=8.0, m=0.3, backend=BACKEND)
x = torch.randn(10, 8, requires_grad=True)
y = torch.arange(10) % 7
with torch.autocast("cpu", dtype=torch.bfloat16):
    h = torch.nn.functional.linear(x, torch.eye(8))
    assert h.dtype == torch.bfloat16
    loss = head(h, y)
loss.backward()
assert loss.dtype == torch.float32 and torch.isfinite(loss)
assert x.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
want = fm.margin_cross_entropy(h.detach(), head.weight.detach().bfloat16(), y, kind="arcface",
                               s=8.0, m=0.3, backend="reference")
torch.testing.assert_close(loss.detach(), want, rtol=2e-2, atol=2e-3)
dist.destroy_process_group()
print("sharded autocast ok")
"""


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sharded_module_under_cpu_autocast(backend):
    if not backend_runs_here(backend):
        pytest.skip(f"{backend} does not run here")
    env = loopback_env(1, rank=0)
    script = _SHARDED_AUTOCAST.replace("BACKEND", repr(backend))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    (rc, log), = run_bounded([proc], EXAMPLE_TIMEOUT_S)
    assert rc == 0 and "sharded autocast ok" in log, log[-4000:]
