"""Shared test set-up: seeds, and the Triton interpreter where there is no GPU.

TRITON_INTERPRET must be set before anything imports a @triton.jit kernel, so
it is set here, at collection time, when no CUDA device is present.
"""
import os

import pytest
import torch

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
