"""Train a small MLP on scikit-learn's digits with a class-sharded margin loss.

    torchrun --nproc_per_node=2 -m fused_margin.examples.sharded_train --epochs 2 --scale 16 --margin 0.3
    python -m fused_margin.examples.sharded_train --epochs 2      # one process

Gloo on CPU (NCCL when CUDA is available and --device cuda). Every rank holds
the same backbone and a shard of the classifier's classes
(fused_margin.nn.ShardedMarginLoss); each step every rank takes its slice of
one global batch. The loss is the global-batch loss on every rank and each
rank's backbone gradient covers its own samples only, so the backbone
gradients are SUMMED over ranks (not averaged, as DDP would); the weight
shards are not reduced at all. Rank 0 prints the loss and accuracies.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any group exists: see init_group)
from torch import nn

from fused_margin.nn import ShardedMarginLoss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over ranks")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--kind", default="arcface")
    # not --s / --m: torchrun takes any unambiguous prefix of its own options
    # (--start-method, --max-restarts, ...) and would refuse these as ambiguous
    p.add_argument("--scale", type=float, default=16.0, help="s, the logit scale")
    p.add_argument("--margin", type=float, default=0.3, help="m, the kind's margin")
    p.add_argument("--embedding", type=int, default=32)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return p.parse_args(argv)


def init_group(device: str) -> None:
    # torch.distributed.nn.functional binds `group=group.WORLD` as default
    # arguments when it is first imported; torch.optim's first optimizer
    # imports it (through torch._dynamo). Imported after this call, those
    # defaults would hold the process group past destroy_process_group(), its
    # gloo threads would outlive main(), and one freeing its last tensor during
    # interpreter shutdown aborts the process. Hence the import above.
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" not in os.environ:  # plain `python -m`: a group of one over loopback
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1")
    if device == "cuda":  # before the group, so NCCL binds this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=120))


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    return (x[order[n_test:]], y[order[n_test:]]), (x[order[:n_test]], y[order[:n_test]])


@torch.no_grad()
def accuracy(backbone, head, x, y, rank, world, device) -> float:
    mine = torch.tensor_split(torch.arange(len(y)), world)[rank]
    pred = head.predict(backbone(x[mine].to(device)))
    counts = torch.tensor([(pred.cpu() == y[mine]).sum().item(), len(mine)], device=device,
                          dtype=torch.float64)
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device if args.device == "cpu"
                          else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    init_group(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    (x_train, y_train), (x_test, y_test) = load_digits(args.seed)

    torch.manual_seed(args.seed)  # the same backbone on every rank
    backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, args.embedding))
    head = ShardedMarginLoss(args.embedding, 10, kind=args.kind, s=args.scale, m=args.margin,
                             sample_rate=args.sample_rate, init_seed=args.seed,
                             generator=torch.Generator().manual_seed(args.seed + rank))
    backbone.to(device)
    head.to(device)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=args.lr)
    order_gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches on every rank
    for epoch in range(1, args.epochs + 1):
        start, total, steps = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(y_train), generator=order_gen)
        for batch in order.split(args.batch_size):
            mine = torch.tensor_split(batch, world)[rank]
            loss = head(backbone(x_train[mine].to(device)), y_train[mine].to(device))
            opt.zero_grad()
            loss.backward()
            for p in backbone.parameters():  # each rank holds its samples' share: sum them
                dist.all_reduce(p.grad)
            opt.step()
            total, steps = total + loss.item(), steps + 1
        train_acc = accuracy(backbone, head, x_train, y_train, rank, world, device)
        test_acc = accuracy(backbone, head, x_test, y_test, rank, world, device)
        if rank == 0:
            print(f"epoch {epoch}/{args.epochs}  loss {total / steps:.4f}  "
                  f"train_acc {train_acc:.4f}  test_acc {test_acc:.4f}  "
                  f"world {world}  {time.perf_counter() - start:.1f}s", flush=True)
    dist.barrier()  # gloo can abort if a rank tears down while a peer is still sending
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
