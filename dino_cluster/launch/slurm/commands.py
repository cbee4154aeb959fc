"""Running SLURM's commands (sbatch, scontrol, sacct, scancel) with a deadline, and reading
a job's state: the one place the SLURM backend and its evaluations talk to SLURM."""

from __future__ import annotations

import shutil
import subprocess

from dino_cluster.launch.errors import LaunchError


def slurm(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        raise LaunchError(
            f"{args[0]} not found: run this on a SLURM login node (for the local "
            'dev cluster: eval "$(infra/slurm/dev-cluster.sh env)")'
        )
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{' '.join(args)}: no answer from SLURM in {timeout:.0f} s") from None


def query_job(job_id: str) -> tuple[str, int]:
    """(SLURM state, restart count) from slurmctld, else from accounting; ("", 0) if unknown."""
    out = slurm("scontrol", "show", "job", "-o", str(job_id)).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    if fields.get("JobState"):
        return fields["JobState"], int(fields.get("Restarts", "0") or 0)
    # slurmctld forgets finished jobs after MinJobAge; accounting remembers.
    acct = slurm("sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State")
    lines = [ln.strip() for ln in acct.stdout.splitlines() if ln.strip()]
    return (lines[-1], 0) if lines else ("", 0)
