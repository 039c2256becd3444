"""fused_margin.compat.insightface against a faithful copy of insightface's
arcface_torch code (losses.py and partial_fc_v2.py at commit 7fadd42: the
formulas and autograd as written there; only .cuda() and the float32 buffers
follow the inputs' device and dtype), in 2-rank gloo groups on CPU.

Run as a script (`_worker`), one rank of the group; the tests compare what the
ranks saved. Harness: tests/test_distributed.py's.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from datetime import timedelta

import pytest
import torch

import fused_margin as fm
from fused_margin.compat import insightface as fi

WORLD, D = 2, 6
GROUP_TIMEOUT_S, COLLECTIVE_TIMEOUT_S = 150, 60
# name -> (num_classes, margin (s, m1, m2, m3), sample_rate, labels per rank)
CASES = {
    "arcface": (11, (16.0, 1.0, 0.5, 0.0), 1.0, ([3, 0, 10, 7, 4], [5, 5, 2, 9, 1])),
    "arcface-s64": (11, (64.0, 1.0, 0.5, 0.0), 1.0, ([3, 0, 10, 7, 4], [5, 5, 2, 9, 1])),
    "cosface-ignores-m1-m2": (11, (16.0, 0.8, 0.3, 0.35), 1.0,
                              ([3, 0, 10, 7, 4], [5, 5, 2, 9, 1])),
    # every class is a target: insightface keeps them all (int(rate * C_r) < P), so do we
    "arcface-sampled": (8, (16.0, 1.0, 0.4, 0.0), 0.5, ([0, 1, 2, 3, 4], [5, 6, 7, 0, 1])),
}
BACKENDS = ("cpu", "reference")


# ------------------------------------------- insightface, as written (the oracle)

class TheirCombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        index_positive = torch.where(labels != -1)[0]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty = dirty.to(logits.dtype)
                mask = torch.ones([index_positive.size(0), logits.size(1)], dtype=logits.dtype,
                                  device=logits.device)
                mask.scatter_(1, labels[index_positive], 0)
                dirty[index_positive] *= mask
                tensor_mul = 1 - dirty
            logits = tensor_mul * logits
        target_logit = logits[index_positive, labels[index_positive].view(-1)]
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                target_logit.arccos_()
                logits.arccos_()
                final_target_logit = target_logit + self.m2
                logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
                logits.cos_()
            logits = logits * self.s
        elif self.m3 > 0:
            final_target_logit = target_logit - self.m3
            logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
            logits = logits * self.s
        else:
            raise
        return logits


class TheirDistCrossEntropyFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, label):
        import torch.distributed as distributed
        batch_size = logits.size(0)
        max_logits, _ = torch.max(logits, dim=1, keepdim=True)
        distributed.all_reduce(max_logits, distributed.ReduceOp.MAX)
        logits.sub_(max_logits)
        logits.exp_()
        sum_logits_exp = torch.sum(logits, dim=1, keepdim=True)
        distributed.all_reduce(sum_logits_exp, distributed.ReduceOp.SUM)
        logits.div_(sum_logits_exp)
        index = torch.where(label != -1)[0]
        loss = torch.zeros(batch_size, 1, dtype=logits.dtype, device=logits.device)
        loss[index] = logits[index].gather(1, label[index])
        distributed.all_reduce(loss, distributed.ReduceOp.SUM)
        ctx.save_for_backward(index, logits, label)
        return loss.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, loss_gradient):
        index, logits, label = ctx.saved_tensors
        batch_size = logits.size(0)
        one_hot = torch.zeros(size=[index.size(0), logits.size(1)], dtype=logits.dtype,
                              device=logits.device)
        one_hot.scatter_(1, label[index], 1)
        logits[index] -= one_hot
        logits.div_(batch_size)
        return logits * loss_gradient.item(), None


class TheirAllGatherFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, *gather_list):
        import torch.distributed as distributed
        gather_list = list(gather_list)
        distributed.all_gather(gather_list, tensor)
        return tuple(gather_list)

    @staticmethod
    def backward(ctx, *grads):
        import torch.distributed as distributed
        grad_list = list(grads)
        rank = distributed.get_rank()
        grad_out = grad_list[rank]
        dist_ops = [
            distributed.reduce(grad_out, rank, distributed.ReduceOp.SUM, async_op=True)
            if i == rank else
            distributed.reduce(grad_list[i], i, distributed.ReduceOp.SUM, async_op=True)
            for i in range(distributed.get_world_size())]
        for _op in dist_ops:
            _op.wait()
        grad_out *= len(grad_list)
        return (grad_out, *[None for _ in range(len(grad_list))])


class TheirPartialFC_V2(torch.nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0):
        super().__init__()
        import torch.distributed as distributed
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.embedding_size, self.sample_rate = embedding_size, sample_rate
        self.num_local = num_classes // self.world_size + int(
            self.rank < num_classes % self.world_size)
        self.class_start = num_classes // self.world_size * self.rank + min(
            self.rank, num_classes % self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.margin_softmax = margin_loss

    def sample(self, labels, index_positive):
        with torch.no_grad():
            positive = torch.unique(labels[index_positive], sorted=True)
            if self.num_sample - positive.size(0) >= 0:
                perm = torch.rand(size=[self.num_local])
                perm[positive] = 2.0
                index = torch.topk(perm, k=self.num_sample)[1]
                index = index.sort()[0]
            else:
                index = positive
            self.weight_index = index
            labels[index_positive] = torch.searchsorted(index, labels[index_positive])
        return self.weight[self.weight_index]

    def forward(self, local_embeddings, local_labels):
        import torch.distributed as distributed
        from torch.nn.functional import linear, normalize
        local_labels.squeeze_()
        local_labels = local_labels.long()
        batch_size = local_embeddings.size(0)
        dt = local_embeddings.dtype
        _gather_embeddings = [torch.zeros((batch_size, self.embedding_size), dtype=dt)
                              for _ in range(self.world_size)]
        _gather_labels = [torch.zeros(batch_size).long() for _ in range(self.world_size)]
        _list_embeddings = TheirAllGatherFunc.apply(local_embeddings, *_gather_embeddings)
        distributed.all_gather(_gather_labels, local_labels)
        embeddings = torch.cat(_list_embeddings)
        labels = torch.cat(_gather_labels)
        labels = labels.view(-1, 1)
        index_positive = (self.class_start <= labels) & (
            labels < self.class_start + self.num_local)
        labels[~index_positive] = -1
        labels[index_positive] -= self.class_start
        weight = self.sample(labels, index_positive) if self.sample_rate < 1 else self.weight
        norm_embeddings = normalize(embeddings)
        norm_weight_activated = normalize(weight)
        logits = linear(norm_embeddings, norm_weight_activated)
        logits = logits.clamp(-1, 1)
        logits = self.margin_softmax(logits, labels)
        return TheirDistCrossEntropyFunc.apply(logits, labels)


# ------------------------------------------------------------- the ranks

def _inputs(name, rank):
    num_classes, _, _, labels = CASES[name]
    g = torch.Generator().manual_seed(1234)
    w_full = torch.randn(num_classes, D, generator=g, dtype=torch.float64)
    xs = [torch.randn(len(labels[r]), D, generator=g, dtype=torch.float64)
          for r in range(WORLD)]
    ys = [torch.tensor(lab) for lab in labels]
    # rank 0's first row points away from its class: theta + m past pi (no fallback there)
    xs[0][0] = -2 * w_full[ys[0][0]] + 0.05 * torch.randn(D, generator=g, dtype=torch.float64)
    return w_full, xs, ys


def _run(module, w_shard, x, y):
    module.weight.data = w_shard.clone()
    x = x.clone().requires_grad_()
    loss = module(x, y.clone())
    loss.backward()
    return loss.detach(), x.grad, module.weight.grad


def _worker(out_dir):
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    torch.set_default_dtype(torch.float64)  # both modules draw their weight in it
    results = {}
    for name, (num_classes, margin, rate, _) in CASES.items():
        w_full, xs, ys = _inputs(name, rank)
        theirs = TheirPartialFC_V2(TheirCombinedMarginLoss(*margin), D, num_classes, rate)
        lo, n = theirs.class_start, theirs.num_local
        results[("theirs", name)] = _run(theirs, w_full[lo:lo + n], xs[rank], ys[rank])
        for backend in BACKENDS:
            ours = fi.PartialFC_V2(fi.CombinedMarginLoss(*margin), D, num_classes, rate,
                                   backend=backend)
            assert (ours.class_start, ours.num_local) == (lo, n)
            results[(backend, name)] = _run(ours, w_full[lo:lo + n], xs[rank], ys[rank])
        # insightface's own margin object works as the margin_loss too
        ours = fi.PartialFC_V2(TheirCombinedMarginLoss(*margin), D, num_classes, rate)
        results[("their-margin", name)] = _run(ours, w_full[lo:lo + n], xs[rank], ys[rank])
    # the documented switch: fused_margin's combined margin, true gradient
    name = "arcface"
    w_full, xs, ys = _inputs(name, rank)
    ours = fi.PartialFC_V2(fi.CombinedMarginLoss(16.0, 0.9, 0.3, 0.1, variant="fused_margin"),
                           D, 11)
    lo, n = ours.class_start, ours.num_local
    results[("variant", name)] = _run(ours, w_full[lo:lo + n], xs[rank], ys[rank])
    # fp16=True: float16 operands into the sweep
    ours = fi.PartialFC_V2(fi.CombinedMarginLoss(*CASES[name][1]), D, 11, fp16=True)
    results[("fp16", name)] = _run(ours, w_full[lo:lo + n], xs[rank], ys[rank])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


_RESULTS: list = []


@pytest.fixture(scope="module")
def ranks():
    if not _RESULTS:
        from test_distributed import loopback_env, run_bounded

        out_dir = tempfile.mkdtemp(prefix="fm_insightface_")
        env = loopback_env(WORLD)
        procs = [subprocess.Popen([sys.executable, __file__, out_dir],
                                  env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
        done = run_bounded(procs, GROUP_TIMEOUT_S)
        if any(rc != 0 for rc, _ in done):
            pytest.fail("worker failed:\n" + "\n".join(
                f"--- rank {r} rc={rc}\n{log[-4000:]}" for r, (rc, log) in enumerate(done)))
        _RESULTS.extend(torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                        for r in range(WORLD))
    return _RESULTS


TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("who", BACKENDS + ("their-margin",))
@pytest.mark.parametrize("name", sorted(CASES))
def test_partial_fc_matches_insightface(ranks, name, who):
    for r in range(WORLD):
        ours, theirs = ranks[r][(who, name)], ranks[r][("theirs", name)]
        for a, b, what in zip(ours, theirs, ("loss", "embeddings' grad", "weight grad")):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"rank {r}: {what}: {m}")


def test_past_pi_has_no_fallback(ranks):
    """The arcface cases' first row has theta_y + m > pi: insightface (and so the
    drop-in) take cos(theta + m) there, which fused_margin's arcface kind does not."""
    w_full, xs, ys = _inputs("arcface", 0)
    cos = torch.nn.functional.cosine_similarity(xs[0][0], w_full[ys[0][0]], dim=0)
    assert math.acos(cos) + 0.5 > math.pi
    x = torch.cat(xs)
    y = torch.cat(ys)
    ours = fm.margin_cross_entropy(x, w_full, y, kind="arcface", s=16.0, m=0.5,
                                   backend="reference")
    assert not torch.allclose(ours, ranks[0][("theirs", "arcface")][0])


def test_variant_fused_margin_is_the_combined_kind(ranks):
    w_full, xs, ys = _inputs("arcface", 0)
    x = torch.cat(xs).requires_grad_()
    w = w_full.clone().requires_grad_()
    loss = fm.margin_cross_entropy(x, w, torch.cat(ys), kind="combined", s=16.0, m1=0.9, m2=0.3,
                                   m3=0.1, backend="reference")
    loss.backward()
    start = 0
    for r in range(WORLD):
        got_loss, got_x, got_w = ranks[r][("variant", "arcface")]
        n = xs[r].shape[0]
        lo = 0 if r == 0 else 6
        torch.testing.assert_close(got_loss, loss.detach(), **TOL)
        # the drop-in scales the embeddings' gradient by the world size, as insightface
        torch.testing.assert_close(got_x, WORLD * x.grad[start:start + n], **TOL)
        torch.testing.assert_close(got_w, w.grad[lo:lo + got_w.shape[0]], **TOL)
        start += n


def test_fp16_is_close_to_insightface(ranks):
    for r in range(WORLD):
        ours, theirs = ranks[r][("fp16", "arcface")], ranks[r][("theirs", "arcface")]
        assert ours[1].dtype == theirs[1].dtype == torch.float64  # grads in the inputs' dtype
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------ single process

@pytest.mark.parametrize("margin,threshold", [((64.0, 1.0, 0.5, 0.0), 0),
                                              ((30.0, 1.0, 0.2, 0.0), 0.3),
                                              ((64.0, 0.9, 0.4, 0.35), 0),
                                              ((64.0, 1.0, 0.0, 0.2), 0.2)])
def test_combined_margin_logits_match_insightface(margin, threshold):
    n, c = 12, 9
    cos = (torch.randn(n, c, dtype=torch.float64) / 2).clamp(-1, 1)
    labels = torch.randint(0, c, (n, 1))
    labels[3] = -1  # a row whose class lives on another rank
    cos[0, labels[0, 0]] = -0.99  # past pi once m is added
    a, b = cos.clone().requires_grad_(), cos.clone().requires_grad_()
    ours = fi.CombinedMarginLoss(*margin, interclass_filtering_threshold=threshold)
    theirs = TheirCombinedMarginLoss(*margin, interclass_filtering_threshold=threshold)
    za, zb = ours(a, labels), theirs(b * 1.0, labels)
    torch.testing.assert_close(za, zb, **TOL)
    g = torch.randn_like(za)
    za.backward(g)
    zb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    torch.testing.assert_close(a.detach(), cos)  # not modified in place


def test_combined_margin_raises_outside_insightface_branches():
    with pytest.raises(ValueError, match="variant='fused_margin'"):
        fi.CombinedMarginLoss(64, 0.9, 0.4, 0.0)
    with pytest.raises(RuntimeError):
        TheirCombinedMarginLoss(64, 0.9, 0.4, 0.0)(torch.zeros(2, 3), torch.zeros(2, 1).long())
    assert fi.CombinedMarginLoss(64, 0.9, 0.4, 0.0, variant="fused_margin").fused_kwargs()[
        "kind"] == "combined"
    with pytest.raises(ValueError, match="variant"):
        fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0, variant="pml")


def test_partial_fc_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialize distributed"):
        fi.PartialFC_V2(fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10)


def test_partial_fc_reads_margins_and_rejects_what_the_sweep_cannot_do():
    kw = fi._margin_kwargs(fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0))
    assert kw["kind"] == "cosface" and kw["m"] == 0.0 and callable(kw["row_margin"])
    assert fi._margin_kwargs(TheirCombinedMarginLoss(64, 0.9, 0.4, 0.35)) == dict(
        kind="cosface", s=64, m=0.35)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        fi._margin_kwargs(fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.3))
    with pytest.raises(TypeError, match="CombinedMarginLoss"):
        fi._margin_kwargs(lambda logits, labels: logits)


def test_row_margin_needs_cosface():
    from fused_margin import distributed as fd
    with pytest.raises(ValueError, match="row_margin"):
        fd.margin_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2).long(),
                                class_start=0, num_classes=4, kind="arcface",
                                row_margin=lambda c: c)


if __name__ == "__main__":
    _worker(sys.argv[1])
