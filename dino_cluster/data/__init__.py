"""WebDataset shards: pack.py (images -> shards; `from dino_cluster.data.pack import pack`),
`TrainStream` (shards -> multi-crop batches, split over ranks and data workers, resumable),
the labelled reader for evaluation.

The names below are loaded on first use (PEP 562), so `import dino_cluster.data.shards` or
the CLI's `data` commands do not pay for torch until a stream is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BadSample": "dino_cluster.data.decode",
    "Batch": "dino_cluster.data.stream",
    "DataError": "dino_cluster.data.reader",
    "ShardInfo": "dino_cluster.data.shards",
    "ShardSet": "dino_cluster.data.shards",
    "TrainStream": "dino_cluster.data.stream",
    "build_train_stream": "dino_cluster.data.stream",
    "merge_states": "dino_cluster.data.position",
    "resolve_shards": "dino_cluster.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    # Cache it here: importing a submodule sets the package attribute of the same name
    # (`pack` the module), which must not shadow the function exported under that name.
    globals()[name] = value
    return value
