"""Weighted k-NN classification on frozen features (the DINO reference protocol).

Features are L2-normalised; a query's neighbours are the k train features of highest cosine
similarity; each neighbour votes for its label with weight exp(sim / T) (T = 0.07); the
predicted classes are sorted by total weight. Top-1: the heaviest class is the label.
Top-5: the label is among the 5 heaviest classes that got any vote (min(5, k) of them).

The train feature bank is never held whole: `TopK` streams train batches past the (small)
query set and keeps only each query's best k so far, and the queries themselves are processed
in chunks. Under torch.distributed every rank streams its own part of the train set; the
per-rank top-k lists (k per query) are gathered and merged, which gives exactly the top-k
over the whole bank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dino_cluster.evaluate.features import dist_active, gather_rows, max_over_ranks, percent

log = logging.getLogger(__name__)

DEFAULT_T = 0.07
_EMPTY = -1  # label of a padding neighbour (fewer train samples than k on a rank)


class TopK:
    """Running top-k train neighbours (similarity, label) of a fixed set of queries."""

    def __init__(self, queries: Tensor, k: int, query_chunk: int = 4096) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if queries.dim() != 2:
            raise ValueError(f"queries must be (Q, D), got shape {tuple(queries.shape)}")
        self.queries, self.k, self.query_chunk = queries, k, max(1, query_chunk)
        q = queries.shape[0]
        self.sims = torch.empty(q, 0, dtype=queries.dtype, device=queries.device)
        self.labels = torch.empty(q, 0, dtype=torch.int64, device=queries.device)
        self.seen = 0
        self.max_label = -1

    def add(self, keys: Tensor, labels: Tensor) -> None:
        """Fold in a chunk of train features (N, D) with their labels (N,)."""
        if keys.shape[0] == 0:
            return
        if keys.shape[0] != labels.shape[0]:
            raise ValueError("train features and labels differ in length")
        keys = keys.to(self.queries.device, self.queries.dtype)
        labels = labels.to(self.queries.device)
        self.seen += keys.shape[0]
        self.max_label = max(self.max_label, int(labels.max()))
        new_sims, new_labels = [], []
        for start in range(0, self.queries.shape[0], self.query_chunk):
            stop = start + self.query_chunk
            s = self.queries[start:stop] @ keys.T  # (q, N)
            s = torch.cat([self.sims[start:stop], s], dim=1)
            lab = torch.cat(
                [self.labels[start:stop], labels.unsqueeze(0).expand(s.shape[0], -1)], dim=1
            )
            top, idx = s.topk(min(self.k, s.shape[1]), dim=1, largest=True, sorted=True)
            new_sims.append(top)
            new_labels.append(lab.gather(1, idx))
        if new_sims:
            self.sims, self.labels = torch.cat(new_sims), torch.cat(new_labels)

    def padded(self) -> tuple[Tensor, Tensor]:
        """(Q, k) similarities and labels; missing neighbours are -inf / -1."""
        q, have = self.sims.shape
        if have == self.k:
            return self.sims, self.labels
        pad_s = torch.full((q, self.k - have), float("-inf"), device=self.sims.device)
        pad_l = torch.full((q, self.k - have), _EMPTY, dtype=torch.int64, device=self.sims.device)
        return (
            torch.cat([self.sims, pad_s.to(self.sims.dtype)], dim=1),
            torch.cat([self.labels, pad_l], dim=1),
        )

    def merged(self) -> tuple[Tensor, Tensor]:
        """The top-k over every rank's train part (a collective under torch.distributed)."""
        sims, labels = self.padded()
        if not dist_active():
            return sims, labels
        world = dist.get_world_size()
        all_s = [torch.empty_like(sims) for _ in range(world)]
        all_l = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_s, sims.contiguous())
        dist.all_gather(all_l, labels.contiguous())
        return merge_parts(all_s, all_l, self.k)


def merge_parts(sims: list[Tensor], labels: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the union of several (Q, k) sorted neighbour lists (one per bank part):
    the top-k of a union is within the union of each part's top-k."""
    s, lab = torch.cat(sims, dim=1), torch.cat(labels, dim=1)
    top, idx = s.topk(min(k, s.shape[1]), dim=1, largest=True, sorted=True)
    return top, lab.gather(1, idx)


def vote(
    sims: Tensor,
    neighbour_labels: Tensor,
    targets: Tensor,
    k: int,
    *,
    temperature: float = DEFAULT_T,
    num_classes: int,
) -> tuple[int, int]:
    """(top-1 correct, top-5 correct) counts using the first k (sorted) neighbours."""
    s, lab = sims[:, :k], neighbour_labels[:, :k]
    valid = lab >= 0
    weights = torch.where(valid, (s / temperature).exp(), torch.zeros_like(s))
    scores = torch.zeros(s.shape[0], num_classes, dtype=weights.dtype, device=s.device)
    scores.scatter_add_(1, lab.clamp(min=0), weights)
    order = scores.argsort(dim=1, descending=True)
    ranked_scores = scores.gather(1, order)
    hit = (order == targets.view(-1, 1)) & (ranked_scores > 0)
    top1 = int(hit[:, 0].sum())
    top5 = int(hit[:, : min(5, k, num_classes)].any(dim=1).sum())
    return top1, top5


@dataclass
class KnnResult:
    by_k: dict[int, tuple[float, float]]  # k -> (top-1 %, top-5 %)
    n_train: int
    n_val: int
    num_classes: int
    temperature: float

    def as_results(self, headline_k: int = 20, **info: Any) -> dict[str, Any]:
        """The JSON recorded next to the checkpoint: headline top1/top5 and every k."""
        k = headline_k if headline_k in self.by_k else min(self.by_k)
        top1, top5 = self.by_k[k]
        return {
            "k": k,
            "top1": round(top1, 4),
            "top5": round(top5, 4),
            "by_k": {
                str(kk): {"top1": round(a, 4), "top5": round(b, 4)}
                for kk, (a, b) in sorted(self.by_k.items())
            },
            "info": {
                "n_train": self.n_train,
                "n_val": self.n_val,
                "num_classes": self.num_classes,
                "temperature": self.temperature,
                **info,
            },
        }


def knn_classify(
    train_batches: Iterable[tuple[Tensor, Tensor]],
    val_features: Tensor,
    val_labels: Tensor,
    ks: Sequence[int],
    *,
    temperature: float = DEFAULT_T,
    num_classes: int | None = None,
    query_chunk: int = 4096,
) -> KnnResult:
    """k-NN accuracy of (already L2-normalised) val features against streamed train batches.

    Under torch.distributed, `val_features` must be the same full val set on every rank and
    `train_batches` this rank's part of the train set; every rank returns the same result.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive, got {list(ks)}")
    acc = TopK(val_features, max(ks), query_chunk=query_chunk)
    for feats, labels in train_batches:
        acc.add(feats, labels)
    n_train = acc.seen
    if dist_active():
        t = torch.tensor([n_train], dtype=torch.int64)
        dist.all_reduce(t)
        n_train = int(t.item())
    if n_train == 0:
        raise ValueError("k-NN needs at least one train sample")
    sims, labels = acc.merged()
    if num_classes is None:
        top = max(acc.max_label, int(val_labels.max()) if val_labels.numel() else -1)
        num_classes = max_over_ranks(top) + 1
    by_k: dict[int, tuple[float, float]] = {}
    n_val = val_features.shape[0]
    for k in ks:
        kk = min(k, n_train)
        if kk != k:
            log.warning("k=%d exceeds the %d train samples: using k=%d", k, n_train, kk)
        c1, c5 = vote(
            sims, labels, val_labels, kk, temperature=temperature, num_classes=num_classes
        )
        by_k[k] = (percent(c1, n_val), percent(c5, n_val))
    return KnnResult(by_k, n_train, n_val, num_classes, temperature)


def run_knn(
    features: torch.nn.Module,
    train_reader: Iterable,
    val_reader: Iterable,
    ks: Sequence[int],
    *,
    device: torch.device,
    temperature: float = DEFAULT_T,
    feature_dim: int | None = None,
) -> KnnResult:
    """Extract val features (gathered to every rank), then stream this rank's train part."""
    from dino_cluster.evaluate.features import collect, extract

    started = time.perf_counter()
    val_f, val_y = collect(
        extract(features, val_reader, device, normalize=True, what="k-NN query features")
    )
    val_f = gather_rows(val_f.to(device), dim=feature_dim)
    val_y = gather_rows(val_y.to(device))
    if val_f.shape[0] == 0:
        raise ValueError("k-NN needs at least one labelled val sample")
    log.info("k-NN: %d val features in %.1f s", val_f.shape[0], time.perf_counter() - started)
    train = extract(features, train_reader, device, normalize=True, what="k-NN bank features")
    return knn_classify(train, val_f, val_y, ks, temperature=temperature)
