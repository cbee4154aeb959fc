"""A labelled, non-augmented, deterministic pass over shards (for evaluation).

Training streams shuffle, repeat and balance; evaluation needs the opposite: every sample
exactly once, in a fixed order, with its label, and no augmentation beyond one deterministic
`transform` (resize + centre crop). Shards are split across ranks by position in the shard
list (shard i goes to rank i % world_size), so ranks see disjoint parts whose union is the
whole dataset. Inside a rank, DataLoader workers (if any) split that rank's shards the same
way and the loader interleaves their batches in a fixed order. Bad samples (undecodable,
unlabelled, an unusable label, a repeated key) cost one sample each: counted in
`LabelledReader.bad` and logged once; a shard that breaks or ends short of its index count
counts the samples it did not give (`truncated_shard`, `unreadable_shard`, `short_shard`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dino_cluster.data.decode import BadSample, decode_sample
from dino_cluster.data.shards import ShardSet, resolve_shards
from dino_cluster.data.tario import ShardReadError, is_gzip_shard, iter_records
from dino_cluster.storage import StorageError, StorageOptions, open_store

log = logging.getLogger(__name__)

EvalTransform = Callable[[Image.Image], torch.Tensor]


@dataclass
class LabelledBatch:
    images: torch.Tensor  # (B, C, H, W)
    labels: torch.Tensor  # int64 (B,)
    keys: list[str]  # "<shard>/<sample key>"


@dataclass
class _Chunk:
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bad: list[tuple[str, str, int]] = field(default_factory=list)  # (sample id, reason, count)


@dataclass(frozen=True)
class _Bad:
    sample_id: str
    reason: str
    count: int = 1


def split_shards(names: list[str], rank: int, world_size: int) -> list[str]:
    """The shards of `rank`: every world_size-th one, starting at `rank` (disjoint, complete)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return names[rank::world_size]


class _ShardPass(IterableDataset):
    def __init__(
        self,
        root_url: str,
        names: list[str],
        transform: EvalTransform,
        batch_size: int,
        storage_options: StorageOptions | None,
        max_pixels: int,
        require_labels: bool,
        samples: dict[str, int] | None = None,
    ) -> None:
        self.root_url, self.names, self.transform = root_url, names, transform
        self.batch_size, self.storage_options = batch_size, storage_options
        self.max_pixels, self.require_labels = max_pixels, require_labels
        self.samples = samples or {}  # expected records per shard (index or count)

    def __iter__(self) -> Iterator[_Chunk]:
        info = get_worker_info()
        names = self.names if info is None else split_shards(self.names, info.id, info.num_workers)
        store = open_store(self.root_url, self.storage_options)
        chunk = _Chunk()
        for name in names:
            for item in self._read(store, name):
                if isinstance(item, _Bad):
                    chunk.bad.append((item.sample_id, item.reason, item.count))
                    continue
                key, image, label = item
                chunk.images.append(image)
                chunk.labels.append(label)
                chunk.keys.append(f"{name}/{key}")
                if len(chunk.images) >= self.batch_size:
                    yield chunk
                    chunk = _Chunk()
        if chunk.images or chunk.bad:
            yield chunk

    def _read(self, store, name: str) -> Iterator:  # type: ignore[no-untyped-def]
        bad: list[_Bad] = []
        read = 0

        def on_bad(reason: str, member: str) -> None:
            bad.append(_Bad(f"{name}/{member}", reason))

        try:
            with (
                store.open_read(name) as f,
                closing(iter_records(f, on_bad=on_bad, compressed=is_gzip_shard(name))) as recs,
            ):
                for rec in recs:
                    read += 1
                    yield from bad
                    bad.clear()
                    yield from self._sample(name, rec)
        except (ShardReadError, StorageError, OSError) as exc:
            missing = max(1, self.samples.get(name, 0) - read)
            kind = "truncated_shard" if read else "unreadable_shard"
            yield _Bad(name, f"{kind}: {exc} after {read} samples", missing)
        else:
            if self.samples.get(name, 0) > read:
                missing = self.samples[name] - read
                yield _Bad(name, f"short_shard: {read} samples, index says more", missing)
        yield from bad

    def _sample(self, name: str, rec) -> list:  # type: ignore[no-untyped-def]
        """[(key, transformed image, label)] for one record, and/or why it is not usable."""
        sample_id = f"{name}/{rec.key}"
        if rec.problem is not None:
            return [_Bad(sample_id, f"{rec.problem}: repeats an earlier sample")]
        try:
            sample = decode_sample(rec.fields, max_pixels=self.max_pixels)
        except BadSample as exc:
            return [_Bad(sample_id, exc.reason)]
        out: list = []
        if sample.label_error is not None:
            out.append(_Bad(sample_id, f"bad_label: {sample.label_error}"))
            if self.require_labels:
                return out
        elif self.require_labels and sample.label < 0:
            return [_Bad(sample_id, "missing_label")]
        try:
            image = self.transform(sample.image)
        except Exception as exc:  # noqa: BLE001 - one degenerate image, one sample
            return [*out, _Bad(sample_id, f"transform_failed: {exc}")]
        return [*out, (rec.key, image, sample.label)]


def _identity(item: _Chunk) -> _Chunk:
    return item


class LabelledReader:
    """One rank's part of a labelled dataset, as batches of (images, labels, keys)."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        transform: EvalTransform,
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        storage_options: StorageOptions | None = None,
        max_image_pixels: int = 64_000_000,
        require_labels: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shards = shards
        self.names = split_shards([s.name for s in shards.shards], rank, world_size)
        self.expected = sum(s.samples for s in shards.shards if s.name in set(self.names))
        self.num_workers = min(num_workers, len(self.names))
        self.bad: dict[str, int] = {}
        self._dataset = _ShardPass(
            shards.root_url,
            self.names,
            transform,
            batch_size,
            storage_options,
            max_image_pixels,
            require_labels,
            {s.name: s.samples for s in shards.shards},
        )

    def __iter__(self) -> Iterator[LabelledBatch]:
        if self.num_workers == 0:
            source: Iterator[_Chunk] = iter(self._dataset)
        else:
            source = iter(
                DataLoader(
                    self._dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                )
            )
        for chunk in source:
            for sample_id, reason, count in chunk.bad:
                kind = reason.split(":", 1)[0]
                self.bad[kind] = self.bad.get(kind, 0) + count
                log.warning("evaluation skipped bad sample %s: %s", sample_id, reason)
            if chunk.images:
                yield LabelledBatch(
                    torch.stack(chunk.images),
                    torch.tensor(chunk.labels, dtype=torch.int64),
                    chunk.keys,
                )


def build_labelled_reader(
    url: str,
    *,
    transform: EvalTransform,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    storage_options: StorageOptions | None = None,
    max_image_pixels: int = 64_000_000,
    require_labels: bool = True,
) -> LabelledReader:
    """Resolve the shards at `url` (index file, brace pattern or folder/prefix) and read this
    rank's part once, in order, with labels."""
    return LabelledReader(
        resolve_shards(url, storage_options),
        transform=transform,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        storage_options=storage_options,
        max_image_pixels=max_image_pixels,
        require_labels=require_labels,
    )
