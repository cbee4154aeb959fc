"""Pictures of what a run learned: attention maps, nearest neighbours, run plots (PNG).

    attention.py   the last block's CLS self-attention per head, overlaid on the image
    neighbours.py  queries and their k nearest bank images by teacher CLS feature (cosine)
    plot.py        loss, teacher entropy, KL, lr and each checkpoint's k-NN against steps
    draw.py        the PIL drawing these share: colour map, tiled grids, line panels
    source.py      checkpoints (run folder, checkpoint root, step folder) and images (files,
                   shards on file:// or s3://) as the commands take them
    cli.py         `dino-cluster visualize attention|neighbours` and `dino-cluster plot`

Drawing is PIL only (no plotting library): the pictures are simple and the command starts
fast. This module imports nothing: `VisualizeError` is what the commands report as a one-line
user mistake (exit status 2).
"""

from __future__ import annotations


class VisualizeError(ValueError):
    """A user mistake: a missing file, a run with no metrics, a checkpoint that does not fit."""
