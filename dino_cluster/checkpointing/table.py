"""The table behind `dino-cluster checkpoints RUN`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from rich.table import Table

from dino_cluster.checkpointing.layout import CheckpointInfo


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _eval_summary(evals: dict[str, dict]) -> str:
    parts = []
    for kind, results in sorted(evals.items()):
        shown = [
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(results.items())
            if isinstance(v, int | float | str) and not isinstance(v, bool)
        ][:4]
        parts.append(f"{kind}: {' '.join(shown)}" if shown else kind)
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
        table.add_row(str(info.step), when, human_size(info.size), world, _eval_summary(info.evals))
    return table
