"""Which checkpoints to keep: pure functions, so the policy is tested without a store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


def select_retained(steps: Iterable[int], keep_last: int, keep_every: int = 0) -> set[int]:
    """The steps to keep: the newest ``keep_last`` plus every multiple of ``keep_every`` (> 0)."""
    if keep_last < 1:
        raise ValueError(
            f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}"
        )
    if keep_every < 0:
        raise ValueError(f"keep_every must be >= 0 (0 = off), got {keep_every}")
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:])
    if keep_every > 0:
        keep.update(s for s in ordered if s % keep_every == 0)
    return keep


@dataclass
class RetentionPlan:
    delete_committed: list[int] = field(default_factory=list)  # manifest first, then objects
    delete_partial: list[int] = field(default_factory=list)  # step folders with no manifest
    abandoned: list[int] = field(default_factory=list)  # committed, newer than the new commit


def plan_retention(
    committed: Iterable[int],
    partial: Iterable[int],
    just_committed: int,
    keep_last: int,
    keep_every: int = 0,
) -> RetentionPlan:
    """What to delete after ``just_committed`` landed.

    Committed steps newer than the one just written belong to an abandoned timeline (the run
    resumed from an older checkpoint, e.g. because the newest was damaged or the user picked
    one): left alone they would be what the next resume picks, so they go. Partial folders
    older than the new commit can never complete (one writer, increasing steps) and go too;
    newer ones are left for the writer that will overwrite them.
    """
    committed = sorted(set(committed))
    abandoned = [s for s in committed if s > just_committed]
    alive = [s for s in committed if s <= just_committed]
    if just_committed not in alive:
        alive.append(just_committed)
    keep = select_retained(alive, keep_last, keep_every)
    return RetentionPlan(
        delete_committed=sorted(abandoned + [s for s in alive if s not in keep]),
        delete_partial=sorted(s for s in set(partial) if s < just_committed),
        abandoned=abandoned,
    )
