"""CPU benchmark of one rank's class-sharded margin loss (fused_margin.distributed,
world 1 over gloo, fp32, forward + backward): what the per-shard partials cost.

Each (workload, provider) runs in its own subprocess, so that its peak memory
can be read from ru_maxrss: "extra peak" is ru_maxrss at the end minus
ru_maxrss right after set-up (the group started, the backend warmed up on a
tiny batch, the inputs built). W's gradient (C_r x D) is part of every
provider's extra peak. Providers:
  cpu     the C++ partials kernel (csrc/angular.cpp, shard_partials_*), what
          backend="auto" picks for CPU tensors
  tiled   backend="reference": the same sweep as eager PyTorch tiles
          (fused_margin/reference/sharded_tiles.py)
  eager   the N x C_r oracle (fused_margin/reference/sharded.py, plain autograd)
  floor   the matmuls alone: cos = x W^T, then the two gradient products
          g W and g^T x with g of cos's shape (no normalisation, no softmax)
Workloads are N x C_r x D; "big" is the 1M-class row of the table in docs/distributed.md
at 8 ranks (C_r = 125 000, D = 512, N = 8192): there only cpu and tiled run
(eager and floor would hold 4 GiB tiles), one repeat each.

    python bench/bench_sharded.py                       # every workload
    python bench/bench_sharded.py --workloads wide --repeats 5

Writes bench/results/sharded_cpu.json and .png and prints a Markdown table.
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

from common import machine, run_worker, save_results, time_memory_bars, timed

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# name -> (N, C_r, D, providers, repeats)
WORKLOADS = {
    "square": (8192, 4000, 64, ("cpu", "tiled", "eager", "floor"), 3),
    "wide": (2048, 60000, 64, ("cpu", "tiled", "eager", "floor"), 3),
    "big": (8192, 125000, 512, ("cpu", "tiled"), 1),
}
KIND = dict(kind="arcface", s=64.0, m=0.5)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(workload: str, provider: str, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (before the group: docs/distributed.md, "a pitfall")

    from fused_margin import dispatch
    from fused_margin import distributed as fd

    n, c_r, d = WORKLOADS[workload][:3]
    dist.init_process_group("gloo", rank=0, world_size=1)
    if provider == "eager":  # the oracle in the place of the reference backend's tiles
        dispatch.OPS["margin_shard_partials"] = dict(
            dispatch.OPS["margin_shard_partials"],
            reference="fused_margin.reference.sharded:margin_shard_partials")
    backend = "cpu" if provider == "cpu" else "reference"

    def make_step(x, w, y):
        if provider == "floor":
            def floor():
                cos = x @ w.T
                g = torch.ones_like(cos)
                return g @ w, g.T @ x
            return floor
        return lambda: fd.margin_cross_entropy(x, w, y, class_start=0,
                                               num_classes=w.shape[0], backend=backend,
                                               **KIND).backward()

    torch.manual_seed(0)
    make_step(torch.randn(16, d, requires_grad=True), torch.randn(32, d, requires_grad=True),
              torch.arange(16))()
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(c_r, d, requires_grad=True)
    y = torch.randint(0, c_r, (n,))
    step = make_step(x, w, y)
    base = _maxrss_mb()
    load_before = os.getloadavg()
    times = timed(step, repeats, (x, w))
    peak = _maxrss_mb()
    dist.destroy_process_group()
    return dict(workload=workload, provider=provider, N=n, C_r=c_r, D=d, min_s=min(times),
                median_s=statistics.median(times), times_s=times, extra_peak_mb=peak - base,
                threads=torch.get_num_threads(), loadavg_before=load_before,
                loadavg_after=os.getloadavg())


def run_one(workload: str, provider: str, repeats: int, timeout: int) -> dict:
    from contextlib import closing
    import socket

    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{workload}:{provider}",
           "--repeats", str(repeats)]
    return run_worker(cmd, timeout, dict(workload=workload, provider=provider), env=env)


def table(rows) -> str:
    out = ["| workload N x C_r x D | provider | min (s) | median (s) | x floor (min) | "
           "x eager (min) | extra peak (MB) |", "|---|---|---|---|---|---|---|"]
    best = {(r["workload"], r["provider"]): r for r in rows if "error" not in r}
    for r in rows:
        n, c_r, d = WORKLOADS[r["workload"]][:3]
        shape = f"{r['workload']} {n} x {c_r} x {d}"
        if "error" in r:
            out.append(f"| {shape} | {r['provider']} | failed: {r['error'][:100]} | | | | |")
            continue
        rel = []
        for other in ("floor", "eager"):
            o = best.get((r["workload"], other))
            rel.append(f"{r['min_s'] / o['min_s']:.2f}" if o else "-")
        out.append(f"| {shape} | {r['provider']} | {r['min_s']:.3f} | {r['median_s']:.3f} | "
                   f"{rel[0]} | {rel[1]} | {r['extra_peak_mb']:.0f} |")
    return "\n".join(out)


def plot(rows, path, title):
    ok = [r for r in rows if "error" not in r]
    colors = {"cpu": "tab:blue", "tiled": "tab:orange", "eager": "tab:gray", "floor": "black"}
    time_memory_bars([f"{r['workload']}\n{r['provider']}" for r in ok],
                     [r["min_s"] for r in ok], [r["median_s"] for r in ok],
                     [r["extra_peak_mb"] for r in ok], [colors[r["provider"]] for r in ok],
                     path, title)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per run (default: the workload's own)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", default=os.path.join(RESULTS, "sharded_cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        workload, provider = args.worker.split(":")
        print("RESULT " + json.dumps(worker(workload, provider, args.repeats)), flush=True)
        return

    rows = []
    for w in args.workloads.split(","):
        for prov in WORKLOADS[w][3]:
            print(f"running {w} / {prov} ...", file=sys.stderr, flush=True)
            rows.append(run_one(w, prov, args.repeats or WORKLOADS[w][4], args.timeout))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    md = table(rows)
    title = (f"one rank of distributed.margin_cross_entropy (world 1, gloo), arcface fp32 "
             f"fwd+bwd, {os.cpu_count()} CPUs")
    info = dict(title=title, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                machine=machine(), kind=KIND, results=rows, markdown=md)
    save_results(args.out, info, plot, rows, title, md)
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
