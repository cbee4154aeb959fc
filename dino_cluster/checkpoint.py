"""Checkpoints: save / commit / list / load / retain through storage.

The implementation lives in ``dino_cluster.checkpointing``; this module is the stable import
path named in the design (``from dino_cluster.checkpoint import CheckpointManager``).
"""

from dino_cluster.checkpointing import *  # noqa: F403
from dino_cluster.checkpointing import __all__  # noqa: F401
