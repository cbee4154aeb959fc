"""SLURM backend: submit through submitit, render a plain sbatch script, and follow, query
and cancel SLURM runs.

    dino-cluster submit SPEC --backend slurm [--dry-run] [--detach]
    dino-cluster render SPEC --backend slurm > job.sbatch; sbatch job.sbatch
    dino-cluster status RUN | logs RUN [--follow] [--rank N] | cancel RUN

Every task runs dino_cluster.launch.slurm_task.SlurmTrainTask (submitit) or
`python -m dino_cluster.train` (sbatch script); both checkpoint on USR2/TERM, requeue the
job and resume. RUN/launch.json names the job for status/logs/cancel, whichever way it was
submitted. submitit is imported only when submitting.

With `evaluation.enabled`, `submit` also starts the evaluation watcher on the submit host
(`dino-cluster eval watch RUN`, detached, log RUN/logs/eval-watch.log): it only lists the
checkpoint store and talks to sbatch/scontrol, so it suits a login node, survives the
training job's requeues and does not hold the training allocation while the last
checkpoint is evaluated. Each evaluation is its own sbatch job (evaluate/submit_slurm.py).
A hand-submitted script (`render`) starts no watcher: run `dino-cluster eval watch RUN`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dino_cluster.launch import slurm_env
from dino_cluster.launch.base import LaunchError, SubmitResult
from dino_cluster.launch.slurm_render import (
    Resources,
    render_sbatch,
    resources,
    sbatch_options,
    submitit_parameters,
)
from dino_cluster.spec import JobSpec, write_resolved

POLL_S = 0.5


def _slurm(
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


def read_launch(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "launch.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise LaunchError(f"{run_dir}: no launch.json here; is this a run folder?") from None
    if info.get("backend") != "slurm" or not info.get("job_id"):
        raise LaunchError(f"{path}: not a SLURM run")
    return info


def query_job(job_id: str) -> tuple[str, int]:
    """(SLURM state, restart count) from slurmctld, else from accounting; ("", 0) if unknown."""
    out = _slurm("scontrol", "show", "job", "-o", str(job_id)).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    if fields.get("JobState"):
        return fields["JobState"], int(fields.get("Restarts", "0") or 0)
    # slurmctld forgets finished jobs after MinJobAge; accounting remembers.
    acct = _slurm("sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State")
    lines = [ln.strip() for ln in acct.stdout.splitlines() if ln.strip()]
    return (lines[-1], 0) if lines else ("", 0)


_HINTS = (
    (
        "invalid partition",
        "launcher.slurm.partition {partition!r} does not exist here "
        "(`sinfo -s` lists the partitions)",
    ),
    (
        "node configuration is not available",
        "no node offers {tasks_per_node} task(s) x "
        "{cpus_per_task} CPU(s), {gpus_per_node} GPU(s){mem}: check launcher.gpus_per_node, "
        "launcher.procs_per_node, launcher.slurm.cpus_per_task and launcher.slurm.mem_gb",
    ),
    ("generic resource", "launcher.gpus_per_node={gpus_per_node}: this partition has no such GPUs"),
    (
        "--time",
        "launcher.slurm.time_min / additional_parameters.time: not a SLURM time "
        "(minutes, or D-HH:MM:SS)",
    ),
    (
        "time limit",
        "launcher.slurm.time_min / additional_parameters.time: SLURM refused the "
        "time limit (a partition's MaxTime may be lower)",
    ),
    ("invalid account", "launcher.slurm.account {account!r} is not valid for you"),
    ("invalid qos", "launcher.slurm.qos {qos!r} is not valid for you"),
    (
        "unrecognized option",
        "launcher.slurm.additional_parameters has an option sbatch does not know",
    ),
)


def explain_sbatch_error(message: str, r: Resources) -> str:
    text = " ".join(message.split())
    lowered = text.lower()
    values = dict(vars(r), mem=f", {r.mem_gb} GB" if r.mem_gb else "")
    hints = [h.format(**values) for key, h in _HINTS if key in lowered]
    out = f"SLURM refused the job, nothing was submitted: {text or '(no message)'}"
    return out + "".join(f"\n  hint: {h}" for h in hints)


class SlurmBackend:
    name = "slurm"

    # -- render / submit ---------------------------------------------------------------
    def render(self, spec: JobSpec) -> str:
        return render_sbatch(spec)

    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        r = resources(spec)
        run_dir = spec.run_dir
        folder = Path(spec.launcher.slurm.folder).resolve() / spec.run.name
        params = submitit_parameters(r)
        if dry_run:
            return SubmitResult(
                str(run_dir), status="dry-run", message=self._dry_run_text(spec, r, folder, params)
            )
        self._refuse_if_active(run_dir)
        self.preflight(r)
        job_id = self._submit_submitit(spec, r, folder, params)
        pattern = str(folder / "{job_id}" / "{job_id}_{rank}_log.out")
        info = {
            "backend": "slurm",
            "via": "submitit",
            "job_id": job_id,
            "folder": str(folder / job_id),
            "log_pattern": pattern,
            "world_size": r.world_size,
            "spec": str((run_dir / "spec.resolved.yaml").resolve()),
            "grace_s": r.grace_s,
            "submitted": time.time(),
        }
        (run_dir / "launch.json").write_text(json.dumps(info, indent=1) + "\n")
        if spec.evaluation.enabled:
            from dino_cluster.evaluate.submit import spawn_watcher

            # On this (submit) host, detached: it lists the checkpoint store, sbatches one
            # evaluation job per committed checkpoint and exits once the run has ended.
            print(f"evaluation watcher started (pid {spawn_watcher(run_dir)})", flush=True)
        log0 = pattern.format(job_id=job_id, rank=0)
        print(
            f"submitted SLURM job {job_id}: {r.nodes} node(s) x {r.tasks_per_node} task(s)"
            f"{f' on partition {r.partition}' if r.partition else ''}\n"
            f"  rank logs: {pattern.format(job_id=job_id, rank='<rank>')}\n"
            f"  follow:    dino-cluster logs {run_dir} --follow   (or: tail -F {log0})\n"
            f"  status:    dino-cluster status {run_dir}   (squeue -j {job_id})\n"
            f"  stop:      dino-cluster cancel {run_dir}   (checkpoints first)",
            flush=True,
        )
        result = SubmitResult(
            str(run_dir),
            job_id=job_id,
            status="submitted",
            extra={"folder": info["folder"], "log": log0},
        )
        if detach:
            result.status = self.status(str(run_dir))
            return result
        try:
            self.logs(str(run_dir), follow=True)
        except KeyboardInterrupt:
            print(
                f"\nstopped following; job {job_id} keeps running "
                f"(dino-cluster cancel {run_dir} stops it)",
                file=sys.stderr,
            )
        result.status = self.status(str(run_dir))
        return result

    def _refuse_if_active(self, run_dir: Path) -> None:
        """One live job per run folder: two would write the same checkpoints."""
        if not (run_dir / "launch.json").exists():
            return
        try:
            old = read_launch(run_dir)
            state = self.status(str(run_dir))
        except LaunchError:  # another backend's run, or no SLURM answer: nothing to protect
            return
        if state in ("pending", "running", "requeued"):
            raise LaunchError(
                f"{run_dir}: SLURM job {old['job_id']} of this run is {state}; "
                f"`dino-cluster cancel {run_dir}` first"
            )

    @staticmethod
    def preflight(r: Resources) -> None:
        """Ask SLURM whether it could ever run this job (`sbatch --test-only`): an unknown
        partition, more GPUs or CPUs than any node has, a bad time limit fail here, before
        anything is submitted. (Without EnforcePartLimits SLURM would otherwise accept such a
        job and leave it pending forever.)"""
        flags = [
            f"--{k}" if v is None else f"--{k}={v}"
            for k, v in sbatch_options(r)
            if k not in ("output", "signal", "open-mode", "requeue")
        ]
        done = _slurm("sbatch", "--test-only", *flags, "--wrap", "true")
        if done.returncode:
            raise LaunchError(explain_sbatch_error(done.stderr or done.stdout, r))

    def _submit_submitit(self, spec: JobSpec, r: Resources, folder: Path, params: dict) -> str:
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise LaunchError(f"{tool} not found: run this on a SLURM login node")
        import submitit
        from submitit.core.utils import FailedJobError

        from dino_cluster.launch.slurm_task import SlurmTrainTask

        spec_path = write_resolved(spec, spec.run_dir).resolve()
        slurm_env.clear_cancel(spec.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        before = set(folder.iterdir())
        executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=0)
        try:
            executor.update_parameters(**params)
        except ValueError as exc:
            raise LaunchError(f"launcher.slurm: {exc}") from None
        task = SlurmTrainTask(spec_path, spec.run_dir.resolve(), r.max_requeues)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):  # submitit echoes sbatch's stderr
                job = executor.submit(task)
        except FailedJobError as exc:
            # Nothing half-submitted: remove the pickle and script submitit left behind.
            for path in set(folder.iterdir()) - before:
                if path.is_file():
                    path.unlink()
            raise LaunchError(explain_sbatch_error(str(exc) or stderr.getvalue(), r)) from None
        return str(job.job_id)

    def _dry_run_text(self, spec: JobSpec, r: Resources, folder: Path, params: dict) -> str:
        lines = [
            "# dry run: nothing submitted",
            f"# submitit SlurmExecutor(folder={folder / '%j'}) with parameters:",
            *(f"#   {k}: {v!r}" for k, v in params.items()),
            f"# each of the {r.world_size} task(s) runs SlurmTrainTask(spec="
            f"{spec.run_dir / 'spec.resolved.yaml'}, max_requeues={r.max_requeues}):",
            "#   RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM_*, train, and on",
            "#   USR2/TERM checkpoint -> scontrol requeue -> resume",
        ]
        try:  # the exact script submitit would write (a private helper: best effort)
            from submitit.slurm.slurm import _make_sbatch_string

            text = _make_sbatch_string(
                command="python -u -m submitit.core._submit " + str(folder / "%j"),
                folder=folder / "%j",
                **{k: v for k, v in params.items()},
            )
            lines += ["# the sbatch script submitit writes:", text.rstrip("\n")]
        except Exception:  # noqa: BLE001 - submitit missing or changed: the parameters suffice
            pass
        return "\n".join(lines) + "\n"

    # -- status / logs / cancel ----------------------------------------------------------
    def status(self, run_dir: str) -> str:
        info = read_launch(run_dir)
        state, restarts = query_job(info["job_id"])
        return slurm_env.map_state(state, restarts)

    def logs(self, run_dir: str, *, follow: bool = False, rank: int | None = None) -> None:
        info = read_launch(run_dir)
        rank = rank or 0
        world = int(info.get("world_size") or 1)
        if not 0 <= rank < world:
            raise LaunchError(f"rank {rank} does not exist (world size {world})")
        path = Path(info["log_pattern"].format(job_id=info["job_id"], rank=rank))
        last_check, state = 0.0, ""

        def finished() -> bool:
            nonlocal last_check, state
            if time.monotonic() - last_check > 2.0:  # do not hammer slurmctld
                state, last_check = self.status(run_dir), time.monotonic()
            return state in slurm_env.TERMINAL_STATES or state == "unknown"

        while not path.exists():
            if not follow or finished():
                raise LaunchError(
                    f"{path}: no log yet (job {info['job_id']} is {state or self.status(run_dir)})"
                )
            time.sleep(POLL_S)
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(65536)
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                    continue
                if not follow or finished():
                    rest = fh.read()
                    if rest:
                        sys.stdout.write(rest.decode("utf-8", "replace"))
                        sys.stdout.flush()
                    return
                time.sleep(POLL_S)

    def cancel(self, run_dir: str, *, wait_s: float | None = None) -> None:
        """Checkpoint, then cancel: USR2 to every rank (they checkpoint after the current step
        and the job cancels itself instead of requeueing), then scancel whatever is left."""
        info = read_launch(run_dir)
        job_id = str(info["job_id"])
        state = self.status(run_dir)
        if state in slurm_env.TERMINAL_STATES:
            print(f"job {job_id} already {state}", file=sys.stderr)
            return
        slurm_env.request_cancel(run_dir)
        if state == "running":
            done = _slurm("scancel", "--signal=USR2", job_id)
            if done.returncode == 0:
                deadline = time.monotonic() + (
                    wait_s if wait_s is not None else float(info.get("grace_s", 120)) + 30
                )
                while time.monotonic() < deadline and self.status(run_dir) == "running":
                    time.sleep(POLL_S)
        done = _slurm("scancel", job_id)
        if done.returncode and "already" not in (done.stderr or "").lower():
            if self.status(run_dir) not in slurm_env.TERMINAL_STATES:
                raise LaunchError(f"scancel {job_id}: {done.stderr.strip()}")
