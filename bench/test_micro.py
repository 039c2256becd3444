"""pytest-benchmark micro-benchmarks: one forward + backward per op and provider.

    pip install -e ".[test]"                              # or ".[bench]": pytest-benchmark
    pytest bench/ --benchmark-only                        # all (torch.compile: ~15 s per op)
    pytest bench/ --benchmark-only -k "arcface and cpu"   # a selection
    pytest bench/ --benchmark-only -k "not compile"       # without compiling

Not part of the test suite (pytest's testpaths is tests/). The cases and the
providers are fused_margin.cli.bench's (the ones `fused-margin bench` measures),
at its --quick sizes; a provider without a kernel for the op is skipped with
the reason, never replaced, and so is torch.compile where it cannot compile
(no C++ compiler for inductor, an unsupported Python). Compiling happens in
the warm-up call, outside the timing. CPU only: `fused-margin bench --device
cuda` covers the Triton kernels.
"""
import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fused_margin.cli import bench  # noqa: E402

CASES = {c.op: c for c in bench.build_cases(bench.OPS, quick=True)}  # one shape per op
PROVIDERS = ("eager", "compile", "cpu", "floor")


@functools.lru_cache(maxsize=None)
def _compile_unavailable():
    """Why torch.compile cannot run on this machine, or None: one tiny compile, done once."""
    try:
        f = torch.compile(lambda t: (t * 2).sin().sum())
        f(torch.ones(4, requires_grad=True)).backward()
    except Exception as exc:  # noqa: BLE001 - whatever stops inductor here is the reason
        return bench._one_line(exc)
    return None


@pytest.fixture(autouse=True)
def _one_thread():
    # millisecond timings on a shared machine: two OpenMP threads mostly wait on each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(CASES))
def test_forward_backward(benchmark, op, provider):
    case = CASES[op]
    if provider == "compile" and _compile_unavailable():
        pytest.skip(f"torch.compile does not run here: {_compile_unavailable()}")
    try:
        step, what = bench._make_step(case, provider, torch.device("cpu"), torch.float32)
    except LookupError as exc:
        pytest.skip(f"n/a: {exc}")
    try:
        step()  # warm-up (and, for compile, the compilation), outside the timing
    except Exception as exc:  # noqa: BLE001
        if provider != "compile":
            raise
        pytest.skip(f"torch.compile fails on {op}: {bench._one_line(exc)}")
    benchmark.extra_info.update(shape=case.shape, floor=what)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
