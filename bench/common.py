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
