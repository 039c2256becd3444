"""Speed and peak memory of the fused batched Sinkhorn and Wasserstein loss on a CUDA GPU.

Times, for each (N, K), `sinkhorn` (plans, forward only) and `wasserstein_loss` with a
distribution target (forward + backward) with backend="triton" (envelope-theorem
backward) against the eager reference (autograd through the unrolled iterations),
with triton.testing.do_bench (median, 20th and 80th percentiles), a fixed n_iter and
no tol (so both run the same iterations). Peak memory is
torch.cuda.max_memory_allocated during one call, less what was allocated before it
(the inputs). A run that fails or runs out of memory is a row with an "error".
Writes JSON (device name, date, versions, one row per measurement) to --out.

    python bench/bench_sinkhorn_cuda.py --out bench/results/sinkhorn_h100.json

Needs a CUDA device; `--help` works anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from common import cuda_measure

METHODS = ("triton", "eager")
OPS = ("sinkhorn", "wasserstein")
DTYPES = {"fp32": "float32", "fp64": "float64"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, nargs="+", default=[256, 4096], help="batch sizes")
    p.add_argument("--k", type=int, nargs="+", default=[10, 100, 500], help="class counts")
    p.add_argument("--n-iter", type=int, default=100, help="Sinkhorn iterations")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--per-sample-cost", action="store_true",
                   help="a [N, K, K] cost instead of one shared [K, K]")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return p.parse_args(argv)


def _setup(op, method, N, K, dtype, args):
    """(step, tensors to zero the grads of) for one call."""
    import torch

    import fused_margin as fm

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (N, K, K) if args.per_sample_cost else (K, K)
    cost = torch.rand(*shape, device="cuda", dtype=dtype, generator=gen)
    target = torch.rand(N, K, device="cuda", dtype=dtype, generator=gen) + 0.05
    target = target / target.sum(1, keepdim=True)
    backend = "triton" if method == "triton" else "reference"
    kw = dict(eps=args.eps, n_iter=args.n_iter, backend=backend)
    if op == "sinkhorn":
        a = torch.rand(N, K, device="cuda", dtype=dtype, generator=gen) + 0.05
        a = a / a.sum(1, keepdim=True)

        def step():
            with torch.no_grad():
                fm.sinkhorn(a, target, cost, **kw)
        return step, None
    z = torch.randn(N, K, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)

    def step():
        fm.wasserstein_loss(z, target, cost, **kw).backward()
    return step, [z]


def measure(op, method, N, K, dtype, args):
    """{"ms", "ms_p20", "ms_p80", "peak_mb"}, or {"error": "OOM" / message}."""
    return cuda_measure(lambda: _setup(op, method, N, K, dtype, args), args.warmup, args.rep)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_sinkhorn_cuda.py needs a CUDA device (and TRITON_INTERPRET unset)")
    device = torch.cuda.get_device_name()
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, DTYPES[name])
        for op in args.ops:
            for N in args.n:
                for K in args.k:
                    for method in args.methods:
                        res = measure(op, method, N, K, dtype, args)
                        rows.append(dict(op=op, method=method, dtype=name, N=N, K=K,
                                         n_iter=args.n_iter, eps=args.eps,
                                         per_sample_cost=args.per_sample_cost, device=device,
                                         **res))
                        shown = res.get("error") or f"{res['ms']:.3f} ms, {res['peak_mb']:.0f} MiB"
                        print(f"{name} {op:11s} N={N:>6d} K={K:>4d} {method:6s} {shown}",
                              flush=True)
    out = dict(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               torch=torch.__version__, triton=triton.__version__, args=vars(args), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
