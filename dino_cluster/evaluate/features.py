"""Frozen backbones and the features evaluation reads from them.

Three feature extractors, all `nn.Module`s mapping a batch of eval images to (B, D):
- `CLSFeatures`: the backbone's pooled output (CLS after the final norm for ViTs): k-NN.
- `LinearProbeFeatures`: the reference linear-probe recipe: CLS of the last n blocks (each
  through the final norm) concatenated, optionally with the average-pooled patch tokens of
  the last block (ViT-B in the reference).
- `PixelFeatures`: the flattened eval image itself (the raw-pixel baseline).

Plus: building the backbone a spec describes, loading a teacher backbone from a checkpoint
or an exported `teacher.pth`, and gathering variable-length tensors across ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_cluster.data.labelled import LabelledBatch
from dino_cluster.dino.augment.reference import EvalTransform
from dino_cluster.dino.model import build_backbone
from dino_cluster.spec import JobSpec

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
# The reference evaluates 224 crops of 256 resizes; smaller models keep that ratio.
RESIZE_RATIO = 256 / 224


class EvalError(RuntimeError):
    """An evaluation cannot run (bad checkpoint contents, no labelled data, ...)."""


def eval_transform(spec: JobSpec) -> EvalTransform:
    """Bicubic resize of the shorter side + centre crop to the model's nominal size."""
    crop = spec.model.img_size
    return EvalTransform(resize=max(crop, round(crop * RESIZE_RATIO)), crop=crop)


def build_eval_backbone(spec: JobSpec) -> nn.Module:
    """The spec's backbone, without head or drop path, in eval mode, no gradients."""
    m = spec.model
    shape = {
        k: v
        for k, v in (("depth", m.depth), ("embed_dim", m.embed_dim), ("num_heads", m.num_heads))
        if v is not None
    }
    backbone = build_backbone(
        m.arch,
        patch_size=m.patch_size,
        drop_path_rate=0.0,
        img_size=m.img_size,
        pos_embed_interpolation=m.pos_embed_interpolation,
        **shape,
    )
    return freeze(backbone)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def backbone_state(model_state: Mapping[str, Any], what: str = "teacher") -> dict[str, Tensor]:
    """The `backbone.*` entries of a student/teacher state, prefix removed.

    Accepts our MultiCropWrapper keys and the reference export layout (both `backbone.*`),
    with DDP / torch.compile wrapper prefixes stripped.
    """
    if not isinstance(model_state, Mapping):
        raise EvalError(f"{what} is a {type(model_state).__name__}, not a state dict")
    out: dict[str, Tensor] = {}
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise EvalError(f"{what} entry {key!r} is not a named tensor")
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key.startswith(BACKBONE_PREFIX):
            out[key[len(BACKBONE_PREFIX) :]] = value
    if not out:
        raise EvalError(f"{what} has no {BACKBONE_PREFIX}* weights")
    return out


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Load a backbone state strictly: a spec that does not match the checkpoint is an error
    naming the first differing key (the spec's model section must be the run's)."""
    from dino_cluster.checkpointing.objects import state_mismatch

    found = state_mismatch(backbone, dict(state), "the checkpoint's backbone")
    if found:
        raise EvalError(
            f"{found[1]}: the spec's model section (arch, depth, embed_dim, num_heads, "
            "patch_size, img_size) must be the training run's; pass the run's "
            "spec.resolved.yaml as --spec"
        )
    backbone.load_state_dict(dict(state), strict=True)
    return freeze(backbone)


class CLSFeatures(nn.Module):
    """The backbone's pooled feature (a ViT's normed CLS token)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        return out[0] if isinstance(out, tuple) else out


class LinearProbeFeatures(nn.Module):
    """CLS of the last `n_last_blocks` blocks (normed) concatenated [+ avg-pooled patches]."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int, avgpool_patch_tokens: bool) -> None:
        super().__init__()
        if not hasattr(backbone, "get_intermediate_layers"):
            raise EvalError(
                f"{type(backbone).__name__} has no get_intermediate_layers: the linear probe "
                "recipe needs a ViT backbone"
            )
        self.backbone = backbone
        self.n = n_last_blocks
        self.avgpool = avgpool_patch_tokens

    def forward(self, x: Tensor) -> Tensor:
        layers = self.backbone.get_intermediate_layers(
            x, self.n, return_prefix_tokens=True, norm=True
        )
        # Each entry is (patch tokens (B, N, D), prefix tokens (B, P, D)); prefix 0 is CLS.
        feats = [prefix[:, 0] for _, prefix in layers]
        if self.avgpool:
            feats.append(layers[-1][0].mean(dim=1))
        return torch.cat(feats, dim=-1)


class PixelFeatures(nn.Module):
    """The eval image, flattened: the raw-pixel baseline a learned feature must beat."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def linear_recipe(spec: JobSpec) -> tuple[int, bool]:
    """(n_last_blocks, avgpool) per the reference: ViT-B last CLS + avgpool, else last 4 CLS
    (fewer when the model has fewer blocks)."""
    if "base" in spec.model.arch:
        return 1, True
    depth = spec.model.depth or 12
    return min(4, depth), False


@torch.no_grad()
def extract(
    features: nn.Module,
    batches: Iterable[LabelledBatch],
    device: torch.device,
    *,
    normalize: bool,
    what: str = "features",
) -> Iterable[tuple[Tensor, Tensor]]:
    """(features, labels) per batch, on `device`; L2-normalised when `normalize`. Logs its
    progress (images, rate, time to go from the reader's `expected` count) every ~10 s."""
    features.eval().to(device)
    progress = _Progress(getattr(batches, "expected", None), what)
    for batch in batches:
        out = features(batch.images.to(device, non_blocking=True)).float()
        if normalize:
            out = nn.functional.normalize(out, dim=1, p=2)
        progress.add(len(batch.labels))
        yield out, batch.labels.to(device)


class _Progress:
    """A log line every `every_s` seconds: how far, how fast, how long to go."""

    def __init__(self, total: int | None, what: str, every_s: float = 10.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.done = 0
        self.started = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and rate > 0:
            left = f", about {max(self.total - self.done, 0) / rate:.0f} s to go"
        log.info("%s: %d%s images, %.1f images/s%s", self.what, self.done, of, rate, left)


def collect(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate (features, labels) batches; an empty part gives (0, 0) / (0,) tensors."""
    feats, labels = [], []
    for f, y in pairs:
        feats.append(f)
        labels.append(y)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------- distributed


def dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: Tensor, dim: int | None = None) -> Tensor:
    """All ranks' rows of `t` concatenated in rank order (rows may differ per rank).

    `dim` is the feature width to use for a rank whose part is empty (shape (0, 0)).
    """
    if not dist_active():
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    width = t.shape[1:] if t.dim() > 1 else ()
    if t.shape[0] == 0 and t.dim() > 1 and dim is not None:
        width = (dim,)
        t = t.reshape(0, dim)
    pad = max(counts)
    padded = torch.zeros((pad, *width), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def max_over_ranks(value: int) -> int:
    if not dist_active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def feature_dim(features: nn.Module, spec: JobSpec) -> int:
    """Output width of `features` for the spec's eval crop (one dummy forward)."""
    size = spec.model.img_size
    with torch.no_grad():
        dev = next(iter(features.parameters()), torch.zeros(0)).device
        return int(features.eval()(torch.zeros(1, 3, size, size, device=dev)).shape[1])


def percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else math.nan
