"""Submit, watch and stop a run on an existing Ray cluster through the Ray Jobs API.

The job's driver is `python -m dino_cluster.launch.ray.driver --spec spec.resolved.yaml`
on the cluster. Its runtime env carries only code and the resolved spec: our package as a
`py_modules` entry and a working dir holding the spec. Credentials never go into it: the
cluster's nodes bring their own (environment, instance role, workload identity), and the
spec refuses credential-looking `runtime_env.env_vars`.

Token authentication (RAY_AUTH_MODE=token, the default on recent Ray) is honoured: the
token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token and sent as a
bearer header; it is never written into the run folder or the runtime env.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import dino_cluster
from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.ray.cluster import auth_headers, enable_token_auth
from dino_cluster.spec import JobSpec, write_resolved

# Ray job states -> the words `dino-cluster status` uses for every backend.
STATUS_WORDS = {
    "PENDING": "pending",
    "RUNNING": "running",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "STOPPED": "stopped",
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_GRACE_S = 120.0  # how long a cancelled run may take to checkpoint and stop


def entrypoint(spec: JobSpec) -> str:
    """The job's driver command. It runs on the cluster, in the cluster's environment: its
    `python` unless `launcher.python` names another (the submitter's interpreter path means
    nothing on a remote cluster; a cluster this package starts puts ours first on PATH)."""
    python = shlex.quote(spec.launcher.python or "python")
    return f"{python} -m dino_cluster.launch.ray.driver --spec spec.resolved.yaml"


def client(address: str) -> Any:
    """A JobSubmissionClient for a dashboard URL, with the auth header when there is a token."""
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:
        hint = ""
        if "401" in str(exc) or "nauthori" in str(exc):
            hint = (
                " (the cluster wants a Ray auth token: set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token)"
            )
        raise LaunchError(f"cannot reach the Ray Jobs API at {address}: {exc}{hint}") from None


def runtime_env(spec: JobSpec, staging: Path) -> dict[str, Any]:
    """The job's runtime env: user extras from the spec, plus our code and the spec."""
    env: dict[str, Any] = {k: v for k, v in spec.launcher.ray.runtime_env.items()}
    if "working_dir" in env:
        raise LaunchError(
            "launcher.ray.runtime_env.working_dir is set by dino-cluster "
            "(it carries the resolved spec); remove it"
        )
    package_dir = str(Path(dino_cluster.__file__).resolve().parent)
    env["working_dir"] = str(staging)
    env["py_modules"] = [*env.get("py_modules", []), package_dir]
    env["excludes"] = [*env.get("excludes", []), "__pycache__", "*.pyc"]
    # The job supervisor reads RAY_JOB_STOP_WAIT_TIME_S from the job's env: give a cancelled
    # driver time to have its workers checkpoint before SIGKILL (Ray's default is 3 s).
    env["env_vars"] = {
        **env.get("env_vars", {}),
        "PYTHONUNBUFFERED": "1",
        "RAY_JOB_STOP_WAIT_TIME_S": str(int(STOP_GRACE_S) + 30),
    }
    return env


def submit(spec: JobSpec, address: str, *, job_id: str | None = None) -> str:
    """Submit the run's driver; returns the job id at once."""
    staging = spec.run_dir / "ray" / "job"
    if staging.exists():
        shutil.rmtree(staging)
    write_resolved(spec, staging)
    c = client(address)
    job_id = job_id or f"dino-{spec.run.name}-{uuid.uuid4().hex[:8]}"
    try:
        c.submit_job(
            entrypoint=entrypoint(spec),
            submission_id=job_id,
            runtime_env=runtime_env(spec, staging),
            metadata={"dino_cluster_run": spec.run.name},
        )
    except Exception as exc:
        raise LaunchError(f"the Ray Jobs API at {address} refused the job: {exc}") from None
    return job_id


def status(address: str, job_id: str) -> str:
    try:
        raw = str(client(address).get_job_status(job_id))
    except LaunchError:
        raise
    except Exception as exc:
        raise LaunchError(f"cannot get the status of Ray job {job_id}: {exc}") from None
    raw = raw.rsplit(".", 1)[-1]  # JobStatus.RUNNING -> RUNNING
    return STATUS_WORDS.get(raw, raw.lower())


def wait(address: str, job_id: str, timeout_s: float) -> str:
    """Poll until the job reaches a terminal state (or the timeout); returns the word."""
    deadline = time.monotonic() + timeout_s
    while True:
        word = status(address, job_id)
        if word in ("completed", "failed", "stopped") or time.monotonic() > deadline:
            return word
        time.sleep(1.0)


def print_logs(address: str, job_id: str) -> None:
    try:
        text = client(address).get_job_logs(job_id)
    except LaunchError:
        raise
    except Exception as exc:
        raise LaunchError(f"cannot read the logs of Ray job {job_id}: {exc}") from None
    sys.stdout.write(text)
    sys.stdout.flush()


def follow_logs(address: str, job_id: str) -> None:
    """Stream the job's logs until it ends."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise LaunchError(f"lost the log stream of Ray job {job_id}: {exc}") from None


def cancel(address: str, job_id: str) -> None:
    """Stop the job: its driver gets SIGTERM and asks the workers to checkpoint and stop."""
    try:
        client(address).stop_job(job_id)
    except LaunchError:
        raise
    except Exception as exc:
        raise LaunchError(f"cannot stop Ray job {job_id}: {exc}") from None
