"""What every launcher backend offers, and how the CLI finds one by name.

Backends are imported lazily: `dino-cluster submit` on a laptop must not import Ray or
submitit unless the spec asks for them.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dino_cluster.spec import JobSpec

BACKENDS: dict[str, str] = {
    "local": "dino_cluster.launch.local:LocalBackend",
    "ray": "dino_cluster.launch.ray:RayBackend",
    "kuberay": "dino_cluster.launch.kuberay:KubeRayBackend",
    "slurm": "dino_cluster.launch.slurm:SlurmBackend",
}


def free_port() -> int:
    """A TCP port free on loopback right now (for a rendezvous or a metrics server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs; a zombie child of ours is reaped and counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


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
