"""Backend selection: what backends() reports, auto's fallback, errors, and that the
C++ extension was built unless the run opted out."""
import os
import warnings

import pytest
import torch

import fused_margin as fm
from fused_margin import dispatch


def test_backends_report():
    info = fm.backends()
    assert set(info) == {"triton", "cpu", "reference"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool) and entry["reason"]
        assert all(op in dispatch.OPS for op in entry["ops"])
    assert info["reference"]["available"]
    assert set(info["reference"]["ops"]) == set(dispatch.OPS)


def test_every_op_has_a_reference():
    for op, impls in dispatch.OPS.items():
        assert callable(dispatch._load(impls["reference"])), op


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve("margin_cross_entropy", "cuda", torch.device("cpu"))


def test_op_without_kernel_raises_not_implemented(monkeypatch):
    monkeypatch.setitem(dispatch.OPS, "toy", {"reference": "fused_margin.reference.angular:cosine"})
    with pytest.raises(NotImplementedError, match="no 'cpu' kernel"):
        dispatch.resolve("toy", "cpu", torch.device("cpu"))


def test_auto_falls_back_with_one_warning(monkeypatch):
    """A missing C++ extension: auto warns once and uses the reference; cpu raises."""
    monkeypatch.setitem(dispatch.OPS, "toy", {"reference": "fused_margin.reference.angular:cosine",
                                               "cpu": "fused_margin.cpu:row_inv_norm"})
    monkeypatch.setattr(dispatch, "_cpu_status", lambda: (False, "not built (test)"))
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="not built"):
        fn = dispatch.resolve("toy", "auto", torch.device("cpu"))
    assert fn is fm.reference.angular.cosine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.resolve("toy", "auto", torch.device("cpu"))  # no second warning
    with pytest.raises(RuntimeError, match="unavailable"):
        dispatch.resolve("toy", "cpu", torch.device("cpu"))


def test_auto_uses_the_fused_cpu_kernel_when_built():
    ok, _ = dispatch._cpu_status()
    if not ok:
        pytest.skip("C++ extension not built")
    for op, impls in dispatch.OPS.items():
        if "cpu" in impls:
            assert dispatch.resolve(op, "auto", torch.device("cpu")) is dispatch._load(impls["cpu"])


def test_cpu_extension_build_path():
    ok, why = dispatch._cpu_status()
    if not ok:
        pytest.skip(why)
    from fused_margin import cpu
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(cpu.row_inv_norm(x), torch.tensor([0.2, 0.0, 1.0]))


def test_cpu_extension_was_built():
    """setup.py leaves a pure-Python install behind when the compiler fails, and every
    cpu test then skips: this one fails instead, unless the run opted out the way the
    build does (FUSED_MARGIN_NO_EXT=1)."""
    if os.environ.get("FUSED_MARGIN_NO_EXT", "0") == "1":
        pytest.skip("FUSED_MARGIN_NO_EXT=1: running without the C++ extension on purpose")
    ok, why = dispatch._cpu_status()
    assert ok, (f"{why}. The cpu backend's tests would all skip. Build it with "
                "`pip install --no-build-isolation -e .` (needs a C++17 compiler and ninja; the "
                "build log says why it failed), or set FUSED_MARGIN_NO_EXT=1 to test without it.")
