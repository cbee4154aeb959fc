"""Per-rank entry: `python -m dino_cluster.train --spec RUN/spec.resolved.yaml`.

Launchers that start processes themselves (the local backend's supervisor, SLURM srun,
sbatch) run this in every rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set. `--log-dir DIR` sends the rank's output to DIR/rank-N.log (appended).
Exit codes: 0 completed, 3 stopped after a checkpoint, 1 failed, 2 bad spec (or a checkpoint
that does not fit it); the code also
goes to RUN/exit/rank-N.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from dino_cluster.launch.local_agent import SUPERVISOR_ENV
from dino_cluster.spec import SpecError, load_spec
from dino_cluster.train.assemble import ResumeMismatchError
from dino_cluster.train.loop import NonFiniteLossError, train

EXIT_STOPPED = 3  # stopped by a signal after writing a checkpoint (requeue me)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.train")
    parser.add_argument("--spec", required=True, help="resolved job spec (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--log-dir", help="write this rank's output to LOG_DIR/rank-N.log")
    args = parser.parse_args(argv)
    if args.log_dir:
        _redirect_output(Path(args.log_dir))
    _stop_with_supervisor()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        result = train(spec)
        code = EXIT_STOPPED if result.status == "stopped" else 0
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (ResumeMismatchError, SpecError) as exc:  # the user's to fix: a restart won't help
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        _write_exit(spec, code)
    return code


def _redirect_output(log_dir: Path) -> None:
    """Point fds 1 and 2 (so C++ output and child processes too) at LOG_DIR/rank-N.log in
    append mode: a resumed run keeps the lines of the attempts before it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank-{os.environ.get('RANK', '0')}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _stop_with_supervisor() -> None:
    """Under the local backend's supervisor, have the kernel send this rank SIGTERM (the
    checkpoint-and-stop signal) when the supervisor dies, even by SIGKILL: no rank outlives
    the process that watches it."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != supervisor:  # it died before the request took effect
        print(f"the supervisor (pid {supervisor}) is gone: not starting", file=sys.stderr)
        raise SystemExit(1)


def _write_exit(spec, code: int) -> None:  # type: ignore[no-untyped-def]
    """Record how this rank ended, for `dino-cluster status` of detached local runs."""
    rank = os.environ.get("RANK", "0")
    exit_dir = spec.run_dir / "exit"
    exit_dir.mkdir(parents=True, exist_ok=True)
    (exit_dir / f"rank-{rank}.json").write_text(json.dumps({"code": code}))


if __name__ == "__main__":
    sys.exit(main())
