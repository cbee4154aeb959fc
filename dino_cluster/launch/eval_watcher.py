"""The evaluation watcher beside a run: started detached by the local and SLURM backends
(`dino-cluster eval watch RUN`), waited for by a foreground `submit`. The Ray backend runs
the watcher in its driver instead (ray/evaluations.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dino_cluster.launch.procs import pid_alive

WATCH_LOG = "logs/eval-watch.log"
WATCH_PID = "eval-watch.pid"


def spawn_watcher(run_dir: Path) -> int:
    """Start `dino-cluster eval watch RUN` as a detached process (its own session, so it
    outlives the launching shell); log RUN/logs/eval-watch.log, pid RUN/eval-watch.pid. It
    exits once the run has ended and every committed checkpoint has its evaluations."""
    log_path = run_dir / WATCH_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as wlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dino_cluster.evaluate.cli", "watch", str(run_dir)],
            stdout=wlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (run_dir / WATCH_PID).write_text(str(proc.pid))
    return proc.pid


def wait_for_watcher(run_dir: Path, pid: int, *, poll_s: float = 1.0) -> bool:
    """Block until the watcher `pid` beside a finished foreground run exits, echoing its
    result lines ("step N knn: ..."), so `submit` ends with the run's evaluations. Ctrl-C
    stops the waiting, not the watcher. Returns False when interrupted."""
    path = run_dir / WATCH_LOG
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
