"""The measuring half of bench/gpu_check.sh: forward + backward of the fused margin
cross-entropy against its peers, a small sweep of our tile configurations, one small
case of each fused op for compute-sanitizer, and the closing table.

    python bench/gpu_check.py bench  --out DIR/bench.json [--budget-s 180]
    python bench/gpu_check.py sweep  --out DIR/sweep.json [--budget-s 60]
    python bench/gpu_check.py linear --out DIR/linear.json [--budget-s 25]
    python bench/gpu_check.py small                       # one small case per fused op
    python bench/gpu_check.py table  DIR                  # the table, from the JSON files
    python bench/gpu_check.py bench  --dry-run --out DIR/bench.json   # CPU, tiny shapes

Timing: triton.testing.do_bench median (20th / 80th percentiles kept), one untimed
warm-up step first (compilation, autotuning); peak memory is max_memory_allocated
during one step less what was allocated before it. Providers:
  fused    fused_margin.margin_cross_entropy(backend="triton")  (arcface, s=64, m=0.5)
  eager    the reference (eager PyTorch, N x C logits) on the same inputs
  compile  torch.compile of the eager reference
  floor    the three matmuls any method makes: x W^T, g W, g^T x
  torch    torch.nn.functional.linear_cross_entropy(s x_hat, w_hat, y,
           options=LinearCrossEntropyOptions()) on normalised inputs (plain CE), if present
  cce      cut_cross_entropy.linear_cross_entropy(s x_hat, w_hat, y) (plain CE), if importable
  liger    LigerFusedLinearCrossEntropyLoss on (w_hat, s x_hat, y) (plain CE), if importable
The peers' normalisation runs inside the timed step, as ours does. A provider that
fails (OOM, missing, over its share of the budget) is a row with an "error".
`linear`: plain linear cross-entropy (issue 18), no normalisation anywhere, at
LINEAR_SHAPES: fused = margin_cross_entropy(kind="normface", s=1, normalize=False),
eager = F.cross_entropy(x @ W.T, y), torch / cce / liger on (x, W, y) as they are.
--dry-run: CPU, bf16, N=32, D=16, C=130, the interpreter for "fused", perf_counter timing;
it checks the driver, not the speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

PROVIDERS = ("fused", "floor", "eager", "compile", "torch", "cce", "liger")
# the linear rows: (dtype, N, D, C), the issue-18 shape first, then the margin loss's
LINEAR_SHAPES = [("bf16", 1024, 256, 50_000), ("fp32", 1024, 256, 50_000),
                 ("bf16", 4096, 512, 100_000)]
LINEAR_PROVIDERS = ("fused", "floor", "cce", "liger", "torch", "eager")
KW = dict(kind="arcface", s=64.0, m=0.5)
# the sweep's candidates (bf16, C = 100K): rows x classes x D step, warps, stages, chunk,
# the forward's row tile (0: rows): the sm_90 default (256-row forward) first, then the
# 128-row forward it replaced, then the others
SWEEP = [(128, 128, 64, 8, 3, 4096, 256), (128, 128, 64, 8, 3, 4096, 0),
         (128, 128, 64, 8, 4, 4096, 256), (128, 256, 64, 8, 3, 4096, 0),
         (128, 128, 64, 4, 3, 4096, 0), (64, 128, 64, 4, 3, 4096, 0),
         (128, 128, 64, 8, 3, 8192, 256)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("bench", "sweep", "linear", "small", "table"))
    ap.add_argument("dir", nargs="?", help="table: the folder with the JSON files")
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    ap.add_argument("--budget-s", type=float, default=180.0, help="stop starting new rows after")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--c", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition, ms")
    ap.add_argument("--warmup", type=int, default=15, help="do_bench warm-up, ms")
    a = ap.parse_args(argv)
    if a.dry_run:  # the driver's paths, not the speed: as small as the interpreter allows
        a.n, a.d, a.c, a.dtypes = 32, 16, [130], ["bf16"]
    return a


def _dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _normalised(x, W):
    import torch.nn.functional as F
    return F.normalize(x, dim=1), F.normalize(W, dim=1)


def make_step(provider, x, W, y, blocks=None):
    """A closure doing one forward + backward, or raise (a missing peer, say)."""
    import torch

    import fused_margin as fm
    from fused_margin.reference import angular as ref

    s = KW["s"]
    if provider == "fused":
        if blocks is None:
            return lambda: fm.margin_cross_entropy(x, W, y, backend="triton", **KW).backward()
        from fused_margin.triton import angular as ta
        return lambda: ta.apply(y, x, W, m1=1.0, m2=0.0, m3=0.0, elm_lambda=0.0,
                                class_weight=None, ignore_index=-100, reduction="mean",
                                blocks=blocks, **KW).backward()
    if provider == "floor":
        xd, Wd = x.detach(), W.detach()

        def floor():
            g = xd @ Wd.T
            g @ Wd
            g.T @ xd
        return floor
    if provider == "eager":
        return lambda: ref.margin_cross_entropy(x, W, y, **KW).backward()
    if provider == "compile":
        f = torch.compile(lambda a, b: ref.margin_cross_entropy(a, b, y, **KW))
        return lambda: f(x, W).backward()
    if provider == "torch":
        opts = torch.nn.LinearCrossEntropyOptions()  # AttributeError where absent

        def lce():
            xh, wh = _normalised(x, W)
            torch.nn.functional.linear_cross_entropy(xh * s, wh, y, options=opts).backward()
        return lce
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            xh, wh = _normalised(x, W)
            linear_cross_entropy(xh * s, wh, y).backward()
        return cce
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()

        def liger():
            xh, wh = _normalised(x, W)
            loss(wh, xh * s, y).backward()
        return liger
    raise ValueError(provider)


def make_linear_step(provider, x, W, y):
    """One forward + backward of plain linear cross-entropy, logits x @ W.T."""
    import torch
    import torch.nn.functional as F

    import fused_margin as fm

    if provider == "fused":
        return lambda: fm.margin_cross_entropy(x, W, y, kind="normface", s=1.0,
                                               normalize=False, backend="triton").backward()
    if provider == "eager":
        return lambda: F.cross_entropy((x @ W.T).float(), y).backward()
    if provider == "torch":
        opts = torch.nn.LinearCrossEntropyOptions()  # AttributeError where absent
        return lambda: F.linear_cross_entropy(x, W, y, options=opts).backward()
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda: linear_cross_entropy(x, W, y).backward()
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(W, x, y).backward()
    return make_step(provider, x, W, y)  # the floor: the same three products


def measure(step, leaves, cuda, rep, warmup) -> dict:
    import torch

    try:
        step()  # compile / autotune outside the measurement
        if cuda:
            torch.cuda.synchronize()
            for t in leaves:
                t.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            import triton.testing
            ms, p20, p80 = triton.testing.do_bench(step, warmup=warmup, rep=rep,
                                                   grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8])
            return dict(ms=ms, ms_p20=p20, ms_p80=p80, peak_mb=peak)
        times = []
        for _ in range(1):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return dict(ms=statistics.median(times), ms_p20=min(times), ms_p80=max(times),
                    peak_mb=float("nan"))
    except Exception as exc:  # noqa: BLE001 - a failure is a row, not a crash
        msg = "OOM" if "out of memory" in str(exc).lower() else f"{type(exc).__name__}: {exc}"
        return dict(error=msg[:300])
    finally:
        for t in leaves:
            t.grad = None
        if cuda:
            torch.cuda.empty_cache()


def problem(N, D, C, dtype, cuda):
    import torch
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, D, device=dev, dtype=dtype, generator=g).requires_grad_(True)
    W = torch.randn(C, D, device=dev, dtype=dtype, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (N,), device=dev, generator=g)
    return x, W, y


def _env(cuda) -> dict:
    import torch
    import triton
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu (dry run)",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                torch=torch.__version__, triton=triton.__version__,
                tf32=bool(torch.backends.cuda.matmul.allow_tf32))


def bench(a) -> dict:
    import torch
    cuda = torch.cuda.is_available() and not a.dry_run
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows: IEEE products everywhere
    start, rows = time.monotonic(), []
    for dt in a.dtypes:
        for C in a.c:
            for prov in a.providers:
                ident = dict(provider=prov, dtype=dt, N=a.n, D=a.d, C=C, **KW)
                if time.monotonic() - start > a.budget_s:
                    rows.append(dict(ident, error="skipped: over the time budget"))
                    continue
                if a.dry_run and prov in ("compile", "torch", "cce", "liger"):
                    rows.append(dict(ident, error="skipped in --dry-run"))
                    continue
                if prov == "eager" and cuda and C * a.n * 4 * 6 > 0.8 * torch.cuda.mem_get_info()[0]:
                    rows.append(dict(ident, error="skipped: N x C tensors would not fit"))
                    continue
                if prov == "compile" and C > 200_000 and dt == "fp32":
                    rows.append(dict(ident, error="skipped: compile time over its share"))
                    continue
                try:
                    x, W, y = problem(a.n, a.d, C, _dtype(dt), cuda)
                    res = measure(make_step(prov, x, W, y), [x, W], cuda, a.rep, a.warmup)
                except Exception as exc:  # noqa: BLE001
                    res = dict(error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(dict(ident, **res))
                shown = res.get("error") or f"{res['ms']:.3f} ms, {res['peak_mb']:.0f} MiB"
                print(f"{dt:5s} C={C:>9,d} {prov:8s} {shown}", flush=True)
    return dict(_env(cuda), rows=rows)


def linear(a) -> dict:
    import torch
    cuda = torch.cuda.is_available() and not a.dry_run
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = LINEAR_SHAPES if not a.dry_run else [("bf16", a.n, a.d, a.c[0])]
    start, rows = time.monotonic(), []
    for dt, N, D, C in shapes:
        for prov in LINEAR_PROVIDERS:
            ident = dict(provider=prov, dtype=dt, N=N, D=D, C=C, kind="linear")
            if time.monotonic() - start > a.budget_s:
                rows.append(dict(ident, error="skipped: over the time budget"))
                continue
            if a.dry_run and prov in ("torch", "cce", "liger"):
                rows.append(dict(ident, error="skipped in --dry-run"))
                continue
            try:
                x, W, y = problem(N, D, C, _dtype(dt), cuda)
                with torch.no_grad():
                    x.mul_(0.1)  # logits of a few units
                res = measure(make_linear_step(prov, x, W, y), [x, W], cuda, a.rep, a.warmup)
            except Exception as exc:  # noqa: BLE001
                res = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(dict(ident, **res))
            shown = res.get("error") or f"{res['ms']:.3f} ms, {res['peak_mb']:.0f} MiB"
            print(f"linear {dt:5s} N={N} D={D} C={C:>9,d} {prov:8s} {shown}", flush=True)
    return dict(_env(cuda), rows=rows)


def sweep(a) -> dict:
    import torch

    from fused_margin.triton import angular as ta
    cuda = torch.cuda.is_available() and not a.dry_run
    C = a.c[0]
    start, rows = time.monotonic(), []
    cands = SWEEP if cuda else [(32, 32, 16, 4, 2, 64, 64)]
    for bn, bc, bd, w, st, chunk, fo in cands:
        ident = dict(dtype="bf16", N=a.n, D=a.d, C=C, BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd,
                     num_warps=w, num_stages=st, chunk_cols=chunk, fwd_rows=fo or bn)
        if time.monotonic() - start > a.budget_s:
            rows.append(dict(ident, error="skipped: over the time budget"))
            continue
        blocks = ta.Blocks(bn, bc, bd, num_warps=w, num_stages=st, chunk_rows=8192,
                           chunk_cols=chunk, fwd_outer=fo)
        x, W, y = problem(a.n, a.d, C, _dtype("bf16"), cuda)
        res = measure(make_step("fused", x, W, y, blocks), [x, W], cuda, a.rep, a.warmup)
        rows.append(dict(ident, **res))
        print(ident, res.get("error") or f"{res['ms']:.3f} ms", flush=True)
    return dict(_env(cuda), rows=rows)


def small() -> None:
    """One small case of each fused op (forward + backward), for compute-sanitizer."""
    import torch

    import fused_margin as fm
    from fused_margin.triton import angular as ta
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(70, 40, device=dev, dtype=dt, requires_grad=True)
        W = torch.randn(300, 40, device=dev, dtype=dt, requires_grad=True)
        y = torch.randint(0, 300, (70,), device=dev)
        for kind in ("arcface", "elm", "arcgrad"):
            m = torch.full((300,), 0.2, device=dev) if kind == "elm" else 0.3
            fm.margin_cross_entropy(x, W, y, kind=kind, m=m, s=16.0, backend="triton").backward()
        b = torch.randn(300, device=dev, dtype=dt, requires_grad=True)
        fm.margin_cross_entropy(x, W, y, kind="cosface", s=1.0, m=0.2, normalize=False, bias=b,
                                label_smoothing=0.1, backend="triton").backward()
        cos = torch.rand(70, 300, device=dev, dtype=dt).mul(2).sub(1).requires_grad_(True)
        fm.margin_cross_entropy_from_cosine(cos, y, backend="triton").backward()
        keep = torch.arange(0, 300, 3, device=dev)
        p = ta.margin_shard_partials(x, W, y, class_start=0, kind="arcgrad", s=4.0, keep=keep)
        (p.sum_exp.sum() + p.target.sum()).backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    print("small cases ran on", dev)


def table(folder) -> str:
    out = []
    path = os.path.join(folder, "bench.json")
    if os.path.exists(path):
        data = json.load(open(path))
        out.append(f"## fwd+bwd, {data['device']}, torch {data['torch']}, triton {data['triton']}")
        out.append("| dtype | C | provider | ms (median) | x floor | peak MiB |")
        out.append("|---|---|---|---|---|---|")
        floor = {(r["dtype"], r["C"]): r.get("ms") for r in data["rows"] if r["provider"] == "floor"}
        for r in data["rows"]:
            f = floor.get((r["dtype"], r["C"]))
            if "error" in r:
                out.append(f"| {r['dtype']} | {r['C']:,} | {r['provider']} | {r['error'][:60]} | - | - |")
            else:
                ratio = f"{r['ms'] / f:.2f}" if f else "-"
                out.append(f"| {r['dtype']} | {r['C']:,} | {r['provider']} | {r['ms']:.3f} | "
                           f"{ratio} | {r['peak_mb']:.0f} |")
    path = os.path.join(folder, "linear.json")
    if os.path.exists(path):
        data = json.load(open(path))
        out.append("\n## plain linear cross-entropy (normalize=False), fwd+bwd")
        out.append("| dtype | N x D x C | provider | ms (median) | x floor | peak MiB |")
        out.append("|---|---|---|---|---|---|")
        floor = {(r["dtype"], r["N"], r["C"]): r.get("ms") for r in data["rows"]
                 if r["provider"] == "floor"}
        for r in data["rows"]:
            shape = f"{r['N']} x {r['D']} x {r['C']:,}"
            f = floor.get((r["dtype"], r["N"], r["C"]))
            if "error" in r:
                out.append(f"| {r['dtype']} | {shape} | {r['provider']} | {r['error'][:60]} | - "
                           "| - |")
            else:
                ratio = f"{r['ms'] / f:.2f}" if f else "-"
                out.append(f"| {r['dtype']} | {shape} | {r['provider']} | {r['ms']:.3f} | "
                           f"{ratio} | {r['peak_mb']:.0f} |")
    path = os.path.join(folder, "sweep.json")
    if os.path.exists(path):
        data = json.load(open(path))
        out.append("\n## tile sweep (fused, bf16)")
        out.append("| BLOCK_N x C x D | forward rows | warps | stages | chunk | ms |")
        out.append("|---|---|---|---|---|---|")
        for r in data["rows"]:
            t = r.get("error") or f"{r['ms']:.3f}"
            out.append(f"| {r['BLOCK_N']}x{r['BLOCK_C']}x{r['BLOCK_D']} | "
                       f"{r.get('fwd_rows', r['BLOCK_N'])} | {r['num_warps']} | "
                       f"{r['num_stages']} | {r['chunk_cols']} | {t} |")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.what == "table":
        print(table(a.dir))
        return 0
    if a.what == "small":
        small()
        return 0
    res = {"bench": bench, "sweep": sweep, "linear": linear}[a.what](a)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
