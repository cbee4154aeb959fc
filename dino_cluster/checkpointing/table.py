"""The table behind `dino-cluster checkpoints RUN`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from rich.table import Table

from dino_cluster.checkpointing.layout import CheckpointInfo
from dino_cluster.evaluate.results import EvalResult, ResultError


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _eval_summary(step: int, evals: dict[str, dict]) -> str:
    parts = []
    for kind, body in sorted(evals.items()):
        try:
            parts.append(EvalResult.from_json(kind, step, body).summary())
        except ResultError:
            parts.append(f"{kind}: unreadable result")
    return "; ".join(parts)


def render_table(infos: Iterable[CheckpointInfo], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("step", justify="right")
    table.add_column("time (UTC)")
    table.add_column("size", justify="right")
    table.add_column("world", justify="right")
    table.add_column("evals")
    for info in infos:
        when = dt.datetime.fromtimestamp(info.time, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        world = "" if info.world_size is None else str(info.world_size)
        evals = _eval_summary(info.step, info.evals)
        table.add_row(str(info.step), when, human_size(info.size), world, evals)
    return table
