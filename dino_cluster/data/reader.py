"""The per-worker side of the stream: read assigned shards, decode, transform, emit chunks.

Runs inside a DataLoader worker process (or in the main process when num_workers=0). Each
emitted item is `(crops, meta)`: `crops` is a list over crop index of stacked tensors (or None
for an events-only item), `meta` carries, per sample, the shard, the record position in that
shard's emission order, key, label and whether it is an untracked repeat, plus the shards this
worker finished and the bad samples it met since the previous item. The main process turns
that into batches and the data position. A transform with `per_sample` and `per_batch`
runs in two stages (`split_transform`): per image, then once per emitted chunk.

For exact resume (position.py) every item also carries its number `seq` and `after`: the
WorkerTask that continues this worker from just after the item, random state included. The
first item (seq 0) carries no samples, only the task as the worker starts it, so the main
process knows every worker's starting state before the first batch: in-order delivery puts
all first items ahead of any chunk.

A sample whose label is unusable is still emitted, unlabelled (-1), and counted as a
`bad_label` event: pretraining does not use labels.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dino_cluster.data import worker_rng
from dino_cluster.data.decode import BadSample, decode_sample
from dino_cluster.data.position import WorkerTask, stable_seed
from dino_cluster.data.tario import (
    DEFAULT_MAX_MEMBER_BYTES,
    ShardReadError,
    is_gzip_shard,
    iter_records,
)
from dino_cluster.storage import StorageError, StorageOptions, open_store

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], list[torch.Tensor]]
BatchTransform = Callable[[list[torch.Tensor]], list[torch.Tensor]]
# A transform that fails on this many samples in a row, with no success yet, is a bug in code
# or configuration, not bad data: stop instead of silently skipping the whole dataset.
_MAX_TRANSFORM_FAILURES = 50


def wants_lazy_image(transform: Transform) -> bool:
    """A transform with `lazy_decode = True` gets the image opened but not decoded (size
    already checked, any mode) so it can decode at reduced scale itself (PIL `draft`)."""
    return bool(getattr(transform, "lazy_decode", False))


def split_transform(transform: Transform) -> tuple[Transform, BatchTransform | None]:
    """A transform with callable `per_sample` and `per_batch` attributes runs in two stages:
    `per_sample(image)` per image, then `per_batch(stacked)` once per emitted chunk (a list
    over crop index of tensors stacked along a new first dim, in the worker), so per-batch
    work (e.g. photometric ops on all same-size crops at once) pays Python once per chunk.
    Any other transform is called per image and its outputs are stacked, as before."""
    per_sample = getattr(transform, "per_sample", None)
    per_batch = getattr(transform, "per_batch", None)
    if callable(per_sample) and callable(per_batch):
        return per_sample, per_batch
    return transform, None


class DataError(RuntimeError):
    """The data cannot feed training at all (e.g. no decodable sample anywhere)."""


@dataclass(frozen=True)
class ReadContext:
    root_url: str
    storage_options: StorageOptions | None
    samples: dict[str, int]  # expected samples per shard (from the index)
    seed: int
    epoch: int
    shuffle_buffer: int
    transform: Transform
    max_pixels: int
    chunk_size: int  # = per-rank batch: workers emit whole batches except their last item
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES


# ("bad", sample id, reason, detail, count) | ("ok", pos, key, DecodedSample)
_Event = tuple


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle buffer: keep up to `size` items, emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def read_shard(store, ctx: ReadContext, name: str, pass_no: int, skip: int) -> Iterator[_Event]:
    """Events for one shard in its fixed emission order (records before `skip` not decoded)."""
    expected = ctx.samples.get(name)
    member_bad: list[_Event] = []
    state = {"read": 0, "error": None}

    def on_bad(reason: str, member: str) -> None:
        member_bad.append(("bad", f"{name}/{member}", reason, "refused tar member", 1))

    def records():
        try:
            with store.open_read(name) as f:
                for rec in iter_records(
                    f,
                    on_bad=on_bad,
                    max_member_bytes=ctx.max_member_bytes,
                    compressed=is_gzip_shard(name),
                ):
                    state["read"] += 1
                    yield rec
        except (ShardReadError, StorageError, OSError) as exc:
            state["error"] = exc

    lazy = wants_lazy_image(ctx.transform)
    rng = random.Random(stable_seed("sample-order", ctx.seed, ctx.epoch, name, pass_no))
    with closing(records()) as recs:
        for pos, rec in enumerate(_shuffled(recs, ctx.shuffle_buffer, rng)):
            while member_bad:
                yield member_bad.pop(0)
            if pos < skip:
                continue
            sample_id = f"{name}/{rec.key}"
            if rec.problem is not None:
                yield ("bad", f"{sample_id}#{pos}", rec.problem, "repeats an earlier sample", 1)
                continue
            try:
                decoded = decode_sample(rec.fields, max_pixels=ctx.max_pixels, load=not lazy)
            except BadSample as bad:
                yield ("bad", sample_id, bad.reason, bad.detail, 1)
                continue
            if decoded.label_error is not None:
                # Counted, and the image still trains: the label is optional data.
                yield ("bad", f"{sample_id}.cls", "bad_label", decoded.label_error, 1)
            yield ("ok", pos, rec.key, decoded)
    yield from member_bad
    read, error = state["read"], state["error"]
    missing = max(0, (expected or 0) - read)
    if error is not None:
        reason = "truncated_shard" if read else "unreadable_shard"
        yield ("bad", name, reason, f"{error} after {read} samples", max(1, missing))
    elif missing:
        yield ("bad", name, "short_shard", f"{read} samples, index says {expected}", missing)


class _Emitter:
    """Collects transformed samples into chunks and attaches pending events."""

    def __init__(self, ctx: ReadContext, worker: int) -> None:
        self.ctx, self.worker = ctx, worker
        self.lazy = wants_lazy_image(ctx.transform)
        self.per_sample, self.per_batch = split_transform(ctx.transform)
        self.crops: list[list[torch.Tensor]] = []
        self.meta: dict[str, list] = {k: [] for k in ("shard", "pos", "key", "label", "repeat")}
        self.done: list[str] = []
        self.bad: list[tuple[str, str, str, int]] = []
        self.emitted = 0
        self.failures = 0
        self.successes = 0
        self.seq = 0  # number of the next item
        # The WorkerTask that continues from the current point (set by run_worker).
        self.describe: Callable[[], WorkerTask] = lambda: WorkerTask([], 0, [])

    def add(self, shard: str, pos: int, key: str, sample, repeat: bool) -> bool:
        try:
            views = self.per_sample(sample.image)
        except Exception as exc:  # noqa: BLE001 - a degenerate image must cost one sample
            if self.lazy and isinstance(exc, OSError | SyntaxError | EOFError):
                # A lazy transform decodes the pixels itself: corrupt data surfaces here.
                detail = f"{type(exc).__name__}: {exc}"
                self.bad.append((f"{shard}/{key}", "bad_image", detail, 1))
                return False
            self.failures += 1
            if self.successes == 0 and self.failures >= _MAX_TRANSFORM_FAILURES:
                raise DataError(
                    f"the transform failed on the first {self.failures} samples "
                    f"(last: {type(exc).__name__}: {exc}); this is not a data problem"
                ) from exc
            self.bad.append((f"{shard}/{key}", "transform_failed", f"{exc}", 1))
            return False
        self.successes += 1
        self.crops.append(list(views))
        values = (shard, pos, key, sample.label, repeat)
        for k, v in zip(("shard", "pos", "key", "label", "repeat"), values, strict=True):
            self.meta[k].append(v)
        self.emitted += 1
        return True

    def full(self) -> bool:
        return len(self.crops) >= self.ctx.chunk_size

    def take(self) -> tuple[list[torch.Tensor] | None, dict]:
        crops = _stack(self.crops) if self.crops else None
        if crops is not None and self.per_batch is not None:
            try:
                crops = list(self.per_batch(crops))
            except Exception as exc:
                # Per-sample failures are data; a failing batch stage is code or configuration.
                raise DataError(f"the transform's per_batch stage failed: {exc}") from exc
        # `after` is taken once the chunk is complete (the batch stage included), so it holds
        # the random state right before this worker's next sample.
        meta = dict(self.meta, done=self.done, bad=self.bad, worker=self.worker, seq=self.seq,
                    after=self.describe())  # fmt: skip
        self.seq += 1
        self.crops = []
        self.meta = {k: [] for k in self.meta}
        self.done, self.bad = [], []
        return crops, meta


def _stack(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    n_views = len(samples[0])
    if any(len(s) != n_views for s in samples):
        raise DataError("the transform returned a different number of crops for two samples")
    try:
        return [torch.stack([s[i] for s in samples]) for i in range(n_views)]
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"the transform must return same-shape tensors per crop: {exc}") from exc


class _Cursor:
    """Where a worker stands in its task, to describe the task that continues from there."""

    def __init__(self, task: WorkerTask, capture_rng: bool) -> None:
        self.task, self.capture_rng = task, capture_rng
        self.own_index = 0
        self.repeat: tuple[int, int] | None = None  # (pass, pool index) once repeating
        self.skip = 0  # records of the current shard done: those before the last sample too

    def describe(self, emitted: int) -> WorkerTask:
        t = self.task
        rng = worker_rng.capture() if self.capture_rng else None
        if emitted == 0 and self.repeat is None and self.own_index == 0:
            return WorkerTask(t.own, t.quota, t.repeat_pool, t.global_index, t.repeat_from, rng)
        quota = t.quota - emitted
        if self.repeat is None:
            name = t.own[self.own_index][0]
            own = [(name, self.skip), *t.own[self.own_index + 1 :]]
            return WorkerTask(own, quota, t.repeat_pool, t.global_index, t.repeat_from, rng)
        pass_no, index = self.repeat
        at = (pass_no, index, self.skip)
        return WorkerTask([], quota, t.repeat_pool, t.global_index, at, rng)


def run_worker(
    ctx: ReadContext, task: WorkerTask, *, capture_rng: bool = False
) -> Iterator[tuple[list | None, dict]]:
    """Emit exactly `task.quota` samples: own shards first, then repeated passes if short.
    With `capture_rng` (in a data worker) each item's `after` holds the random state."""
    em = _Emitter(ctx, task.global_index)
    if task.quota <= 0:
        return
    store = open_store(ctx.root_url, ctx.storage_options)
    cursor = _Cursor(task, capture_rng)
    em.describe = lambda: cursor.describe(em.emitted)
    yield em.take()  # seq 0: no samples, the task as this worker starts it

    def feed(name: str, pass_no: int, skip: int, repeat: bool) -> Iterator[tuple]:
        """Yields chunks while reading one shard; returns once the quota is met or shard ends."""
        cursor.skip = skip
        with closing(read_shard(store, ctx, name, pass_no, skip)) as events:
            for ev in events:
                if ev[0] == "bad":
                    em.bad.append(ev[1:])
                    continue
                _, pos, key, sample = ev
                if em.add(name, pos, key, sample, repeat):
                    cursor.skip = pos + 1
                    if em.full():
                        yield em.take()
                if em.emitted >= task.quota:
                    return

    for i, (name, skip) in enumerate(task.own):
        cursor.own_index = i
        yield from feed(name, 0, skip, repeat=False)
        if em.emitted >= task.quota:
            break
        em.done.append(name)
    yield from _repeat_passes(task, em, cursor, feed)
    if em.crops or em.done or em.bad:
        yield em.take()


def _repeat_passes(task: WorkerTask, em: _Emitter, cursor: _Cursor, feed) -> Iterator[tuple]:  # type: ignore[no-untyped-def]
    """Untracked passes over the repeat pool until the quota is met, starting where
    `task.repeat_from` says (a resumed task may start mid-pass, mid-shard)."""
    pass_no, start, skip = task.repeat_from
    while em.emitted < task.quota:
        before = em.emitted
        partial = start > 0 or skip > 0  # the rest of a pass that yielded samples before
        for index in range(start, len(task.repeat_pool)):
            cursor.repeat = (pass_no, index)
            yield from feed(task.repeat_pool[index], pass_no, skip, repeat=True)
            skip = 0
            if em.emitted >= task.quota:
                break
        if em.emitted == before and not partial:
            raise DataError(
                f"worker {task.global_index} needs {task.quota - em.emitted} more samples but "
                f"its shards {task.repeat_pool[:3]}... yield no decodable sample"
            )
        start, pass_no = 0, pass_no + 1
