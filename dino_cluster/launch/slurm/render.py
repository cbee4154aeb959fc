"""What a job spec asks of SLURM: the resources, as submitit parameters and as a
self-contained sbatch script (`dino-cluster render SPEC --backend slurm`).

One task per GPU (`--ntasks-per-node = gpus_per_node`), or per CPU worker for CPU specs
(`procs_per_node`). The job body (signal forwarding, requeue, requeue cap) is the same text
in the rendered script and in infra/slurm/dino.sbatch; a test keeps the two identical.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from dino_cluster.spec import JobSpec

SIGNAL = "USR2"  # submitit's preemption/timeout signal; NCCL may use USR1


@dataclass(frozen=True)
class Resources:
    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int | None
    time_min: int
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    grace_s: int
    max_requeues: int
    additional: dict[str, str | bool | int] = field(default_factory=dict)
    setup: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def resources(spec: JobSpec) -> Resources:
    la, s = spec.launcher, spec.launcher.slurm
    per_node = la.gpus_per_node if la.gpus_per_node else la.procs_per_node
    return Resources(
        job_name=s.job_name or f"dino-{spec.run.name}",
        nodes=la.nodes,
        tasks_per_node=per_node,
        gpus_per_node=la.gpus_per_node,
        cpus_per_task=s.cpus_per_task,
        mem_gb=s.mem_gb,
        time_min=s.time_min,
        partition=s.partition,
        account=s.account,
        qos=s.qos,
        constraint=s.constraint,
        grace_s=s.signal_grace_s,
        max_requeues=s.max_requeues,
        additional=dict(s.additional_parameters),
        setup=tuple(s.setup),
    )


def format_time(minutes: int) -> str:
    """SLURM's D-HH:MM:SS for a limit in minutes (4320 -> 3-00:00:00)."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


def sbatch_options(r: Resources) -> list[tuple[str, str | None]]:
    """The #SBATCH options in a fixed order: (option, value or None for a flag)."""
    opts: list[tuple[str, str | None]] = [
        ("job-name", r.job_name),
        ("nodes", str(r.nodes)),
        ("ntasks-per-node", str(r.tasks_per_node)),
    ]
    if r.gpus_per_node:
        opts.append(("gpus-per-node", str(r.gpus_per_node)))
    opts.append(("cpus-per-task", str(r.cpus_per_task)))
    if r.mem_gb:
        opts.append(("mem", f"{r.mem_gb}G"))
    opts.append(("time", format_time(r.time_min)))
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(r, key)
        if value:
            opts.append((key, value))
    # B: signals the batch shell, which forwards to every rank (see the job body).
    opts += [
        ("signal", f"B:{SIGNAL}@{r.grace_s}"),
        ("requeue", None),
        ("open-mode", "append"),
        ("output", "%x-%j.out"),
    ]
    taken = {k for k, _ in opts}
    for key, value in r.additional.items():
        key = key.replace("_", "-")
        if key in taken:
            opts = [(k, v) for k, v in opts if k != key]
        opts.append((key, None if value is True else str(value)))
    return opts


def submitit_parameters(r: Resources) -> dict:
    """Keyword arguments for submitit's SlurmExecutor.update_parameters."""
    params: dict = {
        "job_name": r.job_name,
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks_per_node,
        "cpus_per_task": r.cpus_per_task,
        "time": r.time_min,
        # submitit sends USR2 to every task this long before the time limit.
        "signal_delay_s": r.grace_s,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **r.additional},
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem"] = f"{r.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    if r.setup:
        params["setup"] = list(r.setup)
    return params


# The part of every dino-cluster batch script after DINO_RUN_DIR, DINO_SPEC, DINO_MAX_REQUEUES
# and DINO_PYTHON are set. Kept byte-identical in infra/slurm/dino.sbatch (tested).
JOB_BODY = r"""# ---- dino-cluster job body: begin ----
export DINO_RUN_DIR DINO_SPEC DINO_MAX_REQUEUES DINO_PYTHON PYTHONUNBUFFERED=1
restarts=${SLURM_RESTART_COUNT:-0}
# USR2 (--signal=B:USR2@grace before the time limit, and on preemption) reaches only this
# shell: pass it on to every rank, which checkpoints after its current step and exits with 3.
# TERM (scancel, the end of a preemption grace time) reaches the ranks directly; this shell
# keeps waiting for them instead of dying first.
signalled=""
forward() {
  signalled=$1
  echo "dino-cluster: SIG$1: asking the ranks to checkpoint and stop" >&2
  [ -n "${srun_pid:-}" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}
trap 'forward USR2' USR2
trap 'signalled=TERM' TERM
# Records the job (RUN/launch.json, RUN/slurm/requeues.json); refuses to train past the cap.
"$DINO_PYTHON" -m dino_cluster.launch.slurm.job started --run-dir "$DINO_RUN_DIR" \
  --spec "$DINO_SPEC" --max-requeues "$DINO_MAX_REQUEUES" || exit $?
# torch.distributed from SLURM: the first node hosts rank 0; the port follows the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$(( 20000 + (SLURM_JOB_ID + 997 * restarts) % 40000 ))
export MASTER_ADDR MASTER_PORT
mkdir -p "$DINO_RUN_DIR/slurm/logs"

srun --unbuffered --open-mode=append --output="$DINO_RUN_DIR/slurm/logs/%j_%t.log" \
  bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
    LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}
    exec "$DINO_PYTHON" -m dino_cluster.train --spec "$DINO_SPEC"' &
srun_pid=$!
[ "$signalled" = USR2 ] && forward USR2  # arrived before srun started
while true; do  # a trapped signal interrupts `wait`: wait again until srun has exited
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
trap - USR2 TERM
# A rank killed by the signal before it could install its handler wrote no checkpoint, but
# the previous one stands: treat it as stopped so the job requeues and resumes from that.
if [ -n "$signalled" ] && [ "$rc" -gt 128 ]; then rc=3; fi

# Exit code 3: a checkpoint was written on a signal. Requeue (the next start resumes from it)
# unless `dino-cluster cancel` asked to stop, the requeue cap is reached, or SLURM is already
# ending the job (scancel): requeueing that would bring a cancelled job back.
decision=$("$DINO_PYTHON" -m dino_cluster.launch.slurm.job decide --run-dir "$DINO_RUN_DIR" \
  --code "$rc" --max-requeues "$DINO_MAX_REQUEUES")
case "$decision" in
  requeue) scontrol requeue "$SLURM_JOB_ID" ;;
  cancel) scancel "$SLURM_JOB_ID" ;;
esac
exit "$rc"
# ---- dino-cluster job body: end ----
"""

SPEC_EOF = "DINO_SPEC_EOF"


def render_sbatch(spec: JobSpec) -> str:
    """A batch script that needs nothing but this project installed on the cluster."""
    r = resources(spec)
    spec_yaml = spec.to_yaml()
    if any(line.strip() == SPEC_EOF for line in spec_yaml.splitlines()):
        raise ValueError(f"the spec contains a line {SPEC_EOF!r}, which ends the embedded spec")
    lines = [
        "#!/bin/bash",
        f"# dino-cluster: DINO pretraining run {spec.run.name!r}, rendered from its job spec",
        "# by `dino-cluster render SPEC --backend slurm`. Change the spec and render again",
        "# rather than editing the #SBATCH lines. Submit from the folder you run dino-cluster",
        f"# in (the run folder {spec.run_dir} is relative to it): sbatch THIS_FILE",
        f"# World size {r.world_size}: {r.nodes} node(s) x {r.tasks_per_node} task(s), one per "
        + ("GPU." if r.gpus_per_node else "CPU worker."),
    ]
    for key, value in sbatch_options(r):
        lines.append(f"#SBATCH --{key}" + ("" if value is None else f"={value}"))
    if r.setup:
        lines += ["", "# launcher.slurm.setup"] + list(r.setup)
    lines += [
        "",
        f"DINO_RUN_DIR={shlex.quote(str(spec.run_dir))}",
        'DINO_SPEC="$DINO_RUN_DIR/spec.resolved.yaml"',
        f"DINO_MAX_REQUEUES={r.max_requeues}",
        # The interpreter: launcher.python, else the one that rendered this script.
        f"DINO_PYTHON=${{DINO_PYTHON:-{shlex.quote(spec.launcher.interpreter)}}}",
        "# The resolved job spec, embedded: this script is all the cluster needs.",
        'mkdir -p "$DINO_RUN_DIR"',
        f"cat > \"$DINO_SPEC.$SLURM_JOB_ID.tmp\" <<'{SPEC_EOF}'",
        spec_yaml.rstrip("\n"),
        SPEC_EOF,
        'mv -f "$DINO_SPEC.$SLURM_JOB_ID.tmp" "$DINO_SPEC"',
        "",
    ]
    return "\n".join(lines) + "\n" + JOB_BODY
