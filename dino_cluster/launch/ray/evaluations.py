"""Evaluations of a Ray run: Ray tasks, and the watcher in the driver that starts them.

Every evaluation is one Ray task on the run's cluster running the runner
(`dino_cluster.evaluate.runner.main`) in its own worker process, with `num_cpus` /
`num_gpus` (and `memory`) from the spec's evaluation section, so Ray schedules it beside
training and it waits for resources rather than oversubscribing them:

- `max_calls=1`: a fresh worker process per evaluation, ended afterwards, so the model,
  the feature bank and a CUDA context never outlive it;
- `max_retries=0`: the watcher counts attempts and retries, Ray must not retry behind it;
- the resolved spec travels as text in the task's arguments: a node only needs to reach the
  checkpoint store and the shards, not the run folder;
- the exit code comes back as the task's return value; a task whose worker died (killed
  for memory, node lost) ends with EXIT_FAILED;
- cancel is `ray.cancel(force=True)`: the worker process is killed, whatever it was doing.

The watcher of a Ray run runs in a thread of the driver (`DriverEvaluations`): the driver
is the one process that lives exactly as long as the run and is already joined to the run's
cluster, also when it runs on the cluster through the Jobs API or as a KubeRay RayJob. When
training has ended the driver waits for the evaluations of the last checkpoints before it
disconnects (a private local Ray stops with the driver). A stop request (`dino-cluster
cancel`, SIGTERM) or a failed run cancels running evaluations instead: their claims are
released and `dino-cluster eval watch RUN` picks them up later.

A standalone `dino-cluster eval watch RUN --backend ray` joins the cluster the run used
(`--address`, the run's driver address in its record, `launcher.ray.address` when it is
host:port, else RAY_ADDRESS), with token auth as the launcher does it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dino_cluster.evaluate.submit import (
    EXIT_FAILED,
    BackendSubmitter,
    EvalHandle,
    EvalJob,
    eval_env,
    runner_args,
)
from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.ray.cluster import enable_token_auth, loopback_env
from dino_cluster.launch.run_record import read_record
from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)

POLL_EVERY_S = 0.5  # the watcher polls handles often; asking Ray twice a second is plenty


def run_address(run_dir: str | Path | None, spec_address: str | None) -> str | None:
    """The Ray cluster (GCS host:port) a run's evaluations go to, or None (RAY_ADDRESS /
    an already initialised Ray decide). A Jobs API URL is no GCS address: such runs
    evaluate from their driver, on the cluster."""
    if run_dir is not None:
        try:
            rec = read_record(run_dir)
        except LaunchError:
            rec = None
        if rec is not None and rec.backend == "ray" and rec.mode == "driver" and rec.address:
            return rec.address
    if spec_address and not spec_address.startswith(("http://", "https://")):
        return spec_address
    return None


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` unless this process already did (the driver)."""
    if address is not None and address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Read once, when Ray is imported: a one-machine cluster stays on loopback.
        for key, value in loopback_env().items():
            os.environ.setdefault(key, value)
    enable_token_auth()
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            "no Ray cluster to submit evaluations to: pass --address HOST:PORT, set "
            "RAY_ADDRESS, or set launcher.ray.address (a Jobs API URL runs the watcher in "
            "the run's driver instead)"
        )
    ray.init(address=address or "auto", log_to_driver=True, logging_level=logging.WARNING)


def _evaluate_task(
    job: EvalJob, spec_text: str, cpus: int, gpus: int, target: Callable[[EvalJob], int] | None
) -> int:
    """Body of the Ray task: one evaluation in this (fresh) worker process."""
    env = eval_env(os.environ, cpus)  # not a rank of any process group; its CPU threads
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    import torch

    torch.set_num_threads(cpus)
    if target is not None:
        return int(target(job))
    from dino_cluster.evaluate import runner

    with tempfile.TemporaryDirectory(prefix="dino-eval-") as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(spec_text)
        return int(runner.main(runner_args(replace(job, spec_path=str(spec_file)))))


_REMOTE: Any = None


def _remote_fn() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_calls=1)(_evaluate_task)  # not settable in .options()
    return _REMOTE


class _RayHandle:
    def __init__(self, ref: Any, name: str) -> None:
        self.ref, self.name = ref, name
        self.code: int | None = None
        self._next = 0.0

    def poll(self) -> int | None:
        if self.code is not None or time.monotonic() < self._next:
            return self.code
        self._next = time.monotonic() + POLL_EVERY_S
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.code = int(ray.get(self.ref))
        except Exception as exc:  # noqa: BLE001 - a dead worker or a cancel is a failed run
            log.error("Ray evaluation %s ended without an exit code: %s", self.name, exc)
            self.code = EXIT_FAILED
        return self.code

    def cancel(self) -> None:
        import ray

        if self.code is None:
            # force: the worker process is killed, not interrupted (a KeyboardInterrupt can
            # be swallowed by the code it lands in).
            ray.cancel(self.ref, force=True)


def submit_task(
    job: EvalJob,
    spec: JobSpec,
    *,
    address: str | None = None,
    target: Callable[[EvalJob], int] | None = None,
) -> EvalHandle:
    """Start `job` as a Ray task (joining the cluster at `address` first, unless this
    process already is a Ray driver). `target`: a picklable `callable(job) -> exit code`
    run in the task instead of the runner (custom evaluators, tests)."""
    connect(address)
    ev = spec.evaluation
    options: dict[str, Any] = {
        "num_cpus": ev.cpus,
        "num_gpus": ev.gpus,
        "max_retries": 0,
        "retry_exceptions": False,
        "name": f"dino-eval-{job.name}",
    }
    if ev.mem_gb:
        options["memory"] = ev.mem_gb * 1024**3
    spec_text = ""
    if target is None:
        if job.spec_path is None:
            raise ValueError("a runner job needs the run's spec file (spec_path)")
        spec_text = Path(job.spec_path).read_text()
    ref = _remote_fn().options(**options).remote(job, spec_text, ev.cpus, ev.gpus, target)
    log.info("started %s as a Ray task (%d CPU, %d GPU)", job.name, ev.cpus, ev.gpus)
    return _RayHandle(ref, job.name)


def driver_eval_backend(spec: JobSpec) -> str:
    """Where the driver of a Ray run (embedded, Jobs API or a KubeRay RayJob) starts
    evaluations: on Ray, through this driver's connection, unless the spec names another."""
    return "ray" if spec.evaluation.backend == "auto" else spec.evaluation.backend


class _Stopped(Exception):
    """Raised from the watcher's `finished` callback to leave its loop at once."""


class DriverEvaluations:
    def __init__(self, spec: JobSpec, spec_path: Path, stop_event: threading.Event) -> None:
        from dino_cluster.evaluate.watcher import make_watcher
        from dino_cluster.launch.base import get_backend

        run_dir = spec.run_dir
        self.backend = driver_eval_backend(spec)
        submitter = BackendSubmitter(get_backend(self.backend), spec, run_dir)
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
