"""Local backend: one or more training processes on this machine, no cluster.

Every rank is a `python -m dino_cluster.train` process with the torch.distributed
environment set (gloo on CPU), writing to RUN/logs/rank-N.log. In the foreground the
launcher follows rank 0's log until all ranks exit; with --detach it returns at once and
`status`, `logs`, `cancel` find the processes through RUN/launch.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
from dino_cluster.launch.procs import follow as follow_file
from dino_cluster.launch.procs import free_port, pid_alive
from dino_cluster.launch.run_record import LocalRecord, read_record, write_record
from dino_cluster.spec import JobSpec, write_resolved


def run_status(run_dir: Path) -> str:
    """running | completed | stopped | failed, from the processes and their exit files."""
    record = read_record(run_dir, "local")
    if any(pid_alive(p) for p in record.pids):
        return "running"
    codes = []
    for rank in range(len(record.pids)):
        f = Path(run_dir) / "exit" / f"rank-{rank}.json"
        if not f.exists():
            return "failed"  # killed before it could say how it ended
        codes.append(json.loads(f.read_text())["code"])
    if all(c == 0 for c in codes):
        return "completed"
    if all(c in (0, 3) for c in codes):
        return "stopped"
    return "failed"


class LocalBackend:
    name = "local"

    def render(self, spec: JobSpec) -> str:
        world, python = spec.launcher.world_size, spec.launcher.interpreter
        resolved = spec.run_dir / "spec.resolved.yaml"
        return (
            "\n".join(
                f"RANK={r} WORLD_SIZE={world} LOCAL_RANK={r} MASTER_ADDR=127.0.0.1 "
                f"{python} -m dino_cluster.train --spec {resolved}"
                for r in range(world)
            )
            + "\n"
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
        exit_dir = run_dir / "exit"
        exit_dir.mkdir(exist_ok=True)
        for f in exit_dir.glob("rank-*.json"):
            f.unlink()
        world = spec.launcher.world_size
        port = free_port()
        pids = []
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                PYTHONUNBUFFERED="1",
            )
            if world > 1:
                # Keep CPU ranks from fighting over cores.
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
            log = open(run_dir / "logs" / f"rank-{rank}.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                [spec.launcher.interpreter, "-m", "dino_cluster.train", "--spec", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            log.close()
            procs.append(proc)
            pids.append(proc.pid)
        write_record(run_dir, LocalRecord(pids=pids, world_size=world, spec=str(spec_path)))
        watcher = None
        if spec.evaluation.enabled:
            # The evaluation watcher runs beside training (not one of the run's ranks); it
            # claims each committed checkpoint once and exits when the run has ended.
            watcher = spawn_watcher(run_dir)
        result = SubmitResult(str(run_dir), job_id=str(pids[0]), status="running")
        if detach:
            return result
        try:
            self.logs(run_dir, follow=True, _procs=procs)
        except KeyboardInterrupt:
            # Ctrl-C: ask every rank to checkpoint and stop, like a preemption.
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
            watcher = None  # interrupted: the watcher finishes on its own, in the background
        result.status = run_status(run_dir)
        if watcher is not None:
            # In the foreground the run is over when its last checkpoint is evaluated too.
            wait_for_watcher(run_dir, watcher)
        return result

    def status(self, run_dir: Path) -> str:
        return run_status(run_dir)

    def logs(
        self,
        run_dir: Path,
        *,
        follow: bool = False,
        rank: int | None = None,
        _procs: list[subprocess.Popen] | None = None,
    ) -> None:
        pids = read_record(run_dir, "local").pids
        rank = rank or 0
        if not 0 <= rank < len(pids):
            raise LaunchError(f"rank {rank} does not exist (world size {len(pids)})")
        path = Path(run_dir) / "logs" / f"rank-{rank}.log"

        def running() -> bool:
            if _procs is not None:
                return any(p.poll() is None for p in _procs)
            return any(pid_alive(p) for p in pids)

        follow_file(path, lambda: follow and running())

    def cancel(self, run_dir: Path) -> None:
        for pid in read_record(run_dir, "local").pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)  # ranks checkpoint, then exit

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
