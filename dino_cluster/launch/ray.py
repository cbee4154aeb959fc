"""Ray backend: Ray Train (TorchTrainer) on a private local Ray or an existing cluster.

Where the driver runs depends on `launcher.ray.address`:

    (unset)              a driver process here starts a private local Ray (own temp dir and
                         ports, dashboard on 127.0.0.1, URL printed) and stops it at the end
    host:port | auto     a driver process here joins that Ray cluster
    http(s)://head:8265  the driver is submitted through the Ray Jobs API and runs on the
                         cluster; `submit --detach` returns at once with the job id

RUN/launch.json says which, so `status`, `logs [--follow]` and `cancel` work later:
    {"backend": "ray", "mode": "driver", "pid": ..., "address": ...}
    {"backend": "ray", "mode": "jobs", "address": "http://...", "job_id": "..."}

Local paths in the spec (run folder, shards, checkpoints) are made absolute before the
spec goes to Ray: Ray Train runs workers in their own working directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dino_cluster.launch.base import LaunchError, SubmitResult, pid_alive
from dino_cluster.spec import JobSpec, spec_from_dict, write_resolved

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


def _read_launch(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "launch.json"
    if not path.exists():
        raise LaunchError(f"{run_dir}: no launch.json here; is this a run folder?")
    info = json.loads(path.read_text())
    if info.get("backend") != "ray":
        raise LaunchError(f"{run_dir}: launched by the {info.get('backend')!r} backend, not ray")
    return info


class RayBackend:
    name = "ray"

    # -- render ---------------------------------------------------------------------------
    def render(self, spec: JobSpec) -> str:
        from dino_cluster.launch import ray_driver

        spec = localize_paths(spec)
        lc = spec.launcher
        address = lc.ray.address
        kw = ray_driver.scaling_kwargs(spec)
        lines = [
            "# Ray Train: TorchTrainer("
            f"num_workers={kw['num_workers']}, use_gpu={kw['use_gpu']}, "
            f"resources_per_worker={kw['resources_per_worker']}, "
            f"backend={'nccl' if kw['use_gpu'] else 'gloo'}, "
            f"max_failures={lc.ray.max_failures}, "
            f"startup_timeout_s={lc.ray.startup_timeout_s:g})",
        ]
        if address and address.startswith(JOBS_SCHEMES):
            from dino_cluster.launch import ray_jobs

            env = ray_jobs.runtime_env(spec, spec.run_dir / "ray" / "job")
            lines += [
                f"# Ray Jobs API: {address}",
                f"entrypoint: {ray_jobs.ENTRYPOINT}",
                "runtime_env: " + json.dumps(env, sort_keys=True),
            ]
        else:
            where = f"--address {address}" if address else "(private local Ray)"
            lines.append(
                f"{sys.executable} -m dino_cluster.launch.ray_driver "
                f"--spec {spec.run_dir / 'spec.resolved.yaml'} {where}"
            )
        return "\n".join(lines) + "\n"

    # -- submit ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        spec = localize_paths(spec)
        run_dir = spec.run_dir
        if dry_run:
            return SubmitResult(str(run_dir), status="dry-run", message=self.render(spec))
        if (run_dir / "launch.json").exists() and self._still_running(run_dir):
            raise LaunchError(
                f"{run_dir}: this run is already running (dino-cluster status / cancel)"
            )
        address = spec.launcher.ray.address
        if address and address.startswith(JOBS_SCHEMES):
            return self._submit_job(spec, address, detach)
        return self._submit_driver(spec, address, detach)

    def _still_running(self, run_dir: Path) -> bool:
        try:
            return self.status(str(run_dir)) in ("running", "pending")
        except LaunchError:  # an old launch we cannot ask about any more (cluster gone)
            return False

    def _submit_job(self, spec: JobSpec, address: str, detach: bool) -> SubmitResult:
        from dino_cluster.launch import ray_jobs

        run_dir = spec.run_dir
        write_resolved(spec, run_dir)
        # launch.json is written before following, so `status`/`cancel` work meanwhile.
        job_id = f"dino-{spec.run.name}-{os.urandom(4).hex()}"
        _write_launch(
            run_dir,
            {
                "backend": "ray",
                "mode": "jobs",
                "address": address,
                "job_id": job_id,
                "started": time.time(),
            },
        )
        ray_jobs.submit(spec, address, job_id=job_id)
        print(f"Ray job {job_id} submitted to {address}", flush=True)
        if detach:
            return SubmitResult(
                str(run_dir), job_id=job_id, status="submitted", extra={"address": address}
            )
        ray_jobs.follow_logs(address, job_id)
        word = ray_jobs.wait(address, job_id, timeout_s=60)
        return SubmitResult(str(run_dir), job_id=job_id, status=word, extra={"address": address})

    def _submit_driver(self, spec: JobSpec, address: str | None, detach: bool) -> SubmitResult:
        from dino_cluster.launch.ray_driver import result_path

        run_dir = spec.run_dir
        spec_path = write_resolved(spec, run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        result_file = result_path(spec)
        if result_file.exists():
            result_file.unlink()
        cmd = [sys.executable, "-m", "dino_cluster.launch.ray_driver", "--spec", str(spec_path)]
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
        _write_launch(
            run_dir,
            {
                "backend": "ray",
                "mode": "driver",
                "pid": proc.pid,
                "address": address,
                "started": time.time(),
                "spec": str(spec_path),
            },
        )
        result = SubmitResult(str(run_dir), job_id=str(proc.pid), status="running")
        if detach:
            return result
        try:
            _follow(log_path, lambda: proc.poll() is None, start)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the driver has the workers checkpoint first
            _follow(log_path, lambda: proc.poll() is None, log_path.stat().st_size)
        proc.wait()
        result.status = self.status(str(run_dir))
        return result

    # -- status / logs / cancel -----------------------------------------------------------
    def status(self, run_dir: str) -> str:
        info = _read_launch(run_dir)
        if info["mode"] == "jobs":
            from dino_cluster.launch import ray_jobs

            return ray_jobs.status(info["address"], info["job_id"])
        if pid_alive(int(info["pid"])):
            return "running"
        resolved = Path(info["spec"])
        result = resolved.parent / "ray" / "driver-result.json"
        if not result.exists():
            return "failed"  # the driver was killed before it could say how it ended
        status = json.loads(result.read_text())["status"]
        return "completed" if status == "max_steps" else status

    def logs(self, run_dir: str, *, follow: bool = False, rank: int | None = None) -> None:
        info = _read_launch(run_dir)
        if rank not in (None, 0):
            raise LaunchError(
                "the ray backend shows the driver's log, which carries every "
                "rank's output (prefixed with its process); drop --rank"
            )
        if info["mode"] == "jobs":
            from dino_cluster.launch import ray_jobs

            if follow:
                ray_jobs.follow_logs(info["address"], info["job_id"])
            else:
                ray_jobs.print_logs(info["address"], info["job_id"])
            return
        pid = int(info["pid"])
        _follow(Path(run_dir) / "logs" / "driver.log", lambda: follow and pid_alive(pid))

    def cancel(self, run_dir: str) -> None:
        info = _read_launch(run_dir)
        if info["mode"] == "jobs":
            from dino_cluster.launch import ray_jobs

            ray_jobs.cancel(info["address"], info["job_id"])
            return
        pid = int(info["pid"])
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)  # workers checkpoint, then the driver exits


def _write_launch(run_dir: Path, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "launch.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(run_dir / "launch.json")


def _follow(path: Path, running: Any, offset: int = 0) -> int:
    """Print a log file from `offset`; keep printing new lines while `running()` is true.
    Returns the offset reached."""
    if not path.exists():
        raise LaunchError(f"{path}: no log yet")
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                continue
            if not running():
                rest = fh.read()
                if rest:
                    sys.stdout.write(rest.decode("utf-8", "replace"))
                    sys.stdout.flush()
                return fh.tell()
            time.sleep(0.2)
