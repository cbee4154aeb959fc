"""How a claimed evaluation is run: a `Submitter` starts it, an `EvalHandle` follows it.

The watcher only needs "start this job" and "has it ended, with which exit code", so a
backend plugs in by implementing two small protocols. The job itself always ends the same
way: it records its results next to the checkpoint (CheckpointManager.record_eval) and exits
with one of the codes below; the watcher reads the record back.

- `LocalSubmitter`: a `python -m dino_cluster.evaluate.runner` subprocess on this machine
  (the local backend), with the evaluation's CPU threads and GPU from the spec.
- `InlineSubmitter`: a Python callable in a thread (tests, custom evaluators).
A Ray submitter would start a Ray task/job with `num_cpus`/`num_gpus` from the spec, a SLURM
one an sbatch job running the same runner command (`runner_command` builds it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dino_cluster.storage import StorageOptions

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # the spec or checkpoint cannot be evaluated: retrying will not help
EXIT_GONE = 4  # the checkpoint was deleted (retention) before it could be evaluated


@dataclass(frozen=True)
class EvalJob:
    checkpoint_url: str  # the run's checkpoint root (CheckpointManager URL)
    step: int
    kind: str  # "knn" | "linear" | a custom kind
    spec_path: str | None = None  # job spec the runner builds the model and data from
    storage_options: StorageOptions | None = None
    attempt: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}-step-{self.step}-attempt-{self.attempt}"


class EvalHandle(Protocol):
    def poll(self) -> int | None:
        """The exit code once ended, else None."""
        ...

    def cancel(self) -> None: ...


class Submitter(Protocol):
    def submit(self, job: EvalJob) -> EvalHandle: ...


def runner_command(job: EvalJob) -> list[str]:
    """The command that evaluates `job` on any machine that can read the checkpoint store."""
    if job.spec_path is None:
        raise ValueError("a runner job needs the run's spec file (spec_path)")
    cmd = [
        sys.executable,
        "-m",
        "dino_cluster.evaluate.runner",
        "--kind",
        job.kind,
        "--checkpoint",
        job.checkpoint_url,
        "--step",
        str(job.step),
        "--spec",
        job.spec_path,
    ]
    opts = job.storage_options
    if opts is not None and opts.endpoint_url:
        cmd += ["--endpoint-url", opts.endpoint_url]
    return cmd


class _ProcessHandle:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def poll(self) -> int | None:
        return self.proc.poll()

    def cancel(self) -> None:
        if self.proc.poll() is None:
            try:  # its own session: the runner and any DataLoader workers it started
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class LocalSubmitter:
    """Runs each evaluation as a subprocess of this machine; logs to `log_dir/<job>.log`."""

    def __init__(self, *, cpus: int = 2, gpus: int = 0, log_dir: str | Path | None = None) -> None:
        self.cpus, self.gpus = cpus, gpus
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def submit(self, job: EvalJob) -> EvalHandle:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.cpus), PYTHONUNBUFFERED="1")
        # One process, not part of the training run's process group.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            env.pop(key, None)
        if self.gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{job.name}.log", "ab")  # noqa: SIM115 - child holds it
        try:
            proc = subprocess.Popen(
                runner_command(job),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        log.info("started %s as process %d", job.name, proc.pid)
        return _ProcessHandle(proc)


class _ThreadHandle:
    def __init__(self, fn: Callable[[], int]) -> None:
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], int]) -> None:
        try:
            self.code = fn()
        except Exception:  # noqa: BLE001 - an evaluator crash is an exit code, like a process
            log.exception("inline evaluation crashed")
            self.code = EXIT_FAILED

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.code

    def cancel(self) -> None:
        # A thread cannot be killed: it finishes, and its claim is gone, so the watcher
        # does not record anything for it.
        pass


class InlineSubmitter:
    """Runs `evaluate(job) -> results dict` in a thread and records the results."""

    def __init__(self, evaluate: Callable[[EvalJob], dict[str, Any]]) -> None:
        self.evaluate = evaluate

    def submit(self, job: EvalJob) -> EvalHandle:
        from dino_cluster.checkpoint import CheckpointManager, CheckpointNotFoundError

        def run() -> int:
            try:
                results = self.evaluate(job)
            except CheckpointNotFoundError:
                return EXIT_GONE
            manager = CheckpointManager(
                job.checkpoint_url, storage_options=job.storage_options, is_writer=False
            )
            manager.record_eval(job.step, job.kind, results)
            return EXIT_OK

        return _ThreadHandle(run)
