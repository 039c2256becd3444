"""Double-backward guard for the fused backends' autograd Functions.

A fused backward is a kernel (C++ or Triton), not a graph of differentiable
torch ops, so with ``create_graph=True`` (gradient penalties, meta-learning)
its result would be a constant and ``loss + ||dL/dx||^2`` would get a silently
wrong ``x.grad``. ``torch.autograd.function.once_differentiable`` alone does not
catch this: the grad_output of a scalar loss does not require grad, so it
returns the constant without complaint. Autograd runs a backward with grad mode
on exactly when ``create_graph=True``, so checking ``torch.is_grad_enabled()``
at entry catches every such call.
"""
from __future__ import annotations

import functools

import torch


class DoubleBackwardError(RuntimeError):
    """A fused op's backward was asked to build a graph (create_graph=True)."""


def double_backward_error(op: str) -> DoubleBackwardError:
    return DoubleBackwardError(
        f"fused_margin: {op} has no double backward on this backend (its backward is a fused "
        "kernel, so a gradient taken with create_graph=True would be a constant and every "
        "higher-order term silently wrong); use backend=\"reference\" for gradient penalties, "
        "meta-learning or any other create_graph=True use")


def first_order(op: str):
    """Decorator for an autograd Function's backward (place it above
    ``@once_differentiable``, below ``@staticmethod``): raise
    DoubleBackwardError when autograd builds a graph of the backward."""
    def deco(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            if torch.is_grad_enabled():
                raise double_backward_error(op)
            return fn(ctx, *grads)
        return backward
    return deco
