"""pytest-benchmark micro-benchmarks: one forward + backward per op and provider.

    pytest bench/ --benchmark-only                       # all
    pytest bench/ --benchmark-only -k "arcface and cpu"  # a selection

Not part of the test suite (pytest's testpaths is tests/). The cases and the
providers are fused_margin.bench's (the ones `fused-margin bench` measures),
at its --quick sizes; a provider without a kernel for the op is skipped with
the reason, never replaced. CPU only: `fused-margin bench --device cuda` covers
the Triton kernels.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fused_margin import bench  # noqa: E402

CASES = {c.op: c for c in bench.build_cases(bench.OPS, quick=True)}  # one shape per op
PROVIDERS = ("eager", "cpu", "floor")


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
    try:
        step, what = bench._make_step(case, provider, torch.device("cpu"), torch.float32)
    except LookupError as exc:
        pytest.skip(f"n/a: {exc}")
    step()  # warm-up, outside the timing
    benchmark.extra_info.update(shape=case.shape, floor=what)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
