"""Queries and their k nearest bank images by the teacher's CLS feature (cosine), as a grid.

The features are exactly k-NN evaluation's (evaluate/features.py): `CLSFeatures` of the frozen
teacher backbone on the spec's `EvalTransform` (bicubic resize + centre crop + ImageNet
normalisation), L2-normalised. The bank is streamed once, keeping only each query's running
top k (and those images' thumbnails), so a bank of any size fits in memory. When the queries
are samples of the bank itself, each query's own sample is left out of its neighbours.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD
from dino_cluster.evaluate.features import CLSFeatures
from dino_cluster.visualize import VisualizeError
from dino_cluster.visualize.draw import BAD, BLACK, GOOD, Cell, compose_grid
from dino_cluster.visualize.source import VisImage, to_uint8


@dataclass
class Item:
    """A bank or query image as the grid shows it."""

    key: str | None
    label: str | None
    thumb: np.ndarray  # (H, W, 3) uint8: the eval crop, de-normalised


@dataclass
class Match:
    item: Item
    similarity: float


@dataclass
class QueryResult:
    query: Item
    matches: list[Match] = field(default_factory=list)


def as_item(image: VisImage) -> Item:
    return Item(image.key, image.label, to_uint8(image.pixels, IMAGENET_MEAN, IMAGENET_STD))


@torch.no_grad()
def embed(features: nn.Module, images: Sequence[VisImage], device: torch.device) -> Tensor:
    """L2-normalised features of `images` (one batch), on the CPU as float32."""
    batch = torch.stack([im.pixels for im in images]).to(device)
    out = features(batch).float()
    return nn.functional.normalize(out, dim=1, p=2).cpu()


class StreamingTopK:
    """Each query's k most similar bank rows so far; the bank arrives in batches."""

    def __init__(self, queries: Tensor, k: int, exclude: Sequence[str | None]) -> None:
        self.queries, self.k = queries, k
        self.exclude = list(exclude)
        n = queries.shape[0]
        self.values = torch.empty(n, 0)
        self.index = torch.empty(n, 0, dtype=torch.int64)
        self.items: dict[int, Item] = {}
        self.seen = 0

    def add(self, feats: Tensor, images: Sequence[VisImage]) -> None:
        sims = self.queries @ feats.T  # (Q, b) cosine: both sides are unit vectors
        keys = [im.key for im in images]
        for q, own in enumerate(self.exclude):
            for j, key in enumerate(keys):
                if own is not None and key == own:
                    sims[q, j] = -torch.inf  # a query is not its own neighbour
        ids = torch.arange(self.seen, self.seen + len(images)).expand(sims.shape[0], -1)
        values = torch.cat([self.values, sims], dim=1)
        index = torch.cat([self.index, ids], dim=1)
        top = values.topk(min(self.k, values.shape[1]), dim=1)
        self.values, self.index = top.values, index.gather(1, top.indices)
        keep = set(self.index.flatten().tolist())
        for j, image in enumerate(images):
            if self.seen + j in keep:
                self.items[self.seen + j] = as_item(image)
        self.items = {i: it for i, it in self.items.items() if i in keep}
        self.seen += len(images)

    def matches(self, q: int) -> list[Match]:
        return [
            Match(self.items[int(i)], float(v))
            for v, i in zip(self.values[q], self.index[q], strict=True)
            if torch.isfinite(v)
        ]


def find_neighbours(
    backbone: nn.Module,
    queries: Sequence[VisImage],
    bank: Iterable[Sequence[VisImage]],
    k: int,
    *,
    device: torch.device,
    exclude_self: bool,
) -> list[QueryResult]:
    """The k nearest bank images of every query, most similar first."""
    if not queries:
        raise VisualizeError("no query image")
    features = CLSFeatures(backbone).eval().to(device)
    query_feats = torch.cat(
        [embed(features, queries[i : i + 64], device) for i in range(0, len(queries), 64)]
    )
    exclude = [q.key if exclude_self else None for q in queries]
    top = StreamingTopK(query_feats, k, exclude)
    for batch in bank:
        top.add(embed(features, batch, device), batch)
    if top.seen == 0:
        raise VisualizeError("the bank has no usable image")
    return [QueryResult(as_item(q), top.matches(i)) for i, q in enumerate(queries)]


def caption_color(query: Item, match: Item) -> tuple[int, int, int]:
    if query.label is None or match.label is None:
        return BLACK
    return GOOD if query.label == match.label else BAD


def neighbours_figure(results: Sequence[QueryResult], k: int, tile: int, title: str) -> Image.Image:
    """One row per query: the query, then its neighbours with similarity (and label)."""
    rows = []
    for r in results:
        cells = [Cell(Image.fromarray(r.query.thumb), f"query {r.query.label or ''}".strip())]
        for m in r.matches:
            text = f"{m.similarity:.2f} {m.item.label or ''}".strip()
            cells.append(Cell(Image.fromarray(m.item.thumb), text, caption_color(r.query, m.item)))
        cells += [Cell(None)] * (k - len(r.matches))  # a bank smaller than k
        rows.append(cells)
    return compose_grid(rows, tile, title)


def results_json(results: Sequence[QueryResult]) -> list[dict]:
    return [
        {
            "query": r.query.key,
            "label": r.query.label,
            "neighbours": [
                {"key": m.item.key, "label": m.item.label, "similarity": round(m.similarity, 6)}
                for m in r.matches
            ],
        }
        for r in results
    ]


def write_neighbours(
    results: Sequence[QueryResult], out_dir: Path, *, k: int, tile: int, title: str
) -> tuple[Path, Path, tuple[int, int]]:
    """DIR/neighbours.png (the grid) and DIR/neighbours.json (keys, labels, similarities)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = neighbours_figure(results, k, tile, title)
    png, doc = out_dir / "neighbours.png", out_dir / "neighbours.json"
    fig.save(png, format="PNG")
    doc.write_text(json.dumps(results_json(results), indent=1) + "\n", encoding="utf-8")
    return png, doc, fig.size
