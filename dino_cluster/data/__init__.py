"""WebDataset shards: `pack` (images -> shards) and `build_train_stream` (shards -> batches)."""

from dino_cluster.data.decode import BadSample
from dino_cluster.data.pack import pack
from dino_cluster.data.position import merge_states
from dino_cluster.data.reader import DataError
from dino_cluster.data.shards import ShardInfo, ShardSet, resolve_shards
from dino_cluster.data.stream import Batch, TrainStream, build_train_stream

__all__ = [
    "BadSample",
    "Batch",
    "DataError",
    "ShardInfo",
    "ShardSet",
    "TrainStream",
    "build_train_stream",
    "merge_states",
    "pack",
    "resolve_shards",
]
