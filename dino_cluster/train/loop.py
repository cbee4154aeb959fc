"""The per-rank DINO training loop that every backend calls.

`assemble` (assemble.py) builds student, teacher, loss, optimizer, the data stream, the
schedules and the checkpoint manager from the spec and resumes from the latest committed
checkpoint (by step). Then, for every step: schedules -> one optimisation step
(train/step.py: student on all crops, teacher on the 2 global crops, DINO loss, backward,
clip, freeze last layer, AdamW, EMA teacher; a non-finite step is skipped on every rank) ->
at logging cadence: agree on skipped steps and stop requests (one host sync; every step on
the foreach/CPU path), metrics -> checkpoint at cadence or on a launcher signal.

Nothing here knows who launched it: the launcher passes `LaunchHooks` (Ray uses them) and
the environment tells us our rank.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dino_cluster.metrics.sinks import MetricsSink
from dino_cluster.spec import JobSpec, write_resolved
from dino_cluster.train import rng
from dino_cluster.train.assemble import LaunchHooks, Run, assemble, build_sinks
from dino_cluster.train.distributed import init_distributed
from dino_cluster.train.signals import StopRequest
from dino_cluster.train.step import NonFiniteLossError

log = logging.getLogger(__name__)

__all__ = ["LaunchHooks", "NonFiniteLossError", "TrainResult", "train"]


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped" (signal) | "max_steps"
    step: int
    epoch: int
    skipped_steps: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    # sha256 of this rank's final student, teacher and center: equal on every rank when the
    # ranks stayed in sync (logged at the end; tests compare them across ranks).
    digest: dict[str, str] = field(default_factory=dict)


def state_digest(module: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(key.encode())
        h.update(sd[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def save_checkpoint(run: Run, at_step: int, *, blocking: bool = False) -> None:
    """Hand the state to the checkpoint manager (a collective: every rank calls it; rank 0
    writes). Only the copy to host memory happens here; uploading runs in the background."""
    info = run.info
    state: dict[str, Any] = {
        "student": _unwrap(run.model).state_dict(),
        "teacher": run.teacher.state_dict(),
        "dino_loss": run.dino_loss.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.use_scaler else {},
        "meta": {
            "step": at_step,
            "epoch": at_step // run.iters_per_epoch,
            "world_size": info.world_size,
            "data_position": run.stream.state_dict(gather=info.distributed),
            "rng": rng.get_state(gather=info.distributed),  # every rank's stream
            "spec": run.spec.model_dump(mode="json"),
            "iters_per_epoch": run.iters_per_epoch,
        },
    }
    run.ckpt.save(at_step, state, blocking=blocking)


def checkpoint_values(ckpt: Any) -> dict[str, float]:
    """Checkpoint figures of the writing rank, for the logged values."""
    out = {
        "checkpoint_stall_s": float(ckpt.last_stall_s or 0.0),
        "checkpoint_failed_uploads": float(ckpt.failed_uploads),
    }
    if not ckpt.is_writer:
        return out
    out["checkpoint_commits"] = float(ckpt.commits)
    out["checkpoint_upload_s"] = float(ckpt.last_upload_s or 0.0)
    if ckpt.last_committed_step is not None:
        out["checkpoint_last_step"] = float(ckpt.last_committed_step)
    return out


def gpu_memory_values(device: torch.device) -> dict[str, float]:
    """CUDA allocator figures for `device` (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_memory_allocated_bytes": float(torch.cuda.memory_allocated(device)),
        "gpu_memory_reserved_bytes": float(torch.cuda.memory_reserved(device)),
        "gpu_memory_max_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
    }


class _Window:
    """Throughput and data-wait of one logging window (time in the launcher's report hook,
    which can block, is kept out of it and counted on its own), and the run's elapsed time
    and ETA from the step rate measured since the first logging window."""

    def __init__(self, end_step: int) -> None:
        self.started = time.perf_counter()
        self.t0, self.images, self.data_wait = self.started, 0, 0.0
        self.report_wait = 0.0  # cumulative over the run
        self.end_step = end_step
        self.first: tuple[float, int] | None = None  # (time, step) of the first log

    def values(self, step: int, global_batch: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        steps = max(round(self.images / global_batch), 1)
        step_time = elapsed / steps
        if self.first is not None and step > self.first[1]:
            # The first window includes start-up (workers, first batches): measure after it.
            step_time = (now - self.first[0]) / (step - self.first[1])
        else:
            self.first = (now, step)
        out = {
            "images_per_s": self.images / elapsed,
            "data_wait_frac": min(self.data_wait / elapsed, 1.0),
            "step_time_s": elapsed / steps,
            "report_wait_s": self.report_wait,
            "elapsed_s": now - self.started,
            "eta_s": max(self.end_step - step, 0) * step_time,
        }
        self.t0, self.images, self.data_wait = now, 0, 0.0
        return out


def _log_values(run: Run, it: int, loss: torch.Tensor, skipped: int) -> dict[str, float]:
    ent, kl = run.dino_loss.last_teacher_entropy, run.dino_loss.last_kl
    return {
        "epoch": float(it // run.iters_per_epoch),
        "loss": float(loss.detach()),
        **run.schedules.at(it),
        "teacher_entropy": float(ent) if ent is not None else float("nan"),
        "student_teacher_kl": float(kl) if kl is not None else float("nan"),
        "skipped_steps": float(skipped),
        "bad_samples": float(sum(run.stream.bad_samples.values())),
        "center_norm": float(run.dino_loss.center.norm()),
        "world_size": float(run.info.world_size),
        **checkpoint_values(run.ckpt),
        **gpu_memory_values(run.info.device),
    }


def _to_device(run: Run, crops: list) -> list[torch.Tensor]:
    device = run.info.device
    if run.device_augment is None:
        return [c.to(device, non_blocking=True) for c in crops]
    # Photometric ops on the device; their parameters stay on the CPU.
    *views, params = crops
    views = [v.to(device, non_blocking=True) for v in views]
    return run.device_augment.per_batch([*views, params])


def _run_steps(
    run: Run, stop: StopRequest, sink: MetricsSink, hooks: LaunchHooks
) -> tuple[str, int, int, dict[str, float]]:
    """The loop proper; returns (status, step, skipped steps, last logged values)."""
    spec, o, me = run.spec, run.spec.optim, run.spec.method
    ipe, end, every = run.iters_per_epoch, run.end_step, spec.checkpoint.every_steps
    log_every = spec.metrics.log_every_steps
    step, skipped, last = run.start_step, 0, {}
    window = _Window(end)
    while step < end:
        epoch = step // ipe
        epoch_start = step
        t_fetch = time.perf_counter()
        for crops in run.stream.epoch_iter(epoch):
            window.data_wait += time.perf_counter() - t_fetch
            it = step  # global iteration index into the schedules
            for group in run.optimizer.param_groups:
                group["lr"] = float(run.schedules.lr[it])
                if group.get("name") == "regularized":  # biases and norms keep 0
                    group["weight_decay"] = float(run.schedules.weight_decay[it])
            loss = run.step_fn(
                _to_device(run, crops),
                epoch=epoch,
                teacher_temp=float(run.schedules.teacher_temp[it]),
                momentum=float(run.schedules.momentum[it]),
                stop_requested=stop.requested,
            )
            step += 1
            window.images += o.global_batch
            at_log = step % log_every == 0 or step == end
            check, stopping = None, False
            if at_log or not run.step_fn.sync_free:
                # The host learns about skipped steps and stop requests here only: one
                # sync per logging window on the sync-free path.
                check = run.step_fn.check(stop.requested)
                skipped, stopping = check.skipped, check.stop
            if at_log:
                last = _log_values(run, it, loss, skipped) | window.values(step, o.global_batch)
                sink.log(step, last)
            if check is not None and check.longest >= me.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{me.max_nonfinite_steps} consecutive non-finite losses (seen at step "
                    f"{step}, {check.skipped} skipped in all): stopping. Try precision "
                    "bf16/fp32, a lower optim.base_lr, optim.clip_grad, or a longer "
                    "teacher-temperature warm-up."
                )
            due = (every and step % every == 0) or (not every and step % ipe == 0)
            if stopping:
                save_checkpoint(run, step, blocking=True)
                return "stopped", step, skipped, last
            if step >= end:
                return ("completed" if end == run.total_steps else "max_steps"), step, skipped, last
            if due:
                save_checkpoint(run, step)
            if hooks.report is not None and (due or step % log_every == 0):
                t_report = time.perf_counter()
                hooks.report(dict(last), step if due else None)
                # A report can block (Ray Train paces reports ~2 s apart by default): counted
                # on its own and kept out of the step-time window.
                waited = time.perf_counter() - t_report
                window.report_wait += waited
                window.t0 += waited
            t_fetch = time.perf_counter()
        if step == epoch_start:
            raise RuntimeError(f"the data stream yielded no batch for epoch {epoch}")
    return "completed", step, skipped, last  # resumed at (or past) the last step


def train(
    spec: JobSpec,
    *,
    hooks: LaunchHooks | None = None,
    stop: StopRequest | None = None,
    install_signal_handlers: bool = True,
) -> TrainResult:
    hooks = hooks or LaunchHooks()
    info = init_distributed(use_gpu=spec.launcher.gpus_per_node > 0 and torch.cuda.is_available())
    if info.is_main:
        write_resolved(spec, spec.run_dir)
    run = assemble(spec, info)
    stop = stop or StopRequest()
    if install_signal_handlers:
        stop.install(spec.checkpoint.on_signals)
    sink = build_sinks(spec, info, run.end_step, hooks)
    already_done = run.start_step >= run.end_step
    if already_done and info.is_main:
        log.info(
            "the run is already complete: its checkpoint is at step %d, the spec ends at step "
            "%d (raise optim.epochs or optim.max_steps to train on); nothing to do",
            run.start_step,
            run.end_step,
        )
    try:
        status, step, skipped, last = _run_steps(run, stop, sink, hooks)
        if status in ("completed", "max_steps") and not already_done:
            save_checkpoint(run, step, blocking=True)
            if hooks.report is not None:
                hooks.report(dict(last), step)
    finally:
        run.ckpt.close()
        sink.close()
        if install_signal_handlers:
            stop.restore()
    if run.ckpt.last_error is not None and info.is_main:
        log.error("some checkpoint uploads failed: %s", run.ckpt.last_error)
    digest = {
        "student": state_digest(_unwrap(run.model)),
        "teacher": state_digest(run.teacher),
        "center": state_digest({"center": run.dino_loss.center}),
    }
    log.info(
        "rank %d finished at step %d (%s): teacher %s center %s",
        info.rank,
        step,
        status,
        digest["teacher"][:16],
        digest["center"][:16],
    )
    return TrainResult(
        status=status,
        step=step,
        epoch=step // run.iters_per_epoch,
        skipped_steps=skipped,
        last_metrics=last,
        digest=digest,
    )
