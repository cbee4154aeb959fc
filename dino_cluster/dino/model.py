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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

# ----------------------------------------------------------------------------------------------
# Backbone


def build_backbone(
    name: str,
    *,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    img_size: int = 224,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model with its classifier removed; `backbone.num_features` is the feature size.

    ViT-style models get `img_size`, `patch_size` (when given) and `dynamic_img_size=True` so
    that one model accepts both global (e.g. 224) and local (e.g. 96) crops; models that do not
    take those arguments (ResNets) are built without them. Extra keyword arguments go to
    `timm.create_model` unchanged (tests use e.g. `depth=2`). Never downloads weights.
    """
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
            if bad in required:
                raise ValueError(f"timm model {name!r} does not take a {bad}") from err
            raise
    if not getattr(model, "num_features", 0):
        raise ValueError(f"timm model {name!r} does not expose num_features")
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
    **timm_kwargs: Any,
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher networks; the teacher starts as an exact copy of the student.

    The teacher's backbone is built with drop_path 0 (as the reference), holds the student's
    weights and has `requires_grad=False` everywhere: it changes only through `ema_update`.
    """
    head_kwargs = dict(
        out_dim=out_dim,
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
        nlayers=nlayers,
        use_bn=use_bn,
        norm_last_layer=norm_last_layer,
    )
    bb_kwargs = dict(patch_size=patch_size, img_size=img_size, **timm_kwargs)
    student_bb = build_backbone(backbone_name, drop_path_rate=drop_path_rate, **bb_kwargs)
    teacher_bb = build_backbone(backbone_name, drop_path_rate=0.0, **bb_kwargs)
    dim = int(student_bb.num_features)
    student = MultiCropWrapper(student_bb, DINOHead(dim, **head_kwargs))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, **head_kwargs))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
