"""fused_margin: margin-based classification losses as fused kernels.

Triton on GPUs, C++ on CPUs, each with a pure-PyTorch reference of the same
signature (`backend="reference"`). `fused_margin.backends()` says which
backends run here and why not. The public API: docs/api.md. Drop-in modules
for pytorch-metric-learning and insightface users: fused_margin.compat.pml,
fused_margin.compat.insightface; the class-sharded loss: fused_margin.distributed.
"""
from . import functional, nn  # noqa: F401
from .dispatch import backends  # noqa: F401
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all

__version__ = "0.1.0"
__all__ = list(_functional_all) + ["backends", "functional", "nn"]
