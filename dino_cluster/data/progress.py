"""The main-process half of exact resume: which WorkerTask continues each data worker from
the last sample the trainer got.

Workers send items in a fixed order (the DataLoader delivers in order, round-robin over
workers, skipping a worker once it has ended), each with `seq` and `after`: the task that
continues that worker from just after the item (reader.py). Batches are cut from the items'
samples in arrival order, so after each batch every worker stands either at the end of an item
(resume: that item's `after`) or inside one (resume: the previous item's `after`, then drop the
samples of the item the trainer already has; the worker re-makes that whole item, so that a
per-chunk batch stage sees the chunk it saw before). The worker whose item comes next in the
round-robin is the one a resumed loader must start with (`phase`): the items of the others
then interleave as before.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from dino_cluster.data.position import WorkerTask


@dataclass
class _Item:
    task: int  # this rank's task index
    seq: int
    total: int  # samples in the item as the worker made it
    done: int  # of those, yielded to the trainer (dropped replays included)


class WorkerProgress:
    """Tracks, for one rank's tasks, the resume point matching the batches yielded so far."""

    def __init__(
        self, tasks: list[WorkerTask], *, first_index: int, phase: int, resumed: bool
    ) -> None:
        self.first_index = first_index  # global index of task 0
        self.phase = phase
        self.resumed = resumed
        # Per task, seq -> the task continuing after that item; seq 0 = before any sample.
        self.after: list[dict[int, WorkerTask]] = [{0: replace(t, drop=0)} for t in tasks]
        # Per task, (seq, samples to drop of the next item): the resume point.
        self.point: list[tuple[int, int]] = [(0, t.drop) for t in tasks]
        self._drop = [t.drop for t in tasks]
        self._items: deque[_Item] = deque()
        self._last: tuple[int, bool] | None = None  # (task, its item complete?) of the last sample

    def receive(self, meta: dict) -> int:
        """Note a worker item; returns how many of its first samples the trainer already has."""
        t = meta["worker"] - self.first_index
        self.after[t][meta["seq"]] = meta["after"]
        n = len(meta["key"])
        if n == 0:
            return 0
        drop, self._drop[t] = self._drop[t], 0
        self._items.append(_Item(t, meta["seq"], n, drop))
        return drop

    def yielded(self, n: int) -> None:
        """The next `n` samples (in arrival order) went to the trainer."""
        while n:
            item = self._items[0]
            take = min(n, item.total - item.done)
            item.done += take
            n -= take
            complete = item.done == item.total
            base = item.seq if complete else item.seq - 1
            self.point[item.task] = (base, 0 if complete else item.done)
            self._last = (item.task, complete)
            if complete:
                self._items.popleft()
            after = self.after[item.task]
            for seq in [s for s in after if s < base]:
                del after[seq]

    def snapshot(self, *, with_rng: bool) -> tuple[list[WorkerTask], int] | None:
        """(tasks, phase) to resume from, or None when a re-plan gives the same (nothing
        yielded since a fresh plan) or a worker's state is unknown (a re-plan is safe)."""
        if self._last is None and not self.resumed:
            return None
        phase = self.phase
        if self._last is not None:
            task, complete = self._last
            phase = (task + 1) % len(self.point) if complete else task
        tasks = []
        for t, (seq, drop) in enumerate(self.point):
            desc = self.after[t].get(seq)
            if desc is None or (with_rng and desc.rng is None and desc.quota > 0):
                return None
            tasks.append(replace(desc, drop=drop))
        return tasks, phase
