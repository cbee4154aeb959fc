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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from dino_cluster.checkpointing.layout import OBJECT_SUFFIX, CheckpointNotFoundError, step_dir
from dino_cluster.storage import open_store, split_url

if TYPE_CHECKING:
    from dino_cluster.checkpointing.manager import CheckpointManager

# DDP and torch.compile wrap modules; their prefixes are not part of the model's layout.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PARAMETRIZED = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}
EXPORT_NAME = "export/teacher.pth"


def _renamer() -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    try:  # the method's own mapping, when the dino package provides it
        from dino_cluster.dino.model import reference_state_dict
    except ImportError:
        return _rename_weight_norm
    return reference_state_dict


def _rename_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for ours, ref in _PARAMETRIZED.items():
            if key.endswith(ours):
                key = key[: -len(ours)] + ref
                break
        out[key] = value
    return out


def reference_layout(model_state: Mapping[str, Any], what: str = "model") -> dict[str, Any]:
    """``backbone.*`` / ``head.*`` state -> reference key layout (plain CPU tensors)."""
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{what} state is a {type(model_state).__name__}, not a state dict")
    stripped: dict[str, torch.Tensor] = {}
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
    out = _renamer()(stripped)
    odd = sorted(k for k in out if not k.startswith(("backbone.", "head.")))
    if odd:
        raise ValueError(
            f"{what} state has keys outside backbone.*/head.* (first: {odd[0]!r}); "
            "the reference layout has only those two"
        )
    return out


def export_teacher(
    manager: CheckpointManager,
    step: int,
    dest_url: str | None = None,
    *,
    include_student: bool = True,
) -> str:
    """Write ``{"teacher": ..., "student": ..., "step": step}`` for committed ``step``."""
    names = manager.read_manifest(step).objects
    keys = ["teacher"]
    if include_student and any(o.name == "student" + OBJECT_SUFFIX for o in names):
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
    with tempfile.TemporaryDirectory(prefix="dino-export-", dir=manager.spool_dir) as tmp:
        path = os.path.join(tmp, "teacher.pth")
        torch.save(payload, path)
        store.upload_file(name, path)
    return store.url_for(name)
