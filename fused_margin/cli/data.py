"""Small bundled classification problems for `fused-margin train`.

The scikit-learn toy datasets (nothing is downloaded), split train/test with
stratification and a fixed seed, standardised with the training statistics,
and optionally made long-tailed: the training split keeps
n_c = n_max * R^(-c/(C-1)) samples of class c (the exponential profile of the
LDAM and ELM papers), class 0 the head, class C-1 the tail. The test split
stays balanced, as in those papers, so per-class recall measures the tail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

DATASETS = ("digits", "iris", "wine", "breast_cancer")


class DataError(ValueError):
    """A split these options cannot make (the training CLI reports it as bad input)."""


@dataclass
class Split:
    """A standardised train/test split as float32 features and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: List[str]
    imbalance: Optional[float] = None
    train_counts: List[int] = field(default_factory=list)
    test_counts: List[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _load(name: str):
    try:
        from sklearn import datasets
    except ImportError as exc:  # the CLI extra is optional for the library itself
        raise ImportError("the bundled datasets need scikit-learn: "
                          "pip install 'fused_margin[cli]'") from exc
    loaders = {"digits": datasets.load_digits, "iris": datasets.load_iris,
               "wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    bunch = loaders[name]()
    names = [str(n) for n in getattr(bunch, "target_names", [])]
    classes = np.unique(bunch.target)
    if len(names) != len(classes):
        names = [str(c) for c in classes]
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64), names


def long_tail_counts(counts, imbalance: float) -> List[int]:
    """Per-class sizes n_c = n_max * R^(-c/(C-1)), capped by what each class has, at least 1.

    n_max is the largest class; R = imbalance >= 1 is the head-to-tail ratio.
    """
    if not (np.isfinite(imbalance) and imbalance >= 1):
        raise ValueError(f"imbalance must be a ratio >= 1, got {imbalance}")
    counts = [int(c) for c in counts]
    n_classes, n_max = len(counts), max(counts)
    if n_classes < 2:
        return counts
    return [max(1, min(have, int(n_max * imbalance ** (-c / (n_classes - 1)))))
            for c, have in enumerate(counts)]


def split_sizes(name: str, n_samples: int, n_classes: int, test_size: float):
    """(train, test) sizes of a stratified split, as scikit-learn rounds them.

    Both sides need at least one sample per class; checked here so that a bad
    --test-size is named with the range that works instead of failing inside
    scikit-learn.
    """
    if not (math.isfinite(test_size) and 0 < test_size < 1):
        raise DataError(f"test-size must lie in (0, 1), got {test_size}")
    n_test = math.ceil(test_size * n_samples)
    n_train = n_samples - n_test
    if min(n_test, n_train) < n_classes:
        # rounded inwards, so that both ends of the range work
        lo = math.ceil(n_classes / n_samples * 1000) / 1000
        hi = math.floor((1 - n_classes / n_samples) * 1000) / 1000
        raise DataError(f"test-size {test_size:g} splits {name}'s {n_samples} samples into "
                        f"{n_train} train / {n_test} test, but each side needs one sample "
                        f"per class ({n_classes}): use a test-size in [{lo:g}, {hi:g}]")
    return n_train, n_test


def load_split(name: str = "digits", *, imbalance: Optional[float] = None,
               test_size: float = 0.25, seed: int = 0) -> Split:
    """The dataset `name` split train/test (stratified, `seed`), standardised, maybe long-tailed."""
    from sklearn.model_selection import train_test_split

    x, y, class_names = _load(name)
    split_sizes(name, len(y), len(class_names), test_size)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y,
                                              random_state=seed)
    n_classes = len(class_names)
    if imbalance is not None:
        keep_n = long_tail_counts(np.bincount(y_tr, minlength=n_classes), imbalance)
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), keep_n[c], replace=False)
                               for c in range(n_classes)])
        keep.sort()
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    # Training statistics only, so the test split is unseen; constant columns
    # (digits has some) keep unit scale instead of dividing by zero.
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std < 1e-12] = 1.0

    def as_tensor(a):
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return Split(name=name, x_train=as_tensor(x_tr), y_train=torch.from_numpy(y_tr),
                 x_test=as_tensor(x_te), y_test=torch.from_numpy(y_te),
                 class_names=class_names, imbalance=imbalance,
                 train_counts=np.bincount(y_tr, minlength=n_classes).tolist(),
                 test_counts=np.bincount(y_te, minlength=n_classes).tolist())
