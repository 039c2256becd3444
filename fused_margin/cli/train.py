"""Train a small embedding network with any fused_margin loss and measure it.

The work behind `fused-margin train`: the model (an MLP, input -> hidden ->
ReLU -> embedding), the loss head for each `--loss`, the training loop (Adam,
shuffled mini-batches, optional deferred re-weighting), and the metrics
(accuracy, per-class recall, confusion matrix, target-angle statistics and
ArcGrad's WC-Intra / W-Inter / C-Inter). The CLI only parses and prints.

Loss heads:
- margin losses (normface ... elm) are fused_margin.nn modules that own the
  class weights W [C, D]; prediction is argmax of s*cos(x, W_j), no margin.
- wce, crwwce, wasserstein act on the logits of a plain linear head.
- ce and the feature-space losses (center, contrastive-center, sigma2r,
  soft-nn, triplet) use softmax cross-entropy on a linear head; the
  feature-space term is added with weight `lam` on the embedding.
For losses without class weights, the angle statistics use the linear
head's weight rows as the class directions.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as torch_F

from .. import functional as F
from ..checks import ANGLE_LIMIT
from .. import nn as fm_nn
from .data import DATASETS, DataError, Split, load_split
from ..dispatch import BACKENDS, OPS, resolve

MARGIN_LOSSES = ("normface", "arcface", "cosface", "sphereface", "combined", "camri", "arcgrad",
                 "adacos", "ldam", "elm", "subcenter-arcface", "magface", "elasticface", "adaface",
                 "curricularface")
COST_LOSSES = ("wce", "crwwce", "wasserstein")
FEATURE_LOSSES = ("center", "contrastive-center", "sigma2r", "soft-nn", "triplet", "git",
                  "triplet-center", "contrastive")
# raw linear logits with a margin on the target (M-Softmax, margin_cross_entropy normalize=False)
LINEAR_LOSSES = ("msoftmax",)
LOSSES = ("ce",) + MARGIN_LOSSES + LINEAR_LOSSES + COST_LOSSES + FEATURE_LOSSES
DRW_LOSSES = ("ce", "ldam", "elm")
IMPORTANT_LOSSES = ("camri", "wce", "crwwce", "wasserstein")
# --margin is an added angle (radians) for these: the library accepts [-pi/2, pi/2]
ANGLE_MARGIN_LOSSES = ("arcface", "camri", "combined", "subcenter-arcface", "elasticface",
                       "adaface", "curricularface")

# Defaults tuned for these small problems (2-10 classes, a 32-d embedding):
# the face-recognition s = 64 saturates the softmax within a few steps here.
DEFAULT_SCALE = {k: 16.0 for k in ("normface", "arcface", "cosface", "sphereface", "combined",
                                   "camri", "ldam", "elm", "subcenter-arcface", "magface",
                                   "elasticface", "adaface", "curricularface")}
DEFAULT_MARGIN = {"arcface": 0.3, "cosface": 0.2, "sphereface": 1.35, "combined": 0.2,
                  "camri": 0.3, "ldam": 0.5, "elm": 0.5, "msoftmax": 0.5,
                  "subcenter-arcface": 0.3, "elasticface": 0.3, "adaface": 0.4,
                  "curricularface": 0.3}
# issue 19's face-recognition heads: K sub-centres; ElasticFace-Arc's std; MagFace and
# AdaFace keep their papers' other hyper-parameters (nn.MagFace, nn.AdaFace)
SUB_CENTERS = 3
ELASTIC_STD = 0.05
COMBINED_M1, COMBINED_M3 = 1.0, 0.1  # `--margin` is m2, the additive angle
ELM_LAMBDA = 0.5
ARCGRAD_GAP = 0.15  # radians (about 8.6 degrees): s = arcgrad_scale(C, gap), 14.3 for C = 10
CRWWCE_FP_IMPORTANT = 2.0  # fp row and column of the important class (CAMRI paper's setup)
WASSERSTEIN_IMPORTANT = 2.0  # cost row and column of the important class, 1 - eye elsewhere
SINKHORN_EPS, SINKHORN_ITERS = 0.1, 50


class ConfigError(ValueError):
    """A bad training option: the CLI prints it as one line and exits with status 2."""


def max_threads() -> int:
    """The most intra-op threads accepted: 4 x the CPUs. torch takes any count and an absurd
    one (1e5) crashes the process when its thread pool starts."""
    return 4 * (os.cpu_count() or 1)


def check_threads(flag: str, n) -> None:
    """A thread count in 1..max_threads(), else ConfigError naming `flag`."""
    top = max_threads()
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= top:
        raise ConfigError(f"{flag} must be an integer in 1..{top} (4 x the {os.cpu_count()} "
                          f"CPUs here), got {n!r}")


@dataclass
class TrainConfig:
    loss: str = "arcface"
    dataset: str = "digits"
    imbalance: Optional[float] = None
    important_class: int = 0
    important_weight: float = 4.0
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    embedding_dim: int = 32
    hidden_dim: int = 64
    scale: Optional[float] = None
    margin: Optional[float] = None
    gap: float = ARCGRAD_GAP
    lam: float = 0.01
    drw: bool = False
    test_size: float = 0.25
    threads: Optional[int] = 1  # intra-op threads while training; None leaves torch's setting


@dataclass
class TrainResult:
    """The JSON-ready report plus the tensors a plot needs."""

    report: dict
    test_features: torch.Tensor
    test_labels: torch.Tensor
    directions: torch.Tensor
    class_names: List[str] = field(default_factory=list)


# ------------------------------------------------------------------ validation

def _finite(name: str, v, *, positive=False, nonnegative=False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ConfigError(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ConfigError(f"{name} must be >= 0, got {v}")


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked before the data is loaded."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose from {', '.join(LOSSES)}")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
    for name in ("epochs", "batch_size", "embedding_dim", "hidden_dim"):
        _positive_int(name.replace("_", "-"), getattr(cfg, name))
    if cfg.threads is not None:
        check_threads("threads", cfg.threads)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    _finite("lr", cfg.lr, positive=True)
    _finite("lambda", cfg.lam, nonnegative=True)
    _finite("gap", cfg.gap, positive=True)
    _finite("important-weight", cfg.important_weight, positive=True)
    _finite("test-size", cfg.test_size, positive=True)
    if cfg.test_size >= 1:
        raise ConfigError(f"test-size must lie in (0, 1), got {cfg.test_size}")
    if cfg.imbalance is not None:
        _finite("imbalance", cfg.imbalance)
        if cfg.imbalance < 1:
            raise ConfigError(f"imbalance is a head-to-tail ratio >= 1, got {cfg.imbalance}")
    if cfg.scale is not None:
        _finite("scale", cfg.scale, positive=True)
        if cfg.loss not in DEFAULT_SCALE and cfg.loss != "arcgrad":
            raise ConfigError(f"--scale does not apply to loss {cfg.loss!r}"
                              + (" (its scale is adaptive)" if cfg.loss == "adacos" else ""))
    if cfg.margin is not None:
        _finite("margin", cfg.margin, nonnegative=True)
        if cfg.loss not in DEFAULT_MARGIN:
            raise ConfigError(f"--margin does not apply to loss {cfg.loss!r}")
        if cfg.loss == "sphereface" and cfg.margin < 1:
            raise ConfigError(f"sphereface's margin is multiplicative and must be >= 1, "
                              f"got {cfg.margin}")
        if cfg.loss in ANGLE_MARGIN_LOSSES and cfg.margin > ANGLE_LIMIT:
            what = "m2, the additive angle," if cfg.loss == "combined" else "the additive angle"
            raise ConfigError(f"--margin {cfg.margin:g} is out of range for {cfg.loss}: {what} "
                              f"must lie in [0, pi/2] radians (at most {ANGLE_LIMIT:.4f})")
    if cfg.drw and cfg.loss not in DRW_LOSSES:
        raise ConfigError(f"--drw applies to {', '.join(DRW_LOSSES)}, not {cfg.loss!r}")
    if not isinstance(cfg.important_class, int) or isinstance(cfg.important_class, bool):
        raise ConfigError(f"important-class must be an integer, got {cfg.important_class!r}")
    _check_device(cfg.backend, cfg.device)


def _check_device(backend: str, device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device")
    if backend in ("auto", "reference"):
        return
    try:  # the fused core, which every fused backend implements
        resolve("margin_cross_entropy", backend, dev)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(str(exc)) from None


def _available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on `device` (CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(cfg: TrainConfig, split: Split, device: torch.device) -> None:
    """Refuse model sizes that cannot fit before allocating them.

    A lazily committed allocation that is too large need not fail in malloc: it
    can instead bring in the kernel's OOM killer part-way through
    initialisation, so the estimate runs first. Counted in fp32: the weights
    (embedder, head, centres) four times (value, gradient, Adam's two moments)
    and the activations of the largest forward (a batch or the test split).
    """
    f, h, d, c = split.num_features, cfg.hidden_dim, cfg.embedding_dim, split.num_classes
    params = f * h + h + h * d + d + 2 * (c * d + c)
    rows = max(min(cfg.batch_size, int(split.y_train.numel())), int(split.y_test.numel()))
    need = 4 * (4 * params + 3 * rows * (h + d + c))
    have = _available_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"--hidden-dim {h} with --embedding-dim {d} needs about "
                          f"{need / 2 ** 30:.3g} GiB (weights, gradients, Adam state, "
                          f"activations) but {have / 2 ** 30:.3g} GiB is free on {device}")


def _check_split(cfg: TrainConfig, split: Split) -> None:
    c = split.num_classes
    if not 0 <= cfg.important_class < c:
        raise ConfigError(f"important-class {cfg.important_class} is out of range for "
                          f"{split.name} ({c} classes: 0..{c - 1})")
    if cfg.loss == "adacos" and c < 3:
        # Its scale starts at sqrt(2)*log(C - 1) = 0 for two classes and the
        # update log(B_avg)/cos(theta_med) keeps it there: nothing trains.
        raise ConfigError(f"adacos needs at least 3 classes; {split.name} has {c}")


# ------------------------------------------------------------------ backends

def _effective_backend(op: str, backend: str, device: torch.device) -> str:
    """Which implementation `backend` reaches for `op`; missing kernels fall back to reference.

    Only the margin cross-entropy has fused kernels so far; asking for
    --backend cpu must not make every other op raise, so those run the
    reference and the report says so.
    """
    impls = OPS.get(op, {})
    if backend == "reference":
        return "reference"
    if backend == "auto":
        fused = "triton" if device.type == "cuda" else "cpu"
        if fused not in impls:
            return "reference"
        try:  # asks only this backend's status (fused_margin.backends() would import triton)
            resolve(op, fused, device)
        except (RuntimeError, ValueError, NotImplementedError):
            return "reference"
        return fused
    return backend if backend in impls else "reference"


def _module_backend(ops, backend: str, device: torch.device) -> str:
    """One backend string for a module that calls several ops."""
    picks = {_effective_backend(op, backend, device) for op in ops}
    if picks == {backend} or backend in ("auto", "reference"):
        return backend
    # The module calls an op the requested backend lacks: "auto" picks the same
    # fused kernels where they exist and the reference elsewhere, when the
    # requested backend is this device's natural one.
    natural = {_effective_backend(op, "auto", device) for op in ops} - {"reference"}
    return "auto" if natural <= {backend} else "reference"


# ------------------------------------------------------------------ model

class Embedder(nn.Module):
    """input -> hidden -> ReLU -> embedding (no activation on the embedding)."""

    def __init__(self, in_features: int, hidden: int, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearHead(nn.Module):
    """A plain linear classifier with softmax cross-entropy, `class_weight` as in MarginLoss."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.register_buffer("class_weight", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch_F.cross_entropy(self.linear(features), labels, weight=self.class_weight)


class Objective(nn.Module):
    """The loss of one `--loss`: a classifier head plus, maybe, a feature-space term."""

    def __init__(self, cfg: TrainConfig, num_classes: int, train_counts: List[int],
                 device: torch.device):
        super().__init__()
        c, d, b, k = num_classes, cfg.embedding_dim, cfg.backend, cfg.important_class
        self.loss_name, self.lam = cfg.loss, cfg.lam
        self.params: Dict[str, float] = {}
        self.backends: Dict[str, str] = {}
        self.aux: Optional[nn.Module] = None
        self.centers: Optional[nn.Parameter] = None
        s = cfg.scale if cfg.scale is not None else DEFAULT_SCALE.get(cfg.loss)
        m = cfg.margin if cfg.margin is not None else DEFAULT_MARGIN.get(cfg.loss)
        loss = cfg.loss
        if loss in MARGIN_LOSSES:
            ops = ["margin_cross_entropy"] + (["adacos_loss"] if loss == "adacos" else [])
            mb = _module_backend(ops, b, device)
            if loss == "normface":
                self.head = fm_nn.NormFace(d, c, s=s, backend=mb)
            elif loss == "arcface":
                self.head = fm_nn.ArcFace(d, c, s=s, m=m, backend=mb)
            elif loss == "cosface":
                self.head = fm_nn.CosFace(d, c, s=s, m=m, backend=mb)
            elif loss == "sphereface":
                self.head = fm_nn.SphereFace(d, c, s=s, m=m, backend=mb)
            elif loss == "combined":
                self.head = fm_nn.CombinedMargin(d, c, s=s, m1=COMBINED_M1, m2=m, m3=COMBINED_M3,
                                                 backend=mb)
                self.params.update(m1=COMBINED_M1, m3=COMBINED_M3)
            elif loss == "camri":
                self.head = fm_nn.CAMRI(d, c, important=k, m=m, s=s, backend=mb)
            elif loss == "arcgrad":
                if s is None:
                    s = F.arcgrad_scale(c, cfg.gap)
                    self.params["gap"] = cfg.gap
                self.head = fm_nn.ArcGrad(d, c, s=s, backend=mb)
            elif loss == "adacos":
                self.head = fm_nn.AdaCos(d, c, backend=mb)
            elif loss == "ldam":
                self.head = fm_nn.LDAM(d, train_counts, max_m=m, s=s, backend=mb)
            elif loss == "subcenter-arcface":
                self.head = fm_nn.SubCenterArcFace(d, c, sub_centers=SUB_CENTERS, s=s, m=m,
                                                   backend=mb)
                self.params["sub_centers"] = SUB_CENTERS
            elif loss == "magface":
                self.head = fm_nn.MagFace(d, c, s=s, backend=mb)
                self.params.update(l_a=self.head.l_a, u_a=self.head.u_a, l_m=self.head.l_m,
                                   u_m=self.head.u_m, lambda_g=self.head.lambda_g)
            elif loss == "elasticface":
                self.head = fm_nn.ElasticFace(d, c, variant="arc", s=s, m=m, std=ELASTIC_STD,
                                              backend=mb)
                self.params["std"] = ELASTIC_STD
            elif loss == "curricularface":
                # the hard-negative transform has no fused kernel yet: the reference runs it
                mb = "reference"
                self.head = fm_nn.CurricularFace(d, c, s=s, m=m, backend=mb)
                self.params["momentum"] = self.head.momentum
            elif loss == "adaface":
                self.head = fm_nn.AdaFace(d, c, m=m, s=s, backend=mb)
                self.params.update(h=self.head.h, t_alpha=self.head.t_alpha)
            else:
                self.head = fm_nn.ELM(d, train_counts, max_m=m, s=s, lam=ELM_LAMBDA, backend=mb)
                self.params["elm_lambda"] = ELM_LAMBDA
            for op in ops:
                self.backends[op] = _effective_backend(op, mb, device)
            self._logits_backend = _effective_backend("scaled_cosine", b, device)
            self.backends["scaled_cosine"] = self._logits_backend
        elif loss == "msoftmax":
            mb = _module_backend(["margin_cross_entropy"], b, device)
            self.head = fm_nn.MSoftmax(d, c, m=m, bias=True, backend=mb)
            self.backends["margin_cross_entropy"] = _effective_backend("margin_cross_entropy", mb,
                                                                       device)
        else:
            self.head = LinearHead(d, c)
            if loss == "ce" or loss in FEATURE_LOSSES:
                self.backends["cross_entropy"] = "torch"
        if loss == "wce":
            w = torch.ones(c)
            w[k] = cfg.important_weight
            self.register_buffer("wce_weight", w)
            self._cost_op("weighted_cross_entropy", b, device)
        elif loss == "crwwce":
            fn = torch.ones(c)
            fn[k] = cfg.important_weight
            fp = torch.ones(c, c)
            fp[k, :] = CRWWCE_FP_IMPORTANT
            fp[:, k] = CRWWCE_FP_IMPORTANT
            fp.fill_diagonal_(0.0)
            self.register_buffer("fn_weight", fn)
            self.register_buffer("fp_weight", fp)
            self.params["fp_important"] = CRWWCE_FP_IMPORTANT
            self._cost_op("crwwce_loss", b, device)
        elif loss == "wasserstein":
            cost = torch.ones(c, c)
            cost[k, :] = WASSERSTEIN_IMPORTANT
            cost[:, k] = WASSERSTEIN_IMPORTANT
            cost.fill_diagonal_(0.0)
            self.aux = fm_nn.WassersteinLoss(
                cost, eps=SINKHORN_EPS, n_iter=SINKHORN_ITERS,
                backend=_effective_backend("wasserstein_loss", b, device))
            self.params.update(cost_important=WASSERSTEIN_IMPORTANT, eps=SINKHORN_EPS,
                               n_iter=SINKHORN_ITERS)
            self._cost_op("wasserstein_loss", b, device)
        elif loss == "center":
            self.aux = fm_nn.CenterLoss(c, d, backend=_effective_backend("center_loss", b, device))
            self.backends["center_loss"] = self.aux.backend
        elif loss == "contrastive-center":
            self.centers = nn.Parameter(torch.randn(c, d))
            self._cost_op("contrastive_center_loss", b, device)
        elif loss == "sigma2r":
            self.aux = fm_nn.Sigma2R(c, d, backend=_effective_backend("sigma2r_loss", b, device))
            self.backends["sigma2r_loss"] = self.aux.backend
        elif loss == "soft-nn":
            self.aux = fm_nn.SoftNearestNeighborLoss(
                backend=_effective_backend("soft_nearest_neighbor_loss", b, device))
            self.backends["soft_nearest_neighbor_loss"] = self.aux.backend
        elif loss == "triplet":
            self.aux = fm_nn.TripletMarginLoss(
                backend=_effective_backend("triplet_margin_loss", b, device))
            self.backends["triplet_margin_loss"] = self.aux.backend
        elif loss == "git":
            self.aux = fm_nn.GitLoss(c, d, backend=_effective_backend("git_loss", b, device))
            self.backends["git_loss"] = self.aux.backend
        elif loss == "triplet-center":
            self.aux = fm_nn.TripletCenterLoss(
                c, d, backend=_effective_backend("triplet_center_loss", b, device))
            self.backends["triplet_center_loss"] = self.aux.backend
        elif loss == "contrastive":
            self.aux = fm_nn.ContrastiveLoss(
                backend=_effective_backend("contrastive_loss", b, device))
            self.backends["contrastive_loss"] = self.aux.backend
        if loss in MARGIN_LOSSES and loss != "adacos":
            self.params["s"] = float(self.head.scale())
        if m is not None and (loss in MARGIN_LOSSES or loss in LINEAR_LOSSES):
            self.params["m2" if loss == "combined" else
                        "max_m" if loss in ("ldam", "elm") else "m"] = float(m)
        if loss in FEATURE_LOSSES:
            self.params["lambda"] = cfg.lam
        if loss in IMPORTANT_LOSSES:
            self.params["important_class"] = k
        if loss in ("wce", "crwwce"):
            self.params["important_weight"] = cfg.important_weight
        first = ("s", "m", "max_m", "m1", "m2", "m3")
        self.params = {**{key: self.params[key] for key in first if key in self.params},
                       **{key: v for key, v in self.params.items() if key not in first}}

    def _cost_op(self, op: str, backend: str, device: torch.device) -> None:
        self.backends[op] = _effective_backend(op, backend, device)

    @property
    def is_margin(self) -> bool:
        return self.loss_name in MARGIN_LOSSES

    def set_class_weight(self, weight: torch.Tensor) -> None:
        """Deferred re-weighting: per-class CE weights from now on."""
        self.head.class_weight = weight.to(self.head.weight.device, self.head.weight.dtype)

    def directions(self) -> torch.Tensor:
        """The class weight directions W [C, D] the angle statistics use (sub-centres:
        the mean of each class's unit sub-centres)."""
        w = self.head.weight.detach()
        if isinstance(self.head, fm_nn.SubCenterArcFace):
            k = self.head.sub_centers
            w = torch.nn.functional.normalize(w, dim=1).view(-1, k, w.shape[1]).mean(1)
        return w

    def scale(self) -> Optional[float]:
        return float(self.head.scale()) if self.is_margin else None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, fm_nn.SubCenterArcFace):
            return self.head.logits(features)  # the max over each class's sub-centres
        if self.is_margin:
            return F.scaled_cosine(features, self.head.weight, self.head.scale(),
                                   backend=self._logits_backend)
        return self.head.logits(features)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        name = self.loss_name
        if self.is_margin or name == "ce" or name in LINEAR_LOSSES:
            return self.head(features, labels)
        logits = self.head.logits(features)
        if name == "wce":
            return F.weighted_cross_entropy(logits, labels, self.wce_weight,
                                            backend=self.backends["weighted_cross_entropy"])
        if name == "crwwce":
            return F.crwwce_loss(logits, labels, self.fn_weight, self.fp_weight,
                                 backend=self.backends["crwwce_loss"])
        if name == "wasserstein":
            return self.aux(logits, labels)
        ce = self.head(features, labels)
        if name == "contrastive-center":
            extra = F.contrastive_center_loss(features, labels, self.centers,
                                              backend=self.backends["contrastive_center_loss"])
        else:
            extra = self.aux(features, labels)
        return ce + self.lam * extra


# ------------------------------------------------------------------ metrics

def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between the rows of a and b (paired), float64."""
    cos = torch_F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def _mean_offdiag_angle(v: torch.Tensor) -> Optional[float]:
    c = v.shape[0]
    if c < 2:
        return None
    ang = _angle_deg(v[:, None, :].expand(c, c, -1), v[None, :, :].expand(c, c, -1))
    mask = ~torch.eye(c, dtype=torch.bool, device=v.device)
    return float(ang[mask].mean())


def angle_statistics(features: torch.Tensor, labels: torch.Tensor,
                     directions: torch.Tensor) -> dict:
    """Target angles per class and ArcGrad's Eq. 20-22, all in degrees.

    theta_i = angle(x_i, W_{y_i}); per class its mean and (population) std.
    WC-Intra (Eq. 20): mean over classes of angle(Center_j, W_j), Center_j the
    mean test embedding of class j. W-Inter (Eq. 21): mean angle between
    different W_i, W_j. C-Inter: mean angle between different centres; Eq. 22
    as printed repeats <Center_j, W_j>, but its text defines C-Inter as the
    angle between different classes' feature centres, which is what we use.
    """
    c = directions.shape[0]
    theta = _angle_deg(features, directions[labels])
    means, stds, centers = [], [], []
    for j in range(c):
        t = theta[labels == j]
        means.append(float(t.mean()) if t.numel() else None)
        stds.append(float(t.std(unbiased=False)) if t.numel() else None)
        sel = features[labels == j]
        centers.append(sel.double().mean(0) if sel.shape[0] else
                       torch.full((features.shape[1],), float("nan"), dtype=torch.float64,
                                  device=features.device))
    centers_t = torch.stack(centers)
    wc = _angle_deg(centers_t, directions.double())
    wc = wc[torch.isfinite(wc)]
    return {"target_mean_deg": means, "target_std_deg": stds,
            "wc_intra_deg": float(wc.mean()) if wc.numel() else None,
            "w_inter_deg": _mean_offdiag_angle(directions.double()),
            "c_inter_deg": _mean_offdiag_angle(centers_t)}


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, per-class recall and the confusion matrix (rows: true, columns: predicted)."""
    cm = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2)
    cm = cm.reshape(num_classes, num_classes).cpu()
    support = cm.sum(1)
    recall = [float(cm[j, j]) / float(support[j]) if support[j] else None
              for j in range(num_classes)]
    return {"accuracy": float(cm.diagonal().sum()) / max(1, int(labels.numel())),
            "per_class_recall": recall, "confusion_matrix": cm.tolist()}


# ------------------------------------------------------------------ training

def _batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    # A one-sample tail batch has no pairs for the feature-space losses and a
    # noisy gradient for the rest: fold it into the previous batch.
    if len(chunks) > 1 and chunks[-1].numel() < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def train(cfg: TrainConfig, *, progress: bool = False, split: Optional[Split] = None
          ) -> TrainResult:
    """Train per `cfg` and evaluate on the test split; raises ConfigError on bad options.

    The models are tiny (64-wide layers), so by default training runs on one
    intra-op thread: more threads only add synchronisation, and on a busy
    machine they cost several times the run time. The caller's thread count
    is restored afterwards.
    """
    validate(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress, split)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, progress: bool, split: Optional[Split]) -> TrainResult:
    t_start = time.perf_counter()
    if split is None:
        try:
            split = load_split(cfg.dataset, imbalance=cfg.imbalance, test_size=cfg.test_size,
                               seed=cfg.seed)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
    _check_split(cfg, split)
    device = torch.device(cfg.device)
    _check_memory(cfg, split, device)
    torch.manual_seed(cfg.seed)
    c = split.num_classes
    model = Embedder(split.num_features, cfg.hidden_dim, cfg.embedding_dim).to(device)
    objective = Objective(cfg, c, split.train_counts, device).to(device)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()),
                                 lr=cfg.lr)
    x, y = split.x_train.to(device), split.y_train.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    drw_start = cfg.epochs // 2 if cfg.drw else None

    if progress:
        from tqdm import tqdm

        epochs = tqdm(range(cfg.epochs), desc=f"{cfg.loss}/{cfg.dataset}", unit="epoch",
                      file=sys.stderr, leave=False)
    else:
        epochs = None
    epoch_s: List[float] = []
    train_loss: List[float] = []
    for epoch in epochs if epochs is not None else range(cfg.epochs):
        if drw_start is not None and epoch == drw_start:
            objective.set_class_weight(F.drw_weights(split.train_counts))
        model.train()
        objective.train()
        t0 = time.perf_counter()
        total, seen = torch.zeros((), device=device), 0
        for idx in _batches(x.shape[0], cfg.batch_size, generator):
            idx = idx.to(device)
            loss = objective(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * idx.numel()
            seen += idx.numel()
        mean_loss = float(total) / seen  # float() syncs, so the epoch time is complete
        epoch_s.append(time.perf_counter() - t0)
        train_loss.append(mean_loss)
        if epochs is not None:
            epochs.set_postfix(loss=f"{mean_loss:.4f}")
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"the training loss became {mean_loss} at epoch {epoch + 1}; "
                                     "try a smaller --lr or --scale")
    if epochs is not None:
        epochs.close()
    train_s = sum(epoch_s)

    model.eval()
    objective.eval()
    with torch.no_grad():
        feats = model(split.x_test.to(device))
        pred = objective.logits(feats).argmax(1)
        labels = split.y_test.to(device)
        metrics = classification_metrics(pred, labels, c)
        directions = objective.directions()
        angles = angle_statistics(feats, labels, directions)
    k = cfg.important_class
    report = {
        "config": asdict(cfg),
        "dataset": {"name": split.name, "num_classes": c, "class_names": split.class_names,
                    "num_features": split.num_features, "train_size": int(x.shape[0]),
                    "test_size": int(split.y_test.numel()), "imbalance": split.imbalance,
                    "train_counts": split.train_counts, "test_counts": split.test_counts},
        "loss": {"name": cfg.loss, "params": objective.params, "final_scale": objective.scale(),
                 "drw_start_epoch": drw_start, "backends": objective.backends,
                 "device": str(device)},
        **metrics,
        "important_class": k,
        "important_recall": metrics["per_class_recall"][k],
        "angles": angles,
        "train_loss": train_loss,
        "timing": {"epoch_s": epoch_s, "mean_epoch_s": train_s / len(epoch_s),
                   "train_s": train_s, "total_s": time.perf_counter() - t_start},
    }
    return TrainResult(report=report, test_features=feats.detach().cpu(),
                       test_labels=labels.cpu(), directions=directions.cpu(),
                       class_names=split.class_names)


# ------------------------------------------------------------------ plot

def plot_features(result: TrainResult, path: str) -> None:
    """A PNG of the test embeddings by class, with the class weight directions as arrows.

    The margin losses compare features by angle only, so their features are
    drawn L2-normalised (as in the CAMRI paper's Fig. 2); the others raw. A
    2-D embedding is drawn as is, a wider one on its first two principal axes,
    a 1-D one as a strip of raw values per class.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects

    rep = result.report
    feats = result.test_features.double()
    dirs = result.directions.double()
    if feats.shape[1] == 1:
        _plot_strips(result, path, plt)
        return
    normalised = rep["loss"]["name"] in MARGIN_LOSSES
    if normalised:
        feats = torch_F.normalize(feats, dim=1)
    if feats.shape[1] == 2:
        pts, arrows, axes = feats, dirs, ("z1", "z2")
    else:
        # Principal axes of the embeddings; the directions are projected on the
        # same axes without centring, since they are directions from the origin.
        _, _, v = torch.linalg.svd(feats - feats.mean(0), full_matrices=False)
        basis = v[:2].T
        pts, arrows, axes = feats @ basis, dirs @ basis, ("PC1", "PC2")
    norms = pts.norm(dim=1)
    radius = 1.0 if normalised else max(float(norms.quantile(0.9)), 1e-6)
    arrows = arrows / arrows.norm(dim=1, keepdim=True).clamp_min(1e-12) * radius
    # Outliers would squash the plot: frame the bulk (99% of the points) and the arrows.
    lim = 1.15 * max(float(norms.quantile(0.99)), radius)
    c = rep["dataset"]["num_classes"]
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=110)
    ax.axhline(0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    for j in range(c):
        sel = result.test_labels == j
        name = result.class_names[j] if j < len(result.class_names) else j
        ax.scatter(pts[sel, 0], pts[sel, 1], s=10, alpha=0.6, color=cmap(j % cmap.N),
                   label=str(name), zorder=2)
    for j in range(c):
        ax.annotate("", xy=(float(arrows[j, 0]), float(arrows[j, 1])), xytext=(0.0, 0.0),
                    zorder=5, arrowprops=dict(
                        arrowstyle="-|>", color=cmap(j % cmap.N), lw=2.2, path_effects=[
                            patheffects.withStroke(linewidth=4.5, foreground="white")]))
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    what = "normalised test features" if normalised else "test features"
    ax.set_title(f"{rep['loss']['name']} on {rep['dataset']['name']} "
                 f"(accuracy {rep['accuracy']:.3f}): {what}, arrows W_j", fontsize=10)
    ax.legend(fontsize=7, markerscale=1.5, loc="upper right", ncol=2 if c > 5 else 1,
              framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _plot_strips(result: TrainResult, path: str, plt) -> None:
    """A 1-D embedding: one jittered strip of raw feature values per class, W_j's sign as arrows.

    Normalising a 1-D feature leaves only its sign (cos is +-1), so the raw
    values are drawn; the arrow on each class's strip points the way its
    weight W_j does, which is all a margin loss can compare against.
    """
    rep = result.report
    z = result.test_features.double()[:, 0]
    w = result.directions.double()[:, 0]
    labels = result.test_labels
    c = rep["dataset"]["num_classes"]
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20")
    # frame the bulk (99% of |z|) so that a few outliers do not squash the strips
    lim = 1.15 * max(float(z.abs().quantile(0.99)), 1e-6)
    jitter = (torch.rand(z.shape[0], generator=torch.Generator().manual_seed(0)) - 0.5) * 0.5
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.5 * c + 1.5)), dpi=110)
    ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    for j in range(c):
        sel = labels == j
        colour = cmap(j % cmap.N)
        ax.scatter(z[sel], j + jitter[sel], s=10, alpha=0.6, color=colour, zorder=2)
        sign = 1.0 if float(w[j]) >= 0 else -1.0
        ax.annotate("", xy=(sign * 0.8 * lim, j), xytext=(0.0, j), zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=2.0, alpha=0.45))
    ax.set_xlim(-lim, lim)
    ax.set_ylim(c - 0.5, -0.5)
    ax.set_yticks(range(c))
    ax.set_yticklabels([str(result.class_names[j]) if j < len(result.class_names) else str(j)
                        for j in range(c)], fontsize=8)
    ax.set_xlabel("z1 (raw)")
    note = (" (a margin loss sees only the sign: cos(x, W_j) = +-1)"
            if rep["loss"]["name"] in MARGIN_LOSSES else "")
    ax.set_title(f"{rep['loss']['name']} on {rep['dataset']['name']} "
                 f"(accuracy {rep['accuracy']:.3f}): 1-D test features\n"
                 f"arrows: sign(W_j){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
