"""Builds the margin kernels of fused_margin/triton/angular.py for sm_90 (an H100 /
H200) without a GPU, as a real launch builds them, and checks the binaries.

The launchers themselves pick every variant: FUSED_MARGIN_TRITON_CONFIG=sm90 gives them
the GPU tiles, and angular.LAUNCH_HOOK records each launch (kernel, arguments,
constexprs, warps, stages) instead of running it, while the Python around the launches
(autograd, chunk loops, torch.mm on zeros) runs on CPU tensors. Each recorded launch is
specialised the way JITFunction.run does it (Triton's own binder: integer arguments
equal to 1 become constexpr, sizes i32 with divisibility-16 hints where they divide,
pointers aligned to 16), then built with triton.compile for GPUTarget("cuda", 90, 32):
Triton's front end, LLVM and ptxas, what the interpreter never checks.

Checks: 0 spill bytes in every variant; in every kernel with a tl.dot on bf16 / fp16
(or TF32) tiles, the SASS has HGMMA (wgmma) inside a loop and no HMMA (mma.sync).
Prints one line per variant, then "compiled N of M"; exit status 1 on a failed check.

    python tests/sm90_compile.py            # the variants CI builds
    python tests/sm90_compile.py --all --ragged   # every kind; sizes 16 does not divide

bench/sm90_report.py prints the same variants as a table (registers, spills, shared
memory, stages, MMA kind, tile FLOP per byte). Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["FUSED_MARGIN_TRITON_CONFIG"] = "sm90"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fused_margin.triton import angular as ta  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DOT_KERNELS = ("_margin_ce_fwd_kernel", "_margin_ce_grad_kernel")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


class Recorder:
    """angular.LAUNCH_HOOK: keeps one record per distinct specialisation."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.seen = {}
        self.tag = ""

    def __call__(self, kernel, grid, args, kw):
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, spec, options = binder(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kw, bound, spec,
                                                                  options)
        flags = {k: v for k, v in kw.items() if k.isupper() and k not in ("ACC", "PREC")}
        key = (kernel.fn.__name__, repr(sorted(signature.items())),
               repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items(), key=str)),
               options.num_warps, options.num_stages)
        if key not in self.seen:
            self.seen[key] = dict(kernel=kernel, signature=signature, constexprs=constexprs,
                                  attrs=attrs, options=options, tag=self.tag, kw=kw,
                                  flags=flags, name=kernel.fn.__name__)


def _label(rec) -> str:
    kw = rec["kw"]
    name = rec["name"].replace("_margin_ce_", "").replace("_kernel", "").lstrip("_")
    bits = [rec["tag"], name]
    if "KIND" in kw and name in ("fwd", "grad", "finish"):
        bits.append(ta.KINDS[int(kw["KIND"])])
    if kw.get("NORMALIZE") is False:
        bits.append("linear")
    for flag in ("FROM_COSINE", "PARTIALS", "TRACK_BEST", "HAS_OFFSET", "HAS_KEEP", "WRITE",
                 "HAS_KS", "HAS_IDX", "HAS_BIAS", "ROW_WEIGHT"):
        if kw.get(flag):
            bits.append(flag.lower().replace("has_", ""))
    if "BLOCK_N" in kw and "BLOCK_C" in kw:
        bits.append(f"{kw['BLOCK_N']}x{kw['BLOCK_C']}x{kw['BLOCK_D']}")
    return " ".join(b for b in bits if b)


# the kinds CI builds: the sweep and gradient kernels differ between kinds only in
# arcgrad's non-target logit and elm's argmax (the others are the same code with another
# constant), the finish kernel in the target transform; --all builds every kind
CI_KINDS = ("arcface", "elm", "arcgrad")


def record(ragged: bool = False, all_kinds: bool = False) -> list:
    """Drive the launchers on CPU tensors (zeros: the kernels never run) and return the
    distinct launches they make."""
    rec = Recorder()
    ta.LAUNCH_HOOK = rec
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        shapes = [(256, 512, 8192)] + ([(250, 500, 8000)] if ragged else [])
        plan = [  # (tag, dtype, tf32, kinds); fp16 is bf16's code with another type
            ("bf16", torch.bfloat16, False, ta.KINDS if all_kinds else CI_KINDS),
            ("fp16", torch.float16, False, ("arcface",) if all_kinds else ()),
            ("fp32", torch.float32, False, ("arcface", "elm", "arcgrad") if all_kinds
             else ("arcface", "arcgrad")),
            ("tf32", torch.float32, True, ("arcface", "elm", "arcgrad") if all_kinds
             else ("arcface", "arcgrad")),
            ("fp64", torch.float64, False, ("arcgrad",)),
        ]
        for N, D, C in shapes:
            for tag, dt, tf32, kinds in plan:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                rec.tag = tag + ("" if (N, D, C) == shapes[0] else " ragged")
                if (N, D, C) != shapes[0] and tag not in ("bf16", "tf32"):
                    continue
                x = torch.zeros(N, D, dtype=dt, requires_grad=True)
                W = torch.zeros(C, D, dtype=dt, requires_grad=True)
                y = torch.arange(N) % C
                for kind in kinds:
                    m = torch.full((C,), 0.2) if kind in ("ldam", "elm") else 0.3
                    loss = ta.apply(y, x, W, kind=kind, s=30.0, m=m, m1=1.0, m2=0.3, m3=0.1,
                                    elm_lambda=0.5, class_weight=None, ignore_index=-100,
                                    reduction="mean")
                    loss.backward()
                if tag in ("bf16", "tf32", "fp32"):
                    # normalize=False (issue 18): plain linear CE, and with a bias and label
                    # smoothing (per-row weights)
                    b = torch.zeros(C, dtype=dt, requires_grad=True)
                    for extra in (dict(), dict(bias=b, label_smoothing=0.1)):
                        ta.margin_cross_entropy(x, W, y, kind="normface", s=1.0,
                                                normalize=False, **extra).backward()
                if tag == "bf16" and (N, D, C) == shapes[0]:
                    p = ta.MarginParams("arcgrad", 4.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1, "none")
                    for kind in ("arcface", "arcgrad"):
                        p = ta.MarginParams(kind, 4.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1, "none")
                        keep = torch.arange(0, C, 2)
                        off = torch.zeros(keep.numel())
                        out = ta.ShardPartialsFunction.apply(p, y % keep.numel(), off, keep, x, W)
                        (out[1].sum() + out[2].sum()).backward()
                    cos = torch.zeros(N, 1024, dtype=dt, requires_grad=True)
                    ta.apply(y % 1024, cos, kind="arcface", s=30.0, m=0.3, m1=1.0, m2=0.0,
                             m3=0.0, elm_lambda=0.5, class_weight=None, ignore_index=-100,
                             reduction="sum").backward()
    finally:
        ta.LAUNCH_HOOK = None
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    out = list(rec.seen.values())
    for r in out:
        r["label"] = _label(r)
    return out


def build(r):
    src = ASTSource(fn=r["kernel"], signature=r["signature"], constexprs=r["constexprs"],
                    attrs=r["attrs"])
    return triton.compile(src, target=TARGET, options=r["options"].__dict__)


def cuobjdump(ck, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(ck) -> dict:
    """cuobjdump -res-usage: registers, stack frame, local memory (where spills go) and
    shared memory a thread block of this kernel uses."""
    text = cuobjdump(ck, "-res-usage")
    got = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return got


def mma_report(text: str) -> dict:
    """MMA instructions in the SASS, and which of them sit inside a loop: the range of a
    backward branch (cuobjdump prints each instruction's address, and branch targets as
    addresses)."""
    branches, mmas = [], []
    for ln in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*)", ln)
        if not m:
            continue
        addr, ins = int(m.group(1), 16), m.group(2)
        b = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", ins)
        if b:
            branches.append((addr, int(b.group(1), 16)))
        for op in ("HGMMA", "HMMA", "DMMA", "IMMA"):
            if re.search(rf"\b{op}\b", ins):
                mmas.append((addr, op))
    loops = [(t, a) for a, t in branches if t < a]
    kinds = sorted({op for _, op in mmas})
    in_loop = sorted({op for i, op in mmas if any(a <= i <= b for a, b in loops)})
    ffma = len(re.findall(r"\bFFMA\b", text))
    dfma = len(re.findall(r"\bDFMA\b", text))
    if "HGMMA" in kinds:
        kind = "wgmma" + (" + mma.sync" if "HMMA" in kinds else "")
    elif "HMMA" in kinds:
        kind = "mma.sync"
    elif "DMMA" in kinds:
        kind = "DMMA (fp64 mma.sync)"
    elif dfma:
        kind = "DFMA"
    else:
        kind = "FFMA" if ffma else "-"
    return dict(kind=kind, in_loop=in_loop, loops=len(loops))


def _ptxas() -> str:
    """The ptxas Triton itself runs for this target (3.9 ships two)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(TARGET.arch).path
    except ImportError:  # older Triton
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "ptxas")


def ptxas_spills(ck) -> tuple:
    """(spill store bytes, spill load bytes, stack frame bytes) from ptxas -v on the
    kernel's PTX with Triton's own flags: local memory can also be a libdevice table
    or array (sin / cos range reduction), which is not a spill."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ck.asm["ptx"])
        log = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    get = lambda pat: sum(int(v) for v in re.findall(pat, log))  # noqa: E731
    return (get(r"(\d+) bytes spill stores"), get(r"(\d+) bytes spill loads"),
            get(r"(\d+) bytes stack frame"))


def inspect(r, ck) -> dict:
    md = ck.metadata
    res = resources(ck)
    text = cuobjdump(ck, "-sass")
    # spill bytes: ptxas's own count, asked only where the kernel has local memory at all
    stl = len(re.findall(r"\b(STL|LDL)\b", text))
    stack = res.get("LOCAL", 0) + res.get("STACK", 0)
    spills = sum(ptxas_spills(ck)[:2]) if (stack or stl) else 0
    info = dict(label=r["label"], name=r["name"], regs=res.get("REG"), spills=spills,
                stack=stack, local_ops=stl, shared=max(md.shared, res.get("SHARED", 0)),
                stages=r["options"].num_stages, warps=r["options"].num_warps)
    info.update(mma_report(text))
    kw = r["kw"]
    dot = r["name"] in DOT_KERNELS and not kw.get("FROM_COSINE")
    tensor_cores = r["tag"].split()[0] in ("bf16", "fp16", "tf32")
    info["needs_wgmma"] = dot and tensor_cores
    if dot:
        bn, bc, bd = kw["BLOCK_N"], kw["BLOCK_C"], kw["BLOCK_D"]
        es = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}[r["tag"].split()[0]]
        info["flop_per_byte"] = 2 * bn * bc * bd / ((bn + bc) * bd * es)
    problems = []
    if info["spills"]:
        problems.append(f"{info['spills']} spill bytes")
    if info["needs_wgmma"] and ("HGMMA" not in info["in_loop"] or "HMMA" in info["kind"]):
        problems.append(f"hot loop without wgmma ({info['kind']})")
    info["problems"] = problems
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ragged", action="store_true", help="also N, C, D that 16 does not divide")
    ap.add_argument("--all", action="store_true", help="every kind (CI: CI_KINDS)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    todo = record(args.ragged, args.all)
    n = bad = 0
    for r in todo:
        info = inspect(r, build(r))
        n += 1
        status = "FAIL " + "; ".join(info["problems"]) if info["problems"] else "ok"
        print(f"{status}: {info['label']}: {info['regs']} regs, {info['spills']} spills, "
              f"{info['shared']} B shared, {info['stages']} stages, {info['kind']}", flush=True)
        bad += bool(info["problems"])
    print(f"compiled {n} of {len(todo)}; failing the checks: {bad}")
    return 0 if n == len(todo) and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
