"""Evaluations of a SLURM run: every evaluation is one sbatch job running the runner.

    #SBATCH --job-name=dino-eval-<kind>-step-<N>   1 task, --cpus-per-task / --gpus / --mem
                                                    from `evaluation`, --no-requeue
    exec "$DINO_PYTHON" -m dino_cluster.evaluate.runner --kind ... --step N ...

Partition, account and QoS are `evaluation.slurm_*`, else the run's `launcher.slurm` ones;
the time limit is `evaluation.slurm_time_min`; the run's `launcher.slurm.setup` lines (module
loads, venv activation) run first, as in the training job. The script and the job's output
go to RUN/logs/eval/ (`<job name>-<job id>.out`), which must be on a shared filesystem, like
the run folder of a SLURM run. The job's exit code is the runner's (0 ok, 1 failed, 2 bad
input, 4 checkpoint gone); a job that SLURM ended (CANCELLED, TIMEOUT, NODE_FAIL,
OUT_OF_MEMORY, PREEMPTED, ...) is a failed attempt, which the watcher retries. Eval jobs do
not requeue themselves: the watcher owns retries. Cancel is `scancel`.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from dino_cluster.evaluate.submit import EXIT_FAILED, EXIT_OK, EvalHandle, EvalJob, runner_args
from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.slurm.commands import slurm
from dino_cluster.launch.slurm.render import format_time
from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)

POLL_EVERY_S = 2.0  # the watcher polls handles often: do not hammer slurmctld
FORGOTTEN_AFTER_S = 120.0  # neither scontrol nor sacct knows the job this long: it is gone

# Job states after which the job runs no more (eval jobs never requeue, so PREEMPTED ends it).
ENDED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)


@dataclass(frozen=True)
class EvalResources:
    cpus: int
    gpus: int
    mem_gb: int | None
    time_min: int
    partition: str | None
    account: str | None
    qos: str | None
    log_dir: str  # absolute: the job's output and its script
    python: str  # the interpreter the job runs (launcher.python, else the watcher's)
    setup: tuple[str, ...] = ()


def eval_resources(spec: JobSpec, run_dir: str | Path) -> EvalResources:
    ev, s = spec.evaluation, spec.launcher.slurm
    return EvalResources(
        cpus=ev.cpus,
        gpus=ev.gpus,
        mem_gb=ev.mem_gb,
        time_min=ev.slurm_time_min,
        partition=ev.slurm_partition or s.partition,
        account=ev.slurm_account or s.account,
        qos=ev.slurm_qos or s.qos,
        log_dir=str((Path(run_dir) / "logs" / "eval").resolve()),
        python=spec.launcher.interpreter,
        setup=tuple(s.setup),
    )


def job_name(job: EvalJob) -> str:
    return f"dino-eval-{job.kind}-step-{job.step}"


def render_eval_sbatch(job: EvalJob, r: EvalResources) -> str:
    """The batch script of one evaluation job."""
    opts: list[tuple[str, str | None]] = [
        ("job-name", job_name(job)),
        ("nodes", "1"),
        ("ntasks", "1"),
        ("cpus-per-task", str(r.cpus)),
    ]
    if r.gpus:
        opts.append(("gpus", str(r.gpus)))
    if r.mem_gb:
        opts.append(("mem", f"{r.mem_gb}G"))
    opts.append(("time", format_time(r.time_min)))
    for key in ("partition", "account", "qos"):
        if getattr(r, key):
            opts.append((key, getattr(r, key)))
    opts += [("no-requeue", None), ("open-mode", "append"), ("output", f"{r.log_dir}/%x-%j.out")]
    lines = [
        "#!/bin/bash",
        f"# dino-cluster: {job.kind} evaluation of checkpoint step {job.step} "
        f"(attempt {job.attempt}), submitted by",
        "# the evaluation watcher. Exit code: 0 ok, 1 failed, 2 bad input, 4 checkpoint gone.",
    ]
    lines += [f"#SBATCH --{k}" + ("" if v is None else f"={v}") for k, v in opts]
    if r.setup:
        lines += ["", "# launcher.slurm.setup", *r.setup]
    args = " ".join(shlex.quote(a) for a in runner_args(job))
    lines += [
        "",
        "# One process, not a rank of the training job.",
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_PORT",
        f"export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{r.cpus}}} PYTHONUNBUFFERED=1",
    ]
    if not r.gpus:
        lines.append("export CUDA_VISIBLE_DEVICES=")
    lines.append(f"DINO_PYTHON=${{DINO_PYTHON:-{shlex.quote(r.python)}}}")
    lines.append(f'exec "$DINO_PYTHON" -m dino_cluster.evaluate.runner {args}')
    return "\n".join(lines) + "\n"


def job_exit(job_id: str) -> tuple[str, int | None]:
    """(SLURM state word, exit code or None) from slurmctld, else accounting; ("", None)
    when neither knows the job."""
    out = slurm("scontrol", "show", "job", "-o", job_id).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    state, code = fields.get("JobState", ""), fields.get("ExitCode", "")
    if not state:  # slurmctld forgets finished jobs after MinJobAge; accounting remembers
        acct = slurm("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode").stdout
        rows = [ln.strip().split("|") for ln in acct.splitlines() if ln.strip()]
        if rows and len(rows[-1]) == 2:
            state, code = rows[-1]
    word = state.strip().split(" ", 1)[0].rstrip("+").upper()
    return word, exit_code(word, code)


def exit_code(state: str, code: str) -> int | None:
    """The evaluation's exit code for a SLURM state and `ExitCode` (`rc:signal`); None
    while the job may still run."""
    if state not in ENDED:
        return None
    if state == "COMPLETED":
        return EXIT_OK
    rc, _, sig = code.partition(":")
    if state == "FAILED" and rc.isdigit() and int(rc) != 0 and not (sig.isdigit() and int(sig)):
        return int(rc)  # the runner's own code (2 bad input, 4 checkpoint gone, ...)
    return EXIT_FAILED  # killed by a signal, cancelled, timed out, out of memory, node lost


class _SlurmHandle:
    def __init__(self, job_id: str, name: str) -> None:
        self.job_id, self.name = job_id, name
        self.code: int | None = None
        self.state = ""
        self._next = 0.0
        self._unknown_since: float | None = None

    def poll(self) -> int | None:
        if self.code is not None or time.monotonic() < self._next:
            return self.code
        self._next = time.monotonic() + POLL_EVERY_S
        try:
            self.state, self.code = job_exit(self.job_id)
        except LaunchError as exc:  # no answer this time: ask again next poll
            log.warning("SLURM job %s (%s): %s", self.job_id, self.name, exc)
            return None
        if self.state:
            self._unknown_since = None
        elif self._unknown_since is None:
            self._unknown_since = time.monotonic()
        elif time.monotonic() - self._unknown_since > FORGOTTEN_AFTER_S:
            log.error(
                "SLURM job %s (%s) is unknown to SLURM: counted failed", self.job_id, self.name
            )
            self.code = EXIT_FAILED
        if self.code is not None and self.code != EXIT_OK:
            log.warning("SLURM job %s (%s) ended %s", self.job_id, self.name, self.state)
        return self.code

    def cancel(self) -> None:
        if self.code is None:
            done = slurm("scancel", self.job_id)
            if done.returncode:
                log.warning("scancel %s: %s", self.job_id, done.stderr.strip())


def submit_eval_job(job: EvalJob, spec: JobSpec, run_dir: str | Path) -> EvalHandle:
    """Write the job's script to RUN/logs/eval/ and sbatch it."""
    resources = eval_resources(spec, run_dir)
    log_dir = Path(resources.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / f"{job.name}.sbatch"
    script.write_text(render_eval_sbatch(job, resources))
    done = slurm("sbatch", "--parsable", str(script))
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode or not job_id.isdigit():
        text = " ".join((done.stderr or done.stdout).split())
        raise LaunchError(f"sbatch refused evaluation {job.name} ({script}): {text}")
    log.info("submitted %s as SLURM job %s", job.name, job_id)
    return _SlurmHandle(job_id, job.name)
