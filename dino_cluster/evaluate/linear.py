"""Linear probe on frozen features (the DINO reference recipe, on precomputed features).

Features follow the reference (see features.LinearProbeFeatures); the classifier is one
`nn.Linear` (weights N(0, 0.01), bias 0) trained with SGD, momentum 0.9, no weight decay,
lr = base_lr * batch / 256 (base_lr 0.001), cosine-annealed per epoch to 0, cross-entropy.

Deviation from the reference, on purpose: features are computed once from the eval transform
(resize + centre crop) and the classifier trains on those, instead of recomputing features
of RandomResizedCrop + flip views every epoch. That makes the probe cost one pass of the
backbone instead of `epochs` passes, which is what lets it run after every checkpoint; the
numbers are then slightly lower than the reference's augmented probe.

Under torch.distributed every rank extracts its part; the features are gathered and every
rank trains the same classifier (same seed, same data, same result): the classifier is tiny
next to the backbone pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dino_cluster.evaluate.features import collect, extract, gather_rows, max_over_ranks, percent

log = logging.getLogger(__name__)


@dataclass
class LinearResult:
    top1: float
    top5: float
    epochs: int
    lr: float
    n_train: int
    n_val: int
    num_classes: int
    final_loss: float

    def as_results(self, **info: Any) -> dict[str, Any]:
        return {
            "top1": round(self.top1, 4),
            "top5": round(self.top5, 4),
            "info": {
                "epochs": self.epochs,
                "lr": self.lr,
                "n_train": self.n_train,
                "n_val": self.n_val,
                "num_classes": self.num_classes,
                "final_loss": self.final_loss,
                **info,
            },
        }


def train_linear(
    train_f: Tensor,
    train_y: Tensor,
    val_f: Tensor,
    val_y: Tensor,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int = 256,
    base_lr: float = 0.001,
    seed: int = 0,
) -> LinearResult:
    """Train a linear classifier on (train_f, train_y); accuracy on (val_f, val_y)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if train_f.shape[0] == 0 or val_f.shape[0] == 0:
        raise ValueError("the linear probe needs labelled train and val samples")
    device = train_f.device
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(train_f.shape[1], num_classes).to(device)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * 0.01)
        clf.bias.zero_()
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    n = train_f.shape[0]
    loss = torch.tensor(math.nan)
    for epoch in range(epochs):
        for group in opt.param_groups:  # cosine over epochs, as the reference's scheduler
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = clf(val_f)
        k5 = min(5, num_classes)
        top = logits.topk(k5, dim=1).indices
        hit = top == val_y.view(-1, 1)
        c1, c5 = int(hit[:, 0].sum()), int(hit.any(dim=1).sum())
    m = val_f.shape[0]
    return LinearResult(
        percent(c1, m), percent(c5, m), epochs, lr, n, m, num_classes, float(loss.detach())
    )


def run_linear(
    features: nn.Module,
    train_reader: Iterable,
    val_reader: Iterable,
    *,
    device: torch.device,
    epochs: int,
    batch_size: int = 256,
    base_lr: float = 0.001,
    feature_dim: int | None = None,
    seed: int = 0,
) -> LinearResult:
    started = time.perf_counter()
    tr_f, tr_y = collect(
        extract(features, train_reader, device, normalize=False, what="linear train features")
    )
    va_f, va_y = collect(
        extract(features, val_reader, device, normalize=False, what="linear val features")
    )
    tr_f, tr_y = gather_rows(tr_f.to(device), dim=feature_dim), gather_rows(tr_y.to(device))
    va_f, va_y = gather_rows(va_f.to(device), dim=feature_dim), gather_rows(va_y.to(device))
    log.info(
        "linear probe: %d train / %d val features in %.1f s",
        tr_f.shape[0],
        va_f.shape[0],
        time.perf_counter() - started,
    )
    top = max(int(tr_y.max()) if tr_y.numel() else -1, int(va_y.max()) if va_y.numel() else -1)
    num_classes = max_over_ranks(top) + 1
    return train_linear(
        tr_f,
        tr_y,
        va_f,
        va_y,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        base_lr=base_lr,
        seed=seed,
    )
