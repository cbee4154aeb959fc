"""The per-rank DINO training loop that every backend calls.

Read top to bottom: build student/teacher/loss/optimizer from the spec, build the data
stream, resume from the latest committed checkpoint (by step), then for every step:
schedules -> one optimisation step (train/step.py: student on all crops, teacher on the 2
global crops, DINO loss, backward, clip, freeze last layer, AdamW, EMA teacher; a non-finite
step is skipped on every rank) -> at logging cadence: agree on skipped steps and stop requests
(one host sync; every step on the foreach/CPU path), metrics -> checkpoint at cadence or on a
launcher signal.

Nothing here knows who launched it: the launcher passes an optional `report` hook (Ray uses
it) and the environment tells us our rank.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dino_cluster.checkpoint import CheckpointManager
from dino_cluster.data import build_train_stream
from dino_cluster.dino.augment import MultiCropAugment
from dino_cluster.dino.augment_batched import BatchedMultiCropAugment
from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import MultiCropWrapper, build_student_teacher
from dino_cluster.dino.optim import build_optimizer, param_groups
from dino_cluster.dino.schedules import cosine_schedule, teacher_temp_schedule
from dino_cluster.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricsSink,
    MultiSink,
    NullSink,
    checkpoint_values,
    gpu_memory_values,
)
from dino_cluster.spec import JobSpec, write_resolved
from dino_cluster.storage import StorageOptions
from dino_cluster.train import rng
from dino_cluster.train.distributed import DistInfo, init_distributed
from dino_cluster.train.signals import StopRequest
from dino_cluster.train.step import NonFiniteLossError, TrainStep, prepare_models

log = logging.getLogger(__name__)

ReportHook = Callable[[dict[str, float], int | None], None]
__all__ = ["NonFiniteLossError", "TrainResult", "train"]


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


def storage_options(spec: JobSpec) -> StorageOptions:
    s = spec.data.storage
    return StorageOptions(endpoint_url=s.endpoint_url, region=s.region, profile=s.profile)


def _precision(spec: JobSpec, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    choice = spec.optim.precision
    if device.type != "cuda":
        if choice in ("fp16", "bf16"):
            log.warning("precision %s requested on CPU: training in fp32", choice)
        return None, False
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "bf16":
        return torch.bfloat16, False
    if choice == "fp16":
        return torch.float16, True
    return None, False


def build_models(spec: JobSpec) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    m = spec.model
    shape = {
        k: v
        for k, v in (("depth", m.depth), ("embed_dim", m.embed_dim), ("num_heads", m.num_heads))
        if v is not None
    }
    return build_student_teacher(
        m.arch,
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate,
        img_size=m.img_size,
        out_dim=m.out_dim,
        hidden_dim=m.hidden_dim,
        bottleneck_dim=m.bottleneck_dim,
        nlayers=m.head_layers,
        use_bn=m.use_bn_in_head,
        norm_last_layer=m.norm_last_layer,
        **shape,
    )


def build_augment(spec: JobSpec) -> tuple[Any, Any]:
    """(per-sample transform for the data stream, batched stage to run on the device or None)."""
    c = spec.method.crops
    kw: dict[str, Any] = dict(
        global_size=c.global_size,
        local_size=c.local_size,
        n_local=c.n_local,
        global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale),
    )
    if spec.data.augment == "reference":
        return MultiCropAugment(**kw), None
    aug = BatchedMultiCropAugment(**kw)
    if spec.data.augment == "batched":
        return aug, None
    return aug.cpu_stage(), aug


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def _metrics_sink(spec: JobSpec, info: DistInfo, total_steps: int) -> MetricsSink:
    from dino_cluster.metrics_prom import exporter_sinks

    sinks: list[MetricsSink] = []
    if info.is_main:
        sinks += [JsonlSink(spec.run_dir / "metrics.jsonl"), ConsoleSink(total_steps)]
    # Every rank exports (Prometheus when metrics.prometheus, Ray's metrics under Ray).
    sinks += exporter_sinks(spec, info)
    return MultiSink(sinks) if sinks else NullSink()


def train(
    spec: JobSpec,
    *,
    report: ReportHook | None = None,
    stop: StopRequest | None = None,
    install_signal_handlers: bool = True,
) -> TrainResult:
    info = init_distributed(use_gpu=spec.launcher.gpus_per_node > 0 and torch.cuda.is_available())
    device = info.device
    if info.is_main:
        write_resolved(spec, spec.run_dir)

    # Same seed on every rank for the weights (DDP would broadcast them anyway); the
    # per-rank stream of randomness (drop path) is seeded after model construction.
    torch.manual_seed(spec.run.seed)
    student, teacher = build_models(spec)
    student.to(device)
    teacher.to(device)
    perf = spec.performance
    prepare_models(
        student,
        teacher,
        attention=perf.attention,
        channels_last=perf.channels_last,
        compile=perf.compile,
    )
    dino_loss = DINOLoss(
        spec.model.out_dim,
        spec.method.crops.n_crops,
        student_temp=spec.method.student_temp,
        center_momentum=spec.method.center_momentum,
    ).to(device)
    optimizer = build_optimizer(param_groups(student), lr=0.0, impl=perf.fused_optimizer)
    amp_dtype, use_scaler = _precision(spec, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    rng.seed_all(spec.run.seed + info.rank)

    ckpt = CheckpointManager(
        spec.checkpoint_url,
        storage_options=storage_options(spec),
        keep_last=spec.checkpoint.keep_last,
        keep_every=spec.checkpoint.keep_every_steps,
        upload_retries=spec.checkpoint.upload_retries,
        is_writer=info.is_main,
    )
    step, data_state = 0, None
    if spec.checkpoint.resume:
        loaded = ckpt.load(map_location="cpu")
        if loaded is not None:
            step, state = loaded
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            dino_loss.load_state_dict(state["dino_loss"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            meta = state["meta"]
            data_state = meta.get("data_position")
            # RNG streams continue where they were only when the world is unchanged.
            if meta.get("world_size") == info.world_size and meta.get("rng"):
                rng.set_state(meta["rng"], rank=info.rank)
            if info.is_main:
                log.info(
                    "resumed from step %d (written at world size %s, now %d)",
                    step,
                    meta.get("world_size"),
                    info.world_size,
                )

    transform, device_augment = build_augment(spec)
    stream = build_train_stream(
        spec.data.url,
        transform=transform,
        global_batch=spec.optim.global_batch,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=spec.data.num_workers,
        seed=spec.run.seed,
        shuffle_buffer=spec.data.shuffle_buffer,
        storage_options=storage_options(spec),
        state=data_state,
        max_image_pixels=spec.data.max_image_pixels,
        pin_memory=perf.pin_memory and device.type == "cuda",
    )
    ipe = stream.iters_per_epoch
    if ipe < 1:
        raise ValueError(
            f"{spec.data.url}: fewer samples than one global batch ({spec.optim.global_batch})"
        )
    o, me = spec.optim, spec.method
    epochs = o.epochs
    total_steps = epochs * ipe
    end_step = min(total_steps, o.max_steps) if o.max_steps else total_steps
    lr_sched = cosine_schedule(o.peak_lr, o.min_lr, epochs, ipe, warmup_epochs=o.warmup_epochs)
    wd_sched = cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, ipe)
    mom_sched = cosine_schedule(me.teacher_momentum, me.teacher_momentum_final, epochs, ipe)
    temp_sched = teacher_temp_schedule(
        me.warmup_teacher_temp, me.teacher_temp, me.warmup_teacher_temp_epochs, epochs, ipe
    )

    model: torch.nn.Module = student
    if info.distributed:
        model = DDP(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=perf.ddp_bucket_mb,
            static_graph=perf.ddp_static_graph,
        )
    train_step = TrainStep(
        model,
        teacher,
        dino_loss,
        optimizer,
        scaler,
        amp_dtype=amp_dtype,
        clip_grad=o.clip_grad,
        clip_mode=o.clip_mode,
        freeze_last_layer=o.freeze_last_layer,
        channels_last=perf.channels_last,
    )
    log_every = spec.metrics.log_every_steps

    stop = stop or StopRequest()
    if install_signal_handlers:
        stop.install(spec.checkpoint.on_signals)
    sink = _metrics_sink(spec, info, end_step)
    every = spec.checkpoint.every_steps

    def save(at_step: int, epoch: int, blocking: bool = False) -> None:
        state: dict[str, Any] = {
            "student": _unwrap(model).state_dict(),
            "teacher": teacher.state_dict(),
            "dino_loss": dino_loss.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else {},
            "meta": {
                "step": at_step,
                "epoch": epoch,
                "world_size": info.world_size,
                "data_position": stream.state_dict(gather=info.distributed),
                "rng": rng.get_state(gather=info.distributed),  # every rank's stream
                "spec": spec.model_dump(mode="json"),
                "iters_per_epoch": ipe,
            },
        }
        ckpt.save(at_step, state, blocking=blocking)
        last["checkpoint_stall_s"] = float(ckpt.last_stall_s or 0.0)
        last["checkpoint_failed_uploads"] = float(ckpt.failed_uploads)

    last: dict[str, float] = {}
    skipped = 0
    status = "completed"
    epoch = step // ipe
    window_t0, window_imgs, data_wait = time.perf_counter(), 0, 0.0
    report_wait = 0.0  # seconds spent in `report` (the launcher's hook), cumulative
    try:
        while step < end_step and status == "completed":
            epoch = step // ipe
            batches = stream.epoch_iter(epoch)
            t_fetch = time.perf_counter()
            step_at_epoch_start = step
            for crops in batches:
                data_wait += time.perf_counter() - t_fetch
                it = step  # global iteration index into the schedules
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_sched[it])
                    if group.get("name") == "regularized":  # biases and norms keep 0
                        group["weight_decay"] = float(wd_sched[it])
                if device_augment is not None:
                    # Photometric ops on the device; their parameters stay on the CPU.
                    *views, params = crops
                    views = [v.to(device, non_blocking=True) for v in views]
                    crops = device_augment.per_batch([*views, params])
                else:
                    crops = [c.to(device, non_blocking=True) for c in crops]
                loss = train_step(
                    crops,
                    epoch=epoch,
                    teacher_temp=float(temp_sched[it]),
                    momentum=float(mom_sched[it]),
                    stop_requested=stop.requested,
                )
                step += 1
                window_imgs += o.global_batch
                at_log = step % log_every == 0 or step == end_step
                stopping = False
                check = None
                if at_log or not train_step.sync_free:
                    # The host learns about skipped steps and stop requests here only: one
                    # sync per logging window on the sync-free path.
                    check = train_step.check(stop.requested)
                    skipped, stopping = check.skipped, check.stop
                if at_log:
                    elapsed = max(time.perf_counter() - window_t0, 1e-9)
                    ent = dino_loss.last_teacher_entropy
                    kl = dino_loss.last_kl
                    window_steps = max(round(window_imgs / o.global_batch), 1)
                    last.update(
                        {
                            "epoch": float(epoch),
                            "loss": float(loss.detach()),
                            "lr": float(lr_sched[it]),
                            "weight_decay": float(wd_sched[it]),
                            "teacher_momentum": float(mom_sched[it]),
                            "teacher_temp": float(temp_sched[it]),
                            "teacher_entropy": float(ent) if ent is not None else float("nan"),
                            "teacher_student_kl": float(kl) if kl is not None else float("nan"),
                            "images_per_s": window_imgs / elapsed,
                            "data_wait_frac": min(data_wait / elapsed, 1.0),
                            "skipped_steps": float(skipped),
                            "bad_samples": float(sum(stream.bad_samples.values())),
                            "student_teacher_kl": float(kl) if kl is not None else float("nan"),
                            "center_norm": float(dino_loss.center.norm()),
                            "step_time_s": elapsed / window_steps,
                            "world_size": float(info.world_size),
                            "report_wait_s": report_wait,
                            **checkpoint_values(ckpt),
                            **gpu_memory_values(device),
                        }
                    )
                    sink.log(step, last)
                    window_t0, window_imgs, data_wait = time.perf_counter(), 0, 0.0
                if check is not None and check.longest >= me.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{me.max_nonfinite_steps} consecutive non-finite losses (seen at step "
                        f"{step}, {check.skipped} skipped in all): stopping. Try precision "
                        "bf16/fp32, a lower optim.base_lr, optim.clip_grad, or a longer "
                        "teacher-temperature warm-up."
                    )

                at_epoch_end = step % ipe == 0
                due = (every and step % every == 0) or (not every and at_epoch_end)
                if stopping:
                    status = "stopped"
                    save(step, step // ipe, blocking=True)
                    break
                if step >= end_step:
                    status = "completed" if end_step == total_steps else "max_steps"
                    break
                if due:
                    save(step, step // ipe)
                if report is not None and (due or step % log_every == 0):
                    t_report = time.perf_counter()
                    report(dict(last), step if due else None)
                    # A report can block (Ray Train paces reports ~2 s apart by default):
                    # exported as its own figure and kept out of the step-time window, so
                    # images_per_s / step_time_s measure training, not the pacing.
                    waited = time.perf_counter() - t_report
                    report_wait += waited
                    window_t0 += waited
                t_fetch = time.perf_counter()
            else:
                if step == step_at_epoch_start:
                    raise RuntimeError(f"the data stream yielded no batch for epoch {epoch}")
                continue
            break
        if status in ("completed", "max_steps"):
            save(step, step // ipe, blocking=True)
            if report is not None:
                report(dict(last), step)
    finally:
        ckpt.close()
        sink.close()
        if install_signal_handlers:
            stop.restore()
    if ckpt.last_error is not None and info.is_main:
        log.error("some checkpoint uploads failed: %s", ckpt.last_error)
    digest = {
        "student": state_digest(_unwrap(model)),
        "teacher": state_digest(teacher),
        "center": state_digest({"center": dino_loss.center}),
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
        epoch=step // ipe,
        skipped_steps=skipped,
        last_metrics=last,
        digest=digest,
    )
