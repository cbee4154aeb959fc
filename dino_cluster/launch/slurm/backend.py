"""SLURM backend: submit through submitit, render a plain sbatch script, and follow, query
and cancel SLURM runs.

    dino-cluster submit SPEC --backend slurm [--dry-run] [--detach]
    dino-cluster render SPEC --backend slurm > job.sbatch; sbatch job.sbatch
    dino-cluster status RUN | logs RUN [--follow] [--rank N] | cancel RUN

Every task runs task.SlurmTrainTask (submitit) or `python -m dino_cluster.train` (sbatch
script); both checkpoint on USR2/TERM, requeue the job and resume. The run record (a
SlurmRecord) names the job for status/logs/cancel, whichever way it was submitted. submitit
is imported only when submitting.

With `evaluation.enabled`, `submit` also starts the evaluation watcher on the submit host
(`dino-cluster eval watch RUN`, detached, log RUN/logs/eval-watch.log): it only lists the
checkpoint store and talks to sbatch/scontrol, so it suits a login node, survives the
training job's requeues and does not hold the training allocation while the last
checkpoint is evaluated. Each evaluation is its own sbatch job (evaluations.py).
A hand-submitted script (`render`) starts no watcher: run `dino-cluster eval watch RUN`.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dino_cluster.launch.base import LaunchError, SubmitResult, refuse_if_active
from dino_cluster.launch.eval_watcher import spawn_watcher
from dino_cluster.launch.procs import follow as follow_file
from dino_cluster.launch.run_record import SlurmRecord, read_record, write_record
from dino_cluster.launch.slurm import env as slurm_env
from dino_cluster.launch.slurm.commands import query_job, slurm
from dino_cluster.launch.slurm.render import (
    Resources,
    render_sbatch,
    resources,
    sbatch_options,
    submitit_parameters,
)
from dino_cluster.spec import JobSpec, write_resolved

if TYPE_CHECKING:
    from dino_cluster.evaluate.submit import EvalHandle, EvalJob

POLL_S = 0.5


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
    # One line: what to change first, then SLURM's own words.
    said = f"SLURM refused the job, nothing was submitted: {text or '(no message)'}"
    return "; ".join([*hints, said]) if hints else said


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
        refuse_if_active(run_dir)
        self.preflight(r)
        job_id = self._submit_submitit(spec, r, folder, params)
        pattern = str(folder / "{job_id}" / "{job_id}_{rank}_log.out")
        record = SlurmRecord(
            via="submitit",
            job_id=job_id,
            folder=str(folder / job_id),
            log_pattern=pattern,
            world_size=r.world_size,
            spec=str((run_dir / "spec.resolved.yaml").resolve()),
            grace_s=r.grace_s,
        )
        write_record(run_dir, record)
        if spec.evaluation.enabled:
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
            extra={"folder": str(record.folder), "log": log0},
        )
        if detach:
            result.status = self.status(run_dir)
            return result
        try:
            self.logs(run_dir, follow=True)
        except KeyboardInterrupt:
            print(
                f"\nstopped following; job {job_id} keeps running "
                f"(dino-cluster cancel {run_dir} stops it)",
                file=sys.stderr,
            )
        result.status = self.status(run_dir)
        return result

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
        done = slurm("sbatch", "--test-only", *flags, "--wrap", "true")
        if done.returncode:
            raise LaunchError(explain_sbatch_error(done.stderr or done.stdout, r))

    def _submit_submitit(self, spec: JobSpec, r: Resources, folder: Path, params: dict) -> str:
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise LaunchError(f"{tool} not found: run this on a SLURM login node")
        import submitit
        from submitit.core.utils import FailedJobError

        from dino_cluster.launch.slurm.task import SlurmTrainTask

        spec_path = write_resolved(spec, spec.run_dir).resolve()
        slurm_env.clear_cancel(spec.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        before = set(folder.iterdir())
        executor = submitit.SlurmExecutor(
            folder=folder / "%j", max_num_timeout=0, python=shlex.quote(spec.launcher.interpreter)
        )
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
                command=f"{shlex.quote(spec.launcher.interpreter)} -u -m submitit.core._submit "
                + str(folder / "%j"),
                folder=folder / "%j",
                **{k: v for k, v in params.items()},
            )
            lines += ["# the sbatch script submitit writes:", text.rstrip("\n")]
        except Exception:  # noqa: BLE001 - submitit missing or changed: the parameters suffice
            pass
        return "\n".join(lines) + "\n"

    # -- status / logs / cancel ----------------------------------------------------------
    def status(self, run_dir: Path) -> str:
        record = read_record(run_dir, "slurm")
        state, restarts = query_job(record.job_id)
        return slurm_env.map_state(state, restarts)

    def failure(self, run_dir: Path) -> str | None:
        """SLURM's state of a failed job, and where its rank logs are."""
        record = read_record(run_dir, "slurm")
        state, _ = query_job(record.job_id)
        if slurm_env.map_state(state, 0) != "failed":
            return None
        logs = record.log_pattern.format(job_id=record.job_id, rank="<rank>")
        return f"SLURM job {record.job_id} ended {state}; rank logs: {logs}"

    def logs(self, run_dir: Path, *, follow: bool = False, rank: int | None = None) -> None:
        record = read_record(run_dir, "slurm")
        rank = rank or 0
        if not 0 <= rank < record.world_size:
            raise LaunchError(f"rank {rank} does not exist (world size {record.world_size})")
        path = Path(record.log_pattern.format(job_id=record.job_id, rank=rank))
        last_check, state = 0.0, ""

        def finished() -> bool:
            nonlocal last_check, state
            if time.monotonic() - last_check > 2.0:  # do not hammer slurmctld
                state, last_check = self.status(run_dir), time.monotonic()
            return state in slurm_env.TERMINAL_STATES or state == "unknown"

        while not path.exists():
            if not follow or finished():
                raise LaunchError(
                    f"{path}: no log yet (job {record.job_id} is {state or self.status(run_dir)})"
                )
            time.sleep(POLL_S)
        follow_file(path, lambda: follow and not finished(), poll_s=POLL_S)

    def cancel(self, run_dir: Path, *, wait_s: float | None = None) -> None:
        """Checkpoint, then cancel: USR2 to every rank (they checkpoint after the current step
        and the job cancels itself instead of requeueing), then scancel whatever is left."""
        record = read_record(run_dir, "slurm")
        job_id = record.job_id
        state = self.status(run_dir)
        if state in slurm_env.TERMINAL_STATES:
            print(f"job {job_id} already {state}", file=sys.stderr)
            return
        slurm_env.request_cancel(run_dir)
        if state == "running":
            done = slurm("scancel", "--signal=USR2", job_id)
            if done.returncode == 0:
                deadline = time.monotonic() + (
                    wait_s if wait_s is not None else float(record.grace_s or 120) + 30
                )
                while time.monotonic() < deadline and self.status(run_dir) == "running":
                    time.sleep(POLL_S)
        done = slurm("scancel", job_id)
        if done.returncode and "already" not in (done.stderr or "").lower():
            if self.status(run_dir) not in slurm_env.TERMINAL_STATES:
                raise LaunchError(f"scancel {job_id}: {done.stderr.strip()}")

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle:
        """One sbatch job running the runner (evaluations.py)."""
        from dino_cluster.launch.slurm.evaluations import submit_eval_job

        return submit_eval_job(job, spec, run_dir)
