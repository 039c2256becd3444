"""Speed and peak memory of the fused margin cross-entropy on a CUDA GPU.

Times forward + backward of `margin_cross_entropy` with backend="triton" against the
eager reference, torch.compile of the reference, and the floor (the three matmuls
every implementation does at least: x @ W.T, g @ W, g.T @ x), with
triton.testing.do_bench (median, 20th and 80th percentiles). Peak memory is
torch.cuda.max_memory_allocated during one forward + backward, less what was
allocated before it (the inputs). A run that runs out of memory is reported as
"OOM". Writes JSON (device name, date, versions, one row per measurement) to --out
and a bar plot beside it (--plot).

    python bench/bench_angular_cuda.py --out bench/results/angular_h100.json

Needs a CUDA device; `--help` works anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

from common import cuda_measure, cuda_problem, floor_step

METHODS = ("triton", "eager", "compile", "floor")
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--plot", default=None, help="PNG file; None: --out with .png")
    p.add_argument("--n", type=int, default=4096, help="rows (batch size)")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--c", type=int, nargs="+", default=[100_000, 1_000_000], help="classes")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--kind", default="arcface", help="margin kind (docs/api.md)")
    p.add_argument("--s", type=float, default=64.0)
    p.add_argument("--m", type=float, default=0.5)
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 float32 matmuls (torch and the Triton kernels alike)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return p.parse_args(argv)


def _setup(method, N, D, C, dtype, kind, s, m):
    """(step, tensors to zero the grads of) for one forward + backward."""
    import torch

    import fused_margin as fm
    from fused_margin.reference import angular as ref

    x, W, y = cuda_problem(N, D, C, dtype)
    kw = dict(kind=kind, s=s, m=m)
    if method == "floor":
        return floor_step(x, W), None
    if method == "triton":
        def fn(a, b):
            return fm.margin_cross_entropy(a, b, y, backend="triton", **kw)
    elif method == "eager":
        def fn(a, b):
            return ref.margin_cross_entropy(a, b, y, **kw)
    else:
        compiled = torch.compile(lambda a, b: ref.margin_cross_entropy(a, b, y, **kw))

        def fn(a, b):
            return compiled(a, b)

    def step():
        fn(x, W).backward()
    return step, [x, W]


def measure(method, N, D, C, dtype, args):
    """{"ms", "ms_p20", "ms_p80", "peak_mb"}, or {"error": "OOM" / message}."""
    return cuda_measure(lambda: _setup(method, N, D, C, dtype, args.kind, args.s, args.m),
                        args.warmup, args.rep)


def plot(rows, path, methods=METHODS, title=None):
    """Bars per (dtype, C) group and method: time and peak memory, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["C"]) for r in rows}, key=lambda g: (g[0], g[1]))
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(methods))
    for k, (key, label) in enumerate((("ms", "forward + backward, ms (median)"),
                                      ("peak_mb", "peak memory over inputs, MiB"))):
        ax = axes[k]
        for i, meth in enumerate(methods):
            vals = []
            for g in groups:
                r = next((r for r in rows if (r["dtype"], r["C"]) == g and r["method"] == meth),
                         None)
                vals.append(r[key] if r and key in r else math.nan)
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, vals, width, label=meth)
            for xv, v in zip(xs, vals):
                if math.isnan(v):
                    ax.text(xv, 0.02, "OOM/err", rotation=90, ha="center", va="bottom",
                            fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{d}\nC={c:,}" for d, c in groups])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"margin_cross_entropy ({rows[0]['kind']}), N={rows[0]['N']}, "
                 f"D={rows[0]['D']}, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench_angular_cuda.py needs a CUDA device (and TRITON_INTERPRET unset)")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    device = torch.cuda.get_device_name()
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, DTYPES[name])
        for C in args.c:
            for method in args.methods:
                res = measure(method, args.n, args.d, C, dtype, args)
                row = dict(method=method, dtype=name, N=args.n, D=args.d, C=C, kind=args.kind,
                           device=device, **res)
                rows.append(row)
                shown = res.get("error") or f"{res['ms']:.3f} ms, {res['peak_mb']:.0f} MiB"
                print(f"{name:5s} C={C:>9,d} {method:8s} {shown}", flush=True)
    out = dict(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               torch=torch.__version__, triton=triton.__version__, tf32=args.tf32,
               args=vars(args), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    plot(rows, args.plot or os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
