"""How a claimed evaluation is run: a `Submitter` starts it, an `EvalHandle` follows it.

The watcher only needs "start this job" and "has it ended, with which exit code", so a
backend plugs in by implementing two small protocols. The job itself always ends the same
way: it records its results next to the checkpoint (CheckpointManager.record_eval) and exits
with one of the codes below; the watcher reads the record back.

- `LocalSubmitter`: a `python -m dino_cluster.evaluate.runner` subprocess on this machine
  (the local backend), with the evaluation's CPU threads and GPU from the spec.
- `RaySubmitter` (submit_ray.py): a Ray task on the run's Ray cluster with `num_cpus` /
  `num_gpus` from the spec; cancel force-kills its worker.
- `SlurmSubmitter` (submit_slurm.py): one sbatch job per evaluation running the same runner
  command; exit code from scontrol/sacct, cancel with scancel.
- `InlineSubmitter`: a Python callable in a thread (tests, custom evaluators).

`make_submitter` picks one from `evaluation.backend` (auto: the backend the run was
launched with; kuberay runs evaluations as Ray tasks) and `spawn_watcher` starts
`dino-cluster eval watch RUN` beside a run (local and SLURM launchers; the Ray driver runs
the watcher in a thread, see launch/ray_driver.py).
"""

from __future__ import annotations

import json
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


RUNNER_MODULE = "dino_cluster.evaluate.runner"


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
        env = eval_env(os.environ, self.cpus)
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


# -- choosing the submitter -------------------------------------------------------------------

EVAL_BACKENDS = ("auto", "local", "ray", "slurm")


def resolve_backend(
    spec: JobSpec, run_dir: str | Path | None = None, name: str | None = None
) -> str:
    """local | ray | slurm for `name` (default `evaluation.backend`); auto = the backend the
    run was launched with (RUN/launch.json, else `launcher.backend`), kuberay -> ray."""
    name = name or spec.evaluation.backend
    if name not in EVAL_BACKENDS:
        raise ValueError(f"unknown evaluation backend {name!r}; valid: {', '.join(EVAL_BACKENDS)}")
    if name != "auto":
        return name
    name = spec.launcher.backend
    launch = Path(run_dir) / "launch.json" if run_dir is not None else None
    if launch is not None and launch.exists():
        try:
            name = json.loads(launch.read_text()).get("backend", name)
        except (ValueError, OSError):
            pass  # being rewritten: the spec says the same unless --backend overrode it
    return "ray" if name == "kuberay" else name


def make_submitter(
    name: str, spec: JobSpec, run_dir: str | Path, *, ray_address: str | None = None
) -> Submitter:
    """The submitter for a resolved backend name (see resolve_backend)."""
    ev = spec.evaluation
    if name == "local":
        return LocalSubmitter(cpus=ev.cpus, gpus=ev.gpus, log_dir=Path(run_dir) / "logs" / "eval")
    if name == "ray":
        from dino_cluster.evaluate.submit_ray import RaySubmitter

        return RaySubmitter(address=ray_address, cpus=ev.cpus, gpus=ev.gpus, mem_gb=ev.mem_gb)
    if name == "slurm":
        from dino_cluster.evaluate.submit_slurm import SlurmSubmitter

        return SlurmSubmitter.from_spec(spec, run_dir)
    raise ValueError(f"no submitter for backend {name!r}; valid: local, ray, slurm")


def spawn_watcher(run_dir: str | Path) -> int:
    """Start `dino-cluster eval watch RUN` as a detached process (its own session, so it
    outlives the launching shell); log RUN/logs/eval-watch.log, pid RUN/eval-watch.pid. It
    exits once the run has ended and every committed checkpoint has its evaluations."""
    run_dir = Path(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / "eval-watch.log", "ab") as wlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dino_cluster.evaluate.cli", "watch", str(run_dir)],
            stdout=wlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (run_dir / "eval-watch.pid").write_text(str(proc.pid))
    return proc.pid


def wait_for_watcher(run_dir: str | Path, pid: int, *, poll_s: float = 1.0) -> bool:
    """Block until the watcher `pid` beside a finished foreground run exits, echoing its
    result lines ("step N knn: ..."), so `submit` ends with the run's evaluations. Ctrl-C
    stops the waiting, not the watcher. Returns False when interrupted."""
    import time

    from dino_cluster.launch.base import pid_alive

    path = Path(run_dir) / "logs" / "eval-watch.log"
    print(f"training ended; waiting for the evaluations of its checkpoints ({path})", flush=True)
    offset = 0
    try:
        while True:
            alive = pid_alive(pid)
            if path.exists():
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                # Whole lines only: a line still being written is read on the next pass.
                end = chunk.rfind(b"\n") + 1
                offset += end
                for line in chunk[:end].decode("utf-8", "replace").splitlines():
                    if line.startswith(("step ", "watcher done")):
                        print(line, flush=True)
            if not alive:
                return True
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"still evaluating in the background (pid {pid}); see {path}", flush=True)
        return False
