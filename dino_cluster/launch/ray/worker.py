"""What runs inside each Ray Train worker, and the small actor that links workers to the
driver.

Every worker calls the same per-rank entry the other backends use, `train(spec, hooks=...)`.
Ray Train has already formed the torch.distributed process group (gloo on CPU, NCCL on GPU);
the loop joins it. Our loop checkpoints to our own object store and resumes from it, so Ray
only sees metrics (at log / checkpoint cadence) and never a Ray checkpoint.

The `RunLink` actor (no CPU) carries three things Ray Train does not: a heartbeat (for the
driver's startup deadline), a stop request (cancel: checkpoint, then stop), and the
"done" flag that releases idle ranks (see `active_world_size`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0


class RunLink:
    """Plain class; the driver wraps it with `ray.remote(num_cpus=0)`."""

    def __init__(self) -> None:
        self._last_seen: float | None = None
        self._stop: str | None = None
        self._done: set[str] = set()
        self._attempts: list[int] = []

    def alive(self) -> None:
        self._last_seen = time.time()

    def started(self, world_size: int) -> None:
        """Rank 0 of a new worker group (first start, restart or resize)."""
        self._last_seen = time.time()
        self._attempts.append(world_size)

    def last_seen(self) -> float | None:
        return self._last_seen

    def attempts(self) -> list[int]:
        return list(self._attempts)

    def request_stop(self, reason: str) -> None:
        self._stop = reason

    def stop_requested(self) -> str | None:
        return self._stop

    def mark_done(self, token: str) -> None:
        self._done.add(token)

    def is_done(self, token: str) -> bool:
        return token in self._done


def active_world_size(global_batch: int, world_size: int) -> int:
    """The largest number of ranks <= world_size that splits the global batch evenly.

    An elastic range lets Ray pick any worker count in [min, max]; the global batch (and so
    the schedules) must not change with it. When the count does not divide the global batch,
    the extra ranks sit out this attempt instead of changing the recipe.
    """
    for n in range(world_size, 0, -1):
        if global_batch % n == 0:
            return n
    return 1


def _regroup(active: int, rank: int, use_gpu: bool) -> tuple[str, bool]:
    """Replace Ray's process group by one over the first `active` ranks.

    Returns (token shared by all ranks of this attempt, whether this rank trains).
    """
    import torch.distributed as dist

    from dino_cluster.launch.procs import free_port

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    obj: list[Any] = [None]
    if rank == 0:
        obj[0] = (uuid.uuid4().hex, host, free_port(host if host != "localhost" else "127.0.0.1"))
    dist.broadcast_object_list(obj, src=0)
    token, host, port = obj[0]
    dist.destroy_process_group()
    if rank >= active:
        return token, False
    dist.init_process_group(
        backend="nccl" if use_gpu else "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=active,
    )
    return token, True


def _heartbeat(link: Any, stop: Any, halt: threading.Event) -> None:
    """Keep the driver's deadline fed and turn a driver stop request into a loop stop."""
    while not halt.wait(HEARTBEAT_S):
        try:
            link.alive.remote()
            reason = _ray_get(link.stop_requested.remote(), timeout=10)
        except Exception:  # the driver is gone: Ray will tear us down
            continue
        if reason and not stop.requested:
            log.warning("stop requested by the driver (%s): checkpointing, then stopping", reason)
            stop.request(reason)


def _ray_get(ref: Any, timeout: float) -> Any:
    import ray

    return ray.get(ref, timeout=timeout)


def _ray_exporters(spec: Any, rank: int) -> list[Any]:
    """This rank's metrics through Ray's metrics agent (`ray_dino_*`); none if unavailable."""
    from dino_cluster.metrics.catalogue import RunLabels, node_name
    from dino_cluster.metrics.ray_sink import RaySink

    labels = RunLabels(spec.run.name, rank, node_name(), spec.launcher.backend)
    try:
        return [RaySink(labels, out_dim=spec.model.out_dim)]
    except Exception as exc:  # noqa: BLE001 - Ray's metrics are optional
        log.warning("metrics: Ray metrics not available: %s", exc)
        return []


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train per-worker function (module-level so Ray pickles it by reference)."""
    import ray.train

    from dino_cluster.spec import spec_from_dict
    from dino_cluster.train.loop import LaunchHooks, train
    from dino_cluster.train.signals import StopRequest

    if not logging.getLogger().handlers:  # Ray workers start without a logging config
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = spec_from_dict(config["spec"], "<ray driver>")
    link = config["link"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank = ctx.get_local_rank()
    use_gpu = spec.launcher.gpus_per_node > 0
    if rank == 0:
        link.started.remote(world)
    else:
        link.alive.remote()

    active = active_world_size(spec.optim.global_batch, world)
    token, trains = "", True
    if active != world:
        if rank == 0:
            log.warning(
                "world size %d does not divide the global batch %d: training on %d "
                "ranks, %d idle until the next resize",
                world,
                spec.optim.global_batch,
                active,
                world - active,
            )
        token, trains = _regroup(active, rank, use_gpu)
    # The loop and anything it calls read the usual torch.distributed variables.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(active),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
    )

    stop = StopRequest()
    halt = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(link, stop, halt), daemon=True)
    beat.start()
    try:
        if not trains:
            # Wait for the training ranks; Ray restarts the whole group if one of them fails.
            while not _ray_get(link.is_done.remote(token), timeout=30):
                time.sleep(HEARTBEAT_S)
            return {"status": "idle", "rank": rank}

        # ray.train.report is a collective over every Ray worker: only report when every
        # worker trains (idle ranks would never join it).
        def report(metrics: dict[str, float], step: int | None) -> None:
            payload = {k: float(v) for k, v in metrics.items()}
            if step is not None:
                payload["checkpoint_step"] = float(step)
            ray.train.report(payload)

        hooks = LaunchHooks(
            report=report if active == world else None,
            exporters=_ray_exporters(spec, rank),
            # Ray workers do not share the run folder: Ray's metrics and the PodMonitors
            # (infra/k8s) are how Ray runs are discovered, not file-SD targets.
            announce=False,
        )
        result = train(spec, hooks=hooks, stop=stop, install_signal_handlers=False)
        if token and rank == 0:
            link.mark_done.remote(token)
        return {"status": result.status, "step": result.step, "world_size": active, "rank": rank}
    finally:
        halt.set()
