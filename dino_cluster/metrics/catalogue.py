"""The one catalogue of what the exporters publish: which key of the logged `values`
becomes which metric, its kind and help text, and the labels on every series.

The Prometheus exporter (prometheus.py), the Ray exporter (ray_sink.py), the alert rules and
the Grafana dashboard all use these names (tests keep the last two in step).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

MetricKind = Literal["gauge", "counter", "histogram"]

# The Prometheus file-SD folder an operator's Prometheus reads: ranks put their targets
# there (<run>-rank-N.json), a private local Ray a link to its own (ray/*.json).
SD_DIR_ENV = "DINO_PROMETHEUS_SD_DIR"

# Labels on every exported series: which run, which rank on which node, launched how.
LABELS = ("run", "rank", "node", "backend")

# Step time buckets (seconds): a tiny CPU model is ~0.05 s/step, ViT-B/8 on a slow input
# pipeline several seconds.
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # Prometheus name; counters are exposed with a `_total` suffix
    kind: MetricKind
    help: str
    key: str | None = None  # key in the logged values (None: set by the exporter itself)


EXPORTED: tuple[MetricDef, ...] = (
    MetricDef("dino_step", "gauge", "Optimizer steps done (global iteration)"),
    MetricDef("dino_last_log_timestamp_seconds", "gauge", "Unix time of the last logged step"),
    MetricDef("dino_start_timestamp_seconds", "gauge", "Unix time this rank's exporter started"),
    MetricDef("dino_log_out_dim", "gauge", "log(model.out_dim): the entropy of a uniform teacher"),
    MetricDef("dino_epoch", "gauge", "Current epoch", "epoch"),
    MetricDef("dino_loss", "gauge", "DINO loss of the last logged step (NaN if skipped)", "loss"),
    MetricDef("dino_lr", "gauge", "Learning rate", "lr"),
    MetricDef("dino_weight_decay", "gauge", "Weight decay", "weight_decay"),
    MetricDef("dino_teacher_momentum", "gauge", "Teacher EMA momentum", "teacher_momentum"),
    MetricDef("dino_teacher_temp", "gauge", "Teacher temperature", "teacher_temp"),
    MetricDef(
        "dino_teacher_entropy", "gauge", "Mean entropy of the teacher output", "teacher_entropy"
    ),
    MetricDef(
        "dino_student_teacher_kl", "gauge", "Student-teacher KL divergence", "student_teacher_kl"
    ),
    MetricDef("dino_center_norm", "gauge", "L2 norm of the DINO center", "center_norm"),
    MetricDef("dino_images_per_second", "gauge", "Training images per second", "images_per_s"),
    MetricDef(
        "dino_data_wait_ratio",
        "gauge",
        "Fraction of wall time spent waiting for data",
        "data_wait_frac",
    ),
    MetricDef(
        "dino_step_seconds",
        "histogram",
        "Step time (one observation per logging window)",
        "step_time_s",
    ),
    MetricDef(
        "dino_nonfinite_steps_skipped",
        "counter",
        "Steps skipped for a non-finite loss",
        "skipped_steps",
    ),
    MetricDef("dino_bad_samples", "counter", "Unreadable samples skipped", "bad_samples"),
    MetricDef(
        "dino_checkpoint_stall_seconds",
        "gauge",
        "Training time spent in the last save()",
        "checkpoint_stall_s",
    ),
    MetricDef(
        "dino_checkpoint_upload_seconds",
        "gauge",
        "Background serialise+upload+commit time of the last checkpoint",
        "checkpoint_upload_s",
    ),
    MetricDef(
        "dino_checkpoint_failed_uploads",
        "counter",
        "Checkpoint uploads that failed",
        "checkpoint_failed_uploads",
    ),
    MetricDef(
        "dino_checkpoint_commits",
        "counter",
        "Checkpoints committed by this process",
        "checkpoint_commits",
    ),
    MetricDef(
        "dino_checkpoint_last_committed_step",
        "gauge",
        "Step of the newest committed checkpoint",
        "checkpoint_last_step",
    ),
    MetricDef(
        "dino_checkpoint_last_commit_timestamp_seconds",
        "gauge",
        "Unix time the newest checkpoint was seen committed",
    ),
    MetricDef("dino_restarts", "gauge", "Restarts of the run (SLURM requeues)", "restarts"),
    MetricDef("dino_world_size", "gauge", "Number of training ranks", "world_size"),
    MetricDef("dino_eta_seconds", "gauge", "Estimated seconds until the run's last step", "eta_s"),
    MetricDef(
        "dino_report_wait_seconds",
        "counter",
        "Training time spent handing metrics/checkpoints to the launcher (Ray Train report)",
        "report_wait_s",
    ),
    MetricDef(
        "dino_gpu_memory_allocated_bytes",
        "gauge",
        "CUDA memory allocated by tensors",
        "gpu_memory_allocated_bytes",
    ),
    MetricDef(
        "dino_gpu_memory_reserved_bytes",
        "gauge",
        "CUDA memory reserved by the allocator",
        "gpu_memory_reserved_bytes",
    ),
    MetricDef(
        "dino_gpu_memory_max_allocated_bytes",
        "gauge",
        "Peak CUDA memory allocated",
        "gpu_memory_max_allocated_bytes",
    ),
)

# Evaluation results read from the checkpoint store (rank 0), with extra labels.
EVAL_TOP1 = MetricDef("dino_eval_top1", "gauge", "Top-1 accuracy (0-1) of the newest evaluation")
EVAL_STEP = MetricDef("dino_eval_checkpoint_step", "gauge", "Checkpoint step of that evaluation")
EVAL_FAILED = MetricDef(
    "dino_eval_failed", "gauge", "1 when the newest evaluation of this kind failed"
)
EVAL_METRICS = (EVAL_TOP1, EVAL_STEP, EVAL_FAILED)


def exported_names(*, with_suffixes: bool = True) -> set[str]:
    """Every metric the exporters publish: family names, or (with_suffixes) the series names
    Prometheus stores (counters as _total/_created, histograms as _bucket/_sum/_count/...)."""
    names: set[str] = set()
    for m in (*EXPORTED, *EVAL_METRICS):
        if not with_suffixes or m.kind == "gauge":
            names.add(m.name)
        elif m.kind == "counter":
            names.update({f"{m.name}_total", f"{m.name}_created"})
        else:
            names.update(f"{m.name}_{s}" for s in ("bucket", "sum", "count", "created"))
    return names


@dataclass(frozen=True)
class RunLabels:
    run: str
    rank: int
    node: str
    backend: str

    def as_dict(self) -> dict[str, str]:
        return {"run": self.run, "rank": str(self.rank), "node": self.node, "backend": self.backend}


def node_name() -> str:
    # SLURM's node name is what operators see in squeue; otherwise the host (pod) name.
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class CounterTracker:
    """Turns the loop's running totals into counter increments (a restarted process starts
    again from 0, which Prometheus' rate()/increase() read as a counter reset)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def delta(self, key: str, total: float) -> float:
        before = self._seen.get(key, 0.0)
        self._seen[key] = total
        return total - before if total > before else 0.0


def exported_updates(
    values: dict[str, float], counters: CounterTracker
) -> Iterator[tuple[MetricDef, float]]:
    """(metric, value) pairs for the keys present in `values`: gauges get the value,
    histograms one observation, counters the increment since the last call."""
    for m in EXPORTED:
        if m.key is None or m.key not in values:
            continue
        v = float(values[m.key])
        if m.kind == "counter":
            if math.isfinite(v):
                yield m, counters.delta(m.key, v)
        elif m.kind == "histogram":
            if math.isfinite(v) and v >= 0:
                yield m, v
        else:
            yield m, v


def checkpoint_values(ckpt: Any) -> dict[str, float]:
    """Checkpoint counters of the writing rank (a CheckpointManager), for the logged values."""
    if not getattr(ckpt, "is_writer", False):
        return {}
    out = {
        "checkpoint_commits": float(ckpt.commits),
        "checkpoint_upload_s": float(ckpt.last_upload_s or 0.0),
    }
    if ckpt.last_committed_step is not None:
        out["checkpoint_last_step"] = float(ckpt.last_committed_step)
    return out


def gpu_memory_values(device: Any) -> dict[str, float]:
    """CUDA allocator figures for `device` (empty on CPU)."""
    if getattr(device, "type", None) != "cuda":
        return {}
    import torch

    return {
        "gpu_memory_allocated_bytes": float(torch.cuda.memory_allocated(device)),
        "gpu_memory_reserved_bytes": float(torch.cuda.memory_reserved(device)),
        "gpu_memory_max_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
    }
