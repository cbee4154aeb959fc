"""What the exporters learn from outside the training loop: evaluation results and commit
times from the checkpoint store, and restart counts from the run folder.

Evaluations run as separate jobs and record their results beside the checkpoint
(`step-N/evals/<kind>.json`, see CheckpointManager.record_eval), so rank 0 polls the store
in a background thread (a listing every `interval_s`, never on the training path) and
publishes what it finds. `run_summary` reads the same things once for `dino-cluster status`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Seconds between two looks at the checkpoint store (one listing each time).
DEFAULT_POLL_S = 30.0
POLL_ENV = "DINO_METRICS_POLL_S"

REQUEUES_FILE = "slurm/requeues.json"  # written by the SLURM launcher (slurm_env.py)

_K_RE = re.compile(r"(?:^|[^a-z])k[=_-]?(\d+)|@(\d+)|^(\d+)$")


@dataclass
class EvalResult:
    kind: str
    step: int
    top1: dict[str, float] = field(default_factory=dict)  # k ("" when unknown) -> accuracy 0-1
    failed: bool = False
    error: str | None = None


@dataclass
class StoreState:
    """One look at the checkpoint store and the run folder."""

    last_step: int | None = None  # newest committed checkpoint
    last_time: float | None = None  # its commit time (unix seconds, from the manifest)
    evals: dict[str, EvalResult] = field(default_factory=dict)  # kind -> newest result
    restarts: int | None = None


def _k_of(path: list[str]) -> str:
    for part in reversed(path):
        m = _K_RE.search(part.lower())
        if m:
            return next(g for g in m.groups() if g)
    return ""


def parse_top1(results: Any) -> dict[str, float]:
    """Top-1 accuracies in an evaluation record, by k: accepts flat keys (`top1`,
    `top1_k20`, `knn_top1@20`, `k20_top1`), nested ones (`{"20": {"top1": ..}}`,
    `{"top1": {"k=20": ..}}`) and percentages (values above 1 are divided by 100)."""
    out: dict[str, float] = {}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, str(key)])
            return
        if isinstance(node, bool) or not isinstance(node, int | float):
            return
        if not any("top1" in p.lower().replace("-", "").replace("_", "") for p in path):
            return
        value = float(node)
        if not math.isfinite(value) or value < 0:
            return
        out[_k_of(path)] = value / 100.0 if value > 1.0 else value

    walk(results, [])
    if "k" in (results if isinstance(results, dict) else {}) and "" in out:
        k = results["k"]
        if isinstance(k, int) and not isinstance(k, bool):
            out[str(k)] = out.pop("")
    return out


def eval_result(kind: str, step: int, results: dict[str, Any]) -> EvalResult:
    status = str(results.get("status", "")).lower()
    error = results.get("error")
    failed = status in {"failed", "error"} or bool(error)
    return EvalResult(
        kind=kind,
        step=step,
        top1={} if failed else parse_top1(results),
        failed=failed,
        error=str(error)[:200] if error else None,
    )


def latest_evals(infos: Iterable[Any]) -> dict[str, EvalResult]:
    """Newest evaluation of each kind over CheckpointInfo-like objects (.step, .evals)."""
    out: dict[str, EvalResult] = {}
    for info in sorted(infos, key=lambda i: i.step):
        for kind, results in (info.evals or {}).items():
            if isinstance(results, dict):
                out[kind] = eval_result(kind, info.step, results)
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


def queue_failures(store: Any) -> dict[str, EvalResult]:
    """Failed evaluations from the evaluation queue's status records in the checkpoint store
    (eval-queue/<kind>/step-N/status.json, written by dino_cluster.evaluate): for each kind,
    the newest step with a status, when that status is "failed"."""
    from dino_cluster.checkpointing.layout import parse_step_dir
    from dino_cluster.evaluate.queue import QUEUE_PREFIX, STATUS

    newest: dict[str, tuple[int, str]] = {}
    for info in store.list(f"{QUEUE_PREFIX}/"):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[3] != STATUS:
            continue
        step = parse_step_dir(parts[2])
        if step is not None and step > newest.get(parts[1], (-1, ""))[0]:
            newest[parts[1]] = (step, info.key)
    out: dict[str, EvalResult] = {}
    for kind, (step, key) in newest.items():
        try:
            doc = json.loads(store.read_bytes(key))
        except (FileNotFoundError, ValueError):
            continue  # rewritten or deleted since the listing: next poll
        if isinstance(doc, dict) and doc.get("state") == "failed":
            errors = doc.get("errors") or []
            last = errors[-1] if isinstance(errors, list) and errors else None
            out[kind] = EvalResult(kind, step, failed=True, error=str(last)[:200] if last else None)
    return out


def read_store_state(checkpoints: Any, run_dir: str | Path | None = None) -> StoreState:
    """One listing of a CheckpointManager (or anything with .list()) plus the run folder.
    Per evaluation kind the newest step wins: a recorded result, or a failed queue status."""
    infos = checkpoints.list()
    state = StoreState(evals=latest_evals(infos), restarts=read_restarts(run_dir))
    store = getattr(checkpoints, "store", None)
    if store is not None:
        for kind, failure in queue_failures(store).items():
            known = state.evals.get(kind)
            if known is None or failure.step > known.step:
                state.evals[kind] = failure
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
