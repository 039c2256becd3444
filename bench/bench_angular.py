"""CPU benchmark of margin_cross_entropy (arcface, fp32, forward + backward).

Each provider runs in its own subprocess so that its peak memory can be read
from ru_maxrss: "extra peak" is ru_maxrss at the end minus ru_maxrss right after
set-up (inputs built, nothing run). Providers:
  cpu        the C++ backend as dispatched (forward with gradients, row tiles)
  cpu_tiled  the C++ backend with FUSED_MARGIN_CPU_FUSED=0 (class tiles, recomputing backward)
  eager      the PyTorch reference
  compile    torch.compile of the reference (or the reason it could not run)
  floor      the three matmuls alone: x @ W.T [N, C], G @ W, G.T @ x
  floor_tiled the same three matmuls over class blocks of 4096 into one reused [N, 4096]
             scratch (no [N, C] allocation: the page faults of a fresh 200 MB buffer
             per call are part of `floor` but of no tiled kernel)

    python bench/bench_angular.py                      # N=1024 D=256 C=50000
    python bench/bench_angular.py --C 5000 --repeats 3 # quick

Writes bench/results/angular_cpu.json and .png and prints a Markdown table.
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

from common import machine, run_worker, save_results, timed

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PROVIDERS = ("cpu", "cpu_tiled", "eager", "compile", "floor", "floor_tiled")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(provider: str, N: int, D: int, C: int, repeats: int, warmup: int) -> dict:
    if provider == "cpu_tiled":
        os.environ["FUSED_MARGIN_CPU_FUSED"] = "0"
    import torch

    import fused_margin as fm
    from fused_margin.reference import angular as ref

    torch.manual_seed(0)
    x = torch.randn(N, D, requires_grad=True)
    W = torch.randn(C, D, requires_grad=True)
    y = torch.randint(0, C, (N,))
    kw = dict(kind="arcface", s=64.0, m=0.5)

    if provider in ("cpu", "cpu_tiled"):
        def step():
            fm.margin_cross_entropy(x, W, y, backend="cpu", **kw).backward()
    elif provider == "eager":
        def step():
            ref.margin_cross_entropy(x, W, y, **kw).backward()
    elif provider == "compile":
        compiled = torch.compile(ref.margin_cross_entropy)

        def step():
            compiled(x, W, y, **kw).backward()
    elif provider == "floor":
        xd, Wd = x.detach(), W.detach()

        def step():
            G = xd @ Wd.T
            gx = G @ Wd  # noqa: F841
            gw = G.T @ xd  # noqa: F841
    elif provider == "floor_tiled":
        xd, Wd, B = x.detach(), W.detach(), 4096
        buf = torch.empty(N * B)
        gx, gw = torch.empty(N, D), torch.empty(C, D)

        def step():
            gx.zero_()
            for c0 in range(0, C, B):
                cb = min(B, C - c0)
                G = buf[:N * cb].view(N, cb)
                torch.mm(xd, Wd[c0:c0 + cb].T, out=G)
                gx.addmm_(G, Wd[c0:c0 + cb])
                torch.mm(G.T, xd, out=gw[c0:c0 + cb])
    else:
        raise ValueError(provider)

    base = _maxrss_mb()
    t0 = time.perf_counter()
    for _ in range(warmup):
        x.grad = W.grad = None
        step()
    first = time.perf_counter() - t0
    times = timed(step, repeats, (x, W))
    peak = _maxrss_mb()
    return dict(loadavg=os.getloadavg(), provider=provider, min_s=min(times), median_s=statistics.median(times),
                times_s=times, warmup_s=first, rss_after_setup_mb=base, rss_peak_mb=peak,
                extra_peak_mb=peak - base, threads=torch.get_num_threads())




def run_provider(provider: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--N", str(args.N),
           "--D", str(args.D), "--C", str(args.C), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    return run_worker(cmd, args.timeout, dict(provider=provider))


def table(rows, eager, floor, floor_tiled) -> str:
    out = ["| provider | min (s) | median (s) | x floor | x floor_tiled | x eager | "
           "extra peak (MB) | % of eager's extra |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['provider']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        xf = f"{r['min_s'] / floor['min_s']:.2f}" if floor else "-"
        xt = f"{r['min_s'] / floor_tiled['min_s']:.2f}" if floor_tiled else "-"
        xe = f"{r['min_s'] / eager['min_s']:.2f}" if eager else "-"
        pm = f"{100 * r['extra_peak_mb'] / eager['extra_peak_mb']:.1f}" if eager else "-"
        out.append(f"| {r['provider']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {xf} | {xt} | {xe} | "
                   f"{r['extra_peak_mb']:.0f} | {pm} |")
    return "\n".join(out)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["provider"] for r in ok]
    a.bar(names, [r["median_s"] for r in ok], color="tab:blue", label="median")
    a.scatter(names, [r["min_s"] for r in ok], color="black", zorder=3, label="min")
    a.set_ylabel("seconds per forward + backward")
    a.legend()
    b.bar(names, [r["extra_peak_mb"] for r in ok], color="tab:orange")
    b.set_ylabel("extra peak RSS (MB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--C", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--timeout", type=int, default=1200, help="seconds per provider")
    p.add_argument("--out", default=os.path.join(RESULTS, "angular_cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        res = worker(args.worker, args.N, args.D, args.C, args.repeats, args.warmup)
        print("RESULT " + json.dumps(res), flush=True)
        return

    rows = []
    for prov in args.providers.split(","):
        print(f"running {prov} ...", file=sys.stderr, flush=True)
        rows.append(run_provider(prov, args))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    by = {r["provider"]: r for r in rows if "error" not in r}
    eager, floor = by.get("eager"), by.get("floor")
    md = table(rows, eager, floor, by.get("floor_tiled"))
    title = (f"margin_cross_entropy arcface fp32 fwd+bwd, N={args.N} D={args.D} C={args.C}, "
             f"{os.cpu_count()} CPU threads")
    info = dict(title=title, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                machine=machine(), shape=dict(N=args.N, D=args.D, C=args.C),
                repeats=args.repeats, warmup=args.warmup, results=rows, markdown=md)
    if eager and floor and "cpu" in by:
        c = by["cpu"]
        info["targets"] = {
            "time <= 1.3 x floor": c["min_s"] <= 1.3 * floor["min_s"],
            **({"time <= 1.3 x floor_tiled": c["min_s"] <= 1.3 * by["floor_tiled"]["min_s"]}
               if "floor_tiled" in by else {}),
            "time <= 0.7 x eager": c["min_s"] <= 0.7 * eager["min_s"],
            "extra peak <= 10% of eager's": c["extra_peak_mb"] <= 0.1 * eager["extra_peak_mb"],
        }
    save_results(args.out, info, plot, rows, title, md)
    if "targets" in info:
        print("\n" + "\n".join(f"- {k}: {'met' if v else 'NOT met'}" for k, v in info["targets"].items()))
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
