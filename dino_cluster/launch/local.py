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
import sys
import time
from pathlib import Path

from dino_cluster.launch.base import (
    LaunchError,
    SubmitResult,
    free_port,
    missing_local_inputs,
    pid_alive,
)
from dino_cluster.spec import JobSpec, write_resolved


def read_launch(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "launch.json"
    if not path.exists():
        raise LaunchError(f"{run_dir}: no launch.json here; is this a run folder?")
    return json.loads(path.read_text())


def run_status(run_dir: str | Path) -> str:
    """running | completed | stopped | failed, from the processes and their exit files."""
    info = read_launch(run_dir)
    if any(pid_alive(p) for p in info["pids"]):
        return "running"
    codes = []
    for rank in range(len(info["pids"])):
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
        world = spec.launcher.world_size
        return (
            "\n".join(
                f"RANK={r} WORLD_SIZE={world} LOCAL_RANK={r} MASTER_ADDR=127.0.0.1 "
                f"{sys.executable} -m dino_cluster.train --spec {spec.run_dir}/spec.resolved.yaml"
                for r in range(world)
            )
            + "\n"
        )

    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        run_dir = spec.run_dir
        if dry_run:
            return SubmitResult(str(run_dir), status="dry-run", message=self.render(spec))
        if (run_dir / "launch.json").exists() and run_status(run_dir) == "running":
            raise LaunchError(f"{run_dir}: this run is already running (dino-cluster status)")
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
                [sys.executable, "-m", "dino_cluster.train", "--spec", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            log.close()
            procs.append(proc)
            pids.append(proc.pid)
        (run_dir / "launch.json").write_text(
            json.dumps(
                {
                    "backend": "local",
                    "pids": pids,
                    "world_size": world,
                    "started": time.time(),
                    "spec": str(spec_path),
                }
            )
        )
        watcher = None
        if spec.evaluation.enabled:
            from dino_cluster.evaluate.submit import spawn_watcher

            # The evaluation watcher runs beside training (not one of the run's ranks); it
            # claims each committed checkpoint once and exits when the run has ended.
            watcher = spawn_watcher(run_dir)
        result = SubmitResult(str(run_dir), job_id=str(pids[0]), status="running")
        if detach:
            return result
        try:
            self.logs(str(run_dir), follow=True, _procs=procs)
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
            from dino_cluster.evaluate.submit import wait_for_watcher

            # In the foreground the run is over when its last checkpoint is evaluated too.
            wait_for_watcher(run_dir, watcher)
        return result

    def status(self, run_dir: str) -> str:
        return run_status(run_dir)

    def logs(
        self,
        run_dir: str,
        *,
        follow: bool = False,
        rank: int | None = None,
        _procs: list[subprocess.Popen] | None = None,
    ) -> None:
        info = read_launch(run_dir)
        rank = rank or 0
        if not 0 <= rank < len(info["pids"]):
            raise LaunchError(f"rank {rank} does not exist (world size {len(info['pids'])})")
        path = Path(run_dir) / "logs" / f"rank-{rank}.log"

        def running() -> bool:
            if _procs is not None:
                return any(p.poll() is None for p in _procs)
            return any(pid_alive(p) for p in info["pids"])

        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(65536)
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                    continue
                if not follow or not running():
                    rest = fh.read()
                    if rest:
                        sys.stdout.write(rest.decode("utf-8", "replace"))
                    break
                time.sleep(0.2)

    def cancel(self, run_dir: str) -> None:
        info = read_launch(run_dir)
        for pid in info["pids"]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)  # ranks checkpoint, then exit
