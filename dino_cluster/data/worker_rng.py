"""The random state of a data worker process, captured and restored, so that a resumed stream
draws the same augmentations as one never stopped.

A DataLoader worker seeds torch's, Python's and numpy's global generators from the loader's
base seed when it starts; an augmentation (reference: torch + `random`; batched: torch) then
draws from them sample after sample. Restarting the worker restarts those streams, so a
mid-epoch resume saw the same samples with other crops. The worker therefore sends, with each
chunk, the state of all three generators as it was when the chunk was complete, and the data
position stores the one that matches the last batch the trainer got (see progress.py).

`RngState` holds the states in their native forms (cheap to capture per chunk); `to_json` /
`from_json` turn them into the JSON-able strings and numbers of a data position. Nothing here
is pickled: a checkpoint's data position is plain data, checked when read.
Without data workers the augmentation draws from the training process's own generators, which
the checkpoint stores itself: nothing is captured then.
"""

from __future__ import annotations

import base64
import random
import struct
from dataclasses import dataclass
from typing import Any

_MT_WORDS = 624  # Mersenne Twister state words, in Python's and numpy's generators alike


@dataclass(frozen=True)
class RngState:
    torch: bytes  # torch.get_rng_state() (CPU generator)
    python: tuple  # random.getstate(): (version, 625 ints, gauss_next)
    numpy: tuple | None  # ("MT19937", keys as bytes, pos, has_gauss, cached_gaussian)

    def to_json(self) -> dict[str, Any]:
        version, internal, gauss = self.python
        doc: dict[str, Any] = {
            "torch": base64.b64encode(self.torch).decode(),
            "python": [version, _pack_words(internal), gauss],
        }
        if self.numpy is not None:
            name, keys, pos, has_gauss, cached = self.numpy
            doc["numpy"] = [name, base64.b64encode(keys).decode(), pos, has_gauss, cached]
        return doc

    @classmethod
    def from_json(cls, doc: object) -> RngState:
        """Inverse of to_json; ValueError for anything that is not such a state."""
        try:
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            torch_state = base64.b64decode(doc["torch"], validate=True)
            version, words, gauss = doc["python"]
            internal = _unpack_words(words)
            if len(internal) != _MT_WORDS + 1 or not isinstance(version, int):
                raise ValueError("python state of the wrong size")
            if gauss is not None and not isinstance(gauss, float):
                raise ValueError("python gauss_next is not a number")
            numpy_state = None
            if doc.get("numpy") is not None:
                name, keys, pos, has_gauss, cached = doc["numpy"]
                raw = base64.b64decode(keys, validate=True)
                if name != "MT19937" or len(raw) != 4 * _MT_WORDS:
                    raise ValueError("numpy state is not MT19937")
                numpy_state = (name, raw, int(pos), int(has_gauss), float(cached))
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise ValueError(f"malformed worker random state: {exc}") from None
        return cls(torch_state, (version, internal, gauss), numpy_state)


def _pack_words(words: tuple[int, ...]) -> str:
    return base64.b64encode(struct.pack(f"<{len(words)}I", *words)).decode()


def _unpack_words(text: str) -> tuple[int, ...]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("python state is not whole 32-bit words")
    return struct.unpack(f"<{len(raw) // 4}I", raw)


def capture() -> RngState:
    """The current state of this process's torch, Python and numpy global generators."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (str(name), np.asarray(keys, dtype="<u4").tobytes(), int(pos), int(has_gauss),
                   float(cached))  # fmt: skip
    return RngState(torch.get_rng_state().numpy().tobytes(), random.getstate(), numpy_state)


def restore(state: RngState) -> None:
    """Set this process's global generators to `state` (in a data worker, before reading)."""
    import numpy as np
    import torch

    torch.set_rng_state(torch.frombuffer(bytearray(state.torch), dtype=torch.uint8))
    random.setstate(state.python)
    if state.numpy is not None:
        name, keys, pos, has_gauss, cached = state.numpy
        np.random.set_state((name, np.frombuffer(keys, dtype="<u4").copy(), pos, has_gauss, cached))


def fits_this_torch(state: RngState) -> bool:
    """A torch state from another torch build may have another size; set_rng_state would
    then fail inside a worker, so the caller falls back to fresh seeds instead."""
    import torch

    return len(state.torch) == torch.get_rng_state().numel()
