"""How a claimed evaluation is started: a `Submitter` starts it, an `EvalHandle` follows it.

The watcher only needs "start this job" and "has it ended, with which exit code". Where
the job runs is the run's backend's business: `BackendSubmitter` hands every job to
`Backend.submit_eval` (a local process, a Ray task, an sbatch job; see launch/), and this
package never imports a backend's internals. `InlineSubmitter` runs a Python callable in a
thread (tests, custom evaluators).

Every job ends the same way: it records its results next to the checkpoint
(CheckpointManager.record_eval) and exits with one of the codes below; the watcher reads
the record back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dino_cluster.storage import StorageOptions

if TYPE_CHECKING:
    from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # the spec or checkpoint cannot be evaluated: retrying will not help
EXIT_GONE = 4  # the checkpoint was deleted (retention) before it could be evaluated

KINDS = ("knn", "linear")
RUNNER_MODULE = "dino_cluster.evaluate.runner"


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


def runner_args(job: EvalJob) -> list[str]:
    """The runner's arguments for `job` (what follows `python -m dino_cluster.evaluate.runner`)."""
    if job.spec_path is None:
        raise ValueError("a runner job needs the run's spec file (spec_path)")
    args = ["--kind", job.kind, "--checkpoint", job.checkpoint_url, "--step", str(job.step)]
    args += ["--spec", job.spec_path]
    opts = job.storage_options
    if opts is not None and opts.endpoint_url:
        args += ["--endpoint-url", opts.endpoint_url]
    return args


def runner_command(job: EvalJob, python: str | None = None) -> list[str]:
    """The command that evaluates `job` on any machine that can read the checkpoint store
    (`python`: the interpreter to name, default this one)."""
    return [python or sys.executable, "-m", RUNNER_MODULE, *runner_args(job)]


def eval_env(base: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The environment of one evaluation process: its CPU threads, and not a rank of the
    training run's process group (torchrun variables removed)."""
    env = dict(base, OMP_NUM_THREADS=str(cpus), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return env


class ProcessHandle:
    """A runner started as a subprocess in its own session (local evaluations)."""

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


class EvalBackend(Protocol):
    """The part of a launcher backend (launch.base.Backend) evaluations use."""

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle: ...


class BackendSubmitter:
    """Starts every job through the run's backend (`Backend.submit_eval`)."""

    def __init__(
        self, backend: EvalBackend, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> None:
        self.backend, self.spec, self.run_dir, self.address = backend, spec, run_dir, address

    def submit(self, job: EvalJob) -> EvalHandle:
        return self.backend.submit_eval(job, self.spec, self.run_dir, address=self.address)


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
        from dino_cluster.checkpointing import CheckpointManager, CheckpointNotFoundError

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
