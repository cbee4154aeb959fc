"""The data position and the per-epoch plan: which (rank, worker) reads which shards, how much.

Pure logic, no I/O, so it can be tested exhaustively.

Position semantics. Within an epoch, each shard is read by exactly one (rank, worker) and its
samples are emitted in an order fixed by (seed, epoch, shard name) alone, independent of who
reads it. The position records
  - `consumed`: shards whose every sample has been yielded to the trainer, and
  - `in_flight`: for a shard partly yielded, how many records (in that fixed emission order)
    have been yielded.
A worker emits its shards one after the other and the main process yields samples in worker
order, so at any moment each (rank, worker) has at most one in-flight shard. On resume, the
epoch's shard order is rebuilt from seed+epoch, consumed shards are dropped, in-flight shards are
read again from their start (the one shard per rank-worker read twice) but their first
`in_flight[name]` records are skipped, and the rest is split over the new (rank, worker) grid,
whatever its size.

Exact resume. At an unchanged grid (world size and data workers) the position also holds,
per (rank, worker), where that worker stood after the last sample the trainer got
(`workers`): its remaining shards and records to skip, quota, repeat pass and, with data
workers, the state of its random generators (worker_rng.py). A resume then gives each worker
exactly that task instead of re-planning, and the batches, their samples and their
augmentations continue as if never stopped. A position without it (saved by one rank only,
or at another grid) falls back to the re-plan above: same samples covered, fresh seeds.

Equal batch counts. Every rank must yield the same number of batches or DDP hangs. The number
is fixed: iters_per_epoch - batches_done. Each rank needs `remaining * per_rank_batch` samples;
its share is split over its workers in proportion to their samples. A worker that runs out
(uneven shards, bad samples) repeats its own shards in a new shuffled pass ("wrap-around"); a
rank that got no shard at all (fewer remaining shards than ranks) repeats shards of the whole
epoch. A worker that has more than its quota stops at the quota: the rest of that epoch's
samples are dropped, like drop_last. Repeated samples are never counted in the position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dino_cluster.data.worker_rng import RngState

STATE_VERSION = 1


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from parts; unlike hash(), identical in every process and Python run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shard_order(names: Iterable[str], seed: int, epoch: int) -> list[str]:
    import random

    order = sorted(names)
    random.Random(stable_seed("shard-order", seed, epoch)).shuffle(order)
    return order


def greedy_assign(names: Sequence[str], weight: dict[str, int], n_bins: int) -> list[list[str]]:
    """Give each shard, in order, to the bin with the least weight so far (ties: lowest bin).

    Equal weights reduce to round-robin; a small last shard or a half-read in-flight shard goes
    where it evens out the load.
    """
    bins: list[list[str]] = [[] for _ in range(n_bins)]
    load = [0] * n_bins
    for name in names:
        i = min(range(n_bins), key=lambda b: (load[b], len(bins[b]), b))
        bins[i].append(name)
        load[i] += weight[name]
    return bins


def split_quota(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties: first)."""
    wsum = sum(weights)
    if total < 0:
        raise ValueError(f"negative quota {total}")
    if wsum <= 0:
        weights, wsum = [1] * len(weights), len(weights)
    exact = [total * w / wsum for w in weights]
    out = [int(x) for x in exact]
    short = total - sum(out)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[:short]:
        out[i] += 1
    return out


@dataclass
class WorkerTask:
    """What one (rank, worker) reads this epoch, or from a point within it on."""

    own: list[tuple[str, int]]  # (shard, records to skip) read first, tracked in the position
    quota: int  # samples this worker emits, exactly
    repeat_pool: list[str]  # shards to repeat (untracked) when `own` runs short
    global_index: int = 0
    # Where the repeat passes start: (pass number, index in repeat_pool, records to skip).
    repeat_from: tuple[int, int, int] = (1, 0, 0)
    rng: RngState | None = None  # generators to restore first (exact resume, data workers)
    # Samples of the first emitted chunk the trainer already has (the main process drops them;
    # the worker re-makes the whole chunk so that its batch stage sees the same chunk).
    drop: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "own": [[name, skip] for name, skip in self.own],
            "quota": self.quota,
            "repeat_pool": list(self.repeat_pool),
            "global_index": self.global_index,
            "repeat_from": list(self.repeat_from),
            "rng": self.rng.to_json() if self.rng is not None else None,
            "drop": self.drop,
        }

    @classmethod
    def from_dict(cls, doc: object) -> WorkerTask:
        try:
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            own = [(str(name), int(skip)) for name, skip in doc["own"]]
            pass_no, start, skip = (int(v) for v in doc["repeat_from"])
            task = cls(
                own,
                int(doc["quota"]),
                [str(n) for n in doc["repeat_pool"]],
                int(doc["global_index"]),
                (pass_no, start, skip),
                RngState.from_json(doc["rng"]) if doc.get("rng") is not None else None,
                int(doc.get("drop", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed worker task in the data position: {exc}") from None
        numbers = [task.quota, task.drop, pass_no - 1, start, skip, *(s for _, s in own)]
        if min(numbers) < 0 or start > len(task.repeat_pool):
            raise ValueError("malformed worker task in the data position: negative count")
        return task


def plan_rank(
    samples: dict[str, int],
    order: Sequence[str],
    consumed: Iterable[str],
    in_flight: dict[str, int],
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    samples_needed: int,
) -> list[WorkerTask]:
    """Split the epoch's remaining shards over the grid; return this rank's worker tasks."""
    n_workers = max(1, num_workers)
    done = set(consumed)
    remaining = [n for n in order if n not in done]
    avail = {n: max(0, samples[n] - in_flight.get(n, 0)) for n in remaining}
    rank_part = greedy_assign(remaining, avail, world_size)[rank]
    worker_parts = greedy_assign(rank_part, avail, n_workers)
    worker_avail = [sum(avail[n] for n in part) for part in worker_parts]
    quotas = split_quota(samples_needed, worker_avail)
    tasks = []
    for w, part in enumerate(worker_parts):
        g = rank * n_workers + w
        own_total = sum(samples[n] for n in part)
        if own_total > 0:
            pool = list(part)
        else:
            # Nothing of our own: repeat the whole epoch, each worker from a different place.
            everything = [n for n in order if samples[n] > 0]
            start = (g * len(everything)) // (world_size * n_workers) if everything else 0
            pool = everything[start:] + everything[:start]
        tasks.append(WorkerTask([(n, in_flight.get(n, 0)) for n in part], quotas[w], pool, g))
    return tasks


@dataclass
class DataPosition:
    """Where an epoch stands for one rank (or, merged, for all ranks)."""

    epoch: int = 0
    batches_done: int = 0
    consumed: set[str] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)
    # Exact-resume tasks: {"world_size", "num_workers", "ranks": {"<rank>": {"phase": int,
    # "tasks": [WorkerTask.to_dict(), ...]}}} (see "Exact resume"), or None.
    workers: dict[str, Any] | None = None

    def to_dict(self, *, seed: int, global_batch: int, shuffle_buffer: int, dataset: str) -> dict:
        out = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "consumed": sorted(self.consumed),
            "in_flight": {k: self.in_flight[k] for k in sorted(self.in_flight)},
            "seed": seed,
            "global_batch": global_batch,
            "shuffle_buffer": shuffle_buffer,
            "dataset": dataset,
        }
        if self.workers is not None:
            out["workers"] = self.workers
        return out

    @classmethod
    def from_dict(cls, state: dict) -> DataPosition:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data position (version {state.get('version')!r})")
        try:
            epoch, batches = int(state["epoch"]), int(state["batches_done"])
            consumed = {str(n) for n in state.get("consumed", [])}
            in_flight = {str(k): int(v) for k, v in dict(state.get("in_flight", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed data position: {exc}") from None
        if epoch < 0 or batches < 0 or any(v < 0 for v in in_flight.values()):
            raise ValueError("malformed data position: negative epoch, batch or offset")
        workers = state.get("workers")
        if workers is not None and not (
            isinstance(workers, dict) and isinstance(workers.get("ranks"), dict)
        ):
            raise ValueError("malformed data position: 'workers' is not an object of ranks")
        return cls(epoch, batches, consumed, in_flight, workers)

    def rank_tasks(
        self, *, rank: int, world_size: int, num_workers: int
    ) -> tuple[list[WorkerTask], int] | None:
        """This rank's exact-resume tasks and the worker to start with, when the position has
        them for this grid and for every rank of it (all ranks then decide alike); else None."""
        w = self.workers
        if w is None or w.get("world_size") != world_size or w.get("num_workers") != num_workers:
            return None
        ranks = w["ranks"]
        if sorted(ranks) != sorted(str(r) for r in range(world_size)):
            return None
        mine = ranks[str(rank)]
        try:
            tasks = [WorkerTask.from_dict(t) for t in mine["tasks"]]
            phase = int(mine["phase"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed data position: {exc}") from None
        if len(tasks) != max(1, num_workers) or not 0 <= phase < len(tasks):
            raise ValueError("malformed data position: worker tasks do not fit the grid")
        return tasks, phase


_MUST_AGREE = ("version", "epoch", "batches_done", "seed", "global_batch", "dataset")


def merge_states(states: Sequence[dict]) -> dict:
    """Merge the per-rank positions of one moment into the position of the whole job."""
    if not states:
        raise ValueError("no data positions to merge")
    first = states[0]
    for other in states[1:]:
        for key in _MUST_AGREE:
            if other.get(key) != first.get(key):
                raise ValueError(
                    f"data positions disagree on {key!r}: {first.get(key)!r} vs {other.get(key)!r}"
                    " (were they saved at the same step?)"
                )
    consumed: set[str] = set()
    in_flight: dict[str, int] = {}
    for st in states:
        consumed.update(st.get("consumed", []))
        for name, n in st.get("in_flight", {}).items():
            in_flight[name] = max(n, in_flight.get(name, 0))
    merged = dict(first)
    merged["consumed"] = sorted(consumed)
    merged["in_flight"] = {k: in_flight[k] for k in sorted(in_flight) if k not in consumed}
    merged.pop("workers", None)
    workers = _merge_workers([st.get("workers") for st in states])
    if workers is not None:
        merged["workers"] = workers
    return merged


def _merge_workers(parts: list[Any]) -> dict[str, Any] | None:
    """The ranks' exact-resume tasks together, or None unless every part has them for one
    grid (a resume then re-plans, which is always safe)."""
    if not parts or any(not isinstance(p, dict) for p in parts):
        return None
    grid = (parts[0].get("world_size"), parts[0].get("num_workers"))
    ranks: dict[str, Any] = {}
    for part in parts:
        if (part.get("world_size"), part.get("num_workers")) != grid:
            return None
        ranks.update(part.get("ranks", {}))
    return {"world_size": grid[0], "num_workers": grid[1], "ranks": ranks}
