"""Local backend: the training ranks on this machine under one supervisor, no cluster.

`submit` starts one detached process, `python -m dino_cluster.launch.local_agent` (its own
session; log RUN/logs/launcher.log). It runs torch's elastic agent, which starts every rank
(`python -m dino_cluster.train`, gloo on CPU, log RUN/logs/rank-N.log), stops them all when
one fails, and writes how the run ended to RUN/exit/launcher.json. In the foreground
`submit` follows rank 0's log until the supervisor exits (Ctrl-C: cancel, and keep
following); with --detach it returns at once, and `status`, `logs` and `cancel` find the
supervisor through RUN/launch.json.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dino_cluster.evaluate.submit import (
    EvalHandle,
    EvalJob,
    ProcessHandle,
    eval_env,
    runner_command,
)
from dino_cluster.launch.base import (
    LaunchError,
    SubmitResult,
    missing_local_inputs,
    refuse_if_active,
)
from dino_cluster.launch.eval_watcher import spawn_watcher, wait_for_watcher
from dino_cluster.launch.local_agent import (
    LAUNCHER_LOG,
    OUTCOME_FILE,
    SUPERVISOR_ENV,
    clear_exit_files,
    log_tail,
    rank_command,
    rank_environment,
    rank_exit_code,
    read_outcome,
    run_processes,
    supervisor_command,
    supervisor_running,
)
from dino_cluster.launch.procs import follow as follow_file
from dino_cluster.launch.procs import pid_alive
from dino_cluster.launch.run_record import LocalRecord, read_record, write_record
from dino_cluster.spec import JobSpec, write_resolved

_STATES = {0: "completed", 3: "stopped"}  # the supervisor's exit codes; anything else failed
_RANK_CODES = {1: "failed", 2: "bad job spec", 3: "stopped"}  # dino_cluster.train's


def _supervisor_alive(pid: int) -> bool:
    # pid_alive first: it reaps the supervisor when it is our own child (a foreground or
    # in-process submit); a zombie of another parent has ended too.
    return pid_alive(pid) and supervisor_running(pid)


def run_status(run_dir: str | Path) -> str:
    """running | completed | stopped | failed: the supervisor lives, or how it said the
    run ended (RUN/exit/launcher.json, which folds in the ranks' RUN/exit/rank-N.json)."""
    record = read_record(run_dir, "local")
    if _supervisor_alive(record.pid):
        return "running"
    outcome = read_outcome(Path(run_dir))
    if outcome is None:
        return "failed"  # the supervisor was killed before it could say how the run ended
    return _STATES.get(outcome.get("code"), "failed")  # type: ignore[arg-type]


def failure(run_dir: str | Path) -> str | None:
    """Why a local run failed: which rank, how it ended, the last lines of its log. None
    unless the run failed."""
    if run_status(run_dir) != "failed":
        return None
    run_dir = Path(run_dir)
    outcome = read_outcome(run_dir)
    launcher_log = run_dir / LAUNCHER_LOG
    if outcome is None:
        record = read_record(run_dir, "local")
        codes = {r: rank_exit_code(run_dir, r) for r in range(record.world_size)}
        said = ", ".join(f"rank {r}: {'none' if c is None else c}" for r, c in codes.items())
        return (
            f"the launcher (pid {record.pid}) ended without writing {run_dir / OUTCOME_FILE} "
            f"(killed?; the ranks' own exit codes: {said}); last lines of {launcher_log}:\n"
            f"{log_tail(launcher_log)}"
        )
    rank, code = outcome.get("failed_rank"), outcome.get("rank_exitcode")
    if outcome.get("error"):
        what = f"the launcher failed: {outcome['error']}"
    elif rank is None:
        what = "the run failed"
    elif code is None:
        what = f"rank {rank} ended without saying how (killed after the stop grace?)"
    elif outcome.get("signal"):
        what = f"rank {rank} was killed by {outcome['signal']} (exit {code})"
    else:
        meaning = _RANK_CODES.get(code)
        what = f"rank {rank} exited with code {code}" + (f" ({meaning})" if meaning else "")
    log = Path(outcome.get("log") or launcher_log)
    if rank is not None and log.name != f"rank-{rank}.log":  # its own log was empty
        what += f"; nothing in its log {run_dir / 'logs' / f'rank-{rank}.log'}"
    return f"{what}; last lines of {log}:\n{outcome.get('log_tail') or log_tail(log)}"


def _wait_for_log(path: Path, running: Callable[[], bool], poll_s: float = 0.2) -> bool:
    """Whether `path` exists, waiting while the run runs (a rank creates its log)."""
    while not path.exists() and running():
        time.sleep(poll_s)
    return path.exists()


class LocalBackend:
    name = "local"

    def render(self, spec: JobSpec) -> str:
        world = spec.launcher.world_size
        env = {**rank_environment(world, os.environ), SUPERVISOR_ENV: "<supervisor pid>"}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        logs = spec.run_dir / "logs"
        return (
            f"# supervisor: torch's elastic agent, 1 node x {world} rank(s), c10d rendezvous "
            f"on 127.0.0.1, no restarts (log {logs}/launcher.log, outcome "
            f"{spec.run_dir / OUTCOME_FILE})\n"
            f"{shlex.join(supervisor_command(spec))}\n"
            f"# every rank, started by the agent with RANK, LOCAL_RANK, WORLD_SIZE={world}, "
            f"MASTER_ADDR=127.0.0.1, MASTER_PORT set (log {logs}/rank-N.log)\n"
            f"{prefix} {shlex.join(rank_command(spec))}\n"
        )

    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        run_dir = spec.run_dir
        if dry_run:
            return SubmitResult(str(run_dir), status="dry-run", message=self.render(spec))
        refuse_if_active(run_dir)
        if missing := missing_local_inputs(spec):
            # Before anything is written: a run that cannot read its data is not started.
            hint = ". Pack shards with `dino-cluster data pack` (README quickstart)"
            if any(m.startswith("evaluation.") for m in missing):
                hint += " or turn evaluation off: --set evaluation.enabled=false"
            raise LaunchError("; ".join(missing) + hint)
        spec_path = write_resolved(spec, run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        clear_exit_files(run_dir)  # an earlier attempt's outcome is not this one's
        rank0_log = run_dir / "logs" / "rank-0.log"
        offset = rank0_log.stat().st_size if rank0_log.exists() else 0
        with open(run_dir / LAUNCHER_LOG, "ab") as out:
            proc = subprocess.Popen(
                supervisor_command(spec),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,  # outlives this shell; Ctrl-C here is ours to handle
            )
        world = spec.launcher.world_size
        write_record(run_dir, LocalRecord(pid=proc.pid, world_size=world, spec=str(spec_path)))
        watcher = None
        if spec.evaluation.enabled:
            # The evaluation watcher runs beside training (not one of the run's ranks); it
            # claims each committed checkpoint once and exits when the run has ended.
            watcher = spawn_watcher(run_dir)
        result = SubmitResult(str(run_dir), job_id=str(proc.pid), status="running")
        if detach:
            return result
        if not self._follow_to_end(run_dir, proc, offset):
            watcher = None  # interrupted: the watcher finishes on its own, in the background
        result.status = run_status(run_dir)
        if result.status == "failed":
            print(f"error: {failure(run_dir)}", file=sys.stderr, flush=True)
        if watcher is not None:
            # In the foreground the run is over when its last checkpoint is evaluated too.
            wait_for_watcher(run_dir, watcher)
        return result

    def _follow_to_end(self, run_dir: Path, proc: subprocess.Popen, offset: int) -> bool:
        """Print rank 0's log from `offset` until the supervisor exits. Ctrl-C cancels the
        run (the ranks checkpoint) and keeps following; a second one stops following.
        Returns whether the run was followed to its end."""
        path = run_dir / "logs" / "rank-0.log"

        def running() -> bool:
            return proc.poll() is None

        try:
            if _wait_for_log(path, running):
                follow_file(path, running, offset)
            return True
        except KeyboardInterrupt:
            self.cancel(run_dir)
            print("\ncancelling: the ranks checkpoint, then stop (Ctrl-C again: stop waiting)")
        try:
            offset = path.stat().st_size if path.exists() else 0
            if _wait_for_log(path, running):
                follow_file(path, running, offset)
            return True
        except KeyboardInterrupt:
            print(f"\nstill stopping in the background; see `dino-cluster status {run_dir}`")
            return False

    def status(self, run_dir: Path) -> str:
        return run_status(run_dir)

    def failure(self, run_dir: Path) -> str | None:
        return failure(run_dir)

    def logs(self, run_dir: Path, *, follow: bool = False, rank: int | None = None) -> None:
        record = read_record(run_dir, "local")
        rank = rank or 0
        if not 0 <= rank < record.world_size:
            raise LaunchError(f"rank {rank} does not exist (world size {record.world_size})")
        path = Path(run_dir) / "logs" / f"rank-{rank}.log"

        def running() -> bool:
            return _supervisor_alive(record.pid)

        if follow:
            _wait_for_log(path, running)
        follow_file(path, lambda: follow and running())

    def cancel(self, run_dir: Path) -> None:
        """SIGTERM to the supervisor: torch's agent forwards it to every rank (they write a
        checkpoint and exit 3) and SIGKILLs what is left after the stop grace."""
        pid = read_record(run_dir, "local").pid
        if _supervisor_alive(pid):
            os.kill(pid, signal.SIGTERM)
            return
        # No supervisor: its ranks got SIGTERM from the kernel when it died; one that still
        # runs gets it again.
        for rank_pid, env in run_processes(pid).items():
            if "RANK" in env:
                os.kill(rank_pid, signal.SIGTERM)

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle:
        """A `python -m dino_cluster.evaluate.runner` subprocess on this machine with the
        evaluation's CPU threads (and GPU, when `evaluation.gpus`); log RUN/logs/eval/."""
        ev = spec.evaluation
        env = eval_env(os.environ, ev.cpus)
        if ev.gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        log_dir = Path(run_dir) / "logs" / "eval"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{job.name}.log", "ab") as out:
            proc = subprocess.Popen(
                runner_command(job, spec.launcher.interpreter),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return ProcessHandle(proc)
