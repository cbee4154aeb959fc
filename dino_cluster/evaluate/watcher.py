"""The watcher: every committed checkpoint gets each evaluation kind exactly once.

One poll = one listing of the checkpoint store (checkpoints and queue together). For each
committed checkpoint and kind without a final status, in random order (two watchers rarely
collide), the watcher claims the step (queue.py), counts an attempt in the status record,
starts the evaluation through a `Submitter`, heartbeats while it runs, then writes the final
status: `done` (with a copy of the results, which outlives the checkpoint's retention),
`skipped` (the checkpoint was deleted first), or, after `max_attempts` failures, `failed`.
Failures never touch training: the watcher is a separate process that only reads
checkpoints and writes under `eval-queue/` and `step-N/evals/`.

It stops when asked (`once`), or when the run has finished and every committed checkpoint
has a final status for every kind.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_cluster.checkpointing.layout import (
    MANIFEST,
    Manifest,
    ManifestError,
    eval_key,
    manifest_key,
    parse_step_dir,
)
from dino_cluster.evaluate.queue import TERMINAL, Claim, EvalQueue, Liveness, parse_queue
from dino_cluster.evaluate.results import EvalResult
from dino_cluster.evaluate.submit import (
    EXIT_BAD_INPUT,
    EXIT_GONE,
    EXIT_OK,
    KINDS,
    EvalHandle,
    EvalJob,
    Submitter,
)
from dino_cluster.storage import ObjectInfo, ObjectStore, StorageOptions

if TYPE_CHECKING:
    from dino_cluster.metrics.sinks import JsonlSink
    from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 5


@dataclass
class _Active:
    queue: EvalQueue
    claim: Claim
    job: EvalJob
    handle: EvalHandle
    status: dict[str, Any]
    next_beat: float


@dataclass
class WatchStats:
    started: int = 0
    done: int = 0
    failed_attempts: int = 0
    failed: int = 0
    skipped: int = 0
    lost: int = 0
    polls: int = 0
    results: dict[tuple[str, int], EvalResult] = field(default_factory=dict)


class Watcher:
    """Evaluates the committed checkpoints under `store` (a run's checkpoint root)."""

    def __init__(
        self,
        store: ObjectStore,
        submitter: Submitter,
        *,
        kinds: list[str],
        spec_path: str | None = None,
        storage_options: StorageOptions | None = None,
        max_attempts: int = 3,
        max_parallel: int = 1,
        lease_s: float = 60.0,
        poll_s: float = 10.0,
        on_result: Callable[[EvalResult], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1 or max_parallel < 1:
            raise ValueError("max_attempts and max_parallel must be >= 1")
        if not kinds:
            raise ValueError("no evaluation kinds to run")
        self.store, self.submitter, self.spec_path = store, submitter, spec_path
        self.storage_options = storage_options
        self.max_attempts, self.max_parallel = max_attempts, max_parallel
        self.lease_s, self.poll_s = lease_s, poll_s
        self.on_result = on_result
        self.rng = rng or random.Random()
        liveness = Liveness(lease_s)
        self.queues = {k: EvalQueue(store, k, lease_s=lease_s, liveness=liveness) for k in kinds}
        self.active: list[_Active] = []
        self.stats = WatchStats()
        self._manifests: dict[int, tuple[tuple[int, float], float]] = {}  # step -> (id, time)
        self._final: set[tuple[str, int, float]] = set()  # (kind, step, manifest time)
        self.lingering = 0  # live claims left on final steps (see pending)

    # -- what is there ---------------------------------------------------------------------
    def committed(self, infos: list[ObjectInfo]) -> dict[int, float]:
        """Committed steps -> manifest commit time (manifest valid, objects all present)."""
        by_step: dict[int, dict[str, ObjectInfo]] = {}
        for info in infos:
            head, sep, rest = info.key.partition("/")
            step = parse_step_dir(head) if sep else None
            if step is not None:
                by_step.setdefault(step, {})[rest] = info
        out: dict[int, float] = {}
        for step, objs in by_step.items():
            man = objs.get(MANIFEST)
            if man is None:
                continue
            ident = (man.size, man.mtime)
            cached = self._manifests.get(step)
            if cached is None or cached[0] != ident:
                try:
                    manifest = Manifest.from_json(
                        self.store.read_bytes(manifest_key(step)), expect_step=step
                    )
                except (FileNotFoundError, ManifestError) as exc:
                    log.debug("step %d not committed: %s", step, exc)
                    continue
                if any(o.name not in objs or objs[o.name].size != o.size for o in manifest.objects):
                    continue  # objects still landing or being deleted
                cached = (ident, manifest.time)
                self._manifests[step] = cached
            out[step] = cached[1]
        return out

    def pending(self) -> tuple[list[tuple[EvalQueue, int, float]], list[ObjectInfo]]:
        """(queue, step, manifest time) still to evaluate, and the listing they came from.

        Also counts, in `self.lingering`, claims left on final steps by a watcher killed
        between writing the final status and releasing its claim: they are reaped once
        stale, and the watcher does not call the queue drained while any is left.
        """
        infos = self.store.list("")
        steps = self.committed(infos)
        todo: list[tuple[EvalQueue, int, float]] = []
        self.lingering = 0
        for kind, queue in self.queues.items():
            entries = parse_queue(infos, kind)
            for step, mtime in sorted(steps.items()):
                entry = entries.get(step)
                if (kind, step, mtime) in self._final:
                    if entry is not None and entry.claims:
                        self.lingering += len(queue.live_claims(step, entry))
                    continue
                if entry is not None and entry.has_status:
                    status = queue.read_status(step)
                    if (
                        status is not None
                        and status.get("manifest_time") == mtime
                        and status.get("state") in TERMINAL
                    ):
                        self._final.add((kind, step, mtime))
                        if entry.claims:
                            self.lingering += len(queue.live_claims(step, entry))
                        continue
                todo.append((queue, step, mtime))
        return todo, infos

    # -- one pass ----------------------------------------------------------------------------
    def poll_once(self) -> int:
        """Claim and start what can be started; returns how many pairs are not final yet."""
        self.stats.polls += 1
        todo, infos = self.pending()
        busy = {(a.queue.kind, a.claim.step) for a in self.active}
        candidates = [t for t in todo if (t[0].kind, t[1]) not in busy]
        self.rng.shuffle(candidates)
        for queue, step, mtime in candidates:
            if len(self.active) >= self.max_parallel:
                break
            entry = parse_queue(infos, queue.kind).get(step)
            claim = queue.try_claim(step, entry)
            if claim is not None:
                self._start(queue, claim, mtime)
        return len(todo) + self.lingering

    def _start(self, queue: EvalQueue, claim: Claim, mtime: float) -> None:
        # Re-read under the claim: the previous holder wrote its status before releasing.
        status = queue.read_status(claim.step) or {}
        if status.get("manifest_time") != mtime:
            status = {}  # none yet, or a status of an older checkpoint at the same step
        if status.get("state") in TERMINAL:
            queue.release(claim)
            return
        attempts = int(status.get("attempts", 0))
        errors = list(status.get("errors", []))
        if attempts >= self.max_attempts:
            if status.get("state") == "running":
                errors.append(f"attempt {attempts} ended without reporting (watcher died?)")
            self._finish(queue, claim, dict(status, state="failed", errors=errors[-5:]))
            self.stats.failed += 1
            return
        status = {
            "state": "running",
            "attempts": attempts + 1,
            "max_attempts": self.max_attempts,
            "errors": errors[-MAX_ERRORS_KEPT:],
            "manifest_time": mtime,
            "started": time.time(),
        }
        queue.write_status(claim, status)
        job = EvalJob(
            checkpoint_url=self.store.url,
            step=claim.step,
            kind=queue.kind,
            spec_path=self.spec_path,
            storage_options=self.storage_options,
            attempt=attempts + 1,
        )
        try:
            handle = self.submitter.submit(job)
        except Exception as exc:  # noqa: BLE001 - a submission failure is a failed attempt
            log.error("could not start %s: %s", job.name, exc)
            self._failed_attempt(queue, claim, status, f"submit: {exc}")
            return
        self.stats.started += 1
        beat = time.monotonic() + self.lease_s / 4
        self.active.append(_Active(queue, claim, job, handle, status, beat))

    def tend(self) -> int:
        """Heartbeat running evaluations and settle the ended ones; how many ended."""
        ended = 0
        for act in list(self.active):
            code = act.handle.poll()
            if code is None:
                if time.monotonic() >= act.next_beat:
                    act.next_beat = time.monotonic() + self.lease_s / 4
                    if not act.claim.heartbeat():
                        act.handle.cancel()
                        self.active.remove(act)
                        act.queue.mine.discard(act.claim.token)
                        self.stats.lost += 1
                continue
            self.active.remove(act)
            ended += 1
            try:
                self._settle(act, code)
            except Exception as exc:  # noqa: BLE001 - the store failed us: the step stays
                # non-final and its claim goes stale; a later poll (here or elsewhere) redoes it.
                log.warning("%s: could not record the outcome: %s", act.job.name, exc)
                act.queue.mine.discard(act.claim.token)
        return ended

    def _settle(self, act: _Active, code: int) -> None:
        queue, claim, status, job = act.queue, act.claim, act.status, act.job
        if claim.lost or not claim.heartbeat():
            self.stats.lost += 1
            queue.mine.discard(claim.token)
            return
        if code == EXIT_OK:
            result = self._read_result(job)
            if result is not None:
                done = dict(status, state="done", results=result.to_json())
                self._finish(queue, claim, done)
                self.stats.done += 1
                self.stats.results[(job.kind, job.step)] = result
                if self.on_result is not None:
                    self.on_result(result)
                return
            error = "the evaluation exited 0 but recorded no readable results"
        elif code == EXIT_GONE:
            self._finish(queue, claim, dict(status, state="skipped", reason="checkpoint deleted"))
            self.stats.skipped += 1
            return
        elif code == EXIT_BAD_INPUT:
            errors = [*status["errors"], "bad input (spec or checkpoint): not retried"]
            self._finish(queue, claim, dict(status, state="failed", errors=errors))
            self.stats.failed += 1
            return
        else:
            error = f"exit code {code}"
        self._failed_attempt(queue, claim, status, error)

    def _failed_attempt(self, queue: EvalQueue, claim: Claim, status: dict, error: str) -> None:
        self.stats.failed_attempts += 1
        errors = [*status["errors"], f"attempt {status['attempts']}: {error}"][-MAX_ERRORS_KEPT:]
        final = status["attempts"] >= self.max_attempts
        state = "failed" if final else "pending"
        log.warning(
            "%s step %d attempt %d failed (%s)%s",
            queue.kind,
            claim.step,
            status["attempts"],
            error,
            ": giving up" if final else ": will retry",
        )
        if final:
            self.stats.failed += 1
        self._finish(queue, claim, dict(status, state=state, errors=errors))

    def _finish(self, queue: EvalQueue, claim: Claim, status: dict[str, Any]) -> None:
        status["finished"] = time.time()
        try:
            queue.write_status(claim, status)
        finally:
            queue.release(claim)

    def _read_result(self, job: EvalJob) -> EvalResult | None:
        import json

        try:
            doc = json.loads(self.store.read_bytes(eval_key(job.step, job.kind)))
            return EvalResult.from_json(job.kind, job.step, doc.get("results"))
        except (FileNotFoundError, ValueError, AttributeError) as exc:
            log.warning("%s: no readable result: %s", job.name, exc)
            return None

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        *,
        once: bool = False,
        finished: Callable[[], bool] | None = None,
        deadline_s: float | None = None,
    ) -> WatchStats:
        """Poll until `once` work is drained, or `finished()` and everything is final.

        `finished` says whether the run has stopped producing checkpoints (None: never; the
        watcher runs until stopped, unless `once`). It is asked before a poll, so the final
        checkpoint of a run is always seen by a later poll.
        """
        end = None if deadline_s is None else time.monotonic() + deadline_s
        next_poll = 0.0
        while True:
            settled = self.tend()
            now = time.monotonic()
            free = len(self.active) < self.max_parallel
            if now >= next_poll or (free and (settled or (once and not self.active))):
                done_before = finished() if finished is not None else False
                next_poll = time.monotonic() + self.poll_s
                try:
                    remaining = self.poll_once()
                except Exception as exc:  # noqa: BLE001 - a store outage: try again next poll
                    log.warning("watcher poll failed: %s; retrying in %.0f s", exc, self.poll_s)
                    remaining = -1
                if not self.active and remaining >= 0:
                    if remaining == 0 and (once or done_before):
                        return self.stats
                    if once and not self._claimable():
                        return self.stats
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"watcher still busy after {deadline_s} s")
            # Short naps while evaluations run (heartbeats), jittered so that two watchers
            # that just collided on a claim do not collide again.
            time.sleep(self.rng.uniform(0.02, 0.1) if self.active or once else 0.1)

    def _claimable(self) -> bool:
        """Whether a pending pair is not held by another live watcher (for `once`)."""
        todo, infos = self.pending()
        for queue, step, _ in todo:
            entry = parse_queue(infos, queue.kind).get(step)
            if entry is None or not queue.live_claims(step, entry):
                return True
        return False

    def stop(self) -> None:
        """Cancel running evaluations and give their steps back (attempt counted)."""
        for act in self.active:
            act.handle.cancel()
            act.queue.release(act.claim)
        self.active.clear()


def make_watcher(
    job: JobSpec,
    spec_path: Path,
    run_dir: Path,
    submitter: Submitter,
    *,
    kinds: list[str] | None = None,
    max_attempts: int = 3,
    parallel: int = 1,
    lease: float = 60.0,
    poll: float = 10.0,
) -> tuple[Watcher, JsonlSink]:
    """The watcher of a run's checkpoints, its results logged to RUN/metrics-eval.jsonl and
    printed (`eval watch`, and the Ray driver). Close the sink when done."""
    from dino_cluster.metrics.sinks import JsonlSink
    from dino_cluster.storage import open_store

    kinds = kinds or list(job.evaluation.kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown --kind {bad[0]!r}; valid: {', '.join(KINDS)}")
    options = StorageOptions.from_spec(job.data.storage)
    store = open_store(job.checkpoint_url, options)
    sink = JsonlSink(run_dir / "metrics-eval.jsonl")

    def on_result(result: EvalResult) -> None:
        sink.log(result.step, result.values())
        print(f"step {result.step} {result.summary()}", flush=True)

    watcher = Watcher(
        store,
        submitter,
        kinds=kinds,
        spec_path=str(spec_path.resolve()),
        storage_options=options,
        max_attempts=max_attempts,
        max_parallel=parallel,
        lease_s=lease,
        poll_s=poll,
        on_result=on_result,
    )
    return watcher, sink
