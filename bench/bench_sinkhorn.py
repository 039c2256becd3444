"""CPU benchmark of batched Sinkhorn plans: N problems of K classes, n_iter
iterations, float64, one shared cost (uniform [0, 1]), eps = 0.1, no tol.
Providers:
  cpu        fm.sinkhorn(backend="cpu"): csrc/sinkhorn.cpp, OpenMP over the samples
  cpu_1t     the same on one thread (torch.set_num_threads(1))
  eager      the PyTorch reference (log domain, batched)
  pot_loop   ot.sinkhorn(a_n, b_n, M, reg=eps, numItermax=n_iter, stopThr=0) per sample

Every provider is timed on all N problems by default. --ref-samples /
--pot-samples time the reference / the POT loop on the first problems only (quicker);
those figures are then reported for the samples actually timed, with a linear
scaling to N given separately and labelled as an estimate: the reference's time
per sample is not constant in N (its [N, K, K] temporaries leave the caches as N
grows), so a scaled figure is not a measurement. Wall seconds and process CPU
seconds (all threads) are both recorded: on a shared box the wall figures move
with the other jobs' load (load averages before and after are recorded). The
plans of the three agree (max abs difference reported). Not a test: nothing here
asserts on time.

    python bench/bench_sinkhorn.py                       # N=4096 K=43 n_iter=100
    python bench/bench_sinkhorn.py --ref-samples 512 --pot-samples 64   # quicker

Writes bench/results/sinkhorn_cpu.json and .png and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import warnings

import numpy as np
import torch

import fused_margin as fm
from common import machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _time(fn, repeats):
    """(last result, wall seconds per run, process CPU seconds per run)"""
    out, times, cpu = None, [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, times, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--K", type=int, default=43)
    p.add_argument("--n-iter", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ref-samples", type=int, default=None, help="default: all N")
    p.add_argument("--pot-samples", type=int, default=None, help="default: all N")
    p.add_argument("--out", default=os.path.join(RESULTS, "sinkhorn_cpu"))
    args = p.parse_args()
    import ot

    torch.manual_seed(0)
    N, K, it, eps = args.N, args.K, args.n_iter, args.eps
    a = torch.rand(N, K, dtype=torch.float64) + 0.05
    b = torch.rand(N, K, dtype=torch.float64) + 0.05
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost = torch.rand(K, K, dtype=torch.float64)
    load_before = os.getloadavg()

    fm.sinkhorn(a[:8], b[:8], cost, eps=eps, n_iter=it, backend="cpu")  # warm-up
    run_cpu = lambda: fm.sinkhorn(a, b, cost, eps=eps, n_iter=it, backend="cpu")  # noqa: E731
    plans, t_cpu, c_cpu = _time(run_cpu, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, t_cpu1, c_cpu1 = _time(run_cpu, args.repeats)
    torch.set_num_threads(threads)

    nr = min(N, args.ref_samples or N)
    ref_plans, t_ref, c_ref = _time(lambda: fm.sinkhorn(a[:nr], b[:nr], cost, eps=eps, n_iter=it,
                                                 backend="reference"), max(1, args.repeats // 2))

    npot = min(N, args.pot_samples or N)
    an, bn, cn = a.numpy(), b.numpy(), cost.numpy()

    def pot_loop():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "did not converge": stopThr=0 by design
            return np.stack([ot.sinkhorn(an[i], bn[i], cn, reg=eps, numItermax=it, stopThr=0)
                             for i in range(npot)])

    pot_plans, t_pot, c_pot = _time(pot_loop, 2)
    load_after = os.getloadavg()

    # measured: each provider on the samples it was timed on
    timed = {"cpu": N, "cpu_1t": N, "eager": nr, "pot_loop": npot}
    med = {"cpu": statistics.median(t_cpu), "cpu_1t": statistics.median(t_cpu1),
           "eager": statistics.median(t_ref), "pot_loop": statistics.median(t_pot)}
    cpu_s = {"cpu": statistics.median(c_cpu), "cpu_1t": statistics.median(c_cpu1),
             "eager": statistics.median(c_ref), "pot_loop": statistics.median(c_pot)}
    # a linear scaling to N, only for providers timed on a subset: an estimate
    scaled = {name: med[name] * N / timed[name] for name in med if timed[name] < N}
    full = [name for name in med if timed[name] == N]
    diff_ref = float((plans[:nr] - ref_plans).abs().max())
    diff_pot = float((plans[:npot] - torch.from_numpy(pot_plans)).abs().max())
    result = {
        "what": "batched Sinkhorn plans, float64, shared cost U[0,1], eps, no tol, wall seconds",
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after,
                    "note": "shared 2-core box: other jobs may run meanwhile (see loadavg) "
                            "and move the wall figures, the two-thread ones most"},
        "torch": torch.__version__, "pot": ot.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"N": N, "K": K, "n_iter": it, "eps": eps, "repeats_cpu": args.repeats},
        "seconds": med,
        "process_cpu_seconds": cpu_s,
        "samples_timed": timed,
        "linear_estimate_for_N_not_measured": scaled,
        "raw_seconds": {"cpu": t_cpu, "cpu_1t": t_cpu1, "eager": t_ref, "pot_loop": t_pot},
        # speed-ups only between figures measured on the same N samples
        "speedup_cpu_vs": {name: med[name] / med["cpu"] for name in full if name != "cpu"},
        "speedup_cpu_vs_by_process_cpu_seconds": {
            name: cpu_s[name] / cpu_s["cpu"] for name in full if name != "cpu"},
        "max_abs_plan_diff": {"cpu_vs_eager": diff_ref, "cpu_vs_pot": diff_pot},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)

    rows = ["| provider | samples timed | wall s | process CPU s | wall vs cpu |",
            "|---|---|---|---|---|"]
    for name in ("cpu", "cpu_1t", "eager", "pot_loop"):
        vs = (f"{med[name] / med['cpu']:.1f}x" if timed[name] == N else
              f"n/a (subset; x N/{timed[name]} would be {scaled[name]:.3g} s, an estimate)")
        rows.append(f"| {name} | {timed[name]} | {med[name]:.3f} | {cpu_s[name]:.3f} | {vs} |")
    print("\n".join(rows))
    print(f"max |plan diff|: cpu vs eager {diff_ref:.2e}, cpu vs POT {diff_pot:.2e}; "
          f"loadavg {load_before[0]:.1f} -> {load_after[0]:.1f}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = ["cpu", "cpu_1t", "eager", "pot_loop"]
        vals = [med[n] for n in names]
        ax.barh(names, vals, color=["tab:green", "tab:olive", "tab:blue", "tab:orange"])
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        for i, v in enumerate(vals):
            note = "" if timed[names[i]] == N else f" * ({timed[names[i]]} samples)"
            ax.text(v, i, f" {v:.3g}s" + note, va="center")
        ax.set_title(f"Sinkhorn N={N} K={K} {it} it float64 ({os.cpu_count()} cores)\n"
                     "* timed on a subset of the N problems (not scaled)", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}")


if __name__ == "__main__":
    main()
