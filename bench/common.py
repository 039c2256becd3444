"""Pieces every benchmark script shares: a description of the machine (CPU) and
one timed, memory-measured run of a step on a GPU. Scripts in bench/ import it
as `common` (their folder is on sys.path when run as `python bench/<script>.py`)."""
from __future__ import annotations

import os
import platform
import subprocess


def machine() -> dict:
    """Platform, torch version and threads, the lscpu lines that matter, the load."""
    import torch

    info = dict(platform=platform.platform(), processor=platform.processor(),
                python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache",
                "L3 cache", "Vendor ID", "Hypervisor vendor")
        info["lscpu"] = {k.strip(): v.strip() for k, v in
                         (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
                         if k.strip() in keep}
    except Exception as exc:  # noqa: BLE001
        info["lscpu"] = f"unavailable: {exc}"
    info["loadavg_at_start"] = os.getloadavg()
    return info


def cuda_measure(setup, warmup: int, rep: int) -> dict:
    """{"ms", "ms_p20", "ms_p80", "peak_mb"} of step() from (step, grads) = setup(),
    or {"error": "OOM" / message}: a method that fails is a result, not a crash."""
    import torch
    import triton.testing

    torch.cuda.empty_cache()
    try:
        step, grads = setup()
        step()  # compile / autotune outside the measurements
        torch.cuda.synchronize()
        for t in grads or []:
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        for t in grads or []:
            t.grad = None
        ms, p20, p80 = triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads,
                                               quantiles=[0.5, 0.2, 0.8])
        return {"ms": ms, "ms_p20": p20, "ms_p80": p80, "peak_mb": peak}
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as exc:  # noqa: BLE001
        if "out of memory" in str(exc).lower():
            return {"error": "OOM"}
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch.cuda.empty_cache()


def run_worker(cmd: list, timeout: float, ident: dict, env=None) -> dict:
    """Run one measuring subprocess; its result is the JSON after its last
    "RESULT " line, or `ident` with an "error" (a failure is a result, not a crash)."""
    import json

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(ident, error=f"over {timeout} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return dict(ident, error=" | ".join(err[-3:]) if err else f"exit status {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def time_memory_bars(names, min_s, median_s, extra_mb, colors, path: str, title: str) -> None:
    """The CPU scripts' plot: seconds (bars: median, dots: min) and extra peak MB
    per run, both on log axes, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].bar(names, median_s, color=colors, label="median")
    axes[0].scatter(names, min_s, color="black", zorder=3, label="min")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per forward + backward (log)")
    axes[0].legend()
    axes[1].bar(names, [max(v, 0.01) for v in extra_mb], color=colors)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("extra peak RSS (MB, log)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def timed(step, repeats: int, leaves=()) -> list:
    """Wall seconds of `repeats` calls of step(), each after clearing the
    gradients of `leaves` (so that none accumulates into an old one)."""
    import time

    times = []
    for _ in range(repeats):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def save_results(out: str, info: dict, plot, rows, title: str, md: str) -> None:
    """out.json (info), out.png (plot(rows, path, title)), and the table printed."""
    import json

    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    plot(rows, out + ".png", title)
    print(f"### {title}\n")
    print(md)


def cuda_problem(N: int, D: int, C: int, dtype):
    """Seeded features x [N, D] and weight W [C, D] (both requiring grad) and
    labels y [N] on the GPU: the margin benchmarks' inputs."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    W = torch.randn(C, D, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
    y = torch.randint(0, C, (N,), device="cuda", generator=gen)
    return x, W, y


def floor_step(x, W):
    """The matmuls every margin loss makes at least: x W^T, then g W and g^T x."""
    xd, Wd = x.detach(), W.detach()

    def floor():
        g = xd @ Wd.T
        g @ Wd
        g.T @ xd
    return floor
