"""Small evaluation export in the key layout of the public DINO reference checkpoints.

The reference ``*_full_checkpoint.pth`` files hold ``{"teacher": {...}, "student": {...}}``
with ``backbone.*`` / ``head.*`` keys and the head's weight-normalised last layer stored as
``head.last_layer.weight_g`` / ``weight_v``; existing DINO evaluation tools strip ``module.``
and ``backbone.`` themselves. Our state already uses ``backbone.*`` / ``head.*``; only
wrapper prefixes and the weight-norm parametrisation need renaming.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any, Protocol

from dino_cluster.checkpointing.layout import (
    CheckpointNotFoundError,
    Manifest,
    step_dir,
)
from dino_cluster.dino.keys import reference_state_dict
from dino_cluster.storage import ObjectStore, StorageOptions, open_store, split_url

# DDP and torch.compile wrap modules; their prefixes are not part of the model's layout.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EXPORT_NAME = "export/teacher.pth"


class Checkpoints(Protocol):
    """What an export reads (a CheckpointManager)."""

    store: ObjectStore
    storage_options: StorageOptions | None
    spool_dir: str | None

    def read_manifest(self, step: int) -> Manifest: ...

    def load(
        self, step: int | None = None, *, keys: list[str] | None = None, fallback: bool = True
    ) -> tuple[int, dict[str, Any]] | None: ...


def reference_layout(model_state: Mapping[str, Any], what: str = "model") -> dict[str, Any]:
    """``backbone.*`` / ``head.*`` state -> reference key layout (plain CPU tensors)."""
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{what} state is a {type(model_state).__name__}, not a state dict")
    import torch

    stripped: dict[str, Any] = {}
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{what} state entry {key!r} is not a named tensor")
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        stripped[key] = value.detach().to("cpu").contiguous()
    out = reference_state_dict(stripped)
    odd = sorted(k for k in out if not k.startswith(("backbone.", "head.")))
    if odd:
        raise ValueError(
            f"{what} state has keys outside backbone.*/head.* (first: {odd[0]!r}); "
            "the reference layout has only those two"
        )
    return out


def export_teacher(
    manager: Checkpoints,
    step: int,
    dest_url: str | None = None,
    *,
    include_student: bool = True,
) -> str:
    """Write ``{"teacher": ..., "student": ..., "step": step}`` for committed ``step``."""
    names = manager.read_manifest(step).objects
    keys = ["teacher"]
    if include_student and any(o.state_key == "student" for o in names):
        keys.append("student")
    loaded = manager.load(step, keys=keys, fallback=False)
    if loaded is None:  # load(step) raises instead; kept for type checkers
        raise CheckpointNotFoundError(f"no committed checkpoint at step {step}")
    _, state = loaded
    payload: dict[str, Any] = {k: reference_layout(state[k], k) for k in keys}
    payload["step"] = step
    if dest_url is None:
        store, name = manager.store, f"{step_dir(step)}/{EXPORT_NAME}"
    else:
        parent, name = split_url(dest_url)
        store = open_store(parent, manager.storage_options)
    import torch

    with tempfile.TemporaryDirectory(prefix="dino-export-", dir=manager.spool_dir) as tmp:
        path = os.path.join(tmp, "teacher.pth")
        torch.save(payload, path)
        store.upload_file(name, path)
    return store.url_for(name)
