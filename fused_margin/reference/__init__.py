"""Plain eager PyTorch implementations: the oracle and `backend="reference"`.

One file per loss family. No custom autograd Functions here: gradients come
from PyTorch's autograd, which is what the fused backends are checked against.
"""
