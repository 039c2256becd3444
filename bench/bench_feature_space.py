"""CPU benchmark of the feature-space kernels (fp32, forward + backward):
triplet_margin_loss (semi-hard mining, l2) and soft_nearest_neighbor_loss.

Each (workload, provider) runs in its own subprocess so that its peak memory
can be read from ru_maxrss: "extra peak" is ru_maxrss at the end minus
ru_maxrss right after set-up (the backend warmed up on a 16-sample batch, the
inputs built). Providers:
  cpu    the C++ backend (csrc/feature_space.cpp)
  eager  the PyTorch reference (fused_margin/reference/feature_space.py)

    python bench/bench_feature_space.py                  # N=1024 D=128 10 classes
    python bench/bench_feature_space.py --repeats 3 --threads 1
    python bench/bench_feature_space.py --threads 0,1      # default threads, then 1 (default)

Writes bench/results/feature_space_cpu.json and .png and prints a Markdown
table. Not a test: nothing here asserts on time. The machine may be shared:
the load average before and after each run is recorded with it.
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
WORKLOADS = ("triplet_semihard", "soft_nn")
PROVIDERS = ("cpu", "eager")
# the targets of the issue: (speed-up over eager, extra peak as a fraction of eager's)
TARGETS = {"triplet_semihard": (3.0, None), "soft_nn": (2.0, 0.1)}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(workload: str, provider: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fused_margin as fm

    backend = "cpu" if provider == "cpu" else "reference"

    def make_step(x, y):
        if workload == "triplet_semihard":
            return lambda: fm.triplet_margin_loss(x, y, margin=0.2, mining="semihard",
                                                  distance="l2", backend=backend).backward()
        if workload == "soft_nn":
            return lambda: fm.soft_nearest_neighbor_loss(x, y, temperature=1.0,
                                                         backend=backend).backward()
        raise ValueError(workload)

    torch.manual_seed(0)
    # set-up includes one call on a tiny batch, so that loading the backend and
    # starting the BLAS / OpenMP pools is not counted as the op's memory
    make_step(torch.randn(16, args.D, requires_grad=True), torch.arange(16) % 4)()
    x = torch.randn(args.N, args.D, requires_grad=True)
    y = torch.randint(0, args.classes, (args.N,))
    step = make_step(x, y)

    load_before = os.getloadavg()
    base = _maxrss_mb()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        x.grad = None
        step()
    first = time.perf_counter() - t0
    times = timed(step, args.repeats, (x,))
    peak = _maxrss_mb()
    return dict(workload=workload, provider=provider, min_s=min(times),
                median_s=statistics.median(times), times_s=times, warmup_s=first,
                rss_after_setup_mb=base, rss_peak_mb=peak, extra_peak_mb=peak - base,
                threads=torch.get_num_threads(), loadavg_before=load_before,
                loadavg_after=os.getloadavg())




def run_one(workload: str, provider: str, threads: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{workload}:{provider}",
           "--N", str(args.N), "--D", str(args.D), "--classes", str(args.classes),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(threads)]
    return run_worker(cmd, args.timeout, dict(workload=workload, provider=provider,
                                              threads=threads))


def table(rows) -> str:
    out = ["| workload | threads | provider | min (s) | median (s) | speed-up vs eager (min) | "
           "extra peak (MB) | % of eager's extra peak |", "|---|---|---|---|---|---|---|---|"]
    eager = {(r["workload"], r["threads"]): r for r in rows
             if r["provider"] == "eager" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | {r['threads']} | {r['provider']} | "
                       f"failed: {r['error'][:100]} | | | | |")
            continue
        e = eager.get((r["workload"], r["threads"]))
        su = f"{e['min_s'] / r['min_s']:.1f}x" if e else "-"
        pm = (f"{100 * r['extra_peak_mb'] / e['extra_peak_mb']:.1f}"
              if e and e["extra_peak_mb"] > 0 else "-")
        out.append(f"| {r['workload']} | {r['threads']} | {r['provider']} | {r['min_s']:.4f} | "
                   f"{r['median_s']:.4f} | {su} | {r['extra_peak_mb']:.1f} | {pm} |")
    return "\n".join(out)


def targets(rows) -> dict:
    by = {(r["workload"], r["provider"], r["threads"]): r for r in rows if "error" not in r}
    out = {}
    for th in sorted({r["threads"] for r in rows if "error" not in r}):
        for w, (speed, mem) in TARGETS.items():
            c, e = by.get((w, "cpu", th)), by.get((w, "eager", th))
            if not (c and e):
                continue
            key = f"{w}, {th} threads"
            out[f"{key}: >= {speed:g}x faster than eager (min time)"] = (e["min_s"]
                                                                          >= speed * c["min_s"])
            if mem is not None:
                out[f"{key}: extra peak <= {mem:g} x eager's"] = (c["extra_peak_mb"]
                                                                   <= mem * e["extra_peak_mb"])
    return out


def plot(rows, path, title):
    ok = [r for r in rows if "error" not in r]
    short = {"triplet_semihard": "semihard", "soft_nn": "soft NN"}
    time_memory_bars(
        [f"{short.get(r['workload'], r['workload'])}\n{r['provider']}, {r['threads']}t"
         for r in ok],
        [r["min_s"] for r in ok], [r["median_s"] for r in ok], [r["extra_peak_mb"] for r in ok],
        ["tab:blue" if r["provider"] == "cpu" else "tab:gray" for r in ok], path, title)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", default="0,1",
                   help="comma list of torch thread counts, 0: torch's default")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--out", default=os.path.join(RESULTS, "feature_space_cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        workload, provider = args.worker.split(":")
        args.threads = int(args.threads)
        print("RESULT " + json.dumps(worker(workload, provider, args)), flush=True)
        return

    rows = []
    for th in [int(t) for t in args.threads.split(",")]:
        for w in args.workloads.split(","):
            for prov in args.providers.split(","):
                print(f"running {w} / {prov} / threads={th} ...", file=sys.stderr, flush=True)
                rows.append(run_one(w, prov, th, args))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    md = table(rows)
    title = (f"feature-space losses fp32 fwd+bwd, N={args.N} D={args.D} "
             f"{args.classes} classes, {os.cpu_count()} CPUs shared with other jobs")
    met = targets(rows)
    info = dict(title=title, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                machine=machine(), shape=dict(N=args.N, D=args.D, classes=args.classes),
                repeats=args.repeats, warmup=args.warmup, results=rows, targets=met,
                markdown=md)
    save_results(args.out, info, plot, rows, title, md)
    print("\n" + "\n".join(f"- {k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
