"""Pure helpers for the SLURM backend: the torch.distributed environment of one task, job
state names, and the small files a SLURM run keeps in its run folder.

Run folder layout (RUN = spec.run_dir):
    RUN/launch.json             the run record (a SlurmRecord, see launch/run_record.py)
    RUN/slurm/requeues.json     how often SLURM restarted the job (metrics read this)
    RUN/slurm/cancel-requested  written by `dino-cluster cancel`: checkpoint, then do not requeue
Nothing here calls SLURM commands or imports submitit, so it is unit-tested without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

EXIT_STOPPED = 3  # dino_cluster.train: stopped by a signal after writing a checkpoint

REQUEUES_FILE = "slurm/requeues.json"
CANCEL_FILE = "slurm/cancel-requested"

# squeue / sacct / scontrol job states -> dino-cluster run states.
_STATE_MAP = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "SUSPENDED": "pending",
    "RESV_DEL_HOLD": "pending",
    "REQUEUE_HOLD": "requeued",
    "REQUEUE_FED": "requeued",
    "REQUEUED": "requeued",
    "PREEMPTED": "requeued",
    "RESIZING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "COMPLETED": "completed",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "SPECIAL_EXIT": "failed",
    "REVOKED": "failed",
}
TERMINAL_STATES = frozenset({"completed", "cancelled", "failed"})


def map_state(slurm_state: str, restarts: int = 0) -> str:
    """Our state for a SLURM state string ("CANCELLED by 0" reads as CANCELLED).

    A PENDING job that SLURM already restarted is waiting to resume: "requeued".
    """
    word = slurm_state.strip().split(" ", 1)[0].rstrip("+").upper()
    if not word:
        return "unknown"
    ours = _STATE_MAP.get(word, "unknown")
    if ours == "pending" and restarts > 0:
        return "requeued"
    return ours


# -- torch.distributed from the SLURM task environment ---------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: "gpu[01-03,7],login" -> gpu01 gpu02 gpu03 gpu7 login."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not match:
            hosts.append(group)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"cannot parse host range {part!r} in {nodelist!r}")
            width = len(lo)
            hosts.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(int(lo), int(hi) + 1))
    if not hosts:
        raise ValueError(f"empty host list {nodelist!r}")
    return hosts


def master_port(job_id: int, restarts: int = 0) -> int:
    """A port every task of the job computes alike (no shared file), in 20000-59999.

    It changes with every restart so a requeued job does not meet its own old socket.
    The sbatch script computes the same: $(( 20000 + (JOB_ID + 997 * RESTARTS) % 40000 )).
    """
    return 20000 + (job_id + 997 * restarts) % 40000


def _need(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set: this must run inside a SLURM job step (srun)")
    return value


def torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
    task described by SLURM's variables (one task per GPU, or per CPU worker)."""
    job_id = int(_need(env, "SLURM_JOB_ID"))
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    world = int(_need(env, "SLURM_NTASKS"))
    rank = int(_need(env, "SLURM_PROCID"))
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local_world = world // max(nodes, 1)
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        local_world = int(env["SLURM_NTASKS_PER_NODE"])
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(int(env.get("SLURM_LOCALID") or 0)),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": str(master_port(job_id, restarts)),
    }


# -- run-folder records --------------------------------------------------------------------


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def write_requeues(
    run_dir: str | Path,
    *,
    job_id: str,
    requeues: int,
    max_requeues: int,
    cap_reached: bool = False,
    last_step: int | None = None,
) -> Path:
    """RUN/slurm/requeues.json: `requeues` is SLURM_RESTART_COUNT of the running instance.

    The metrics exporter publishes it (dino_slurm_requeues); operators alert on it.
    """
    path = Path(run_dir) / REQUEUES_FILE
    payload: dict = {
        "job_id": str(job_id),
        "requeues": int(requeues),
        "max_requeues": int(max_requeues),
        "cap_reached": bool(cap_reached),
        "updated": time.time(),
    }
    if last_step is not None:
        payload["last_step"] = int(last_step)
    _write_json(path, payload)
    return path


def read_requeues(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / REQUEUES_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def request_cancel(run_dir: str | Path) -> Path:
    path = Path(run_dir) / CANCEL_FILE
    _write_json(path, {"requested": time.time()})
    return path


def cancel_requested(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CANCEL_FILE).exists()


def clear_cancel(run_dir: str | Path) -> None:
    (Path(run_dir) / CANCEL_FILE).unlink(missing_ok=True)


def requeue_decision(
    *, stopped: bool, cancel: bool, requeues: int, max_requeues: int, job_state: str
) -> str:
    """What the job does once training returned: "done", "cancel", "requeue", "cap", "leave".

    "leave": SLURM itself is already ending the job (scancel, admin requeue): requeueing a
    COMPLETING job would bring a cancelled job back to life, so only a RUNNING job requeues.
    """
    if not stopped:
        return "done"
    if cancel:
        return "cancel"
    if requeues >= max_requeues:
        return "cap"
    if job_state.split(" ", 1)[0].upper() != "RUNNING":
        return "leave"
    return "requeue"
