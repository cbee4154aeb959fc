"""TrainStream: multi-crop batches from WebDataset shards, split over ranks and workers.

See position.py for how shards are split, how every rank gets the same batch count and what
the data position means. This module runs the main-process side: it plans the epoch, starts
the workers (reader.py), regroups their chunks into per-rank batches of exactly
`per_rank_batch`, keeps the data position in step with the batches it yields, and counts and
logs bad samples (each distinct one once).

Exact resume (position.py, progress.py): at an unchanged world size and number of data
workers, a stream built from a saved position gives every worker the task it had at the last
yielded batch, its random state included, and starts the loader's round-robin at the worker
that was next: the batches continue bit-identical to a stream never stopped. Otherwise (the
grid changed, a lone rank's position) the epoch's remaining shards are re-planned: nothing
skipped, nothing read twice, and the workers' random streams restart from the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dino_cluster.data import worker_rng
from dino_cluster.data.position import (
    DataPosition,
    WorkerTask,
    merge_states,
    plan_rank,
    shard_order,
    stable_seed,
)
from dino_cluster.data.progress import WorkerProgress
from dino_cluster.data.reader import ReadContext, Transform, run_worker
from dino_cluster.data.shards import ShardSet, resolve_shards
from dino_cluster.storage import StorageOptions

if TYPE_CHECKING:
    from dino_cluster.spec import DataSpec

log = logging.getLogger(__name__)

_MAX_REMEMBERED_BAD = 100_000  # distinct bad-sample ids remembered for log-once


@dataclass
class Batch:
    crops: list[torch.Tensor]  # per crop index: (per_rank_batch, C, H, W)
    keys: list[str]  # "<shard>/<sample key>" per sample
    labels: torch.Tensor  # int64 (per_rank_batch,), -1 where a sample has no label
    repeats: int  # samples in this batch that repeat already-seen data (uneven split filler)


class _EpochDataset(IterableDataset):
    def __init__(self, ctx: ReadContext, tasks: list[WorkerTask]) -> None:
        self.ctx, self.tasks = ctx, tasks

    def __iter__(self):
        info = get_worker_info()
        task = self.tasks[info.id if info is not None else 0]
        if info is not None and task.rng is not None:
            # After the DataLoader seeded this worker: an exact resume continues the
            # generators where the stopped worker had them.
            worker_rng.restore(task.rng)
        # Without workers the transform draws from the trainer's own generators, which
        # checkpoints store themselves: nothing to capture.
        return run_worker(self.ctx, task, capture_rng=info is not None)


def _identity(item):
    return item


def _drop_head(crops, meta: dict, n: int):  # type: ignore[no-untyped-def]
    """An item without its first n samples (an exact resume's re-made chunk)."""
    rest = {k: meta[k][n:] for k in _SAMPLE_KEYS}
    return (None if crops is None else [c[n:] for c in crops]), dict(meta, **rest)


_SAMPLE_KEYS = ("shard", "pos", "key", "label", "repeat")


class _Regrouper:
    """Turns worker chunks (usually exactly one batch, sometimes less) into exact batches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pieces: list[tuple[list[torch.Tensor], dict]] = []
        self.count = 0

    def add(self, crops: list[torch.Tensor], meta: dict) -> None:
        self.pieces.append((crops, meta))
        self.count += len(meta["key"])

    def pop(self) -> tuple[list[torch.Tensor], dict] | None:
        if self.count < self.size:
            return None
        first_crops, first_meta = self.pieces[0]
        if len(first_meta["key"]) == self.size:  # the common, copy-free case
            self.pieces.pop(0)
            self.count -= self.size
            return first_crops, first_meta
        parts_c: list[list[torch.Tensor]] = []
        parts_m: dict[str, list] = {k: [] for k in _SAMPLE_KEYS}
        need = self.size
        while need:
            crops, meta = self.pieces[0]
            n = len(meta["key"])
            take = min(n, need)
            parts_c.append([c[:take] for c in crops])
            for k in parts_m:
                parts_m[k].extend(meta[k][:take])
            if take == n:
                self.pieces.pop(0)
            else:
                rest = {k: meta[k][take:] for k in parts_m}
                self.pieces[0] = ([c[take:] for c in crops], rest)
            need -= take
        self.count -= self.size
        n_views = len(parts_c[0])
        return [torch.cat([p[i] for p in parts_c]) for i in range(n_views)], parts_m


class TrainStream:
    """Per-rank iterator over multi-crop batches; see build_train_stream."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        transform: Transform,
        global_batch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int = 1000,
        storage_options: StorageOptions | None = None,
        state: dict | None = None,
        max_image_pixels: int = 64_000_000,
        pin_memory: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if global_batch % world_size:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by world_size {world_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer < 0 or max_image_pixels < 1:
            raise ValueError("shuffle_buffer must be >= 0 and max_image_pixels >= 1")
        if shards.total_samples < global_batch:
            raise ValueError(
                f"the dataset at {shards.root_url} has {shards.total_samples} samples, fewer "
                f"than one global batch of {global_batch}"
            )
        self.shards, self.transform = shards, transform
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.storage_options, self.max_image_pixels = storage_options, max_image_pixels
        self.pin_memory = pin_memory
        self._samples = {s.name: s.samples for s in shards.shards}
        self._bad: dict[str, int] = {}
        self._bad_seen: set[str] = set()
        self.position = DataPosition()
        # This epoch's exact-resume tasks and first worker (from a saved position or from the
        # progress of an earlier pass in this process), and the progress of the current pass.
        self._exact: tuple[list[WorkerTask], int] | None = None
        self._progress: WorkerProgress | None = None
        for info in shards.shards:
            if info.problem is not None:
                # Found broken while counting: a worker meeting its quota exactly at the last
                # good record never sees the break. Counted once (rank 0; every rank's
                # listing is the same) and remembered, so a read that reaches it adds nothing.
                reason, _, detail = info.problem.partition(": ")
                self._note_bad(info.name, reason, detail, 1 if rank == 0 else 0)
        if state is not None:
            self._load_state(state)

    @classmethod
    def from_spec(
        cls,
        data: DataSpec,
        *,
        transform: Transform,
        global_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None = None,
        pin_memory: bool = False,
    ) -> TrainStream:
        """The stream a run's `data` section describes, for this rank (plus the run facts the
        section does not hold: the global batch, the seed, rank and world size)."""
        return build_train_stream(
            data.url,
            storage_options=StorageOptions.from_spec(data.storage),
            transform=transform,
            global_batch=global_batch,
            rank=rank,
            world_size=world_size,
            num_workers=data.num_workers,
            seed=seed,
            shuffle_buffer=data.shuffle_buffer,
            state=state,
            max_image_pixels=data.max_image_pixels,
            pin_memory=pin_memory,
        )

    # -- public API ---------------------------------------------------------------------------
    @property
    def iters_per_epoch(self) -> int:
        return self.shards.total_samples // self.global_batch

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def bad_samples(self) -> dict[str, int]:
        return dict(self._bad)

    def state_dict(self, gather: bool = False) -> dict:
        """This rank's data position (JSON-able), consistent with the batches yielded so far.

        With gather=True and torch.distributed initialised, this is a collective (call it on
        every rank): it returns the merged position of all ranks, which is what a checkpoint
        should store. A single rank's position is also safe to resume from (it only knows
        fewer shards as done, so more is re-read), never skipping a shard.
        """
        own = replace(self.position, workers=self._workers_state()).to_dict(
            seed=self.seed,
            global_batch=self.global_batch,
            shuffle_buffer=self.shuffle_buffer,
            dataset=self.shards.fingerprint(),
        )
        dist = torch.distributed
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
            return merge_states(gathered)
        return own

    def epoch_iter(self, epoch: int) -> Iterator[list[torch.Tensor]]:
        """The batches left in `epoch` for this rank, each a list over crop index."""
        for batch in self.epoch_batches(epoch):
            yield batch.crops

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """Like epoch_iter, with sample keys and labels (for tests and evaluation)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self.position.epoch:
            raise ValueError(
                f"epoch {epoch} is before the data position's epoch {self.position.epoch}"
            )
        if epoch > self.position.epoch:
            self.position = DataPosition(epoch=epoch)
            self._exact, self._progress = None, None
        return self._run_epoch()

    def worker_tasks(self, epoch: int) -> list[WorkerTask]:
        """What this rank's workers read in `epoch` from the current position (for logs/tests)."""
        if epoch == self.position.epoch:
            return self._tasks()[0]
        return self._plan(DataPosition(epoch=epoch))

    # -- internals ----------------------------------------------------------------------------
    def _load_state(self, state: dict) -> None:
        pos = DataPosition.from_dict(state)
        for key, ours in (
            ("seed", self.seed),
            ("global_batch", self.global_batch),
            ("dataset", self.shards.fingerprint()),
        ):
            if state.get(key) != ours:
                raise ValueError(
                    f"the saved data position was made with {key}={state.get(key)!r}, this run "
                    f"has {ours!r}: resuming would skip or repeat shards"
                )
        unknown = (pos.consumed | set(pos.in_flight)) - set(self._samples)
        if unknown:
            raise ValueError(f"the saved data position names unknown shards {sorted(unknown)[:3]}")
        if state.get("shuffle_buffer") != self.shuffle_buffer and pos.in_flight:
            # The in-flight offsets index a shuffle order that depends on the buffer size:
            # re-read those shards whole (some repeats) rather than skip unseen samples.
            log.warning(
                "shuffle_buffer changed (%s -> %s): re-reading %d in-flight shard(s) whole",
                state.get("shuffle_buffer"),
                self.shuffle_buffer,
                len(pos.in_flight),
            )
            pos.in_flight = {}
            pos.workers = None
        self.position = pos
        exact = pos.rank_tasks(
            rank=self.rank, world_size=self.world_size, num_workers=self.num_workers
        )
        if exact is not None and self._exact_fits(*exact):
            self._exact = exact
        elif pos.batches_done and pos.workers is not None:
            log.info(
                "data workers resume from the data position with fresh random streams "
                "(the world size or data.num_workers differs from the saved run's)"
            )
        pos.workers = None

    def _exact_fits(self, tasks: list[WorkerTask], phase: int) -> bool:
        """Saved exact-resume tasks that this stream can run as they are."""
        remaining = max(0, self.iters_per_epoch - self.position.batches_done)
        names = {n for t in tasks for n, _ in t.own} | {n for t in tasks for n in t.repeat_pool}
        why = ""
        if names - set(self._samples):
            why = f"unknown shards {sorted(names - set(self._samples))[:3]}"
        elif sum(t.quota - t.drop for t in tasks) != remaining * self.per_rank_batch:
            why = "its worker quotas do not add up to the batches left"
        elif self.num_workers == 0 and any(t.rng is not None or t.drop for t in tasks):
            # In-process, re-making a chunk would draw from the trainer's generators again.
            why = "it was saved with data workers"
        elif any(t.rng is not None and not worker_rng.fits_this_torch(t.rng) for t in tasks):
            why = "its random states come from another torch build"
        if why:
            log.warning("not resuming the data workers' exact state: %s; re-planning", why)
        return not why

    def _workers_state(self) -> dict | None:
        """This rank's part of the position's exact-resume tasks, or None."""
        exact = self._exact
        if self._progress is not None:
            exact = self._progress.snapshot(with_rng=self.num_workers > 0)
        if exact is None:
            return None
        tasks, phase = exact
        entry = {"phase": phase, "tasks": [t.to_dict() for t in tasks]}
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "ranks": {str(self.rank): entry}}  # fmt: skip

    def _tasks(self) -> tuple[list[WorkerTask], int, bool]:
        """(tasks, first worker, exact?) for the rest of the current epoch."""
        if self._progress is not None:  # an earlier pass of this epoch in this process
            self._exact = self._progress.snapshot(with_rng=self.num_workers > 0)
            self._progress = None
        if self._exact is not None:
            return self._exact[0], self._exact[1], True
        return self._plan(), 0, False

    def _plan(self, pos: DataPosition | None = None) -> list[WorkerTask]:
        pos = pos or self.position
        remaining = max(0, self.iters_per_epoch - pos.batches_done)
        return plan_rank(
            self._samples,
            shard_order(self._samples, self.seed, pos.epoch),
            pos.consumed,
            pos.in_flight,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            samples_needed=remaining * self.per_rank_batch,
        )

    def _absorb(self, meta: dict) -> None:
        for sample_id, reason, detail, count in meta["bad"]:
            self._note_bad(sample_id, reason, detail, count)

    def _note_bad(self, sample_id: str, reason: str, detail: str, count: int) -> None:
        if sample_id in self._bad_seen:
            return
        if len(self._bad_seen) < _MAX_REMEMBERED_BAD:
            self._bad_seen.add(sample_id)
        if count:
            self._bad[reason] = self._bad.get(reason, 0) + count
            log.warning("skipped bad sample %s: %s (%s)", sample_id, reason, detail)

    def _run_epoch(self) -> Iterator[Batch]:
        pos = self.position
        remaining = max(0, self.iters_per_epoch - pos.batches_done)
        if remaining == 0:
            return
        ctx = ReadContext(
            root_url=self.shards.root_url,
            storage_options=self.storage_options,
            samples=self._samples,
            seed=self.seed,
            epoch=pos.epoch,
            shuffle_buffer=self.shuffle_buffer,
            transform=self.transform,
            max_pixels=self.max_image_pixels,
            chunk_size=self.per_rank_batch,
        )
        tasks, phase, exact = self._tasks()
        progress = WorkerProgress(
            tasks, first_index=self.rank * max(1, self.num_workers), phase=phase, resumed=exact
        )
        self._progress = progress
        # The loader's worker j runs task phase + j: its round-robin then starts with the task
        # whose item came next (and DataLoader seeds, overwritten when exact, stay per id).
        source = self._source(_EpochDataset(ctx, tasks[phase:] + tasks[:phase]), pos.epoch)
        regroup = _Regrouper(self.per_rank_batch)
        outstanding: dict[str, int] = {}  # own samples received, not yet yielded, per shard
        finished: set[str] = set()  # shards a worker read to the end, not yet all yielded
        yielded = 0
        try:
            for crops, meta in source:
                drop = progress.receive(meta)
                if drop:
                    crops, meta = _drop_head(crops, meta, drop)
                self._absorb(meta)
                for shard, repeat in zip(meta["shard"], meta["repeat"], strict=True):
                    if not repeat:
                        outstanding[shard] = outstanding.get(shard, 0) + 1
                finished.update(meta["done"])
                self._settle(finished, outstanding)
                if crops is not None:
                    regroup.add(crops, meta)
                while yielded < remaining and (out := regroup.pop()) is not None:
                    batch_crops, bmeta = out
                    for shard, p, repeat in zip(
                        bmeta["shard"], bmeta["pos"], bmeta["repeat"], strict=True
                    ):
                        if repeat or shard in pos.consumed:
                            continue
                        pos.in_flight[shard] = max(pos.in_flight.get(shard, 0), p + 1)
                        outstanding[shard] -= 1
                    self._settle(finished, outstanding)
                    pos.batches_done += 1
                    yielded += 1
                    progress.yielded(len(bmeta["key"]))
                    yield Batch(
                        batch_crops,
                        [f"{s}/{k}" for s, k in zip(bmeta["shard"], bmeta["key"], strict=True)],
                        torch.tensor(bmeta["label"], dtype=torch.int64),
                        sum(bmeta["repeat"]),
                    )
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if yielded != remaining:
            # Would desynchronise DDP ranks: fail loudly instead of hanging the others.
            raise RuntimeError(
                f"rank {self.rank} produced {yielded} of {remaining} batches in epoch {pos.epoch}"
            )

    def _source(self, dataset: _EpochDataset, epoch: int) -> Iterator:
        if self.num_workers == 0:
            return iter(dataset)
        gen = torch.Generator()
        gen.manual_seed(stable_seed("loader", self.seed, epoch, self.rank) % (1 << 62))
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            generator=gen,
            pin_memory=self.pin_memory,
        )
        return iter(loader)

    def _settle(self, finished: set[str], outstanding: dict[str, int]) -> None:
        pos = self.position
        # Every record of a shard yielded (position counts records in emission order, bad ones
        # included): done, even if its worker stopped at its quota before seeing the tar end.
        finished.update(s for s, n in pos.in_flight.items() if n >= self._samples[s])
        for shard in [s for s in finished if outstanding.get(s, 0) == 0]:
            finished.discard(shard)
            outstanding.pop(shard, None)
            pos.consumed.add(shard)
            pos.in_flight.pop(shard, None)


def build_train_stream(
    url: str, *, storage_options: StorageOptions | None = None, **kwargs: Any
) -> TrainStream:
    """Resolve the shards at `url` (index file, brace pattern or folder/prefix) and build the
    stream for this rank; `kwargs` are TrainStream's (`state`: a saved `state_dict()`)."""
    shards = resolve_shards(url, storage_options)
    return TrainStream(shards, storage_options=storage_options, **kwargs)
