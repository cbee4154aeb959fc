"""Batched photometric ops of the DINO multi-crop recipe, on float tensors of any device.

Every function takes `x`: float32 (N, 3, H, W) holding integer values 0..255 (uint8 pixels
converted to float) and per-image parameters as (N,) tensors, and works in place where it
says so. Between ops the values are floored back to integers, as PIL stores uint8 between
the reference's ops, so brightness, contrast, saturation, grayscale and solarize are bit-exact
with PIL (`Image.blend` in float32, PIL's integer luma), which tests check. Two ops differ from
PIL by design, with the same parameter distribution:

- hue: a float HSV rotation (max/min/chroma kept, the hue sector formula) instead of PIL's
  round trip through 8-bit H, S and V planes. The shift itself is quantised exactly as the
  reference's (`trunc(255 * hue_factor) / 255` of a turn); pixels differ by PIL's 8-bit HSV
  rounding (a few levels, more on dark low-chroma pixels where PIL's 8-bit S is coarse).
- blur: a separable Gaussian with standard deviation `sigma`, truncated at ceil(3 sigma), edge
  pixels replicated, rounded to integers. PIL's `GaussianBlur(radius=sigma)` approximates the
  same Gaussian with three box filters (support about 3 sigma too), so the two differ by the
  box approximation (a level or two), not by the amount of blur.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# PIL's RGB -> L weights (ITU-R 601-2 luma in 16.16 fixed point)
_LUMA = (19595.0, 38470.0, 7471.0)


def _col(v: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1), for broadcasting one value per image."""
    return v.reshape(-1, 1, 1, 1)


def luma(x: Tensor) -> Tensor:
    """PIL's RGB -> L, (N, 1, H, W): (19595 R + 38470 G + 7471 B + 0x8000) >> 16.

    Exact in float32: every partial sum is an integer below 2**24.
    """
    out = x[:, 0:1] * _LUMA[0]
    out.add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])
    return out.add_(32768.0).mul_(1.0 / 65536.0).floor_()


def _blend_(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    # PIL Image.blend(degenerate, x, f) = trunc(clip(deg + f * (x - deg))) in float32; three
    # separate kernels (no fused multiply-add) so the float32 rounding is PIL's.
    return x.sub_(degenerate).mul_(_col(factor)).add_(degenerate).clamp_(0.0, 255.0).floor_()


def brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_brightness on PIL images: blend with black."""
    return x.mul_(_col(factor)).clamp_(0.0, 255.0).floor_()


def contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Contrast: blend with a flat grey at the rounded mean of the L image."""
    grey = luma(x)
    pixels = x.shape[-1] * x.shape[-2]
    # a float32 sum of integer levels is exact while it stays below 2**24 (up to 256x256)
    total = (grey if pixels <= 65536 else grey.double()).sum(dim=(1, 2, 3)).double()
    mean = torch.floor(total / pixels + 0.5).to(x.dtype)  # ImageStat's mean, int(m + 0.5)
    return _blend_(x, _col(mean), factor)


def saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Color: blend with the image's own grey (L) version."""
    return _blend_(x, luma(x), factor)


def hue_turns(hue_factor: Tensor) -> Tensor:
    """The reference's hue shift in turns: PIL's 8-bit H spans a turn in 255 steps and
    torchvision adds int(255 * hue_factor) steps (truncated towards zero)."""
    return torch.trunc(hue_factor * 255.0) / 255.0


def hue_(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate hue by `turns` of a full circle, keeping max and min (so V and chroma), in place.

    HSV -> RGB per channel c is max - chroma * clamp(2 - dist_c, 0, 1), with dist_c the
    distance of hue6 + n_c - 2 (hue6 in sectors, n = (5, 3, 1)) from 0 on a circle of 6
    sectors. With the shift folded into [-5, 1), u = hue6 + shift lies in [-6, 6) and
    dist = |3 - |u||, so channel c = 2 min - max + chroma * clamp(||u| - 3|, 1, 2): no modulo
    and no branch. Masks are float (comparisons written into floats): bool tensors are slow.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(r, g)
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    minc = torch.minimum(minc, b, out=minc)
    chroma = maxc - minc
    inv = chroma.clamp(min=1.0).reciprocal_()  # chroma 0: every difference below is 0 too
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    is_b = torch.rsub(is_r, 1.0)
    is_g.mul_(is_b)  # g is the max and r is not
    is_b.sub_(is_g)
    # hue6 = [r max] (g - b) / C + [g max] (2 + (b - r) / C) + [b max] (4 + (r - g) / C)
    hue6 = torch.sub(g, b).mul_(is_r)
    diff = torch.sub(b, r)
    hue6.addcmul_(diff, is_g)
    hue6.addcmul_(torch.sub(r, g, out=diff), is_b).mul_(inv)
    hue6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    base = minc.mul_(2.0).sub_(maxc).add_(0.5)  # 2 min - max, + 0.5 to round below
    # per channel shift n_c - 2 + 6 turns - 3, folded into [-5, 1) (dist is 6-periodic)
    offsets = torch.tensor((0.0, -2.0, -4.0), dtype=x.dtype, device=x.device)
    shift = offsets + (turns.to(x.dtype) * 6.0).reshape(-1, 1)
    shift = torch.remainder(shift + 5.0, 6.0).sub_(5.0)
    u = hue6.unsqueeze(1) + shift.reshape(-1, 3, 1, 1)
    level = u.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0).mul_(chroma.unsqueeze(1))
    # PIL's HSV -> RGB rounds to the nearest level
    return torch.add(level, base.unsqueeze(1), out=x).floor_()


def grayscale(x: Tensor) -> Tensor:
    """rgb_to_grayscale(num_output_channels=3) on PIL: L, repeated over three channels."""
    return luma(x).expand(-1, 3, -1, -1)


def solarize_(x: Tensor, threshold: float = 128.0) -> Tensor:
    """ImageOps.solarize: invert every level >= threshold (in place)."""
    if threshold == 128.0:
        # levels are integers: x >= 128 <=> x > 127.5, and then 255 - x = 127.5 - |x - 127.5|
        return x.sub_(127.5).abs_().neg_().add_(127.5)
    mask = torch.ge(x, threshold, out=torch.empty_like(x))  # float mask: bool ops are slow
    return x.addcmul_(mask, x.mul(-2.0).add_(255.0))


JITTER_OPS = (brightness_, contrast_, saturation_, hue_)  # torchvision's fn_idx order


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """(N, 2 radius + 1) normalised Gaussian taps, one row per sigma."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    w = torch.exp(-(taps**2) / (2.0 * sigma.reshape(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def blur_radius(sigma: float) -> int:
    """Kernel half-width for `sigma`: ceil(3 sigma), rounded up to an even number so that
    crops fall in few radius groups (one convolution call each); the taps past 3 sigma carry
    the Gaussian's own (tiny) weights."""
    r = max(1, math.ceil(3.0 * sigma - 1e-9))
    return r + (r & 1)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian, one sigma per image, taps -radius..radius, edges replicated, rounded
    to integer levels (PIL's blur writes uint8). One depthwise convolution per direction."""
    n, c, h, w = x.shape
    k = 2 * radius + 1
    taps = gaussian_kernels(sigma.to(x.dtype), radius).repeat_interleave(c, dim=0)
    xp = F.pad(x, (radius, radius, radius, radius), mode="replicate").reshape(
        1, n * c, h + k - 1, w + k - 1
    )
    y = F.conv2d(xp, taps.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, taps.view(n * c, 1, k, 1), groups=n * c)
    # a convex combination of 0..255 levels: rounding cannot leave 0..255
    return y.view(n, c, h, w).add_(0.5).floor_()
