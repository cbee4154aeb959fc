"""One state key as one stored object: torch.save into the spool while hashing, torch.load
back (weights_only), and the finiteness check both directions apply. torch is imported
inside these functions: listing checkpoints never needs it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from dino_cluster.checkpointing.layout import (
    OBJECT_SUFFIX,
    CheckpointError,
    HashingWriter,
    ManifestObject,
)


def torch_save(value: Any, f: Any) -> None:
    import torch

    torch.save(value, f)


def torch_load(path: str, **kwargs: Any) -> Any:
    import torch

    return torch.load(path, **kwargs)


def serialise(key: str, value: Any, spool: str, tag: str) -> tuple[ManifestObject, str]:
    """torch.save `value` into the spool, hashing as it writes; (its manifest entry, path)."""
    name = f"{key}.{tag}{OBJECT_SUFFIX}" if tag else key + OBJECT_SUFFIX
    path = os.path.join(spool, name)
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch_save(value, writer)
        writer.flush()
    obj = ManifestObject(name=name, size=writer.size, sha256=writer.hexdigest(), key=key)
    return obj, path


def _non_finite(value: Any, where: str) -> str | None:
    """The first floating-point tensor in `value` (nested dicts/lists) holding inf or NaN."""
    if hasattr(value, "is_floating_point") and hasattr(value, "isfinite"):
        if value.is_floating_point() and value.numel() and not bool(value.isfinite().all()):
            return where
        return None
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}")
        if found:
            return found
    return None


def refuse_non_finite(
    step: int, state: dict[str, Any], error: type[CheckpointError] = CheckpointError
) -> None:
    """A state holding inf/NaN is never committed, and never loaded (load falls back to the
    previous committed checkpoint, as for a failed checksum): training on from it would
    only spread the NaN into every later checkpoint."""
    for key, value in state.items():
        found = _non_finite(value, key)
        if found:
            raise error(f"checkpoint step {step}: {found} holds non-finite values (inf or NaN)")


def state_mismatch(module: Any, state: Any, what: str) -> tuple[str, str] | None:
    """The first difference between `module`'s state and a saved one: (key, in words)."""
    ours = module.state_dict()
    if state is None:
        return what, f"the checkpoint has no {what}"
    if not isinstance(state, dict):
        return what, f"{what} is a {type(state).__name__}, not a state dict"
    for key, value in ours.items():
        if key not in state:
            return key, f"{what} has no {key}"
        shape = tuple(getattr(state[key], "shape", ()))
        if shape != tuple(value.shape):
            return key, f"{what} {key} has shape {shape}, the spec's model {tuple(value.shape)}"
    extra = sorted(set(state) - set(ours))
    if extra:
        return extra[0], f"{what} has {extra[0]}, which the spec's model does not"
    return None
