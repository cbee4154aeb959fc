"""Bookkeeping inside a SLURM job, shared by the submitit task and the sbatch scripts.

    python -m dino_cluster.launch.slurm.job prepare SPEC [--set K=V ...]   (infra/slurm/dino.sbatch)
    python -m dino_cluster.launch.slurm.job started --run-dir RUN --spec FILE --max-requeues N
    python -m dino_cluster.launch.slurm.job decide  --run-dir RUN --code RC --max-requeues N

`started` records the job (RUN/launch.json, RUN/slurm/requeues.json) and refuses to train
past the requeue cap (exit 4). `decide` prints what the batch script does after training
ended with RC: done | requeue | cancel | cap | leave (see slurm_env.requeue_decision).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dino_cluster.launch.run_record import SlurmRecord, write_record
from dino_cluster.launch.slurm import env as slurm_env

log = logging.getLogger("dino_cluster.slurm")

EXIT_CAPPED = 4


def job_state(job_id: str) -> str:
    """The job's current state per slurmctld ("" when it cannot be read)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for field in out.split():
        if field.startswith("JobState="):
            return field.partition("=")[2]
    return ""


def record_start(
    run_dir: str | Path,
    *,
    job_id: str,
    restarts: int,
    max_requeues: int,
    launch: SlurmRecord | None = None,
) -> bool:
    """Write the job's records; False when the requeue cap is exceeded (do not train)."""
    run_dir = Path(run_dir)
    capped = restarts > max_requeues
    slurm_env.write_requeues(
        run_dir, job_id=job_id, requeues=restarts, max_requeues=max_requeues, cap_reached=capped
    )
    if launch is not None:
        write_record(run_dir, launch)
    if restarts == 0:
        # A fresh submission: a cancel request left by an earlier job does not apply.
        slurm_env.clear_cancel(run_dir)
    if capped:
        log.error(
            "job %s was restarted %d times, over launcher.slurm.max_requeues=%d: not "
            "training. The latest checkpoint is kept; `dino-cluster submit` the spec again "
            "to continue from it.",
            job_id,
            restarts,
            max_requeues,
        )
    return not capped


def decide(run_dir: str | Path, *, code: int, job_id: str, restarts: int, max_requeues: int) -> str:
    """After training exited with `code`: what this job does next (and why, in the log)."""
    run_dir = Path(run_dir)
    stopped = code == slurm_env.EXIT_STOPPED
    state = job_state(job_id) if stopped else ""
    decision = slurm_env.requeue_decision(
        stopped=stopped,
        cancel=slurm_env.cancel_requested(run_dir),
        requeues=restarts,
        max_requeues=max_requeues,
        job_state=state,
    )
    if decision == "requeue":
        log.warning(
            "checkpoint written after a signal: requeueing job %s (restart %d of at most %d)",
            job_id,
            restarts + 1,
            max_requeues,
        )
    elif decision == "cancel":
        log.warning("checkpoint written; cancelling job %s as `dino-cluster cancel` asked", job_id)
    elif decision == "cap":
        slurm_env.write_requeues(
            run_dir, job_id=job_id, requeues=restarts, max_requeues=max_requeues, cap_reached=True
        )
        log.error(
            "checkpoint written, but job %s already restarted %d times "
            "(launcher.slurm.max_requeues=%d): not requeueing. `dino-cluster submit` the "
            "spec again to continue from the checkpoint.",
            job_id,
            restarts,
            max_requeues,
        )
    elif decision == "leave":
        log.warning(
            "checkpoint written; job %s is %s, SLURM is ending or requeueing it itself",
            job_id,
            state or "in an unknown state",
        )
    return decision


def _env_job() -> tuple[str, int]:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise SystemExit("error: SLURM_JOB_ID is not set: run this inside a SLURM batch job")
    return job_id, int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dino_cluster.spec import SpecError, load_spec, write_resolved

    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ntasks = int(os.environ.get("SLURM_NTASKS") or 0)
    world = spec.launcher.world_size
    if ntasks and ntasks != world:
        if spec.optim.global_batch % ntasks:
            print(
                f"error: this job has {ntasks} tasks but optim.global_batch "
                f"({spec.optim.global_batch}) is not divisible by that; edit the #SBATCH "
                "lines or the spec",
                file=sys.stderr,
            )
            return 2
        print(
            f"warning: this job has {ntasks} tasks, the spec's launcher asks for {world}; "
            f"training with {ntasks}",
            file=sys.stderr,
        )
    resolved = write_resolved(spec, spec.run_dir)
    values = {
        "DINO_RUN_DIR": str(spec.run_dir),
        "DINO_SPEC": str(resolved),
        "DINO_MAX_REQUEUES": str(spec.launcher.slurm.max_requeues),
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def _cmd_started(args: argparse.Namespace) -> int:
    job_id, restarts = _env_job()
    run_dir = Path(args.run_dir)
    pattern = str(run_dir.resolve() / "slurm" / "logs" / "{job_id}_{rank}.log")
    launch = SlurmRecord(
        via="sbatch",
        job_id=job_id,
        log_pattern=pattern,
        world_size=int(os.environ.get("SLURM_NTASKS") or 1),
        spec=str(Path(args.spec).resolve()),
    )
    ok = record_start(
        run_dir, job_id=job_id, restarts=restarts, max_requeues=args.max_requeues, launch=launch
    )
    return 0 if ok else EXIT_CAPPED


def _cmd_decide(args: argparse.Namespace) -> int:
    job_id, restarts = _env_job()
    print(
        decide(
            args.run_dir,
            code=args.code,
            job_id=job_id,
            restarts=restarts,
            max_requeues=args.max_requeues,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="dino-cluster: %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.launch.slurm.job")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="resolve SPEC into its run folder; print shell variables")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_prepare)
    for name, func in (("started", _cmd_started), ("decide", _cmd_decide)):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", required=True)
        p.add_argument("--max-requeues", type=int, required=True)
        if name == "started":
            p.add_argument("--spec", required=True)
        else:
            p.add_argument("--code", type=int, required=True)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
