"""The metrics interface: the training loop calls `log(step, values)`; sinks decide where
the numbers go. Here: the run folder's metrics.jsonl, the console, fan-out, nothing.
Exporters (prometheus.py, ray_sink.py) are sinks too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

from rich.console import Console


class MetricsSink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per logged step to `metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "time": time.time()}
        # JSON has no NaN/inf: write them as strings so the file stays valid JSON.
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7 -> '7s' (what a person plans by)."""
    s = int(max(seconds, 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _progress_time(values: dict[str, float]) -> str:
    if "elapsed_s" not in values:
        return ""
    text = f" elapsed {duration(values['elapsed_s'])}"
    eta = values.get("eta_s")
    if eta is not None and math.isfinite(eta):
        text += f" eta {duration(eta)}"
    return text


class ConsoleSink:
    """One progress line per logged step: step, epoch, loss, lr, images/s, elapsed, ETA."""

    def __init__(self, total_steps: int, console: Console | None = None) -> None:
        self.total = total_steps
        self.console = console or Console(stderr=False, highlight=False, markup=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        pct = 100.0 * step / max(self.total, 1)
        self.console.print(
            f"step {step}/{self.total} ({pct:4.1f}%) epoch {int(values.get('epoch', 0))} "
            f"loss {values.get('loss', float('nan')):.4f} lr {values.get('lr', 0):.2e} "
            f"wd {values.get('weight_decay', 0):.3f} mom {values.get('teacher_momentum', 0):.4f} "
            f"T_t {values.get('teacher_temp', 0):.3f} H_t {values.get('teacher_entropy', 0):.3f} "
            f"{values.get('images_per_s', 0):.1f} img/s data-wait "
            f"{100 * values.get('data_wait_frac', 0):.0f}%"
            f"{_progress_time(values)}",
            soft_wrap=True,  # one line per step even when stdout is a file (80 columns)
        )

    def close(self) -> None:
        pass


class MultiSink:
    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, step: int, values: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, values)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class NullSink:
    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
