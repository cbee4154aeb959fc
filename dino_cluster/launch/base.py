"""What every launcher backend offers, and how the CLI finds one by name.

A backend is a thin adapter with the same verbs for everything that runs on it: the
training run (`render`, `submit`, `status`, `logs`, `cancel`) and its evaluations
(`submit_eval`, one job per checkpoint and kind, asked for by the evaluation watcher). The
run's record (run_record.py) says which backend launched a run folder.

Backends are imported lazily, by name: `dino-cluster submit` on a laptop imports neither
Ray nor submitit unless the spec asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.run_record import RunRecordError, read_record, record_path

if TYPE_CHECKING:
    from dino_cluster.evaluate.submit import EvalHandle, EvalJob
    from dino_cluster.spec import JobSpec

__all__ = [
    "BACKENDS",
    "ACTIVE_STATES",
    "Backend",
    "LaunchError",
    "RunRecordError",
    "SubmitResult",
    "get_backend",
    "missing_local_inputs",
    "refuse_if_active",
    "run_backend",
]

BACKENDS: dict[str, str] = {
    "local": "dino_cluster.launch.local:LocalBackend",
    "ray": "dino_cluster.launch.ray.backend:RayBackend",
    "kuberay": "dino_cluster.launch.kuberay:KubeRayBackend",
    "slurm": "dino_cluster.launch.slurm.backend:SlurmBackend",
}
# Run states (any backend's `status`) in which the run may still write checkpoints.
ACTIVE_STATES = frozenset({"running", "pending", "requeued", "submitted"})


@dataclass
class SubmitResult:
    run_dir: str
    job_id: str | None = None
    status: str = "submitted"
    message: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def render(self, spec: JobSpec) -> str:
        """What would be launched (an sbatch script, a RayJob manifest, commands)."""
        ...

    def submit(
        self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False
    ) -> SubmitResult: ...

    def status(self, run_dir: Path) -> str:
        """running | pending | requeued | completed | stopped | failed | cancelled | unknown"""
        ...

    def logs(self, run_dir: Path, *, follow: bool = False, rank: int | None = None) -> None: ...

    def cancel(self, run_dir: Path) -> None:
        """Stop the run; its ranks write a checkpoint first."""
        ...

    def failure(self, run_dir: Path) -> str | None:
        """Why the run failed, in a sentence or two (None: it did not, or nobody knows)."""
        ...

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle:
        """Start one evaluation job of the run's checkpoint `job.step` on this backend
        (`address`: a cluster to use instead of the run's own, where that applies)."""
        ...


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise LaunchError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    module_name, _, cls_name = BACKENDS[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)()


def run_backend(run_dir: Path) -> Backend:
    """The backend that launched the run in `run_dir` (from its record)."""
    return get_backend(read_record(run_dir).backend)


def refuse_if_active(run_dir: Path) -> None:
    """One live run per run folder, whichever backend launched it: two would write the same
    checkpoints. A record this version cannot read, or a backend that cannot say, is no
    live run to protect (the folder is reused)."""
    if not record_path(run_dir).exists():
        return
    try:
        record = read_record(run_dir)
        state = get_backend(record.backend).status(run_dir)
    except LaunchError:
        return
    if state in ACTIVE_STATES:
        raise LaunchError(
            f"{run_dir}: this run is {state} on the {record.backend} backend; "
            f"`dino-cluster cancel {run_dir}` first, or submit with --set run.name=NEW"
        )


def missing_local_inputs(spec: JobSpec) -> list[str]:
    """The spec's local data paths (training shards; evaluation shards when enabled) that do
    not exist on this machine, each as "field: path (why)". URLs with a scheme other than
    file:// are not checked here: the store reports them with its own retries."""
    fields = [("data.url", spec.data.url)]
    if spec.evaluation.enabled:
        fields += [
            ("evaluation.train_url", spec.evaluation.train_url),
            ("evaluation.val_url", spec.evaluation.val_url),
        ]
    missing = []
    for name, url in fields:
        if not url or ("://" in url and not url.startswith("file://")):
            continue
        path = Path(url.removeprefix("file://"))
        # A brace pattern (shard-{000000..000009}.tar) names files in one folder.
        target = path.parent if "{" in path.name else path
        if not target.exists():
            missing.append(f"{name}: {url} does not exist (relative to {Path.cwd()})")
    return missing
