"""Checks before anything is created, spawned or submitted; each failure is one line.

    submit SPEC        -> check_submit(spec, backend, dry_run=False)

- the backend can run the spec (the local backend: one node, GPUs only where CUDA is);
- the data shards (and the evaluation shards, when evaluation is on) resolve: the index
  reads, the folder lists, the pattern's shards exist;
- the checkpoint location is writable (nothing is left behind);
- s3:// URLs have credentials and an endpoint that answers.

Storage is checked only where the run will use this machine's environment (the local
backend, SLURM from a login node sharing it, a Ray driver started here); a run submitted to
a cluster through the Ray Jobs API or KubeRay reaches its data with the cluster's own
credentials and network, which this machine cannot vouch for. Every network wait has a
deadline (STORAGE_DEADLINE_S in all, short per-request timeouts), so a wrong endpoint is a
message in seconds, not minutes of silent retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from dino_cluster.launch.errors import LaunchError

if TYPE_CHECKING:
    from dino_cluster.spec import JobSpec
    from dino_cluster.storage import StorageOptions

STORAGE_DEADLINE_S = 60.0


def check_backend(spec: JobSpec, backend: str, *, dry_run: bool) -> None:
    """What the backend itself cannot do with this spec (no I/O, except the CUDA check)."""
    lc = spec.launcher
    if backend != "local":
        return
    if lc.nodes > 1:
        raise LaunchError(
            f"launcher.nodes={lc.nodes}: the local backend runs on this machine only; use "
            "--backend slurm, ray or kuberay for several nodes, or --set launcher.nodes=1"
        )
    if lc.workers is not None:
        raise LaunchError(
            "launcher.workers (an elastic range) needs the ray or kuberay backend; "
            "the local backend runs a fixed world size (--set launcher.workers=null)"
        )
    if lc.gpus_per_node and not dry_run:
        _check_cuda(lc.gpus_per_node)


def _check_cuda(wanted: int) -> None:
    import torch  # only a real local GPU submit pays for this

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise LaunchError(
            f"launcher.gpus_per_node={wanted} but this machine has no CUDA GPU: train on "
            "CPU ranks with --set launcher.gpus_per_node=0 (launcher.procs_per_node sets how "
            "many), or submit to a GPU cluster (--backend slurm|ray|kuberay)"
        )
    if have < wanted:
        raise LaunchError(
            f"launcher.gpus_per_node={wanted} but this machine has {have} CUDA GPU(s): "
            f"--set launcher.gpus_per_node={have}"
        )


def storage_checked_here(spec: JobSpec, backend: str) -> bool:
    """Whether the run reads its storage with this machine's environment."""
    if backend == "kuberay":
        return False
    address = spec.launcher.ray.address
    return not (backend == "ray" and address and address.startswith(("http://", "https://")))


def _preflight_options(section: object) -> StorageOptions:
    from dino_cluster.storage import StorageOptions

    return StorageOptions.from_spec(section).interactive()


def check_storage(spec: JobSpec) -> None:
    """Data, evaluation data and the checkpoint location, within STORAGE_DEADLINE_S."""
    from dino_cluster.data.shards import probe_shards
    from dino_cluster.storage import StorageError, check_credentials, check_writable

    options = _preflight_options(spec.data.storage)
    checks: list[tuple[str, str, Callable[[], object]]] = []
    urls = [("data.url", spec.data.url)]
    if spec.evaluation.enabled:
        urls += [
            ("evaluation.train_url", spec.evaluation.train_url or ""),
            ("evaluation.val_url", spec.evaluation.val_url or ""),
        ]
    for field, url in urls:
        checks.append((field, url, lambda u=url: check_credentials(u, options)))
        checks.append((field, url, lambda u=url: probe_shards(u, options)))
    ckpt = spec.checkpoint_url
    where = "checkpoint.url" if spec.checkpoint.url else "the checkpoint location (run.storage)"
    checks.append((where, ckpt, lambda: check_writable(ckpt, options)))

    def run_all() -> None:
        for field, url, check in checks:
            try:
                check()
            except StorageError as exc:
                raise LaunchError(f"{field} {url}: {exc.reason}") from None
            except (ValueError, OSError) as exc:  # the message names the URL
                off = " (or --set evaluation.enabled=false)" if field.startswith("eval") else ""
                raise LaunchError(f"{field}: {exc}{off}") from None

    _with_deadline(run_all, STORAGE_DEADLINE_S, "the data and checkpoint storage")


def _with_deadline(fn: Callable[[], None], deadline_s: float, what: str) -> None:
    """Run `fn` in a thread; a LaunchError if it does not finish within `deadline_s`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name="preflight", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if not outcome:
        raise LaunchError(
            f"no answer from {what} within {deadline_s:.0f} s: check the endpoint "
            "(data.storage.endpoint_url / AWS_ENDPOINT_URL) and the network"
        )
    if outcome[0] is not None:
        raise outcome[0]


def check_submit(spec: JobSpec, backend: str, *, dry_run: bool) -> None:
    """Everything `submit` checks before it creates, spawns or submits anything."""
    check_backend(spec, backend, dry_run=dry_run)
    if not dry_run and storage_checked_here(spec, backend):
        check_storage(spec)
