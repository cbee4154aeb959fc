"""Helpers shared by the data tests: tiny transforms and hand-made tar / image bytes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_transform(img: Image.Image) -> list[torch.Tensor]:
    """Two 'crops' of an image, small enough to keep tests fast; shapes differ like DINO's."""
    arr = np.asarray(img.resize((8, 8)), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return [t, t[:, :4, :4].clone()]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def png_bytes(value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> bytes:
    img = Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=90)
    return out.getvalue()


def read_tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
