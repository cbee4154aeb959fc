"""One rank's run, assembled from the job spec: every component is built from its own
section (plus the few runtime facts: rank, world size, device), in a fixed order.

The order matters for bit-exact reproducibility: weights come from `run.seed` on every rank
(DDP would broadcast them anyway), then each rank's own random stream (drop path, crops) is
seeded, then a committed checkpoint, if any, replaces weights, optimizer, center, data
position and (at an unchanged world size) the random streams. The loop (loop.py) only
drives what this module returns; the launcher adds its hooks (`LaunchHooks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.checkpointing.objects import state_mismatch
from dino_cluster.data.stream import TrainStream
from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import MultiCropWrapper, build_student_teacher
from dino_cluster.dino.optim import build_optimizer, param_groups
from dino_cluster.dino.schedules import cosine_schedule, teacher_temp_schedule
from dino_cluster.metrics.sinks import ConsoleSink, JsonlSink, MetricsSink, MultiSink, NullSink
from dino_cluster.spec import CropsSpec, JobSpec, MethodSpec, ModelSpec, OptimSpec, SpecError
from dino_cluster.spec.bounds import MAX_TOTAL_STEPS
from dino_cluster.storage import StorageOptions
from dino_cluster.train import rng
from dino_cluster.train.distributed import DistInfo
from dino_cluster.train.step import TrainStep, prepare_models

log = logging.getLogger(__name__)

ReportHook = Callable[[dict[str, float], int | None], None]


@dataclass
class LaunchHooks:
    """What a launcher adds to a rank's run; nothing else of the launcher reaches training.

    report:     called at logging and checkpoint cadence with the metrics (and the step when
                a checkpoint was just saved); Ray Train's `report`
    exporters:  extra metric exporters fed like the Prometheus one (Ray's metrics)
    announce:   write Prometheus file-SD targets into the run folder (off where this process
                does not share the run folder, as Ray workers)
    """

    report: ReportHook | None = None
    exporters: Sequence[Any] = ()
    announce: bool = True


def build_models(model: ModelSpec) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    shape = {
        k: v
        for k, v in (
            ("depth", model.depth),
            ("embed_dim", model.embed_dim),
            ("num_heads", model.num_heads),
        )
        if v is not None
    }
    return build_student_teacher(
        model.arch,
        patch_size=model.patch_size,
        drop_path_rate=model.drop_path_rate,
        img_size=model.img_size,
        out_dim=model.out_dim,
        hidden_dim=model.hidden_dim,
        bottleneck_dim=model.bottleneck_dim,
        nlayers=model.head_layers,
        use_bn=model.use_bn_in_head,
        norm_last_layer=model.norm_last_layer,
        pos_embed_interpolation=model.pos_embed_interpolation,
        **shape,
    )


def build_augment(crops: CropsSpec, augment: str) -> tuple[Any, Any]:
    """(per-sample transform for the data stream, batched stage to run on the device or None).

    reference: the paper's PIL + torchvision ops per image; batched: both stages of
    BatchedMultiCropAugment in the data workers; fast: both stages of FastMultiCropAugment
    (compiled kernels) in the workers; gpu: FastMultiCropAugment's CPU stage (decode, crops,
    draws) in the workers and its photometric stage batched on the training device."""
    kw: dict[str, Any] = dict(
        global_size=crops.global_size,
        local_size=crops.local_size,
        n_local=crops.n_local,
        global_scale=tuple(crops.global_scale),
        local_scale=tuple(crops.local_scale),
    )
    if augment == "reference":
        from dino_cluster.dino.augment.reference import MultiCropAugment

        return MultiCropAugment(**kw), None
    if augment == "batched":
        from dino_cluster.dino.augment.batched import BatchedMultiCropAugment

        return BatchedMultiCropAugment(**kw), None
    if augment not in ("fast", "gpu"):
        raise ValueError(f"data.augment: unknown value {augment!r}")
    from dino_cluster.dino.augment.fast import FastMultiCropAugment

    fast = FastMultiCropAugment(**kw)
    if augment == "fast":
        return fast, None
    return fast.cpu_stage(), fast


def precision(optim: OptimSpec, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler) for `optim.precision` on `device`."""
    choice = optim.precision
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


@dataclass(frozen=True)
class Schedules:
    """Per-iteration values of the method's schedules (indexed by the global step)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def from_spec(cls, optim: OptimSpec, method: MethodSpec, iters_per_epoch: int) -> Schedules:
        o, me, ipe, epochs = optim, method, iters_per_epoch, optim.epochs
        return cls(
            lr=cosine_schedule(o.peak_lr, o.min_lr, epochs, ipe, warmup_epochs=o.warmup_epochs),
            weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, ipe),
            momentum=cosine_schedule(me.teacher_momentum, me.teacher_momentum_final, epochs, ipe),
            teacher_temp=teacher_temp_schedule(
                me.warmup_teacher_temp, me.teacher_temp, me.warmup_teacher_temp_epochs, epochs, ipe
            ),
        )

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[it]),
            "weight_decay": float(self.weight_decay[it]),
            "teacher_momentum": float(self.momentum[it]),
            "teacher_temp": float(self.teacher_temp[it]),
        }


@dataclass
class Run:
    """Everything one rank trains with (built by `assemble`)."""

    spec: JobSpec
    info: DistInfo
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    model: torch.nn.Module  # the student, DDP-wrapped when distributed
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_scaler: bool
    step_fn: TrainStep
    stream: TrainStream
    device_augment: Any  # the batched photometric stage run on the device, or None
    schedules: Schedules
    ckpt: CheckpointManager
    start_step: int
    end_step: int
    total_steps: int

    @property
    def iters_per_epoch(self) -> int:
        return self.stream.iters_per_epoch


class ResumeMismatchError(ValueError):
    """The committed checkpoint does not fit the spec (a user error: exit status 2)."""


# State-key prefixes -> the spec fields whose change most likely moved them.
_LIKELY_FIELD = (
    ("head.last_layer", "model.out_dim"),
    ("center", "model.out_dim"),
    ("head.", "model.hidden_dim / bottleneck_dim / head_layers / use_bn_in_head"),
    ("backbone.pos_embed", "model.img_size / model.patch_size / model.embed_dim"),
    ("backbone.patch_embed", "model.patch_size / model.embed_dim"),
    ("backbone.blocks.", "model.depth / model.embed_dim / model.num_heads"),
    ("backbone.", "model.arch / model.embed_dim"),
)


def _mismatch_error(step: int, url: str, key: str, problem: str) -> ResumeMismatchError:
    likely = next((f for prefix, f in _LIKELY_FIELD if key.startswith(prefix)), "model.*")
    return ResumeMismatchError(
        f"the checkpoint at step {step} in {url} does not fit this spec: {problem} (likely "
        f"changed: {likely}). Start over with --set checkpoint.resume=false, or keep that "
        "run and start a new one with --set run.name=NEW"
    )


def _resume(
    ckpt: CheckpointManager, info: DistInfo, parts: dict[str, Any]
) -> tuple[int, dict | None]:
    """Load the newest committed checkpoint into `parts`; (step, saved data position). A
    checkpoint that does not fit the spec is a ResumeMismatchError naming the first
    difference, never a size-mismatch traceback at every restart."""
    loaded = ckpt.load(map_location="cpu")
    if loaded is None:
        partial = ckpt.uncommitted_steps()
        if partial and info.is_main:
            log.warning(
                "no committed checkpoint in %s, only unfinished writes of step(s) %s: "
                "starting from step 0",
                ckpt.url,
                ", ".join(map(str, partial[:5])),
            )
        return 0, None
    step, state = loaded
    modules = ("student", "teacher", "dino_loss")
    for key in modules:
        found = state_mismatch(parts[key], state.get(key), key)
        if found:
            raise _mismatch_error(step, ckpt.url, *found)
    for key in modules:
        parts[key].load_state_dict(state[key])
    try:
        parts["optimizer"].load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as exc:
        raise _mismatch_error(step, ckpt.url, "optimizer", f"optimizer state: {exc}") from None
    if state.get("scaler"):
        parts["scaler"].load_state_dict(state["scaler"])
    meta = state["meta"]
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
    return step, meta.get("data_position")


def _check_steps(spec: JobSpec, ipe: int) -> None:
    """The spec against the dataset it met: at least one batch per epoch, and schedules
    (one value per step) of a size that fits in memory."""
    source = str(spec.run_dir / "spec.resolved.yaml")
    if ipe < 1:
        why = f"{spec.data.url} has fewer samples than one global batch"
        raise SpecError(source, [("data.url", f"{why} ({spec.optim.global_batch})")])
    total = spec.optim.epochs * ipe
    if total > MAX_TOTAL_STEPS:
        why = f"{spec.optim.epochs} epochs x {ipe} steps = {total} steps, over {MAX_TOTAL_STEPS}"
        raise SpecError(source, [("optim.epochs", f"{why}: lower it, or raise global_batch")])


def _networks(
    spec: JobSpec, device: torch.device
) -> tuple[MultiCropWrapper, MultiCropWrapper, DINOLoss, torch.optim.Optimizer]:
    """Student, teacher (same weights: one seed on every rank), loss and optimizer."""
    perf = spec.performance
    torch.manual_seed(spec.run.seed)
    student, teacher = build_models(spec.model)
    student.to(device)
    teacher.to(device)
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
    return student, teacher, dino_loss, optimizer


def assemble(spec: JobSpec, info: DistInfo) -> Run:
    device, perf = info.device, spec.performance
    student, teacher, dino_loss, optimizer = _networks(spec, device)
    amp_dtype, use_scaler = precision(spec.optim, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    rng.seed_all(spec.run.seed + info.rank)

    ckpt = CheckpointManager.from_spec(
        spec.checkpoint,
        spec.checkpoint_url,
        storage_options=StorageOptions.from_spec(spec.data.storage),
        is_writer=info.is_main,
    )
    step, data_state = 0, None
    if spec.checkpoint.resume:
        parts = dict(student=student, teacher=teacher, dino_loss=dino_loss, optimizer=optimizer)
        step, data_state = _resume(ckpt, info, {**parts, "scaler": scaler})

    transform, device_augment = build_augment(spec.method.crops, spec.data.augment)
    stream = TrainStream.from_spec(
        spec.data,
        transform=transform,
        global_batch=spec.optim.global_batch,
        seed=spec.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        state=data_state,
        pin_memory=perf.pin_memory and device.type == "cuda",
    )
    ipe = stream.iters_per_epoch
    _check_steps(spec, ipe)
    total = spec.optim.epochs * ipe
    end = min(total, spec.optim.max_steps) if spec.optim.max_steps else total

    model: torch.nn.Module = student
    if info.distributed:
        model = DDP(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=perf.ddp_bucket_mb,
            static_graph=perf.ddp_static_graph,
        )
    step_fn = TrainStep.from_spec(
        spec.optim, perf, model, teacher, dino_loss, optimizer, scaler, amp_dtype=amp_dtype
    )
    return Run(
        spec=spec,
        info=info,
        student=student,
        teacher=teacher,
        model=model,
        dino_loss=dino_loss,
        optimizer=optimizer,
        scaler=scaler,
        use_scaler=use_scaler,
        step_fn=step_fn,
        stream=stream,
        device_augment=device_augment,
        schedules=Schedules.from_spec(spec.optim, spec.method, ipe),
        ckpt=ckpt,
        start_step=step,
        end_step=end,
        total_steps=total,
    )


def build_exporters(spec: JobSpec, info: DistInfo, hooks: LaunchHooks) -> list[Any]:
    """This rank's metric exporters: Prometheus when `metrics.prometheus` (a fixed port P
    gives local rank r the port P + r), then the launcher's. An exporter that cannot start
    is a warning: training goes on without it."""
    exporters: list[Any] = []
    if spec.metrics.prometheus:
        from dino_cluster.metrics.catalogue import RunLabels, node_name
        from dino_cluster.metrics.prometheus import PrometheusSink, targets_files

        m = spec.metrics
        labels = RunLabels(spec.run.name, info.rank, node_name(), spec.launcher.backend)
        announce = targets_files(spec.run_dir, spec.run.name, info.rank) if hooks.announce else []
        try:
            exporters.append(
                PrometheusSink(
                    labels,
                    host=m.host,
                    port=m.port + info.local_rank if m.port else 0,
                    out_dim=spec.model.out_dim,
                    targets_files=announce,
                )
            )
        except OSError as exc:
            log.warning("metrics: Prometheus exporter not started: %s", exc)
    return exporters + list(hooks.exporters)


def build_sinks(spec: JobSpec, info: DistInfo, total_steps: int, hooks: LaunchHooks) -> MetricsSink:
    """Where this rank's metrics go: rank 0 writes RUN/metrics.jsonl and the console line;
    every rank exports (build_exporters), and rank 0 feeds the exporters what the
    checkpoint store says (evaluations, commits, restarts)."""
    sinks: list[MetricsSink] = []
    if info.is_main:
        sinks += [JsonlSink(spec.run_dir / "metrics.jsonl"), ConsoleSink(total_steps)]
    exporters = build_exporters(spec, info, hooks)
    sinks += exporters
    if exporters and info.is_main:
        sinks.append(_store_feed(spec, exporters))
    return MultiSink(sinks) if sinks else NullSink()


def _store_feed(spec: JobSpec, exporters: list[Any]) -> MetricsSink:
    from dino_cluster.metrics.store import (
        StoreState,
        StoreWatcher,
        StoreWatchingSink,
        poll_interval,
        read_store_state,
    )

    options = StorageOptions.from_spec(spec.data.storage)
    opened: list[CheckpointManager] = []

    def read() -> StoreState:
        if not opened:  # opened in the thread: a slow endpoint never delays the start
            opened.append(
                CheckpointManager(spec.checkpoint_url, storage_options=options, is_writer=False)
            )
        return read_store_state(opened[0], spec.run_dir)

    def publish(state: StoreState) -> None:
        for e in exporters:
            e.publish_store(state)

    return StoreWatchingSink(StoreWatcher(read, publish, poll_interval()))
