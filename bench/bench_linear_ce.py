"""CPU benchmark of plain linear cross-entropy (fp32, forward + backward):
fused_margin's C++ kernel in its linear mode against torch's own chunked
linear cross-entropy and the eager two-step form.

Each provider runs in its own subprocess so that its peak memory can be read
from ru_maxrss: "extra peak" is ru_maxrss at the end minus ru_maxrss right after
set-up (inputs built, nothing run). Providers:
  fused_margin    fm.margin_cross_entropy(x, W, y, kind="normface", s=1, normalize=False,
                  backend="cpu") (forward with gradients, row tiles, no N x C buffer)
  fused_margin_tiled  the same with FUSED_MARGIN_CPU_FUSED=0 (class tiles, recomputing backward)
  torch_chunked   torch.nn.functional.linear_cross_entropy(x, W, y,
                  options=torch.nn.LinearCrossEntropyOptions()) (torch's chunked path)
  eager           torch.nn.functional.cross_entropy(x @ W.T, y)
Every provider's loss is recorded, and checked against eager's.

    python bench/bench_linear_ce.py                      # N=1024 D=256 C=50000
    python bench/bench_linear_ce.py --C 5000 --repeats 3 # quick

Writes bench/results/linear_ce_cpu.json and .png and prints a Markdown table.
Not a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time

from common import machine, run_worker, save_results, time_memory_bars, timed

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PROVIDERS = ("fused_margin", "fused_margin_tiled", "torch_chunked", "eager")
COLORS = {"fused_margin": "tab:blue", "fused_margin_tiled": "tab:cyan",
          "torch_chunked": "tab:orange", "eager": "tab:gray"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(provider: str, N: int, D: int, C: int, repeats: int, warmup: int) -> dict:
    if provider == "fused_margin_tiled":
        os.environ["FUSED_MARGIN_CPU_FUSED"] = "0"
    import torch
    import torch.nn.functional as F

    import fused_margin as fm

    torch.manual_seed(0)
    x = torch.randn(N, D, requires_grad=True)
    W = (torch.randn(C, D) / D ** 0.5).requires_grad_(True)
    y = torch.randint(0, C, (N,))
    extra = {}

    if provider in ("fused_margin", "fused_margin_tiled"):
        def loss():
            return fm.margin_cross_entropy(x, W, y, kind="normface", s=1.0, normalize=False,
                                           backend="cpu")
    elif provider == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        extra["options"] = repr(opts)

        def loss():
            return F.linear_cross_entropy(x, W, y, options=opts)
    elif provider == "eager":
        def loss():
            return F.cross_entropy(x @ W.T, y)
    else:
        raise ValueError(provider)

    def step():
        loss().backward()

    base = _maxrss_mb()
    t0 = time.perf_counter()
    for _ in range(warmup):
        x.grad = W.grad = None
        step()
    first = time.perf_counter() - t0
    times = timed(step, repeats, (x, W))
    peak = _maxrss_mb()
    with torch.no_grad():
        value = float(loss())
    return dict(extra, loadavg=os.getloadavg(), provider=provider, loss=value,
                min_s=min(times), median_s=statistics.median(times), times_s=times,
                warmup_s=first, rss_after_setup_mb=base, rss_peak_mb=peak,
                extra_peak_mb=peak - base, threads=torch.get_num_threads())


def run_provider(provider: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--N", str(args.N),
           "--D", str(args.D), "--C", str(args.C), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    return run_worker(cmd, args.timeout, dict(provider=provider))


def table(rows, ref) -> str:
    out = ["| provider | min (s) | median (s) | x torch_chunked (median) | extra peak (MB) | "
           "x torch_chunked (peak) | loss | load avg (1 min) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['provider']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        xt = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-"
        xm = (f"{r['extra_peak_mb'] / ref['extra_peak_mb']:.2f}"
              if ref and ref["extra_peak_mb"] > 0 else "-")
        out.append(f"| {r['provider']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {xt} | "
                   f"{r['extra_peak_mb']:.0f} | {xm} | {r['loss']:.6f} | {r['loadavg'][0]:.2f} |")
    return "\n".join(out)


def plot(rows, path, title):
    ok = [r for r in rows if "error" not in r]
    time_memory_bars([r["provider"] for r in ok], [r["min_s"] for r in ok],
                     [r["median_s"] for r in ok], [r["extra_peak_mb"] for r in ok],
                     [COLORS.get(r["provider"], "tab:gray") for r in ok], path, title)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--C", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--timeout", type=int, default=1200, help="seconds per provider")
    p.add_argument("--out", default=os.path.join(RESULTS, "linear_ce_cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        res = worker(args.worker, args.N, args.D, args.C, args.repeats, args.warmup)
        print("RESULT " + json.dumps(res), flush=True)
        return

    start_info = machine()  # its load average is the one before any provider ran
    rows = []
    for prov in args.providers.split(","):
        print(f"running {prov} ...", file=sys.stderr, flush=True)
        rows.append(run_provider(prov, args))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    by = {r["provider"]: r for r in rows if "error" not in r}
    md = table(rows, by.get("torch_chunked"))
    title = (f"linear cross-entropy fp32 fwd+bwd, N={args.N} D={args.D} C={args.C}, "
             f"{os.cpu_count()} CPU threads (shared machine: see each row's load average)")
    info = dict(title=title, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                machine=start_info, shape=dict(N=args.N, D=args.D, C=args.C),
                repeats=args.repeats, warmup=args.warmup, results=rows, markdown=md,
                loadavg_at_end=os.getloadavg())
    if "eager" in by:
        info["losses_agree_with_eager"] = {
            k: abs(r["loss"] - by["eager"]["loss"]) <= 1e-4 * abs(by["eager"]["loss"])
            for k, r in by.items()}
    if "fused_margin" in by and "torch_chunked" in by:
        c, t = by["fused_margin"], by["torch_chunked"]
        info["targets"] = {
            "median time <= torch_chunked's": c["median_s"] <= t["median_s"],
            "extra peak <= torch_chunked's": c["extra_peak_mb"] <= t["extra_peak_mb"],
        }
    save_results(args.out, info, plot, rows, title, md)
    if "targets" in info:
        print("\n" + "\n".join(f"- {k}: {'met' if v else 'NOT met'}"
                               for k, v in info["targets"].items()))
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
