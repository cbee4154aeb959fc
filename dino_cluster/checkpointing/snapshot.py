"""Copy a training state to host memory, the only part of a checkpoint the loop waits for.

Also the gate that keeps checkpoints loadable with ``torch.load(weights_only=True)``: anything
but tensors, primitives and plain containers is refused here, in the caller's thread, with the
path of the offending value, instead of failing later in the upload thread or at resume.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

# What torch.load(weights_only=True) reads back without extra allow-listing.
_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


class HostSnapshot:
    """Copies nested state into host buffers that are reused from one checkpoint to the next.

    Reuse matters for the stall: writing into already-faulted (and, for CUDA, pinned) pages is
    several times faster than allocating fresh ones for a 1 GB state. The caller must not start
    a new copy while the previous one is still being serialised (CheckpointManager waits).
    """

    def __init__(self, reuse_buffers: bool = True) -> None:
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, state: Any) -> Any:
        used: dict[str, torch.Tensor] = {}
        cuda = [False]
        out = self._copy(state, "state", used, cuda)
        if cuda[0]:
            # Device-to-host copies were issued non-blocking into pinned memory.
            torch.cuda.synchronize()
        self._buffers = used if self.reuse_buffers else {}
        return out

    def release(self) -> None:
        self._buffers = {}

    def _copy(self, obj: Any, path: str, used: dict[str, torch.Tensor], cuda: list[bool]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, path, used, cuda)
        if type(obj) in _PRIMITIVES:  # exact: numpy.float64 subclasses float but won't load
            return obj
        if isinstance(obj, torch.Size):
            return torch.Size(obj)
        if isinstance(obj, dict):
            if type(obj) not in (dict, OrderedDict):
                raise _refuse(obj, path)
            items = []
            for key, value in obj.items():
                if type(key) not in _PRIMITIVES:
                    raise ValueError(
                        f"checkpoint state {path}: dict key {key!r} is a {type(key).__name__}; "
                        "keys must be str, int or another primitive"
                    )
                items.append((key, self._copy(value, f"{path}[{key!r}]", used, cuda)))
            return OrderedDict(items) if type(obj) is OrderedDict else dict(items)
        if type(obj) in (list, tuple, set, frozenset):
            copied = [self._copy(v, f"{path}[{i}]", used, cuda) for i, v in enumerate(obj)]
            return type(obj)(copied)
        raise _refuse(obj, path)

    def _copy_tensor(
        self, t: torch.Tensor, path: str, used: dict[str, torch.Tensor], cuda: list[bool]
    ) -> torch.Tensor:
        if t.layout != torch.strided or t.is_quantized:
            raise ValueError(f"checkpoint state {path}: only dense tensors are supported")
        src = t.detach()
        on_cuda = src.is_cuda
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or path in used:
            buf = torch.empty(
                src.shape, dtype=src.dtype, device="cpu", pin_memory=on_cuda and _can_pin()
            )
        buf.copy_(src, non_blocking=on_cuda)
        cuda[0] = cuda[0] or on_cuda
        used[path] = buf
        return buf


def _can_pin() -> bool:
    return torch.cuda.is_available()


def _refuse(obj: Any, path: str) -> ValueError:
    hint = ""
    if type(obj).__module__ == "numpy":
        hint = " (convert numpy arrays with torch.from_numpy and numpy scalars with .item())"
    return ValueError(
        f"checkpoint state {path} is a {type(obj).__module__}.{type(obj).__qualname__}; "
        f"only tensors, primitives, dicts, lists and tuples can be checkpointed so that "
        f"torch.load(weights_only=True) reads them back{hint}"
    )
