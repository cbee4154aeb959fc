"""Multi-crop augmentation in two stages: per-sample geometry on uint8, batched photometrics.

`BatchedMultiCropAugment` draws everything the reference `reference.MultiCropAugment` draws,
with the same probabilities and ranges, but splits the work:

- `per_sample(img)` (CPU, per image, in a data worker): decode at reduced scale when every
  possible crop is still downsampled (JPEG DCT scaling, `draft`), cut each RandomResizedCrop
  box and resize it straight to the crop size with torch's uint8 antialiased bicubic (PIL's
  filter, within one level), and draw every crop's photometric parameters. It returns the
  2 + n_local uint8 crops (3, S, S) and one float32 parameter table (n_crops, N_PARAMS).
- `per_batch(stacked)` (per batch, on the crops' device: CPU in the worker, or the GPU in
  the training loop): flip, colour jitter in each crop's own random op order, grayscale,
  Gaussian blur with per-crop sigma, solarize and normalisation, for all same-size crops of
  the batch at once (`photometric`). Python runs once per op and group of crops, not per crop.

Calling the object on one image runs both stages (a drop-in per-sample `transform`); the data
stream (`dino_cluster.data.reader`) runs `per_sample` per image and `per_batch` once per
collated chunk when a transform has both. With the same seed the output is deterministic:
every draw comes from torch's RNG (the global one, or `generator`), in a fixed order per image:
36 uniforms per crop. Leave `generator` unset with data workers: DataLoader seeds each worker's
global torch RNG differently, while a generator object would be copied into every worker.

For issue 9's accelerator path, give the stream `cpu_stage()` (per_sample only: batches hold
uint8 crops and the (B, n_crops, N_PARAMS) table) and call `per_batch` in the training loop on
the crops moved to the GPU, leaving the parameter table on the CPU (grouping is planned there,
so no device sync). On the CPU, `per_batch` processes cache-sized blocks of crops and asks
glibc to keep freed memory (`keep_freed_memory`): both measured, see their comments.

Differences from the reference, none in what is drawn: the hue rotation and the blur kernel
(see `batched_ops`), the bicubic resize from torch (within one level of PIL's), the
crop box's random draws taken as floats (same distribution as torchvision's `get_params`), and
Python's `random` no longer used (the reference draws blur and solarize from it).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dino_cluster.dino.augment import batched_ops as ops
from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD

# Columns of the per-crop parameter table.
FLIP, JITTER, ORDER = 0, 1, 2  # ORDER..ORDER+3: jitter op ids (0 b, 1 c, 2 s, 3 h) in order
BRIGHTNESS, CONTRAST, SATURATION, HUE = 6, 7, 8, 9  # factors (hue: torchvision hue_factor)
GRAY, BLUR, SIGMA, SOLARIZE = 10, 11, 12, 13
N_PARAMS = 14
_DECISIONS = [FLIP, JITTER, GRAY, BLUR, SOLARIZE]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOG_RATIO = (math.log(_RATIO[0]), math.log(_RATIO[1]))
_CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before the centre-crop fallback
_DRAWS = 2 * _CROP_TRIES + 2 + 14  # uniforms per crop: box tries, box position, photometric


_TUNED_PIDS: set[int] = set()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process (once per process id).

    The batched ops allocate many short-lived 0.5-5 MB tensors. By default glibc serves such
    sizes with fresh mmap()s or trims them back to the OS on free, so every new tensor page
    faults in again: measured here at ~1,300 minor faults and 3x the CPU time per hue call on
    18 crops of 96x96. Raising the mmap and trim thresholds (the largest mmap threshold glibc
    allows, 32 MiB) keeps that memory in the heap; the cost is that a data worker's RSS stays
    at its peak. A no-op (False) where glibc's mallopt is not available.
    """
    pid = os.getpid()
    if pid in _TUNED_PIDS:
        return True
    _TUNED_PIDS.add(pid)
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


@dataclass(frozen=True)
class View:
    """One crop of the recipe: RandomResizedCrop(size, scale), then its photometric ops."""

    name: str
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    return float(scale[0]), float(scale[1])


def crop_box(
    width: int, height: int, scale: tuple[float, float], u: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params driven by 22 uniforms: (top, left, h, w)."""
    area = width * height
    for t in range(_CROP_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2 * _CROP_TRIES] * (height - h + 1)), height - h)
            left = min(int(u[2 * _CROP_TRIES + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    ratio = width / height  # fallback: the central crop at the nearest allowed aspect ratio
    if ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BatchedMultiCropAugment:
    """PIL image -> [global1, global2, local_1 .. local_n] float CHW normalised (both stages);
    or `per_sample` (uint8 crops + parameters) and `per_batch` (stacked -> float crops)."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        draft: bool = True,
        generator: torch.Generator | None = None,
        tune_malloc: bool = True,
    ) -> None:
        if global_size < 1 or local_size < 1:
            raise ValueError("crop sizes must be >= 1")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        gs, ls = (
            _check_scale("global_scale", global_scale),
            _check_scale("local_scale", local_scale),
        )
        self.n_local = n_local
        self.draft = draft
        self.lazy_decode = draft  # ask the stream for undecoded images (see data/reader.py)
        self.generator = generator
        self.tune_malloc = tune_malloc
        self.views = [
            View("global1", global_size, gs, 1.0, 0.0),
            View("global2", global_size, gs, 0.1, 0.2),
        ] + [View("local", local_size, ls, 0.5, 0.0)] * n_local
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        # jitter ranges of ColorJitter(0.4, 0.4, 0.2, 0.1); p: flip 0.5, jitter 0.8, gray 0.2
        self.flip_p, self.jitter_p, self.gray_p = 0.5, 0.8, 0.2
        self.brightness, self.contrast, self.saturation = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2)
        self.hue, self.sigma = (-0.1, 0.1), (0.1, 2.0)
        # per view and decision column, the probability that the op runs
        self._thresholds = torch.tensor(
            [[self.flip_p, self.jitter_p, self.gray_p, v.blur_p, v.solarize_p] for v in self.views]
        )
        low, high = torch.zeros(N_PARAMS), torch.zeros(N_PARAMS)
        for col, (lo, hi) in (
            (BRIGHTNESS, self.brightness),
            (CONTRAST, self.contrast),
            (SATURATION, self.saturation),
            (HUE, self.hue),
            (SIGMA, self.sigma),
        ):
            low[col], high[col] = lo, hi
        self._low, self._span = low, high - low

    @property
    def n_crops(self) -> int:
        return len(self.views)

    def probabilities(self) -> dict[str, float]:
        """Same keys and values as `MultiCropAugment.probabilities()`."""
        out: dict[str, float] = {}
        for v in self.views[:3]:
            out[f"{v.name}.flip"] = self.flip_p
            out[f"{v.name}.color_jitter"] = self.jitter_p
            out[f"{v.name}.grayscale"] = self.gray_p
            out[f"{v.name}.blur"] = v.blur_p
            if v.solarize_p > 0:
                out[f"{v.name}.solarize"] = v.solarize_p
        return out

    # -- stage 1: per sample ------------------------------------------------------------------
    def draw(self) -> tuple[Tensor, Tensor]:
        """Uniforms for one image: (n_crops, 22) for the crop boxes, and the parameter table
        (column j of the table comes from uniform column j: thresholded, scaled or ranked)."""
        u = torch.rand(self.n_crops, _DRAWS, generator=self.generator)
        box, q = u[:, : 2 * _CROP_TRIES + 2], u[:, 2 * _CROP_TRIES + 2 :]
        p = torch.addcmul(self._low, q, self._span)  # factor and sigma columns
        p[:, _DECISIONS] = (q[:, _DECISIONS] < self._thresholds).float()
        p[:, ORDER : ORDER + 4] = q[:, ORDER : ORDER + 4].argsort(dim=1).float()  # uniform perm
        return box, p

    def _draft_factor(self, width: int, height: int) -> int:
        """Largest JPEG reduction k in (8, 4, 2) that keeps every possible crop downsampled."""
        area = width * height
        for k in (8, 4, 2):
            side = min(math.sqrt(area * v.scale[0] * _RATIO[0]) / k - v.size for v in self.views)
            if side >= 0:
                return k
        return 1

    def _prepare(self, img: Image.Image) -> Image.Image:
        # draft() only works before the pixels are decoded (while `tile` is still pending)
        if self.draft and img.format == "JPEG" and getattr(img, "tile", None):
            k = self._draft_factor(*img.size)
            if k > 1:
                img.draft("RGB", (img.size[0] // k, img.size[1] // k))
        if img.mode != "RGB":
            img = (
                img.convert("RGBA").convert("RGB") if "A" in img.getbands() else img.convert("RGB")
            )
        return img

    def per_sample(self, img: Image.Image) -> list[Tensor]:
        """[uint8 (3, S, S) per crop] + [float32 (n_crops, N_PARAMS) parameters]."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        if self.tune_malloc:
            keep_freed_memory()
        img = self._prepare(img)
        width, height = img.size
        # HWC bytes seen as a (1, 3, H, W) channels-last tensor: torch's fast uint8 resize path
        with warnings.catch_warnings():
            # PIL's array view is read-only; the crops below only read it
            warnings.filterwarnings("ignore", message=".*not writable.*")
            hwc = torch.from_numpy(np.asarray(img))
        chw = hwc.permute(2, 0, 1).unsqueeze(0)
        box, params = self.draw()
        out: list[Tensor] = []
        for view, u in zip(self.views, box.tolist(), strict=True):
            top, left, h, w = crop_box(width, height, view.scale, u)
            crop = chw[:, :, top : top + h, left : left + w]
            out.append(
                F.interpolate(crop, size=(view.size, view.size), mode="bicubic", antialias=True)[0]
            )
        out.append(params)
        return out

    # -- stage 2: per batch -------------------------------------------------------------------
    def per_batch(self, stacked: list[Tensor]) -> list[Tensor]:
        """Collated `per_sample` outputs (crops (B, 3, S, S) uint8 per crop index, parameters
        (B, n_crops, N_PARAMS)) -> float32 (B, 3, S, S) per crop index, on the crops' device."""
        if len(stacked) != self.n_crops + 1:
            raise ValueError(
                f"expected {self.n_crops} crop batches and a parameter table, got {len(stacked)}"
            )
        *crops, params = stacked
        if self.tune_malloc and crops[0].device.type == "cpu":
            keep_freed_memory()
        batch = crops[0].shape[0]
        if params.shape != (batch, self.n_crops, N_PARAMS):
            raise ValueError(f"parameter table of shape {tuple(params.shape)} does not fit")
        out: list[Tensor | None] = [None] * self.n_crops
        for size in dict.fromkeys(v.size for v in self.views):
            idx = [i for i, v in enumerate(self.views) if v.size == size]
            x = torch.cat([crops[i] for i in idx]) if len(idx) > 1 else crops[idx[0]]
            p = params[:, idx].transpose(0, 1).reshape(-1, N_PARAMS)
            y = photometric(x, p, self.mean, self.std)
            for i, part in zip(idx, y.split(batch), strict=True):
                out[i] = part
        return out  # type: ignore[return-value]

    def __call__(self, img: Image.Image) -> list[Tensor]:
        stacked = [t.unsqueeze(0) for t in self.per_sample(img)]
        return [c[0] for c in self.per_batch(stacked)]

    def cpu_stage(self) -> SampleStage:
        """A per-sample transform that stops after `per_sample`: data workers then emit uint8
        crops + the parameter table, and the training loop runs `per_batch` on the GPU."""
        return SampleStage(self)


class SampleStage:
    """`BatchedMultiCropAugment.per_sample` as a plain per-image transform (no `per_batch`)."""

    def __init__(self, augment: BatchedMultiCropAugment) -> None:
        self.augment = augment
        self.lazy_decode = augment.lazy_decode

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return self.augment.per_sample(img)


def _runs(keys: list[int]) -> list[tuple[int, int, int]]:
    """(key, start, end) of each run of equal keys in a sorted list."""
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append((keys[start], start, i))
            start = i
    return runs


# CPU blocks of about 1.5 MiB of float32: a block's whole op chain then runs in cache, and the
# batch makes one trip through memory (batch-wide ops on a 64-sample batch, 56-77 MiB per
# float copy, measured 2-4 ms per sample slower on a loaded 2-core machine).
CPU_BLOCK_ELEMENTS = 3 << 18


def photometric(
    x: Tensor,
    params: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    block_elements: int | None = None,
    row_copies: bool | None = None,
) -> Tensor:
    """uint8 (N, 3, H, W) crops + (N, N_PARAMS) parameters -> float32 normalised crops.

    Runs on x's device; the grouping is planned from the parameters on the CPU (no device
    sync). Crops are sorted by their jitter op order, so each of the 24 orders is one
    contiguous run jittered in place with one call per op. Runs are packed into blocks of at
    most `block_elements` values (CPU default: cache-sized; other devices: the whole batch),
    and each block runs flip, jitter, grayscale, blur (one call per kernel radius), solarize
    and normalisation before its rows are written to the output in the input order (CPU: one
    memcpy per row, `row_copies`; other devices: one index_copy_ per block).
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) crops, got {x.dtype} {tuple(x.shape)}")
    p = params.detach().to("cpu", torch.float32)
    if p.shape != (x.shape[0], N_PARAMS):
        raise ValueError(f"expected ({x.shape[0]}, {N_PARAMS}) parameters, got {tuple(p.shape)}")
    dev = x.device
    out = torch.empty(x.shape, dtype=torch.float32, device=dev)
    if x.shape[0] == 0:
        return out
    if block_elements is None:
        block_elements = CPU_BLOCK_ELEMENTS if dev.type == "cpu" else x.numel()
    order = p[:, ORDER : ORDER + 4].long()
    code = ((order[:, 0] * 4 + order[:, 1]) * 4 + order[:, 2]) * 4 + order[:, 3]
    code = torch.where(p[:, JITTER] > 0, code, torch.full_like(code, -1))
    perm = torch.argsort(code, stable=True)
    p, order = p[perm], order[perm]
    p[:, HUE] = ops.hue_turns(p[:, HUE])
    flags = p[:, [FLIP, GRAY, BLUR, SOLARIZE]].gt(0).tolist()
    radii = [ops.blur_radius(s) for s in p[:, SIGMA].tolist()]
    pd, perm_dev, targets = p.to(dev), perm.to(dev), perm.tolist()
    # (v / 255 - mean) / std == v * a + b
    std_t = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    offset = -torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1) / std_t
    rows_per_block = max(1, block_elements // x[0].numel())
    for block in _blocks(_runs(code[perm].tolist()), rows_per_block):
        lo, hi = block[0][1], block[-1][2]
        local = range(hi - lo)
        xb = x.index_select(0, perm_dev[lo:hi])
        _apply_rows(xb, [i for i in local if flags[lo + i][0]], lambda t: t.flip(-1))
        xf = xb.float()
        for key, start, end in block:
            if key >= 0:
                part = xf[start - lo : end - lo]
                for op in order[start].tolist():
                    ops.JITTER_OPS[op](part, pd[start:end, _FACTOR_COLUMNS[op]])
        _apply_rows(xf, [i for i in local if flags[lo + i][1]], ops.grayscale)
        blurred = [i for i in local if flags[lo + i][2]]
        for r in sorted({radii[lo + i] for i in blurred}):
            rows = [i for i in blurred if radii[lo + i] == r]
            sigma = pd[[lo + i for i in rows], SIGMA]
            _apply_rows(xf, rows, lambda t, s=sigma, r=r: ops.gaussian_blur(t, s, r))
        _apply_rows(xf, [i for i in local if flags[lo + i][3]], ops.solarize_)
        xf.mul_(scale).add_(offset)
        if row_copies if row_copies is not None else dev.type == "cpu":
            # row copies are memcpys; CPU index_copy_ measured ~3x slower per value
            for i in local:
                out[targets[lo + i]].copy_(xf[i])
        else:
            out.index_copy_(0, perm_dev[lo:hi], xf)
    return out


def _blocks(runs: list[tuple[int, int, int]], max_rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive runs packed into blocks of at most max_rows rows (a long run is split)."""
    blocks: list[list[tuple[int, int, int]]] = [[]]
    rows = 0
    for key, start, end in runs:
        while start < end:
            if rows == max_rows:
                blocks.append([])
                rows = 0
            take = min(end - start, max_rows - rows)
            blocks[-1].append((key, start, start + take))
            rows += take
            start += take
    return blocks


_FACTOR_COLUMNS = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


def _apply_rows(t: Tensor, rows: list[int], fn) -> None:
    """t[rows] = fn(t[rows]), with a plain slice when the rows are contiguous."""
    if not rows:
        return
    if rows[-1] - rows[0] + 1 == len(rows):
        t[rows[0] : rows[-1] + 1] = fn(t[rows[0] : rows[-1] + 1])
        return
    idx = torch.tensor(rows, device=t.device)
    t.index_copy_(0, idx, fn(t.index_select(0, idx)).contiguous())
