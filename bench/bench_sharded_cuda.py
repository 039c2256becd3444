"""Speed and peak memory of one rank of the class-sharded margin loss on a CUDA GPU.

World size 1 over NCCL, so the same code path as a multi-GPU job without a second
GPU: fused_margin.distributed.margin_cross_entropy with the Triton partials
("triton"), with the eager tiles ("tiled", backend="reference"), the
single-process fused loss on the same shard ("single", what the distributed
bookkeeping adds to), and the floor (x @ W.T, g @ W, g.T @ x). C is the shard's
class count C_r: 125 000 and 1 250 000 are the 1M- and 10M-class rows of the
docs/distributed.md's table at 8 ranks. --rates < 1 adds PartialFC sampling. Timing and memory
as bench_angular_cuda.py (common.cuda_measure). Writes JSON and a PNG.

    python bench/bench_sharded_cuda.py --out bench/results/sharded_h100.json

Needs a CUDA device; `--help` works anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys

from bench_angular_cuda import DTYPES, plot
from common import cuda_measure, cuda_problem, floor_step

METHODS = ("triton", "tiled", "single", "floor")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, default=8192, help="global batch")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--c", type=int, nargs="+", default=[125_000, 1_250_000],
                   help="classes on this rank (C_r)")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1], help="sample_rate")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--kind", default="arcface")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return p.parse_args(argv)


def _setup(method, N, D, C, rate, dtype, kind):
    import torch

    import fused_margin as fm
    from fused_margin import distributed as fd

    x, W, y = cuda_problem(N, D, C, dtype)
    kw = dict(kind=kind, s=64.0, m=0.5)
    if method == "floor":
        return floor_step(x, W), None
    if method == "single":
        if rate < 1:
            raise ValueError("the single-process loss has no sampling")

        def single():
            fm.margin_cross_entropy(x, W, y, backend="triton", **kw).backward()
        return single, [x, W]
    backend = "triton" if method == "triton" else "reference"
    sampler = torch.Generator(device="cuda").manual_seed(1)

    def sharded():
        fd.margin_cross_entropy(x, W, y, class_start=0, num_classes=C, sample_rate=rate,
                                generator=sampler, backend=backend, **kw).backward()
    return sharded, [x, W]


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (before the group: docs/distributed.md, "a pitfall")
    import triton

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_sharded_cuda.py needs a CUDA device (and TRITON_INTERPRET unset)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.cuda.get_device_name()
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, DTYPES[name])
        for C in args.c:
            for rate in args.rates:
                for method in args.methods:
                    if rate < 1 and method in ("single", "floor"):
                        continue
                    res = cuda_measure(lambda: _setup(method, args.n, args.d, C, rate, dtype,
                                                      args.kind), args.warmup, args.rep)
                    rows.append(dict(method=method, dtype=f"{name} rate {rate:g}", N=args.n,
                                     D=args.d, C=C, rate=rate, kind=args.kind, device=device,
                                     **res))
                    shown = res.get("error") or f"{res['ms']:.3f} ms, {res['peak_mb']:.0f} MiB"
                    print(f"{name:5s} C_r={C:>10,d} rate={rate:<4g} {method:7s} {shown}",
                          flush=True)
    dist.destroy_process_group()
    out = dict(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               torch=torch.__version__, triton=triton.__version__, world_size=1,
               backend="nccl", args=vars(args), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    plot(rows, os.path.splitext(args.out)[0] + ".png", METHODS,
         f"one rank of distributed.margin_cross_entropy ({args.kind}), world 1 over NCCL, "
         f"N={args.n}, D={args.d}, {device}")


if __name__ == "__main__":
    main()
