"""Checkpoints in object storage: atomic, async, verified, resumable, retained.

See manager.py for the flow and layout.py for what lands in the store.
"""

from dino_cluster.checkpointing.export import export_teacher, reference_layout
from dino_cluster.checkpointing.layout import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointNotFoundError,
    Manifest,
    ManifestError,
    ManifestObject,
    step_dir,
)
from dino_cluster.checkpointing.manager import CheckpointManager
from dino_cluster.checkpointing.retention import plan_retention, select_retained
from dino_cluster.checkpointing.table import render_table

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "Manifest",
    "ManifestError",
    "ManifestObject",
    "export_teacher",
    "plan_retention",
    "reference_layout",
    "render_table",
    "select_retained",
    "step_dir",
]
