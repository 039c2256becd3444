"""Shared test set-up: seeds, and the Triton interpreter where there is no GPU.

TRITON_INTERPRET must be set before anything imports a @triton.jit kernel, so
it is set here, at collection time, when no CUDA device is present.
"""
import os

from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fused_backends(op: str):
    """pytest params for every non-reference backend registered for `op`, skipped
    where that backend cannot run here."""
    from fused_margin import dispatch

    params = []
    for name in ("cpu", "triton"):
        if name not in dispatch.OPS[op]:
            continue
        ok, why = dispatch._status(name)
        marks = [] if ok else [pytest.mark.skip(reason=why)]
        params.append(pytest.param(name, marks=marks, id=name))
    if not params:
        params.append(pytest.param(None, marks=pytest.mark.skip(reason=f"no fused backend for {op} yet"),
                                   id="none"))
    return params


def device_for(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Alloc(NamedTuple):
    op: str
    shape: tuple
    numel: int


class AllocationRecorder(TorchDispatchMode):
    """Records every tensor an op returns while active, for the no-N x C / no-N x N
    memory tests. uint8 tensors are left out: the Triton interpreter copies kernel
    arguments as raw byte buffers, which no GPU run allocates and no op of ours makes."""

    def __init__(self):
        super().__init__()
        self.allocs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.allocs.append(Alloc(str(func.overloadpacket), tuple(t.shape), t.numel()))
        return out

    @property
    def ops(self):
        return {a.op for a in self.allocs}

    @property
    def shapes(self):
        return [a.shape for a in self.allocs]

    @property
    def sizes(self):
        return [a.numel for a in self.allocs]


class NativeAllocationRecorder:
    """Records, per op the profiler sees, the bytes it allocated itself (net of what
    it freed itself) while active: the scratch that C++ kernels take with at::empty
    / at::zeros inside one op, and the outputs and temporaries of ATen ops such as
    mm (AllocationRecorder sees only what ops return). Plain std::vector buffers in
    csrc/ are invisible to it; they hold O(N) or per-thread state."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.allocs = [(e.name, e.self_cpu_memory_usage) for e in self._prof.events()
                       if e.self_cpu_memory_usage > 0]
        return False

    @property
    def bytes(self):
        return [b for _, b in self.allocs]
