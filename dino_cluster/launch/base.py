"""What every launcher backend offers, and how the CLI finds one by name.

Backends are imported lazily: `dino-cluster submit` on a laptop must not import Ray or
submitit unless the spec asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

from dino_cluster.spec import JobSpec

BACKENDS: dict[str, str] = {
    "local": "dino_cluster.launch.local:LocalBackend",
    "ray": "dino_cluster.launch.ray:RayBackend",
    "kuberay": "dino_cluster.launch.kuberay:KubeRayBackend",
    "slurm": "dino_cluster.launch.slurm:SlurmBackend",
}


class LaunchError(RuntimeError):
    """A launcher could not do what was asked; the message says why and what to do."""


@dataclass
class SubmitResult:
    run_dir: str
    job_id: str | None = None
    status: str = "submitted"
    message: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def submit(
        self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False
    ) -> SubmitResult: ...

    def render(self, spec: JobSpec) -> str: ...

    def status(self, run_dir: str) -> str: ...

    def logs(self, run_dir: str, *, follow: bool = False, rank: int | None = None) -> None: ...

    def cancel(self, run_dir: str) -> None: ...


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    module_name, _, cls_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise LaunchError(f"the {name!r} backend is not available in this version") from None
        raise
    return getattr(module, cls_name)()
