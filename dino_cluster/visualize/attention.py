"""The last block's CLS self-attention, per head, overlaid on the image (the paper's fig. 1).

The attention probabilities come from the model's own attention module: a forward pre-hook
on the last block's `attn` captures its input (the block's normed tokens), and the weights
are recomputed from the module's public parts, `softmax(q k^T * scale)` with q, k from its
`qkv` projection (and its q/k norms). timm's fused kernel never materialises those weights,
so they are recomputed, and checked: the module's output must equal `proj(weights @ v)`, or
the command stops rather than draw a map of something else (a timm version whose Attention
computes differently). Row 0 (the CLS query) over the patch keys, reshaped to the patch grid
and upsampled to the image by nearest neighbour (one block per patch), is what is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD
from dino_cluster.visualize import VisualizeError
from dino_cluster.visualize.draw import Cell, compose_grid, normalise01, overlay
from dino_cluster.visualize.source import VisImage, to_uint8

# The output of the recomputed attention must match the module's within this (fp32; the fused
# kernel and the explicit softmax differ by rounding only).
CHECK_ATOL = 1e-4
MAX_SIDE_RATIO = 4  # a panorama is cropped to at most 4:1 before it meets the model
_ATTN_PARTS = ("qkv", "num_heads", "head_dim", "scale", "proj")


class AttentionTransform:
    """Shorter side to `size` (bicubic), then centre-cropped so each side is a multiple of
    the patch size (the model sees whole patches only); pixels in [0, 1], not normalised."""

    def __init__(self, size: int, patch: int) -> None:
        if size < patch:
            raise VisualizeError(f"--size {size} is smaller than one {patch}-px patch")
        self.size, self.patch = size, patch

    def __call__(self, img: Image.Image) -> Tensor:
        img = TF.resize(img.convert("RGB"), self.size, interpolation=TF.InterpolationMode.BICUBIC)
        w, h = img.size
        longest = self.size * MAX_SIDE_RATIO
        crop_h = min(h, longest) // self.patch * self.patch
        crop_w = min(w, longest) // self.patch * self.patch
        return TF.to_tensor(TF.center_crop(img, [crop_h, crop_w]))


def last_attention(backbone: nn.Module) -> nn.Module:
    """The last block's attention module, if it is a timm `Attention`-like one."""
    blocks = getattr(backbone, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or any(not hasattr(attn, part) for part in _ATTN_PARTS):
        raise VisualizeError(
            f"{type(backbone).__name__} has no ViT attention (blocks[-1].attn with qkv, "
            "num_heads, head_dim, scale): attention maps need a timm ViT backbone"
        )
    return attn


def attention_probs(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax(q k^T * scale), v) of `attn` on its input tokens `x` (B, N, C): (B, h, N, N)."""
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:  # qk-norm ViTs (nn.Identity otherwise)
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1), v


def recomputed_output(attn: nn.Module, x: Tensor, probs: Tensor, v: Tensor) -> Tensor:
    """What `attn(x)` is if `probs` are its attention weights (timm's Attention.forward)."""
    batch, n, _ = x.shape
    out = (probs @ v).transpose(1, 2).reshape(batch, n, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj(out)


@torch.no_grad()
def cls_attention(backbone: nn.Module, images: Tensor) -> Tensor:
    """The CLS token's attention to every patch in the last block: (B, heads, rows, cols).

    `images` are normalised model inputs (B, 3, H, W) with H, W multiples of the patch size.
    """
    attn = last_attention(backbone)
    captured: dict[str, Any] = {}

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["x"]

    def post(_module: nn.Module, _args: tuple, _kwargs: dict, output: Tensor) -> None:
        captured["out"] = output

    hooks = [
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        attn.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        backbone.eval()
        backbone(images)
    finally:
        for h in hooks:
            h.remove()
    if "x" not in captured:
        raise VisualizeError("the backbone's forward did not reach its last attention block")
    x, out = captured["x"], captured["out"]
    probs, v = attention_probs(attn, x)
    if not torch.allclose(recomputed_output(attn, x, probs, v), out, atol=CHECK_ATOL, rtol=1e-3):
        raise VisualizeError(
            f"{type(attn).__name__} in this timm version does not compute softmax(q k^T) v "
            "from its qkv as expected: no attention map drawn"
        )
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    patch = int(backbone.patch_embed.patch_size[0])
    rows, cols = images.shape[-2] // patch, images.shape[-1] // patch
    if probs.shape[-1] - prefix != rows * cols:
        raise VisualizeError(
            f"{probs.shape[-1] - prefix} patch tokens for a {rows}x{cols} patch grid: "
            "unexpected token layout"
        )
    return probs[:, :, 0, prefix:].reshape(images.shape[0], attn.num_heads, rows, cols)


def upsample(grid: np.ndarray, patch: int) -> np.ndarray:
    """A (rows, cols) map to pixels, one patch-sized block per entry."""
    return np.kron(grid, np.ones((patch, patch)))


@dataclass
class AttentionFigure:
    path: Path
    size: tuple[int, int]
    heads: int


def attention_figure(
    image: VisImage, maps: Tensor, patch: int, tile: int, title: str
) -> Image.Image:
    """One row: the image, the mean over heads, then each head, overlaid on the image."""
    pixels = to_uint8(image.pixels)
    maps_np = maps.float().cpu().numpy()
    cells = [Cell(Image.fromarray(pixels), image.label or "image")]
    # Each map is scaled to its own min-max: heads differ in spread, and what a head looks at
    # is its ordering of patches, not its absolute probabilities.
    mean = normalise01(upsample(maps_np.mean(axis=0), patch))
    cells.append(Cell(Image.fromarray(overlay(pixels, mean)), "mean of heads"))
    for h, grid in enumerate(maps_np):
        heat = normalise01(upsample(grid, patch))
        cells.append(Cell(Image.fromarray(overlay(pixels, heat)), f"head {h}"))
    return compose_grid([cells], tile, title)


def write_attention(
    backbone: nn.Module,
    images: Iterable[VisImage],
    out_dir: Path,
    *,
    tile: int,
    title: str,
    device: torch.device,
) -> list[AttentionFigure]:
    """One PNG per image, `<name>-attention.png` in `out_dir` (names made unique)."""
    backbone.to(device)
    patch = int(backbone.patch_embed.patch_size[0])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[AttentionFigure] = []
    used: set[str] = set()
    for image in images:
        model_input = ((image.pixels.unsqueeze(0) - mean) / std).to(device)
        maps = cls_attention(backbone, model_input)[0]
        label = f" ({image.label})" if image.label else ""
        fig = attention_figure(image, maps, patch, tile, f"{image.name}{label}   {title}")
        stem, n = image.name, 1
        while stem in used:
            n += 1
            stem = f"{image.name}-{n}"
        used.add(stem)
        path = out_dir / f"{stem}-attention.png"
        fig.save(path, format="PNG")
        written.append(AttentionFigure(path, fig.size, int(maps.shape[0])))
    return written
