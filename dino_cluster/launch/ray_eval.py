"""The evaluation watcher of a Ray run, in a thread of the Ray driver.

The driver is the one process that lives exactly as long as the run and is already joined
to the run's Ray cluster (also when it runs on the cluster through the Jobs API or as a
KubeRay RayJob), so the watcher runs there and starts each evaluation as a Ray task beside
the training workers (evaluate/submit_ray.py; `evaluation.backend` may send them elsewhere).

When training has ended the driver waits for the evaluations of the last checkpoints
before it disconnects (a private local Ray stops with the driver). A stop request
(`dino-cluster cancel`, SIGTERM) or a failed run cancels running evaluations instead: their
claims are released and `dino-cluster eval watch RUN` picks them up later.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)


class _Stopped(Exception):
    """Raised from the watcher's `finished` callback to leave its loop at once."""


class DriverEvaluations:
    def __init__(self, spec: JobSpec, spec_path: Path, stop_event: threading.Event) -> None:
        from dino_cluster.evaluate.cli import make_watcher
        from dino_cluster.evaluate.submit import make_submitter, resolve_backend

        run_dir = spec.run_dir
        self.backend = resolve_backend(spec, None)
        if self.backend == "local" and spec.evaluation.backend == "auto":
            self.backend = "ray"  # the driver of a Ray run evaluates on Ray
        submitter = make_submitter(self.backend, spec, run_dir)  # Ray: this driver's connection
        self.watcher, self.sink = make_watcher(spec, spec_path, run_dir, submitter)
        self.stop_event = stop_event
        self.training_done = threading.Event()
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eval-watcher", daemon=True)

    def start(self) -> DriverEvaluations:
        log.info("evaluation watcher started (evaluations on the %s backend)", self.backend)
        self.thread.start()
        return self

    def _finished(self) -> bool:
        if self.stop_event.is_set() or self.cancel.is_set():
            raise _Stopped
        return self.training_done.is_set()

    def _run(self) -> None:
        try:
            stats = self.watcher.run(finished=self._finished)
            log.info(
                "evaluations done: %d evaluated, %d failed, %d skipped",
                stats.done,
                stats.failed,
                stats.skipped,
            )
        except _Stopped:
            log.warning("evaluations stopped; `dino-cluster eval watch RUN` resumes them")
        except Exception:  # noqa: BLE001 - evaluation trouble never fails the training run
            log.exception("the evaluation watcher failed")
        finally:
            try:
                self.watcher.stop()  # cancel what still runs and release its claims
            finally:
                self.sink.close()

    def finish(self, *, wait: bool) -> None:
        """Training has ended: evaluate what is left (`wait`), or cancel it."""
        self.training_done.set()
        if not wait:
            self.cancel.set()
        elif self.thread.is_alive():
            log.info("training ended; waiting for the last evaluations")
        while self.thread.is_alive():
            self.thread.join(1.0)
