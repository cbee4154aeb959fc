"""Batched photometric ops of the DINO multi-crop recipe, on float tensors of any device.

Every function takes `x`: float32 (N, 3, H, W) holding integer values 0..255 (uint8 pixels
converted to float) and per-image parameters as (N,) tensors, and works in place where it
says so. Between ops the values are floored back to integers, as PIL stores uint8 between
the reference's ops, so brightness, contrast, saturation, grayscale and solarize are bit-exact
with PIL (`Image.blend` in float32, PIL's integer luma), which tests check. Two ops differ from
PIL by design, with the same parameter distribution:

- hue: a float HSV rotation (max/min/chroma kept, the hue sector formula) instead of PIL's
  round trip through 8-bit H, S and V planes. The shift itself is quantised exactly as the
  reference's (`trunc(255 * hue_factor) / 256` of a turn); pixels differ by PIL's 8-bit HSV
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
    total = luma(x).sum(dim=(1, 2, 3))  # exact: integers below 2**24 for images up to 256x256
    if x.shape[-1] * x.shape[-2] > 65536:
        total = luma(x).double().sum(dim=(1, 2, 3))
    mean = torch.floor(total.double() / (x.shape[-1] * x.shape[-2]) + 0.5).to(x.dtype)
    return _blend_(x, _col(mean), factor)


def saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Color: blend with the image's own grey (L) version."""
    return _blend_(x, luma(x), factor)


def hue_turns(hue_factor: Tensor) -> Tensor:
    """The reference's hue shift in turns: H (8 bits, 256 per turn) += int(255 * factor)."""
    return torch.trunc(hue_factor * 255.0) / 256.0


def hue_(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate hue by `turns` of a full circle, keeping max, min (so V and chroma): out_c =
    max - chroma * clamp(min(k, 4 - k), 0, 1), k = (hue6 + n_c) mod 6, n = (5, 3, 1)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = chroma.clamp(min=1.0).reciprocal_()  # chroma 0: every difference below is 0 too
    hue6 = torch.where(
        maxc == r,
        (g - b).mul_(inv),
        torch.where(maxc == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)),
    )
    hue6.add_((turns * 6.0).reshape(-1, 1, 1))
    offsets = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = hue6.unsqueeze(1).add(offsets).remainder_(6.0)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    # PIL's HSV -> RGB rounds to the nearest level
    x.copy_(k.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1)).add_(0.5).floor_())
    return x


def grayscale(x: Tensor) -> Tensor:
    """rgb_to_grayscale(num_output_channels=3) on PIL: L, repeated over three channels."""
    return luma(x).expand(-1, 3, -1, -1)


def solarize_(x: Tensor, threshold: float = 128.0) -> Tensor:
    """ImageOps.solarize: invert every level >= threshold."""
    return torch.where(x >= threshold, 255.0 - x, x, out=x)


JITTER_OPS = (brightness_, contrast_, saturation_, hue_)  # torchvision's fn_idx order


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """(N, 2 radius + 1) normalised Gaussian taps, one row per sigma."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    w = torch.exp(-(taps**2) / (2.0 * sigma.reshape(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def blur_radius(sigma: float) -> int:
    """Taps each side of the centre for a Gaussian truncated at 3 sigma."""
    return max(1, math.ceil(3.0 * sigma))


def _blur_1d(x: Tensor, w: Tensor, dim: int) -> Tensor:
    radius = (w.shape[1] - 1) // 2
    size = x.shape[dim]
    pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
    xp = F.pad(x, pad, mode="replicate")
    acc = xp.narrow(dim, 0, size) * _col(w[:, 0])
    for k in range(1, w.shape[1]):
        acc.addcmul_(xp.narrow(dim, k, size), _col(w[:, k]))
    return acc


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian, one sigma per image, all truncated at `radius`; rounded."""
    w = gaussian_kernels(sigma.to(x.dtype), radius)
    return _blur_1d(_blur_1d(x, w, 3), w, 2).add_(0.5).floor_().clamp_(0.0, 255.0)
