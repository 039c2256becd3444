"""Backend selection: maps (op, backend, device) to one implementation.

Every backend exposes, for each op it implements, a function with the
reference's signature (fused backends wrap an autograd Function beside their
launchers). Nothing is rewired at import time: a backend module is imported
the first time an op resolves to it.

backend="auto": Triton for CUDA tensors, the C++ kernels for CPU tensors, the
reference where neither serves (no kernel for that op yet, or the backend is
not available, in which case one warning says why).
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from typing import Callable, Dict

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

# op -> backend -> "module:function". Fused backends add their entries here.
OPS: Dict[str, Dict[str, str]] = {
    "margin_cross_entropy": {"reference": "fused_margin.reference.angular:margin_cross_entropy",
                             "triton": "fused_margin.triton.angular:margin_cross_entropy",
                             "cpu": "fused_margin.cpu.angular:margin_cross_entropy"},
    "margin_cross_entropy_from_cosine": {
        "reference": "fused_margin.reference.angular:margin_cross_entropy_from_cosine",
        "triton": "fused_margin.triton.angular:margin_cross_entropy_from_cosine",
        "cpu": "fused_margin.cpu.angular:margin_cross_entropy_from_cosine"},
    # fused_margin.distributed's per-shard statistics; "reference" is the tiled eager
    # autograd Function (reference.sharded's N x C_r version is the tests' oracle)
    "margin_shard_partials": {
        "reference": "fused_margin.reference.sharded_tiles:margin_shard_partials",
        "triton": "fused_margin.triton.angular:margin_shard_partials",
        "cpu": "fused_margin.cpu.angular:margin_shard_partials"},
    "scaled_cosine": {"reference": "fused_margin.reference.angular:scaled_cosine"},
    "adacos_scale": {"reference": "fused_margin.reference.angular:adacos_scale",
                     "triton": "fused_margin.triton.angular:adacos_scale"},
    "adacos_loss": {"reference": "fused_margin.reference.angular:adacos_loss",
                    "triton": "fused_margin.triton.angular:adacos_loss",
                    "cpu": "fused_margin.cpu.angular:adacos_loss"},
    "weighted_cross_entropy": {
        "reference": "fused_margin.reference.cost_sensitive:weighted_cross_entropy",
        "triton": "fused_margin.triton.cross_entropy:weighted_cross_entropy",
        "cpu": "fused_margin.cpu.cost_sensitive:weighted_cross_entropy"},
    "crwwce_loss": {"reference": "fused_margin.reference.cost_sensitive:crwwce_loss",
                    "triton": "fused_margin.triton.cross_entropy:crwwce_loss",
                    "cpu": "fused_margin.cpu.cost_sensitive:crwwce_loss"},
    "sinkhorn": {"reference": "fused_margin.reference.cost_sensitive:sinkhorn",
                 "triton": "fused_margin.triton.sinkhorn:sinkhorn",
                 "cpu": "fused_margin.cpu.cost_sensitive:sinkhorn"},
    "wasserstein_loss": {
        "reference": "fused_margin.reference.cost_sensitive:wasserstein_loss",
        "triton": "fused_margin.triton.sinkhorn:wasserstein_loss",
        "cpu": "fused_margin.cpu.cost_sensitive:wasserstein_loss"},
    "center_loss": {"reference": "fused_margin.reference.feature_space:center_loss",
                    "triton": "fused_margin.triton.centers:center_loss",
                    "cpu": "fused_margin.cpu.feature_space:center_loss"},
    "center_update": {"reference": "fused_margin.reference.feature_space:center_update"},
    "contrastive_center_loss": {
        "reference": "fused_margin.reference.feature_space:contrastive_center_loss",
        "triton": "fused_margin.triton.centers:contrastive_center_loss",
        "cpu": "fused_margin.cpu.feature_space:contrastive_center_loss"},
    "knn_std": {"reference": "fused_margin.reference.feature_space:knn_std",
                "triton": "fused_margin.triton.feature_space:knn_std",
                "cpu": "fused_margin.cpu.feature_space:knn_std"},
    "sigma2r_loss": {"reference": "fused_margin.reference.feature_space:sigma2r_loss",
                     "triton": "fused_margin.triton.feature_space:sigma2r_loss",
                     "cpu": "fused_margin.cpu.feature_space:sigma2r_loss"},
    "soft_nearest_neighbor_loss": {
        "reference": "fused_margin.reference.feature_space:soft_nearest_neighbor_loss",
        "triton": "fused_margin.triton.feature_space:soft_nearest_neighbor_loss",
        "cpu": "fused_margin.cpu.feature_space:soft_nearest_neighbor_loss"},
    "triplet_margin_loss": {
        "reference": "fused_margin.reference.feature_space:triplet_margin_loss",
        "triton": "fused_margin.triton.feature_space:triplet_margin_loss",
        "cpu": "fused_margin.cpu.feature_space:triplet_margin_loss"},
    "git_loss": {"reference": "fused_margin.reference.feature_space:git_loss",
                 "triton": "fused_margin.triton.center_margins:git_loss",
                 "cpu": "fused_margin.cpu.feature_space:git_loss"},
    "triplet_center_loss": {
        "reference": "fused_margin.reference.feature_space:triplet_center_loss",
        "triton": "fused_margin.triton.center_margins:triplet_center_loss",
        "cpu": "fused_margin.cpu.feature_space:triplet_center_loss"},
    "contrastive_loss": {
        "reference": "fused_margin.reference.feature_space:contrastive_loss",
        "triton": "fused_margin.triton.contrastive:contrastive_loss",
        "cpu": "fused_margin.cpu.feature_space:contrastive_loss"},
}

_warned: set = set()


@lru_cache(maxsize=None)
def _triton_status() -> tuple:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"


@lru_cache(maxsize=None)
def _cpu_status() -> tuple:
    try:
        importlib.import_module("fused_margin._C")
    except Exception as exc:  # noqa: BLE001
        return False, (f"the C++ extension fused_margin._C was not built ({exc}); rebuild with "
                       "`pip install --no-build-isolation -e .`")
    return True, "C++ extension fused_margin._C loaded"


def _status(backend: str) -> tuple:
    if backend == "reference":
        return True, "plain eager PyTorch, every op, every device"
    if backend == "triton":
        return _triton_status()
    return _cpu_status()


class BackendReport(dict):
    """backends()'s answer: a dict backend -> {"available", "reason", "ops"} whose
    repr (and str) is a readable table of the backends and of which ops each has."""

    def table(self) -> str:
        names = list(self)
        lines = [f"{'backend':<10} {'available':<9}  reason"]
        for name in names:
            info = self[name]
            lines.append(f"{name:<10} {'yes' if info['available'] else 'no':<9}  "
                         f"{info['reason']}")
        ops = sorted({op for info in self.values() for op in info["ops"]})
        width = max([len("op")] + [len(op) for op in ops])
        lines += ["", f"{'op':<{width}}  " + "  ".join(f"{n:^9}" for n in names)]
        for op in ops:
            marks = ["yes" if op in self[n]["ops"] else "-" for n in names]
            lines.append(f"{op:<{width}}  " + "  ".join(f"{mk:^9}" for mk in marks))
        lines += ["", "backend='auto' picks triton for CUDA tensors and cpu for CPU tensors where "
                      "the op has that kernel and the backend is available, else reference."]
        return "\n".join(line.rstrip() for line in lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()


def backends() -> BackendReport:
    """What each backend can run here, and why not where it cannot (a dict whose
    repr is a table: print(fused_margin.backends()))."""
    out = BackendReport()
    for name in BACKENDS[1:]:
        ok, why = _status(name)
        ops = sorted(op for op, impls in OPS.items() if name in impls)
        out[name] = {"available": ok, "reason": why, "ops": ops}
    return out


def _load(path: str) -> Callable:
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def _serves(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu"
                                         and os.environ.get("TRITON_INTERPRET", "0") == "1")
    return device.type == "cpu"


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` that `backend` picks for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impls = OPS[op]
    if backend == "auto":
        fused = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        if fused in impls:
            ok, why = _status(fused)
            if ok:
                return _load(impls[fused])
            if fused not in _warned:
                _warned.add(fused)
                warnings.warn(f"fused_margin: the {fused} backend is unavailable ({why}); "
                              "backend='auto' falls back to the PyTorch reference",
                              RuntimeWarning, stacklevel=3)
        return _load(impls["reference"])
    if backend not in impls:
        have = sorted(impls)
        raise NotImplementedError(f"{op} has no {backend!r} kernel yet; implemented: {have}")
    ok, why = _status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    if not _serves(backend, device):
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors")
    return _load(impls[backend])


def resolve_unless(op: str, backend: str, device: torch.device, lacking: Dict[str, str],
                   feature: str) -> Callable:
    """resolve(), except that where the picked backend is a key of `lacking` (a
    backend whose kernel does not yet serve `feature`), the reference serves the
    call instead, with one warning per (op, backend, feature) naming the pending work."""
    fn = resolve(op, backend, device)
    impls = OPS[op]
    for name, pending in lacking.items():
        if name in impls and getattr(fn, "__module__", None) == impls[name].split(":")[0]:
            key = (op, name, feature)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"fused_margin: the {name} kernel of {op} does not serve {feature} "
                              f"yet ({pending}); the PyTorch reference computes these calls",
                              RuntimeWarning, stacklevel=3)
            return _load(impls["reference"])
    return fn

