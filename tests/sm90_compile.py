"""Compiles the margin kernels of fused_margin/triton/angular.py for sm_90 (an
H100 / H200) without a GPU: Triton's own front end, LLVM and ptxas, the code
paths the interpreter never takes (typing of constexpr branches, layouts,
register allocation). Run by tests/test_triton.py in a process without
TRITON_INTERPRET (under it, @triton.jit makes interpreted functions, which
cannot be compiled). Prints one line per kernel variant, then "compiled N of M".

    python tests/sm90_compile.py
"""
from __future__ import annotations

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_margin.triton import angular as ta

TARGET = GPUTarget("cuda", 90, 32)
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp64": "*fp64"}
ACC = {"fp32": (tl.float32, "*fp32"), "bf16": (tl.float32, "*fp32"), "fp64": (tl.float64, "*fp64")}
TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Every argument: constexpr, its pointer type, else a 64-bit integer (the
    kernels' sizes, strides and ignore_index)."""
    return {n: "constexpr" if n in constexprs else pointers.get(n, "i64")
            for n in kernel.arg_names}


def _compile(kernel, pointers, constexprs, num_warps):
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs),
                    constexprs=constexprs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))


def variants():
    """(label, kernel, pointer types, constexprs, num_warps) of what the launchers
    can ask for: the loss in several kinds and PARTIALS mode, with and without
    logit offsets, their two backward kernels, in fp32, bf16 and fp64."""
    import torch

    for dt in ("fp32", "bf16", "fp64"):
        b = ta.default_blocks(getattr(torch, TORCH[dt]), 512)
        acc, accp = ACC[dt]
        x = PTR[dt]
        fwd_ptrs = dict(x_ptr=x, w_ptr=x, rx_ptr=accp, rw_ptr=accp, labels_ptr="*i64",
                        m_ptr=accp, cw_ptr=accp, p_ptr=accp, off_ptr=accp, keep_ptr="*i64",
                        stats_ptr=accp, cstar_ptr="*i64")
        bwd_ptrs = dict(x_ptr=x, w_ptr=x, rx_ptr=accp, rw_ptr=accp, labels_ptr="*i64",
                        p_ptr=accp, off_ptr=accp, keep_ptr="*i64", lse_ptr=accp, a_ptr=accp,
                        b_ptr=accp, dx_ptr=x, dw_ptr=x)
        prec = "tf32" if dt == "bf16" else "ieee"
        # the loss's target transforms differ by kind; the partials and the backward
        # kernels only by arcgrad's class logit or not
        kinds = {"fp32": ta.KINDS, "bf16": ("elm", "arcgrad"), "fp64": ("arcgrad",)}[dt]
        for kind in kinds:
            modes = [(False, False, False)]  # (partials, logit offsets, kept rows)
            if kind in ("arcface", "arcgrad") or dt != "fp32":
                modes += [(True, False, False), (True, False, True), (True, True, True)]
            for partials, offset, keep in modes:
                ce = dict(KIND=ta.KINDS.index(kind), FROM_COSINE=False,
                          HAS_M_VEC=kind in ("ldam", "elm"), HAS_CLASS_WEIGHT=not partials,
                          HAS_OFFSET=offset, HAS_KEEP=keep, PARTIALS=partials,
                          IS_F64=dt == "fp64", ACC=acc,
                          PREC=prec, UPCAST=False, BLOCK_N=b.outer, BLOCK_C=b.sweep,
                          BLOCK_D=b.d)
                label = f"{dt} fwd {kind}" + (" partials" if partials else "") + (
                    " offset" if offset else "") + (" keep" if keep else "")
                yield label, ta._margin_ce_fwd_kernel, fwd_ptrs, ce, b.num_warps
            for offset, keep in (((False, False), (False, True), (True, True))
                                 if kind in ("arcface", "arcgrad") or dt != "fp32" else ()):
                common = dict(KIND=ta.KINDS.index(kind), HAS_OFFSET=offset, HAS_KEEP=keep,
                              IS_F64=dt == "fp64", ACC=acc, PREC=prec, UPCAST=False,
                              SPLIT=dt == "bf16", BLOCK_D=b.d, BLOCK_DO=b.do)
                tail = (" offset" if offset else "") + (" keep" if keep else "")
                yield (f"{dt} dx {kind}{tail}", ta._margin_ce_bwd_dx_kernel, bwd_ptrs,
                       dict(common, FROM_COSINE=False, BLOCK_N=b.outer, BLOCK_C=b.sweep),
                       b.num_warps)
                yield (f"{dt} dw {kind}{tail}", ta._margin_ce_bwd_dw_kernel, bwd_ptrs,
                       dict(common, BLOCK_N=b.sweep, BLOCK_C=b.outer), b.num_warps)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    todo = list(variants())
    n = 0
    for label, kernel, pointers, constexprs, warps in todo:
        _compile(kernel, pointers, constexprs, warps)
        print("ok", label, flush=True)
        n += 1
    print(f"compiled {n} of {len(todo)}")
    return 0 if n == len(todo) else 1


if __name__ == "__main__":
    sys.exit(main())
