"""The benchmark behind `fused-margin bench`: speed and peak memory of every op.

Cases: margin_cross_entropy per kind (forward + backward; arcface also swept
over C for the plot), sinkhorn, knn_std, soft nearest neighbour and semi-hard
triplet (each forward + backward through a scalar of their output).
Providers per case:
  eager     the PyTorch reference (backend="reference"), the baseline
  compile   torch.compile of the reference function (n/a, with the reason,
            where it fails or is skipped)
  cpu       the C++ kernels (CPU devices), when fused_margin._C is built
  triton    the Triton kernels (CUDA devices only: the interpreter is no benchmark)
  floor     the matmuls the op cannot avoid (margin CE: x@W.T, G@W, G.T@x;
            pairwise ops: x@x.T, G@x, G.T@x; knn_std: x@x.T and c@x.T), or n/a
A backend without a kernel for an op is reported as n/a, never replaced by
another implementation.

Timing: warm-up runs discarded, then `repeats` timed blocks (each of enough
calls for ~5 ms), min and median of the per-call times.
CPU: torch.utils.benchmark.Timer, each measurement in its own process forked
from a forkserver that has torch imported (no parent OpenMP state, cheap
start); peak memory is the growth of ru_maxrss over the timed calls, with the
kernel's high-water mark reset after the warm-up (/proc/self/clear_refs) so
that compilation and first-call caches are not charged to the op; glibc is
told to mmap large blocks so freed buffers leave the RSS. CUDA: in process,
triton.testing.do_bench for time and torch.cuda.max_memory_allocated over one
call for memory. A measurement that crashes or hangs is reported as n/a.
Nothing here asserts on time; the CLI prints, writes JSON and plots.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MARGIN_KINDS = ("normface", "arcface", "cosface", "sphereface", "combined", "ldam", "elm",
                "arcgrad")
OTHER_OPS = ("sinkhorn", "knn_std", "soft_nn", "triplet")
OPS = tuple(f"margin_ce:{k}" for k in MARGIN_KINDS) + OTHER_OPS
# what each benchmark name dispatches to
FAMILY = {**{f"margin_ce:{k}": "margin_cross_entropy" for k in MARGIN_KINDS},
          "sinkhorn": "sinkhorn", "knn_std": "knn_std",
          "soft_nn": "soft_nearest_neighbor_loss", "triplet": "triplet_margin_loss"}
SWEEP_KIND = "arcface"  # the kind swept over C for the plot

# (N, D, C) of margin CE; the sweep over C; sizes of the other ops.
SIZES = {
    "full": {"margin": (512, 128, 4096), "sweep_C": (1024, 4096, 16384),
             "sinkhorn": (256, 10, 100), "knn_std": (1024, 64, 10), "soft_nn": (1024, 64, 10),
             "triplet": (256, 64, 10)},
    "quick": {"margin": (64, 32, 256), "sweep_C": (256, 1024),
              "sinkhorn": (64, 10, 20), "knn_std": (128, 16, 5), "soft_nn": (128, 16, 5),
              "triplet": (64, 16, 5)},
}
REPEATS = {"full": (2, 10), "quick": (1, 3)}  # (warm-up, timed)


class BenchError(ValueError):
    """Bad benchmark options: the CLI prints one line and exits 2."""


@dataclass
class Case:
    op: str                 # benchmark name, e.g. "margin_ce:arcface"
    shape: Dict[str, int]   # N, D, C (margin CE, pairwise ops) or N, K, iters (sinkhorn)

    @property
    def family(self) -> str:
        return FAMILY[self.op]

    @property
    def kind(self) -> Optional[str]:
        return self.op.split(":", 1)[1] if self.op.startswith("margin_ce:") else None

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class Result:
    op: str
    shape: Dict[str, int]
    provider: str
    status: str = "ok"          # "ok" or "n/a"
    reason: str = ""            # why n/a
    mode: str = "fwd+bwd"
    min_ms: Optional[float] = None
    median_ms: Optional[float] = None
    peak_mb: Optional[float] = None
    repeats: int = 0
    calls_per_repeat: int = 1
    floor: str = ""             # what the floor computes (floor rows)
    wall_s: Optional[float] = None  # the whole measurement, set-up and warm-up included


# ------------------------------------------------------------------ cases

def build_cases(ops: Sequence[str], quick: bool) -> List[Case]:
    sz = SIZES["quick" if quick else "full"]
    cases: List[Case] = []
    for op in ops:
        if op.startswith("margin_ce:"):
            n, d, c = sz["margin"]
            cs = sorted(set(sz["sweep_C"]) | {c}) if op == f"margin_ce:{SWEEP_KIND}" else [c]
            cases += [Case(op, {"N": n, "D": d, "C": cc}) for cc in cs]
        elif op == "sinkhorn":
            n, k, it = sz["sinkhorn"]
            cases.append(Case(op, {"N": n, "K": k, "iters": it}))
        else:
            n, d, c = sz[op]
            cases.append(Case(op, {"N": n, "D": d, "C": c}))
    return cases


def parse_ops(text: Optional[str]) -> List[str]:
    """--ops: comma-separated names; "margin_ce" means every kind."""
    if not text:
        return list(OPS)
    out: List[str] = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        if name == "margin_ce":
            picks = [f"margin_ce:{k}" for k in MARGIN_KINDS]
        elif name in OPS:
            picks = [name]
        elif name in MARGIN_KINDS:
            picks = [f"margin_ce:{name}"]
        else:
            raise BenchError(f"unknown op {name!r}; choose from margin_ce, "
                             f"{', '.join(OPS)}")
        out += [p for p in picks if p not in out]
    if not out:
        raise BenchError("--ops selects nothing")
    return out


def _inputs(case: Case, device, dtype):
    """Inputs (leaf tensors that want gradients first) and a call taking an impl."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    sh = case.shape

    def rand(*size, grad=True):
        t = torch.randn(*size, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if case.kind is not None:
        n, d, c = sh["N"], sh["D"], sh["C"]
        x, w = rand(n, d), rand(c, d)
        y = torch.randint(0, c, (n,), generator=g).to(device)
        kw = dict(kind=case.kind, s=30.0)
        if case.kind in ("ldam", "elm"):
            counts = torch.randint(5, 500, (c,), generator=g)
            kw["m"] = (0.5 / counts.double() ** 0.25 * counts.double().min() ** 0.25).to(
                device=device, dtype=dtype)
        elif case.kind == "sphereface":
            kw["m"] = 1.35
        elif case.kind == "combined":
            kw.update(m1=1.0, m2=0.3, m3=0.1)
        elif case.kind in ("arcface", "cosface"):
            kw["m"] = 0.3
        return (x, w), lambda f: f(x, w, y, **kw)
    if case.op == "sinkhorn":
        n, k, it = sh["N"], sh["K"], sh["iters"]
        logits = rand(n, k)
        b = torch.softmax(rand(n, k, grad=False), 1)
        cost = (1 - torch.eye(k)).to(device=device, dtype=dtype)

        def call(f):
            plan = f(torch.softmax(logits, 1), b, cost, eps=0.1, n_iter=it)
            return (plan * cost).sum()
        return (logits,), call
    n, d, c = sh["N"], sh["D"], sh["C"]
    x = rand(n, d)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    if case.op == "knn_std":
        centers = rand(c, d)

        def call(f):
            sx, sc = f(x, y, centers, n_neighbors=7)
            return sx.sum() + sc.sum()
        return (x, centers), call
    if case.op == "soft_nn":
        return (x,), lambda f: f(x, y, temperature=1.0)
    return (x,), lambda f: f(x, y, margin=0.2, mining="semihard", distance="l2")


def _floor(case: Case, device, dtype) -> Tuple[Optional[Callable], str]:
    """The unavoidable matmuls of the op as one callable, and what it computes."""
    import torch

    sh = case.shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    if case.kind is not None:
        x, w = rand(sh["N"], sh["D"]), rand(sh["C"], sh["D"])

        def step():
            gl = x @ w.T
            return gl @ w, gl.T @ x
        return step, "x@W.T, G@W, G.T@x"
    if case.op in ("soft_nn", "triplet"):
        x = rand(sh["N"], sh["D"])

        def step():
            gl = x @ x.T
            return gl @ x, gl.T @ x
        return step, "x@x.T, G@x, G.T@x"
    if case.op == "knn_std":
        x, c = rand(sh["N"], sh["D"]), rand(sh["C"], sh["D"])

        def step():
            return x @ x.T, c @ x.T
        return step, "x@x.T, c@x.T (forward distances)"
    return None, "no matmul floor: K x K log-sum-exps per sample and iteration"


def _impl(case: Case, provider: str):
    """The function a provider runs for this case, or raise with the reason it is n/a."""
    import torch

    from .. import dispatch, functional

    impls = dispatch.OPS[case.family]
    public = getattr(functional, case.family)
    if provider == "eager":
        return lambda *a, **k: public(*a, backend="reference", **k)
    if provider == "compile":
        import logging

        # graph-break warnings (e.g. sinkhorn's data-dependent branch) are dynamo's business:
        # the row records whether compiling worked and what it costs
        torch._logging.set_logs(dynamo=logging.ERROR)
        return torch.compile(dispatch._load(impls["reference"]))
    if provider not in impls:
        raise LookupError(f"no {provider} kernel for {case.family}")
    ok, why = dispatch._status(provider)
    if not ok:
        raise LookupError(why)
    return lambda *a, **k: public(*a, backend=provider, **k)


def _zero(leaves):
    for t in leaves:
        t.grad = None


def _make_step(case: Case, provider: str, device, dtype) -> Tuple[Callable, str]:
    if provider == "floor":
        step, what = _floor(case, device, dtype)
        if step is None:
            raise LookupError(what)
        return step, what
    fn = _impl(case, provider)
    leaves, call = _inputs(case, device, dtype)

    def step():
        _zero(leaves)
        call(fn).backward()
    return step, ""


# ------------------------------------------------------------------ measuring

def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def measure_cpu(case: Case, provider: str, warmup: int, repeats: int, threads: int) -> dict:
    """One measurement, meant to run in its own process (see run_measurements)."""
    import torch
    from torch.utils import benchmark

    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large frees go back to the OS
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    res = Result(case.op, case.shape, provider)
    try:
        step, what = _make_step(case, provider, torch.device("cpu"), torch.float32)
        res.floor = what
        for _ in range(warmup):
            step()
    except LookupError as exc:
        return asdict(Result(case.op, case.shape, provider, status="n/a", reason=str(exc)))
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
        return asdict(Result(case.op, case.shape, provider, status="n/a",
                             reason=_one_line(exc)))
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    # calls per timed block: enough for ~5 ms, so that sub-millisecond ops are not
    # measured at the clock's resolution; min and median are over the blocks' means.
    # This first timed call also loads the Timer's own modules before the peak reset.
    once = timer.timeit(1).mean
    number = max(1, min(100, int(5e-3 / max(once, 1e-7))))
    if libc is not None:
        libc.malloc_trim(0)
    reset = _reset_peak_rss()
    base = _maxrss_mb()
    times = [timer.timeit(number).mean * 1e3 for _ in range(repeats)]
    res.min_ms, res.median_ms = min(times), statistics.median(times)
    res.peak_mb = max(0.0, _maxrss_mb() - base)
    res.repeats = repeats
    res.calls_per_repeat = number
    res.wall_s = time.perf_counter() - t_start
    if not reset:
        res.reason = "peak RSS could not be reset: memory includes the warm-up"
    return asdict(res)


def measure_cuda(case: Case, provider: str, warmup: int, repeats: int, device: str) -> dict:
    import torch

    res = Result(case.op, case.shape, provider)
    dev = torch.device(device)
    try:
        step, what = _make_step(case, provider, dev, torch.float32)
        res.floor = what
        for _ in range(max(1, warmup)):
            step()
        torch.cuda.synchronize(dev)
    except LookupError as exc:
        return asdict(Result(case.op, case.shape, provider, status="n/a", reason=str(exc)))
    except Exception as exc:  # noqa: BLE001
        return asdict(Result(case.op, case.shape, provider, status="n/a",
                             reason=_one_line(exc)))
    import triton.testing

    times = triton.testing.do_bench(step, warmup=25, rep=max(20, 10 * repeats),
                                    return_mode="all")
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    step()
    torch.cuda.synchronize(dev)
    res.min_ms, res.median_ms = float(min(times)), float(statistics.median(times))
    res.peak_mb = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    res.repeats = len(times)
    return asdict(res)


def _one_line(exc: BaseException) -> str:
    text = f"{exc.__class__.__name__}: {exc}".strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]


def _child(conn, args) -> None:
    try:
        conn.send(measure_cpu(*args))
    finally:
        conn.close()


def _in_child(ctx, case: Case, provider: str, args: tuple, timeout: float) -> dict:
    """measure_cpu in a fresh process; a crash or a hang is reported as n/a, not waited on."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, (case, provider) + args), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            return recv.recv()
        why = f"timed out after {timeout:g} s"
    except EOFError:
        proc.join(5)
        why = f"the measuring process died (exit status {proc.exitcode})"
    finally:
        recv.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return asdict(Result(case.op, case.shape, provider, status="n/a", reason=why))


def providers_for(device: str) -> List[str]:
    """eager, compile, the fused backend this device has, floor."""
    fused = "triton" if device.startswith("cuda") else "cpu"
    return ["eager", "compile", fused, "floor"]


def run_measurements(cases: Sequence[Case], device: str, *, quick: bool, compile: bool,
                     threads: Optional[int] = None, progress: Optional[Callable] = None,
                     timeout: float = 600.0) -> List[dict]:
    import torch

    warmup, repeats = REPEATS["quick" if quick else "full"]
    # --quick runs one thread: on a small shared machine two OpenMP threads wait on
    # each other whenever one is descheduled, which swamps millisecond timings
    threads = threads or (1 if quick else torch.get_num_threads())
    provs = providers_for(device)
    plan = []
    for case in cases:
        for p in provs:
            if p == "floor" and case.kind is not None and case.kind != SWEEP_KIND:
                # the floor does not depend on the kind: measured once per shape
                if any(c.kind == SWEEP_KIND and c.shape == case.shape for c in cases):
                    plan.append((case, p, "same as margin_ce:arcface at this shape"))
                    continue
            if p == "compile" and not compile:
                why = ("skipped by --quick (compiling takes tens of seconds per op here)"
                       if quick else "skipped by --no-compile")
                plan.append((case, p, why))
                continue
            plan.append((case, p, None))
    out: List[dict] = []
    if device.startswith("cuda"):
        for case, p, skip in plan:
            if progress:
                progress(case, p)
            out.append(asdict(Result(case.op, case.shape, p, status="n/a", reason=skip))
                       if skip else measure_cuda(case, p, warmup, repeats, device))
        return out
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "fused_margin"])
    for case, p, skip in plan:
        if progress:
            progress(case, p)
        out.append(asdict(Result(case.op, case.shape, p, status="n/a", reason=skip)) if skip
                   else _in_child(ctx, case, p, (warmup, repeats, threads), timeout))
    return out


# ------------------------------------------------------------------ report

def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run(ops: Sequence[str], *, device: str = "cpu", quick: bool = False, compile: bool = True,
        threads: Optional[int] = None, progress: Optional[Callable] = None) -> dict:
    """Benchmark `ops` on `device`; the JSON-ready report."""
    from .. import dispatch

    import torch

    cases = build_cases(ops, quick)
    warmup, repeats = REPEATS["quick" if quick else "full"]
    if not device.startswith("cuda"):
        threads = threads or (1 if quick else torch.get_num_threads())
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = run_measurements(cases, device, quick=quick, compile=compile and not quick,
                            threads=threads, progress=progress)
    return {"date": started.isoformat(timespec="seconds"), "machine": machine(device),
            "settings": {"quick": quick, "warmup": warmup, "repeats": repeats,
                         "threads": threads, "dtype": "float32",
                         "timer": ("triton.testing.do_bench" if device.startswith("cuda")
                                   else "torch.utils.benchmark.Timer"),
                         "memory": ("torch.cuda.max_memory_allocated growth over one call"
                                    if device.startswith("cuda") else
                                    "ru_maxrss growth over the timed calls, one process per "
                                    "measurement, peak reset after warm-up")},
            "backends": _backends_here(dispatch, device),
            "results": rows}


def _backends_here(dispatch, device: str) -> dict:
    """fused_margin.backends()'s verdicts, except that Triton counts only on CUDA: the
    interpreter (TRITON_INTERPRET=1) runs the kernels in numpy and is not benchmarked."""
    keys = ("available", "reason")
    out = {"cpu": dict(zip(keys, dispatch._status("cpu")))}
    if device.startswith("cuda"):
        out["triton"] = dict(zip(keys, dispatch._status("triton")))
    else:
        out["triton"] = {"available": False,
                         "reason": "CUDA devices only (the interpreter is not benchmarked)"}
    return out


def _f(v: Optional[float], spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    rows = report["results"]
    eager = {(r["op"], tuple(sorted(r["shape"].items()))): r for r in rows
             if r["provider"] == "eager" and r["status"] == "ok"}
    floor = {}
    for r in rows:
        if r["provider"] == "floor" and r["status"] == "ok":
            floor[tuple(sorted(r["shape"].items()))] = floor.get(
                tuple(sorted(r["shape"].items())), {})
            floor[tuple(sorted(r["shape"].items()))][FAMILY[r["op"]]] = r
    out = ["| op | shape | provider | min (ms) | median (ms) | peak (MB) | x eager | x floor "
           "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["op"], tuple(sorted(r["shape"].items())))
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["status"] != "ok":
            out.append(f"| {r['op']} | {shape} | {r['provider']} | n/a | n/a | n/a | | | "
                       f"{r['reason']} |")
            continue
        e = eager.get(key)
        fl = floor.get(key[1], {}).get(FAMILY[r["op"]])
        xe = f"{r['min_ms'] / e['min_ms']:.2f}" if e and e["min_ms"] else ""
        xf = f"{r['min_ms'] / fl['min_ms']:.2f}" if fl and fl["min_ms"] else ""
        note = r["floor"] if r["provider"] == "floor" else r["reason"]
        out.append(f"| {r['op']} | {shape} | {r['provider']} | {_f(r['min_ms'])} | "
                   f"{_f(r['median_ms'])} | {_f(r['peak_mb'], '.1f')} | {xe} | {xf} | {note} |")
    return "\n".join(out)


def plot(report: dict, path: str) -> Optional[str]:
    """Write the figure; returns None, or why nothing was plotted (then no file).

    With margin CE cases: time and peak memory against C for the swept kind
    (arcface, else the margin kinds that ran), one line per provider, and a
    note naming the other ops that ran (they are in the table and the JSON).
    Without: bars of min time and peak memory per op and provider. Every
    y-axis starts at zero."""
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if not ok:
        return "nothing to plot: no measurement succeeded"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op = f"margin_ce:{SWEEP_KIND}"
    rows = [r for r in ok if r["op"] == op]
    if not rows:
        rows = [r for r in ok if r["op"].startswith("margin_ce:")]
        op = ", ".join(sorted({r["op"] for r in rows}))
    m = report["machine"]
    where = (f"on {m['device']} ({m.get('gpu', str(m['cpu_count']) + ' CPU cores')}, "
             f"{report['settings']['threads'] or m['torch_threads']} threads)")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.3))
    if rows:
        provs = list(dict.fromkeys(r["provider"] for r in rows))
        for p in provs:
            pts = sorted((r["shape"]["C"], r["median_ms"], r["min_ms"], r["peak_mb"])
                         for r in rows if r["provider"] == p)
            cs = [q[0] for q in pts]
            line, = a.plot(cs, [q[1] for q in pts], marker="o", label=f"{p} (median)")
            a.plot(cs, [q[2] for q in pts], ls=":", color=line.get_color())
            b.plot(cs, [q[3] for q in pts], marker="o", label=p, color=line.get_color())
        for ax in (a, b):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("C (classes)")
        shape = rows[0]["shape"]
        title = f"{op} fp32, N={shape.get('N')} D={shape.get('D')}, {where}"
        others = sorted({r["op"] for r in ok} - {r["op"] for r in rows})
        if others:
            fig.text(0.01, 0.01, "also ran, not plotted (see the table / JSON): "
                     + ", ".join(others), fontsize=7)
    else:
        cases = list(dict.fromkeys((r["op"], " ".join(f"{k}={v}" for k, v in r["shape"].items()))
                                   for r in ok))
        provs = list(dict.fromkeys(r["provider"] for r in ok))
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            got = {(r["op"], " ".join(f"{k}={v}" for k, v in r["shape"].items())): r
                   for r in ok if r["provider"] == p}
            xs = [j + i * width for j, c in enumerate(cases) if c in got]
            a.bar(xs, [got[c]["min_ms"] for c in cases if c in got], width, label=p)
            b.bar(xs, [got[c]["peak_mb"] or 0.0 for c in cases if c in got], width, label=p)
        for ax in (a, b):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels([f"{o}\n{sh}" for o, sh in cases], fontsize=7, rotation=20,
                               ha="right")
        title = f"fused-margin bench, fp32, {where}"
    a.set_ylabel("ms per forward + backward (dotted: min)" if rows
                 else "min ms per forward + backward")
    b.set_ylabel("peak memory (MB)")
    for ax in (a, b):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return None


def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BenchError(f"bad device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but torch sees no CUDA device")
    return str(dev)
