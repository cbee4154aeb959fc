"""DINO networks: a timm backbone, the DINO projection head, and the multi-crop wrapper.

Student and teacher share one architecture: backbone -> (CLS or pooled feature) -> DINOHead.
The head is an MLP to a 256-d bottleneck, L2-normalised, followed by a weight-normalised
linear layer onto `out_dim` prototypes (65,536 by default).

Parameter names of the weight-normalised last layer
---------------------------------------------------
We use `torch.nn.utils.parametrizations.weight_norm` (the maintained API). Its parameters are

    last_layer.parametrizations.weight.original0   the gain g, shape (out_dim, 1)
    last_layer.parametrizations.weight.original1   the direction v, shape (out_dim, bottleneck)

The public reference checkpoints (old `torch.nn.utils.weight_norm`) call the same tensors
`last_layer.weight_g` and `last_layer.weight_v`. `reference_state_dict` and
`from_reference_state_dict` (keys.py) translate between the two spellings (any prefix, e.g.
`head.last_layer...`, is kept).

Reference-exact ViT details (`pos_embed_interpolation`)
--------------------------------------------------------
timm's ViT differs from the reference DINO ViT in two places that matter for DINO:

- Other crop sizes (the 96-px local crops): timm resizes the patch position embeddings with
  antialiased bicubic to the exact new grid; the reference uses plain bicubic with
  `scale_factor = (g + 0.1) / sqrt(N)` per side (g = patches per side of the crop, N = patches
  of the nominal size), which also moves the sampling positions. For ViT-S/16 at
  initialisation (14x14 -> 6x6) the two differ by a relative L2 of about 0.8.
- Initialisation: timm starts `cls_token` at normal(std 1e-6); the reference draws both
  `pos_embed` and `cls_token` from a truncated normal of std 0.02 (cut at +-2).

`pos_embed_interpolation="reference"` (the default) gives timm ViTs the reference's
behaviour for both; "timm" leaves timm's. Backbones that are not timm `VisionTransformer`s
(ResNets, ...) are unaffected.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

log = logging.getLogger(__name__)

PosEmbedInterpolation = Literal["reference", "timm"]
POS_EMBED_INTERPOLATIONS: tuple[str, ...] = ("reference", "timm")
# The reference's offset, added to the target grid to avoid a floating-point error making
# floor(in * scale) one short (facebookresearch/dino issue 8).
REFERENCE_INTERPOLATION_OFFSET = 0.1
REFERENCE_TOKEN_STD = 0.02

# ----------------------------------------------------------------------------------------------
# Reference-exact ViT details


def interpolate_pos_embed_reference(
    pos_embed: Tensor, grid: tuple[int, int], base_grid: tuple[int, int], num_prefix_tokens: int
) -> Tensor:
    """The reference DINO position embedding for a crop of `grid` = (rows, cols) patches.

    `pos_embed` is (1, num_prefix_tokens + base_rows * base_cols, D); the prefix (class token)
    entries are kept as they are, the patch entries are resized with plain bicubic at
    `scale_factor = (g + 0.1) / base` per side. The scale factor, not the output size, is what
    PyTorch uses to place the samples, so this differs from a resize to `grid` even where the
    output shape is the same. As the reference, nothing changes when the crop has the nominal
    square grid (the reference tests pixel sizes; DINO's crops are square, so this is the same).
    """
    rows, cols = grid
    base_rows, base_cols = base_grid
    n_patches = pos_embed.shape[1] - num_prefix_tokens
    if n_patches != base_rows * base_cols:
        raise ValueError(f"pos_embed has {n_patches} patch entries, not {base_rows}x{base_cols}")
    if rows * cols == n_patches and rows == cols:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    # For the reference's square grid, base = sqrt(N) on both sides.
    scale = (
        (rows + REFERENCE_INTERPOLATION_OFFSET) / base_rows,
        (cols + REFERENCE_INTERPOLATION_OFFSET) / base_cols,
    )
    grid_in = patches.reshape(1, base_rows, base_cols, dim).permute(0, 3, 1, 2)
    # float32: bicubic has no half-precision CPU kernel; the parameters are fp32 anyway.
    out = F.interpolate(grid_in.float(), scale_factor=scale, mode="bicubic")
    if out.shape[-2:] != (rows, cols):  # the offset exists to make this impossible
        raise RuntimeError(f"interpolated grid {tuple(out.shape[-2:])} is not {grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([prefix, out], dim=1)


def _reference_pos_embed(self: VisionTransformer, x: Tensor) -> Tensor:
    """timm's `VisionTransformer._pos_embed` (1.0.x) with the reference interpolation.

    `x` is the patch embedding, (B, H, W, C) under `dynamic_img_size`. The token order and the
    class/embed-class handling are timm's; tests compare this with timm's own method at the
    nominal size, where both must agree exactly.
    """
    to_cat = []
    if self.cls_token is not None:
        to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
    if self.reg_token is not None:
        to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
    batch, rows, cols, dim = x.shape
    prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    pos_embed = interpolate_pos_embed_reference(
        self.pos_embed, (rows, cols), tuple(self.patch_embed.grid_size), prefix
    )
    x = x.view(batch, -1, dim)
    if self.no_embed_class:
        x = x + pos_embed
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + pos_embed
    return self.pos_drop(x)


def reference_token_init(vit: nn.Module) -> None:
    """pos_embed and cls_token ~ truncated normal(0, 0.02) cut at +-2, as the reference.

    (The cut is absolute, 100 standard deviations: in effect a plain normal.) Register tokens,
    which the reference has not, keep timm's init.
    """
    for name in ("pos_embed", "cls_token"):
        param = getattr(vit, name, None)
        if isinstance(param, nn.Parameter):
            nn.init.trunc_normal_(param, std=REFERENCE_TOKEN_STD, a=-2.0, b=2.0)


def apply_pos_embed_interpolation(model: nn.Module, choice: str) -> bool:
    """Give a timm ViT the reference's pos-embed interpolation and token init ("reference")
    or leave timm's ("timm"). True when `model` was changed (a ViT with a position embedding
    that is resized per input size)."""
    if choice not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(
            f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, "
            f"got {choice!r}"
        )
    if choice == "timm" or not isinstance(model, VisionTransformer):
        return False
    reference_token_init(model)
    if model.pos_embed is None or not model.dynamic_img_size:
        return True  # nothing is ever resized (a fixed-size model fails loudly on other sizes)
    if type(model)._pos_embed is not VisionTransformer._pos_embed:
        # A subclass with its own token layout (e.g. DeiT's distillation token): replacing its
        # method would drop tokens, so it keeps timm's resize (the init is still the reference's).
        log.warning(
            "%s has its own _pos_embed: timm's position-embedding resize is kept",
            type(model).__name__,
        )
        return True
    # An instance attribute shadows the class method for this model only; deepcopy rebinds
    # it to the copy. Every timm path (forward_features, forward_intermediates) calls it.
    model._pos_embed = types.MethodType(_reference_pos_embed, model)
    return True


def pos_embed_interpolation_of(model: nn.Module) -> str:
    """Which resize `model` uses for other crop sizes: "reference" (installed by
    `apply_pos_embed_interpolation`) or "timm" (timm's own, and every non-ViT)."""
    method = model.__dict__.get("_pos_embed")
    return "reference" if getattr(method, "__func__", None) is _reference_pos_embed else "timm"


# ----------------------------------------------------------------------------------------------
# Backbone


def build_backbone(
    name: str,
    *,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    img_size: int = 224,
    pos_embed_interpolation: PosEmbedInterpolation = "reference",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model with its classifier removed; `backbone.num_features` is the feature size.

    ViT-style models get `img_size`, `patch_size` (when given) and `dynamic_img_size=True` so
    that one model accepts both global (e.g. 224) and local (e.g. 96) crops; models that do not
    take those arguments (ResNets) are built without them. `pos_embed_interpolation` chooses
    the reference DINO position-embedding resize and cls/pos init ("reference") or timm's
    ("timm"); see the module docstring. Extra keyword arguments go to `timm.create_model`
    unchanged (tests use e.g. `depth=2`). Never downloads weights.
    """
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(
            f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, "
            f"got {pos_embed_interpolation!r}"
        )
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    kwargs: dict[str, Any] = dict(
        pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **timm_kwargs
    )
    # Optional arguments are dropped one by one if the model's constructor rejects them.
    optional: dict[str, Any] = {"img_size": img_size, "dynamic_img_size": True}
    required: dict[str, Any] = {} if patch_size is None else {"patch_size": patch_size}
    while True:
        try:
            model = timm.create_model(name, **kwargs, **optional, **required)
            break
        except TypeError as err:
            match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            bad = match.group(1) if match else None
            if bad in optional:
                del optional[bad]
                continue
            if bad in required or bad in timm_kwargs:
                raise ValueError(
                    f"timm model {name!r} does not take a {bad} (model.{bad}: leave it out "
                    "for this arch)"
                ) from err
            raise
    if not getattr(model, "num_features", 0):
        raise ValueError(f"timm model {name!r} does not expose num_features")
    apply_pos_embed_interpolation(model, pos_embed_interpolation)
    return model


def set_attention(module: nn.Module, impl: str) -> int:
    """Choose the attention kernel of every timm attention block in `module`.

    "sdpa": `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs);
    "eager": the explicit softmax(q k^T / sqrt(d)) v of the paper's code. timm reads its
    global `use_fused_attn()` once per block at construction and stores it in the block's
    `fused_attn` attribute, which its forward consults; setting that attribute per model
    leaves timm's process-wide default alone. Returns the number of blocks set (0 for CNNs).
    """
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {impl!r}")
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = impl == "sdpa"
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Head


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised Linear(bottleneck -> out_dim, no bias)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError("head dimensions must be positive")
        layers: list[nn.Module]
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += self._norm_act(hidden_dim, use_bn)
                layers.append(nn.Linear(hidden_dim, hidden_dim))
            layers += self._norm_act(hidden_dim, use_bn)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        # As the reference: the last layer keeps PyTorch's default init (it is created after
        # the trunc-normal init above), and its gain starts at 1 whether frozen or not.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    @staticmethod
    def _norm_act(dim: int, use_bn: bool) -> list[nn.Module]:
        return ([nn.BatchNorm1d(dim)] if use_bn else []) + [nn.GELU()]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# ----------------------------------------------------------------------------------------------
# Multi-crop wrapper


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of same-resolution crops, then the head once on all.

    Crops are expected in the DINO order (all global crops, then all local crops), so the
    consecutive grouping gives exactly one backbone forward per resolution.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_backbone(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        # Some backbones return (features, extras); the first element is the pooled feature.
        return out[0] if isinstance(out, tuple) else out

    def forward(self, crops: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(crops, Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropWrapper needs at least one crop batch")
        feats: list[Tensor] = []
        start = 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
                batch = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]))
                feats.append(self.forward_backbone(batch))
                start = end
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


def build_student_teacher(
    backbone_name: str,
    *,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    img_size: int = 224,
    out_dim: int = 65536,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    use_bn: bool = False,
    norm_last_layer: bool = True,
    pos_embed_interpolation: PosEmbedInterpolation = "reference",
    **timm_kwargs: Any,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher networks; the teacher starts as an exact copy of the student.

    The teacher's backbone is built with drop_path 0 (as the reference), holds the student's
    weights and has `requires_grad=False` everywhere: it changes only through `ema_update`.
    Both backbones get the same `pos_embed_interpolation` (the local crops go through the
    student's, the teacher's sees other sizes in evaluation and visualisation).
    """
    head_kwargs = dict(
        out_dim=out_dim,
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
        nlayers=nlayers,
        use_bn=use_bn,
        norm_last_layer=norm_last_layer,
    )
    bb_kwargs = dict(
        patch_size=patch_size,
        img_size=img_size,
        pos_embed_interpolation=pos_embed_interpolation,
        **timm_kwargs,
    )
    student_bb = build_backbone(backbone_name, drop_path_rate=drop_path_rate, **bb_kwargs)
    teacher_bb = build_backbone(backbone_name, drop_path_rate=0.0, **bb_kwargs)
    dim = int(student_bb.num_features)
    student = MultiCropWrapper(student_bb, DINOHead(dim, **head_kwargs))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, **head_kwargs))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
