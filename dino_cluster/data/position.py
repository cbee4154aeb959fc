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
    """What one (rank, worker) reads this epoch."""

    own: list[tuple[str, int]]  # (shard, records to skip) read first, tracked in the position
    quota: int  # samples this worker emits, exactly
    repeat_pool: list[str]  # shards to repeat (untracked) when `own` runs short
    global_index: int = 0


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

    def to_dict(self, *, seed: int, global_batch: int, shuffle_buffer: int, dataset: str) -> dict:
        return {
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
        return cls(epoch, batches, consumed, in_flight)


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
    return merged
