"""What the exporters learn from outside the training loop: evaluation results and commit
times from the checkpoint store, and restart counts from the run folder.

Evaluations run as separate jobs and record their results beside the checkpoint
(`step-N/evals/<kind>.json`, read as `evaluate.results.EvalResult`), so rank 0 polls the
store in a background thread (a listing every `interval_s`, never on the training path) and
publishes what it finds. `summary.py` reads the same things once for `dino-cluster status`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_cluster.evaluate.queue import newest_statuses
from dino_cluster.evaluate.results import EvalResult, ResultError, newest_by_kind

log = logging.getLogger(__name__)

# Seconds between two looks at the checkpoint store (one listing each time).
DEFAULT_POLL_S = 30.0
POLL_ENV = "DINO_METRICS_POLL_S"

REQUEUES_FILE = "slurm/requeues.json"  # written by the SLURM backend (launch/slurm/env.py)


@dataclass
class StoreState:
    """One look at the checkpoint store and the run folder."""

    last_step: int | None = None  # newest committed checkpoint
    last_time: float | None = None  # its commit time (unix seconds, from the manifest)
    evals: dict[str, EvalResult] = field(default_factory=dict)  # kind -> newest result
    restarts: int | None = None


def checkpoint_results(infos: list[Any]) -> list[EvalResult]:
    """Every recorded evaluation over CheckpointInfo objects (.step, .evals: kind -> body);
    a body not in the runner's layout counts as a failed evaluation that says so."""
    out = []
    for info in infos:
        for kind, body in (info.evals or {}).items():
            try:
                out.append(EvalResult.from_json(kind, info.step, body))
            except ResultError as exc:
                out.append(EvalResult.failure(kind, info.step, f"unreadable result: {exc}"))
    return out


def queue_failures(store: Any) -> list[EvalResult]:
    """Evaluations whose newest status in the evaluation queue is a final "failed"."""
    out = []
    for kind, (step, status) in newest_statuses(store).items():
        if status.get("state") == "failed":
            errors = status.get("errors") or []
            last = errors[-1] if isinstance(errors, list) and errors else "failed"
            out.append(EvalResult.failure(kind, step, str(last)))
    return out


def read_restarts(run_dir: str | Path | None) -> int | None:
    """SLURM requeues of this run (RUN/slurm/requeues.json), or None when there is none."""
    if run_dir is None:
        return None
    try:
        doc = json.loads((Path(run_dir) / REQUEUES_FILE).read_text())
    except (OSError, ValueError):
        return None
    value = doc.get("requeues") if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_store_state(checkpoints: Any, run_dir: str | Path | None = None) -> StoreState:
    """One listing of a CheckpointManager (or anything with .list() and .store) plus the run
    folder. Per evaluation kind the newest step wins: a recorded result or a failure."""
    infos = checkpoints.list()
    results = checkpoint_results(infos)
    store = getattr(checkpoints, "store", None)
    if store is not None:
        results += queue_failures(store)
    state = StoreState(evals=newest_by_kind(results), restarts=read_restarts(run_dir))
    if infos:
        newest = max(infos, key=lambda i: i.step)
        state.last_step, state.last_time = newest.step, newest.time
    return state


def poll_interval() -> float:
    raw = os.environ.get(POLL_ENV)
    if not raw:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{POLL_ENV} must be > 0, got {raw!r}")
    return value


class StoreWatcher:
    """A daemon thread that reads the store every `interval_s` and hands the StoreState to
    `publish`. Errors are logged (once per kind of error) and retried at the next tick: a
    slow or failing bucket must never stop training."""

    def __init__(
        self,
        read: Callable[[], StoreState],
        publish: Callable[[StoreState], None],
        interval_s: float = DEFAULT_POLL_S,
    ) -> None:
        self._read = read
        self._publish = publish
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._errors: set[str] = set()
        self.polls = 0
        self._thread = threading.Thread(target=self._run, name="dino-metrics-store", daemon=True)

    def start(self) -> StoreWatcher:
        self._thread.start()
        return self

    def poll_once(self) -> None:
        try:
            state = self._read()
            self._publish(state)
        except Exception as exc:  # noqa: BLE001 - any store failure: log and retry later
            kind = type(exc).__name__
            if kind not in self._errors:
                self._errors.add(kind)
                log.warning("metrics: could not read the checkpoint store: %s", exc)
        finally:
            self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


class StoreWatchingSink:
    """Runs a StoreWatcher for the lifetime of the sinks it feeds (rank 0 only)."""

    def __init__(self, watcher: StoreWatcher) -> None:
        self.watcher = watcher.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        self.watcher.stop()
