"""RNG state as plain lists and tensors, so checkpoints load with weights_only=True.

Every rank draws its own stream (drop path, on-device augmentation), seeded from
(seed + rank). A checkpoint stores all of them, gathered to the writer rank, so a resume at
the same world size continues each rank's stream where it stopped: multi-rank runs resume
bit-exactly like single-process ones. After a resize the streams start again from the seeds
(which rank would continue which stream is not defined then).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_state(gather: bool = False) -> list[dict[str, Any]]:
    """This process's RNG state, as a one-item list; with `gather` and torch.distributed
    initialised, every rank's state in rank order (a collective: call it on every rank)."""
    own = _own_state()
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, own)
        return states
    return [own]


def set_state(states: list[dict[str, Any]] | dict[str, Any], rank: int = 0) -> None:
    """Restore rank `rank`'s stream from `get_state`'s list. A rank with no saved state keeps
    its fresh seed. (A bare dict is the format before per-rank states: rank 0's only.)"""
    if isinstance(states, dict):
        states = [states]
    if 0 <= rank < len(states):
        _set_own(states[rank])


def _own_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_own(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
