"""What `dino-cluster status RUN` shows beyond the run state: the latest logged step, loss
and throughput (RUN/metrics.jsonl), the newest committed checkpoint and the newest
evaluation (the checkpoint store, local or s3://), restarts and where metrics are served.

It only reads files the run already writes, so it works for every backend and for runs
that ended long ago. A store that cannot be read is reported, not raised.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_cluster.evaluate.results import EvalResult
from dino_cluster.metrics.sinks import duration
from dino_cluster.metrics.store import StoreState, read_restarts, read_store_state

_TAIL_BYTES = 256 * 1024


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, Any] | None = None  # the last metrics.jsonl row
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    evals: dict[str, EvalResult] = field(default_factory=dict)
    restarts: int | None = None
    endpoints: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        return int(self.metrics["step"]) if self.metrics and "step" in self.metrics else None

    @property
    def last_eval(self) -> EvalResult | None:
        if not self.evals:
            return None
        return max(self.evals.values(), key=lambda e: (e.step, e.kind))


def read_last_metrics(path: Path) -> dict[str, Any] | None:
    """The last complete JSON row of a metrics.jsonl (reads only the file's tail)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a partial first line of the tail, or a line being written
        if isinstance(row, dict) and "step" in row:
            return row
    return None


def _endpoints(run_dir: Path) -> list[str]:
    out = []
    for path in sorted((run_dir / "prometheus").glob("targets-rank-*.json")):
        try:
            groups = json.loads(path.read_text())
            for g in groups:
                rank = g.get("labels", {}).get("rank", "?")
                out += [f"http://{t}/metrics (rank {rank})" for t in g.get("targets", [])]
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return out


def _open_checkpoints(run_dir: Path) -> Any:
    from dino_cluster.checkpointing import CheckpointManager
    from dino_cluster.spec import load_spec
    from dino_cluster.storage import StorageOptions

    job = load_spec(run_dir / "spec.resolved.yaml")
    return CheckpointManager(
        job.checkpoint_url,
        storage_options=StorageOptions.from_spec(job.data.storage).interactive(),
        is_writer=False,
    )


def summarize_run(run_dir: str | Path, checkpoints: Any | None = None) -> RunSummary:
    """Collect the summary of the run in `run_dir`. `checkpoints` (anything with .list(),
    normally a CheckpointManager) defaults to the store named by RUN/spec.resolved.yaml."""
    run_dir = Path(run_dir)
    summary = RunSummary(run_dir=run_dir, metrics=read_last_metrics(run_dir / "metrics.jsonl"))
    summary.endpoints = _endpoints(run_dir)
    state: StoreState | None = None
    try:
        if checkpoints is None:
            if not (run_dir / "spec.resolved.yaml").exists():
                raise FileNotFoundError(f"{run_dir}/spec.resolved.yaml is missing")
            checkpoints = _open_checkpoints(run_dir)
        state = read_store_state(checkpoints, run_dir)
    except Exception as exc:  # noqa: BLE001 - status must still print what it has
        summary.problems.append(f"checkpoints not readable: {exc}")
        summary.restarts = read_restarts(run_dir)
    if state is not None:
        summary.checkpoint_step, summary.checkpoint_time = state.last_step, state.last_time
        summary.evals, summary.restarts = state.evals, state.restarts
    return summary


def _ago(t: float, now: float) -> str:
    s = max(0.0, now - t)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, str):  # JsonlSink writes NaN/inf as strings
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, int | float) else None


def render_summary(summary: RunSummary, now: float | None = None, *, running: bool = False) -> str:
    """Plain text lines (no markup) for the terminal; `running`: also the time left."""
    now = time.time() if now is None else now
    lines = []
    row = summary.metrics
    if row:
        parts = [f"step {summary.step}"]
        epoch = _num(row, "epoch")
        if epoch is not None and math.isfinite(epoch):
            parts.append(f"epoch {int(epoch)}")
        loss = _num(row, "loss")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        ips = _num(row, "images_per_s")
        if ips is not None:
            parts.append(f"{ips:.1f} img/s")
        wait = _num(row, "data_wait_frac")
        if wait is not None and math.isfinite(wait):
            parts.append(f"data wait {100 * wait:.0f}%")
        t = _num(row, "time")
        if t is not None:
            parts.append(f"(logged {_ago(t, now)})")
        lines.append("progress: " + "  ".join(parts))
        elapsed, eta = _num(row, "elapsed_s"), _num(row, "eta_s")
        if elapsed is not None:
            timing = f"time: {duration(elapsed)} elapsed"
            if running and eta is not None and math.isfinite(eta) and t is not None:
                # The ETA was estimated when the row was logged; count the time since.
                timing += f", about {duration(max(eta - (now - t), 0))} to go"
            lines.append(timing)
    else:
        lines.append("progress: no step logged yet")
    if summary.checkpoint_step is not None:
        when = f" ({_ago(summary.checkpoint_time, now)})" if summary.checkpoint_time else ""
        lines.append(f"last checkpoint: step {summary.checkpoint_step}{when}")
    elif not summary.problems:
        lines.append("last checkpoint: none committed yet")
    ev = summary.last_eval
    if ev is not None:
        lines.append(f"last eval: step {ev.step} {ev.summary()}")
    if summary.restarts:
        lines.append(f"restarts: {summary.restarts}")
    if summary.endpoints:
        lines.append("metrics: " + ", ".join(summary.endpoints))
    lines += [f"note: {p}" for p in summary.problems]
    return "\n".join(lines)


def metrics_hint(spec: Any) -> str | None:
    """One line for `dino-cluster submit`: where a run's metrics will be served (a JobSpec)."""
    if not spec.metrics.prometheus:
        return None
    m = spec.metrics
    port = f"{m.port}+local rank" if m.port else "a free port"
    where = f"{m.host or '0.0.0.0'}:{port}"
    if spec.launcher.backend in ("ray", "kuberay"):
        return (
            f"metrics: each rank serves /metrics on {where}; also in Ray's metrics "
            "(ray_dino_*, the dashboard's Prometheus)"
        )
    return (
        f"metrics: each rank serves /metrics on {where}; Prometheus file-SD targets in "
        f"{spec.run_dir}/prometheus/targets-rank-N.json"
    )
