"""Bindings to the C++ kernels in csrc/, reached as torch.ops.fused_margin.*.

Importing this package loads fused_margin._C (built by setup.py); the dispatch
module only imports it once that import is known to work. One module per loss
family, as in reference/ and triton/, each exposing functions with the
reference's signature: angular.py (csrc/angular.cpp), feature_space.py
(csrc/feature_space.cpp), cost_sensitive.py (csrc/sinkhorn.cpp).
"""
from __future__ import annotations

import torch

import fused_margin._C  # noqa: F401  (loads the operator registrations)

from ..reference.angular import NORM_EPS

ops = torch.ops.fused_margin


def row_inv_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """1/||x_i|| per row, 0 for rows of norm <= eps (proves the build path)."""
    return ops.row_inv_norm(x, eps)
