"""Which tile table the Triton launchers use: FUSED_MARGIN_TRITON_CONFIG.

    unset / "auto"  the interpreter's small tiles under TRITON_INTERPRET=1, else the GPU table
    "sm90"          the tiles, warps and stages an sm_90 GPU (H100 / H200) gets, also under the
                    interpreter: the tests run the GPU tiles numerically this way, and
                    tests/sm90_compile.py builds exactly them
    "interp"        the interpreter's tiles, also on a GPU

Read at each launch (no import-time state), so a test can set it with monkeypatch.setenv.
The GPU table is the sm_90 one on every CUDA device: no other GPU has been tuned for."""
from __future__ import annotations

import os

ENV = "FUSED_MARGIN_TRITON_CONFIG"
CHOICES = ("auto", "sm90", "interp")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def target() -> str:
    """"sm90" or "interp": the table the launchers read."""
    v = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if v not in CHOICES:
        raise ValueError(f"{ENV}={v!r}: expected one of {', '.join(CHOICES)}")
    if v == "auto":
        return "interp" if interpreted() else "sm90"
    return v
