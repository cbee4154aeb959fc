"""Ray backend: Ray Train (TorchTrainer) on a private local Ray or an existing cluster.

Where the driver runs depends on `launcher.ray.address`:

    (unset)              a driver process here starts a private local Ray (own temp dir and
                         ports, dashboard on 127.0.0.1, URL printed) and stops it at the end
    host:port | auto     a driver process here joins that Ray cluster
    http(s)://head:8265  the driver is submitted through the Ray Jobs API and runs on the
                         cluster; `submit --detach` returns at once with the job id

The run record (a RayRecord, mode "driver" or "jobs") says which, so `status`,
`logs [--follow]` and `cancel` work later. Evaluations are Ray tasks (evaluations.py): the
driver of a Ray run hosts the evaluation watcher and starts them on the run's cluster.

Local paths in the spec (run folder, shards, checkpoints) are made absolute before the
spec goes to Ray: Ray Train runs workers in their own working directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_cluster.launch.base import LaunchError, SubmitResult, refuse_if_active
from dino_cluster.launch.procs import follow as follow_file
from dino_cluster.launch.procs import pid_alive
from dino_cluster.launch.ray.cluster import check_reachable
from dino_cluster.launch.run_record import RayRecord, read_record, record_path, write_record
from dino_cluster.spec import JobSpec, spec_from_dict, write_resolved

if TYPE_CHECKING:
    from dino_cluster.evaluate.submit import EvalHandle, EvalJob

JOBS_SCHEMES = ("http://", "https://")


def _absolute(url: str | None) -> str | None:
    if url is None or "://" in url or url.startswith("pipe:"):
        return url
    return str(Path(url).expanduser().resolve())


def localize_paths(spec: JobSpec) -> JobSpec:
    """A copy of the spec whose local paths are absolute (URLs are left alone)."""
    doc: dict[str, Any] = spec.model_dump(mode="json")
    doc["run"]["dir"] = _absolute(doc["run"]["dir"])
    doc["run"]["storage"] = _absolute(doc["run"]["storage"])
    doc["data"]["url"] = _absolute(doc["data"]["url"])
    doc["checkpoint"]["url"] = _absolute(doc["checkpoint"]["url"])
    for key in ("train_url", "val_url"):
        doc["evaluation"][key] = _absolute(doc["evaluation"][key])
    doc["launcher"]["ray"]["storage_path"] = _absolute(doc["launcher"]["ray"]["storage_path"])
    return spec_from_dict(doc, "<resolved spec>")


class RayBackend:
    name = "ray"

    # -- render ---------------------------------------------------------------------------
    def render(self, spec: JobSpec) -> str:
        from dino_cluster.launch.ray import driver

        spec = localize_paths(spec)
        lc = spec.launcher
        address = lc.ray.address
        kw = driver.scaling_kwargs(spec)
        lines = [
            "# Ray Train: TorchTrainer("
            f"num_workers={kw['num_workers']}, use_gpu={kw['use_gpu']}, "
            f"resources_per_worker={kw['resources_per_worker']}, "
            f"backend={'nccl' if kw['use_gpu'] else 'gloo'}, "
            f"max_failures={lc.ray.max_failures}, "
            f"startup_timeout_s={lc.ray.startup_timeout_s:g})",
        ]
        if address and address.startswith(JOBS_SCHEMES):
            from dino_cluster.launch.ray import jobs

            env = jobs.runtime_env(spec, spec.run_dir / "ray" / "job")
            lines += [
                f"# Ray Jobs API: {address}",
                f"entrypoint: {jobs.entrypoint(spec)}",
                "runtime_env: " + json.dumps(env, sort_keys=True),
            ]
        else:
            where = f"--address {address}" if address else "(private local Ray)"
            lines.append(
                f"{lc.interpreter} -m dino_cluster.launch.ray.driver "
                f"--spec {spec.run_dir / 'spec.resolved.yaml'} {where}"
            )
        return "\n".join(lines) + "\n"

    # -- submit ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        spec = localize_paths(spec)
        run_dir = spec.run_dir
        if dry_run:
            return SubmitResult(str(run_dir), status="dry-run", message=self.render(spec))
        refuse_if_active(run_dir)
        address = spec.launcher.ray.address
        if address:
            check_reachable(address, spec.launcher.ray.connect_timeout_s)
        if address and address.startswith(JOBS_SCHEMES):
            return self._submit_job(spec, address, detach)
        return self._submit_driver(spec, address, detach)

    def _submit_job(self, spec: JobSpec, address: str, detach: bool) -> SubmitResult:
        from dino_cluster.launch.ray import jobs

        run_dir = spec.run_dir
        spec_path = write_resolved(spec, run_dir)
        # The record is written before following, so `status`/`cancel` work meanwhile.
        job_id = f"dino-{spec.run.name}-{os.urandom(4).hex()}"
        write_record(
            run_dir, RayRecord(mode="jobs", address=address, job_id=job_id, spec=str(spec_path))
        )
        try:
            jobs.submit(spec, address, job_id=job_id)
        except LaunchError:
            record_path(run_dir).unlink(missing_ok=True)  # nothing was submitted
            raise
        print(f"Ray job {job_id} submitted to {address}", flush=True)
        if detach:
            return SubmitResult(
                str(run_dir), job_id=job_id, status="submitted", extra={"address": address}
            )
        jobs.follow_logs(address, job_id)
        word = jobs.wait(address, job_id, timeout_s=60)
        return SubmitResult(str(run_dir), job_id=job_id, status=word, extra={"address": address})

    def _submit_driver(self, spec: JobSpec, address: str | None, detach: bool) -> SubmitResult:
        from dino_cluster.launch.ray.driver import result_path

        run_dir = spec.run_dir
        spec_path = write_resolved(spec, run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        result_file = result_path(spec)
        if result_file.exists():
            result_file.unlink()
        python = spec.launcher.interpreter
        cmd = [python, "-m", "dino_cluster.launch.ray.driver", "--spec", str(spec_path)]
        if address:
            cmd += ["--address", address]
        log_path = run_dir / "logs" / "driver.log"
        start = log_path.stat().st_size if log_path.exists() else 0  # follow this run only
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        write_record(
            run_dir, RayRecord(mode="driver", pid=proc.pid, address=address, spec=str(spec_path))
        )
        result = SubmitResult(str(run_dir), job_id=str(proc.pid), status="running")
        if detach:
            return result
        try:
            follow_file(log_path, lambda: proc.poll() is None, start)
        except KeyboardInterrupt:
            _stop_driver(proc, log_path)
        proc.wait()
        result.status = self.status(run_dir)
        return result

    # -- status / logs / cancel ---------------------------------------------------------------
    def status(self, run_dir: Path) -> str:
        rec = read_record(run_dir, "ray")
        if rec.mode == "jobs":
            from dino_cluster.launch.ray import jobs

            return jobs.status(rec.address, rec.job_id)
        if pid_alive(rec.pid):
            return "running"
        result = Path(run_dir) / "ray" / "driver-result.json"
        if not result.exists():
            return "failed"  # the driver was killed before it could say how it ended
        status = json.loads(result.read_text())["status"]
        return "completed" if status == "max_steps" else status

    def failure(self, run_dir: Path) -> str | None:
        """The driver's own account (RUN/ray/driver-result.json) of a failed run."""
        result = Path(run_dir) / "ray" / "driver-result.json"
        try:
            doc = json.loads(result.read_text())
        except (OSError, ValueError):
            return None
        return str(doc.get("message") or "") or None if doc.get("status") == "failed" else None

    def logs(self, run_dir: Path, *, follow: bool = False, rank: int | None = None) -> None:
        rec = read_record(run_dir, "ray")
        if rank not in (None, 0):
            raise LaunchError(
                "the ray backend shows the driver's log, which carries every "
                "rank's output (prefixed with its process); drop --rank"
            )
        if rec.mode == "jobs":
            from dino_cluster.launch.ray import jobs

            if follow:
                jobs.follow_logs(rec.address, rec.job_id)
            else:
                jobs.print_logs(rec.address, rec.job_id)
            return
        pid = rec.pid
        follow_file(Path(run_dir) / "logs" / "driver.log", lambda: follow and pid_alive(pid))

    def cancel(self, run_dir: Path) -> None:
        rec = read_record(run_dir, "ray")
        if rec.mode == "jobs":
            from dino_cluster.launch.ray import jobs

            jobs.cancel(rec.address, rec.job_id)
            return
        if pid_alive(rec.pid):
            os.kill(rec.pid, signal.SIGTERM)  # workers checkpoint, then the driver exits

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle:
        """A Ray task on the run's cluster (this driver's, the recorded driver address,
        `launcher.ray.address`, or `address`); see evaluations.py."""
        from dino_cluster.launch.ray.evaluations import run_address, submit_task

        if address is None:
            address = run_address(run_dir, spec.launcher.ray.address)
        return submit_task(job, spec, address=address)


def _stop_driver(proc: subprocess.Popen, log_path: Path) -> None:
    """Ctrl-C in the foreground: the driver has its workers checkpoint and stops (SIGTERM);
    if it has not ended within the stop grace, or a second Ctrl-C comes, its whole process
    group is killed, so nothing of the run outlives the command."""
    from dino_cluster.launch.ray.jobs import STOP_GRACE_S

    proc.send_signal(signal.SIGTERM)
    print("\nstopping: the workers checkpoint, then the driver exits (Ctrl-C again: kill)")
    deadline = time.monotonic() + STOP_GRACE_S + 30
    try:
        follow_file(
            log_path,
            lambda: proc.poll() is None and time.monotonic() < deadline,
            log_path.stat().st_size,
        )
    except KeyboardInterrupt:
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
