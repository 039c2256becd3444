"""Drop-in replacements for the two libraries margin-loss users come from.

- fused_margin.compat.pml: pytorch-metric-learning 2.x's ArcFaceLoss,
  CosFaceLoss and NormalizedSoftmaxLoss (constructor arguments in PML's units,
  the parameter `W` as [D, C], forward(embeddings, labels), get_logits).
- fused_margin.compat.insightface: arcface_torch's CombinedMarginLoss and
  PartialFC_V2 (insightface's call pattern and margin branches, on top of
  fused_margin.distributed).

Switching is one import; docs/api.md ("Drop-in modules") says what differs.
The submodules are imported on use: `import fused_margin.compat.pml`.
"""
__all__ = ["pml", "insightface"]
