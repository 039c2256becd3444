"""What fused_margin.compat.pml's PML layout (W as [D, C], the kernels given
W.t()) costs against fused_margin.nn's [C, D], on the cpu backend.

The C++ kernels take a contiguous [C, D] weight: given W.t() they make one
[C, D] copy per forward (csrc/angular.cpp, `w.to(ct).contiguous()`), and the
[C, D] gradient they return is transposed back into W.grad's [D, C] layout
by autograd. The Triton kernels read W through its strides (no copy); this
script measures the CPU cost only.

    python bench/bench_compat_layout.py [--json bench/results/compat_layout_cpu.json]

Forward + backward of ArcFace (s=64, m=0.5), fp32, 2 threads, min and median
over repeats after a warm-up, the two layouts interleaved.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
import fused_margin as fm  # noqa: E402
from fused_margin.compat import pml  # noqa: E402

SHAPES = [(512, 128, 10_000), (1024, 256, 50_000)]


def step_fn(module, x, y):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, y).backward()
    return step


def measure(step, warmup: int, repeats: int):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for n, d, c in SHAPES:
        x = torch.randn(n, d, requires_grad=True)
        y = torch.randint(0, c, (n,))
        ours = fm.nn.ArcFace(d, c, s=64.0, m=0.5, backend="cpu")
        compat = pml.ArcFaceLoss(c, d, margin=math.degrees(0.5), scale=64, backend="cpu")
        with torch.no_grad():
            compat.W.copy_(ours.weight.t())
        steps = {"nn.ArcFace, W [C, D]": step_fn(ours, x, y),
                 "compat.pml.ArcFaceLoss, W [D, C] (W.t() given)": step_fn(compat, x, y)}
        times = {k: [] for k in steps}
        for k, st in steps.items():
            measure(st, 2, 0)
        for _ in range(args.repeats):  # interleaved, so drift hits both
            for k, st in steps.items():
                times[k] += measure(st, 0, 1)
        # the two copies the layout adds, timed alone: W.t() -> [C, D] (the C++ forward's
        # contiguous()), and a [C, D] gradient into W.grad's [D, C] layout (autograd)
        g = torch.randn(c, d)
        copies = {"copy alone: W.t().contiguous()": lambda: compat.W.detach().t().contiguous(),
                  "copy alone: [C, D] grad -> [D, C]": lambda: g.t().contiguous()}
        for k, fn in copies.items():
            times[k] = measure(fn, 2, 5 * args.repeats)
        base = min(times["nn.ArcFace, W [C, D]"])
        for k, ts in times.items():
            ts = sorted(ts)
            rows.append(dict(shape=dict(N=n, D=d, C=c), layout=k, min_s=ts[0],
                             median_s=ts[len(ts) // 2], x_nn_min=ts[0] / base))
            print(f"N={n} D={d} C={c}  {k:48s} min {ts[0]:.4f} s  median "
                  f"{ts[len(ts) // 2]:.4f} s  x nn {ts[0] / base:.3f}")
    out = dict(title="PML layout (W [D, C]) vs nn layout (W [C, D]), cpu backend, arcface fp32 "
                     "forward + backward", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               machine=common.machine(), threads=args.threads, repeats=args.repeats, results=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
