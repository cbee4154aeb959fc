"""A faster CPU multi-crop augmentation with exactly the reference's output.

`FastMultiCropAugment` takes the same random decisions, from the same RNG streams and in the
same order, as `augment.MultiCropAugment` (torch: crop box, flip, jitter, grayscale; Python:
blur, solarize), so a seeded run gives the same crops bit for bit (tests check this). What
changes is the plumbing, not the pixels:

- every pixel op is PIL's own uint8 C code, called directly: no torchvision dispatch and
  logging per call, no ImageEnhance objects, cached black images and LUTs, the hue shift as
  one LUT on the H band, grayscale as a plain L -> RGB convert;
- to-tensor and normalisation are one uint8 stack and one fused multiply-add per group of
  same-size crops;
- `draft=True` decodes a JPEG much larger than the crops need at 1/2, 1/4 or 1/8 scale
  (libjpeg DCT scaling), only when every possible crop is still downsampled afterwards; this
  changes pixels of such large JPEGs slightly (a pre-reduced source), not the distribution of
  crops, flips or colour ops. `reducing_gap` passes Pillow's resize shortcut (off: exact).

Decode, bicubic resize, HSV conversion and blur are C loops that no Python restructuring
removes; on one core they dominate what is left. For the real speed-up, run the photometric
ops batched on the accelerator: the tensor functions below (`adjust_brightness`, ...,
`adjust_hue`, `grayscale`, `solarize`) reproduce PIL's uint8 arithmetic bit for bit on float
tensors of any device, with one factor per image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch import Tensor

from dino_cluster.dino.augment import IMAGENET_MEAN, IMAGENET_STD, Record

_BICUBIC = Image.Resampling.BICUBIC
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------------------------
# PIL's uint8 colour arithmetic as tensor ops, bit-exact, for a batch on any device.
# x: float32 (N, H, W, 3) holding integer values 0..255; factors: a float or a (N,) tensor.
# Not used by the CPU path below (PIL's own C loops are faster on one core); they are the
# building blocks for running the photometric ops batched on the accelerator with the same
# output as the CPU reference.


def _per_image(value: float | Tensor, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    v = torch.as_tensor(value, dtype=dtype, device=x.device)
    return v.view(-1, 1, 1, 1) if v.ndim == 1 else v


def luma(x: Tensor) -> Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (exact in float32)."""
    r, g, b = x.unbind(-1)
    return torch.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def blend(degenerate: Tensor, x: Tensor, alpha: float | Tensor) -> Tensor:
    """PIL Image.blend(degenerate, x, alpha): float32 interpolation, clipped, truncated."""
    alpha_t = _per_image(alpha, x)
    return torch.floor((degenerate + alpha_t * (x - degenerate)).clamp_(0.0, 255.0))


def adjust_brightness(x: Tensor, factor: float | Tensor) -> Tensor:
    return blend(torch.zeros_like(x), x, factor)


def adjust_contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    # ImageEnhance.Contrast: flat image at the rounded mean of the L image
    mean = torch.floor(luma(x).double().mean(dim=(-2, -1)) + 0.5).float()
    return blend(mean[..., None, None, None].expand_as(x), x, factor)


def adjust_saturation(x: Tensor, factor: float | Tensor) -> Tensor:
    return blend(luma(x).unsqueeze(-1).expand_as(x), x, factor)


def adjust_hue(x: Tensor, hue_factor: float | Tensor) -> Tensor:
    """torchvision's PIL hue shift: RGB -> HSV (uint8), H += int8(hue * 255), HSV -> RGB,
    with PIL's float/double conversion steps reproduced."""
    shift = torch.trunc(torch.as_tensor(hue_factor, dtype=torch.float64, device=x.device) * 255)
    shift = shift.view(-1, 1, 1) if shift.ndim == 1 else shift
    r, g, b = x.unbind(-1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc
    cr = (maxc - minc).masked_fill_(grey, 1.0)
    s = cr / maxc.clamp(min=1.0)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h_r = (bc - gc).double()
    h_g = ((2.0 + rc.double()) - bc.double()).float().double()
    h_b = ((4.0 + gc.double()) - rc.double()).float().double()
    h = torch.where(r == maxc, h_r, torch.where(g == maxc, h_g, h_b))
    h = torch.fmod(h / 6.0 + 1.0, 1.0).float().double()  # PIL stores it back in a float
    uh = torch.floor(h * 255.0).masked_fill_(grey, 0.0)
    us = torch.floor(s.double() * 255.0).masked_fill_(grey, 0.0)
    uh = torch.remainder(uh + shift, 256.0)
    # HSV -> RGB as PIL: i = floor(6h/255), f (float32) remainder, fs = s/255 (float32)
    h6 = uh * 6.0 / 255.0
    i = torch.floor(h6)
    f = (h6 - i).float()
    fs = (us / 255.0).float()
    v = maxc.double()
    p = torch.floor(v * (1.0 - fs.double()) + 0.5)
    q = torch.floor(v * (1.0 - (fs * f).double()) + 0.5)
    t = torch.floor(v * (1.0 - fs.double() * (1.0 - f.double())) + 0.5)
    sector = torch.remainder(i, 6.0).long()
    # channel k of sector n picks table[n][k] from (v, p, q, t), as colorsys.hsv_to_rgb
    stack = torch.stack([v, p, q, t], dim=-1).clamp_(0.0, 255.0)
    table = torch.tensor(
        [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device
    )
    out = torch.gather(stack, -1, table[sector]).float()
    no_sat = (us == 0).unsqueeze(-1)
    return torch.where(no_sat, maxc.unsqueeze(-1).expand_as(x), out)


def grayscale(x: Tensor) -> Tensor:
    return luma(x).unsqueeze(-1).expand_as(x).clone()


def solarize(x: Tensor, threshold: float = 128.0) -> Tensor:
    return torch.where(x >= threshold, 255.0 - x, x)


# ----------------------------------------------------------------------------------------------
# The CPU path: PIL's C code called directly.


def _pil_contrast(img: Image.Image, factor: float) -> Image.Image:
    # ImageEnhance.Contrast: blend with a flat image at the rounded mean of the L image
    hist = img.convert("L").histogram()
    mean = int(sum(i * c for i, c in enumerate(hist)) / (img.width * img.height) + 0.5)
    return Image.blend(Image.new("RGB", img.size, (mean, mean, mean)), img, factor)


def _pil_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    # torchvision's hue shift: H band += int8(hue * 255) with uint8 wrap-around
    shift = int(np.int8(hue_factor * 255))
    h, s, v = img.convert("HSV").split()
    h = h.point(_HUE_LUTS[shift])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


_HUE_LUTS = {d: [(i + d) % 256 for i in range(256)] for d in range(-128, 128)}
_SOLARIZE_LUT = [i if i < 128 else 255 - i for i in range(256)] * 3


class _FastView:
    """One kind of crop; op probabilities and order as `augment.CropView` of the same name.

    Pixels stay in PIL's uint8 C code (exact), called directly: no torchvision dispatch, no
    ImageEnhance objects, no numpy round-trips per op.
    """

    def __init__(
        self,
        name: str,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        reducing_gap: float | None = None,
    ) -> None:
        self.name = name
        self.reducing_gap = reducing_gap
        self.size = size
        self.scale = scale
        self.blur_p = blur_p
        self.solarize_p = solarize_p
        jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)  # only for its validated parameter ranges
        self._ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        self._black = Image.new("RGB", (size, size), 0)

    def _jitter(self, img: Image.Image) -> Image.Image:
        order, bf, cf, sf, hf = T.ColorJitter.get_params(*self._ranges)
        for op in order.tolist():
            if op == 0:
                img = Image.blend(self._black, img, bf)
            elif op == 1:
                img = _pil_contrast(img, cf)
            elif op == 2:
                img = Image.blend(img.convert("L").convert("RGB"), img, sf)
            else:
                img = _pil_hue(img, hf)
        return img

    def __call__(self, img: Image.Image, record: Record | None) -> np.ndarray:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(_RATIO))
        crop = img.crop((left, top, left + w, top + h))
        crop = crop.resize((self.size, self.size), _BICUBIC, reducing_gap=self.reducing_gap)
        flip = bool(torch.rand(1) < 0.5)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        jitter = bool(torch.rand(1) < 0.8)
        if jitter:
            crop = self._jitter(crop)
        gray = bool(torch.rand(1) < 0.2)
        if gray:
            crop = crop.convert("L").convert("RGB")
        blur = random.random() < self.blur_p
        if blur:
            crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        decisions = [("flip", flip), ("color_jitter", jitter), ("grayscale", gray), ("blur", blur)]
        if self.solarize_p > 0:
            sol = random.random() < self.solarize_p
            decisions.append(("solarize", sol))
            if sol:
                crop = crop.point(_SOLARIZE_LUT)
        if record is not None:
            record.extend((f"{self.name}.{op}", applied) for op, applied in decisions)
        return np.asarray(crop)


class FastMultiCropAugment:
    """Drop-in for `MultiCropAugment`: PIL image -> [global1, global2, locals...] CHW floats."""

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
        reducing_gap: float | None = None,
    ) -> None:
        if global_size < 1 or local_size < 1:
            raise ValueError("crop sizes must be >= 1")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        for name, sc in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not (0.0 < sc[0] <= sc[1] <= 1.0):
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {sc}")
        self.n_local = n_local
        self.draft = draft
        gap = reducing_gap
        self.global1 = _FastView("global1", global_size, global_scale, 1.0, 0.0, gap)
        self.global2 = _FastView("global2", global_size, global_scale, 0.1, 0.2, gap)
        self.local = _FastView("local", local_size, local_scale, 0.5, 0.0, gap)
        # normalise((x / 255 - mean) / std) == x * a + b
        std_t = torch.tensor(std, dtype=torch.float32)
        self._a = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self._b = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1)

    def probabilities(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for view in (self.global1, self.global2, self.local):
            out.update({f"{view.name}.flip": 0.5, f"{view.name}.color_jitter": 0.8})
            out[f"{view.name}.grayscale"] = 0.2
            out[f"{view.name}.blur"] = view.blur_p
            if view.solarize_p > 0:
                out[f"{view.name}.solarize"] = view.solarize_p
        return out

    def _draft_factor(self, width: int, height: int) -> int:
        """Largest JPEG reduction k in (8, 4, 2) keeping every possible crop >= its out size."""
        area = width * height
        for k in (8, 4, 2):
            ok = all(
                math.sqrt(area * view.scale[0] * _RATIO[0]) / k >= view.size
                for view in (self.global1, self.local)
            )
            if ok:
                return k
        return 1

    def _prepare(self, img: Image.Image) -> Image.Image:
        # draft() only works before the pixels are decoded (while `tile` is still pending)
        if self.draft and img.format == "JPEG" and getattr(img, "tile", None):
            k = self._draft_factor(*img.size)
            if k > 1:
                # Pillow picks the largest DCT scale whose result covers the requested size
                img.draft("RGB", (img.size[0] // k, img.size[1] // k))
        return img if img.mode == "RGB" else img.convert("RGB")

    def _normalise(self, crops: list[np.ndarray]) -> list[Tensor]:
        # one uint8 stack, then one fused multiply-add into contiguous (N, 3, H, W) floats
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
        out = torch.empty(batch.shape, dtype=torch.float32)
        torch.addcmul(self._b, batch, self._a, out=out)
        return list(out.unbind(0))

    def __call__(self, img: Image.Image, record: Record | None = None) -> list[Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(f"FastMultiCropAugment expects a PIL image, got {type(img).__name__}")
        img = self._prepare(img)
        globals_ = [self.global1(img, record), self.global2(img, record)]
        locals_ = [self.local(img, record) for _ in range(self.n_local)]
        return self._normalise(globals_) + (self._normalise(locals_) if locals_ else [])
