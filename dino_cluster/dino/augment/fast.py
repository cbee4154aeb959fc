"""The reference multi-crop recipe at several times its speed per core, every operation but
one bit-exact (`data.augment: fast`; its CPU stage also feeds `gpu`).

`FastMultiCropAugment` runs the same two stages as `batched.BatchedMultiCropAugment`, and
emits the same parameter table, but every pixel operation is a compiled kernel
(`fast_kernels`, numba) that does the reference's own arithmetic:

- `per_sample(img)` (per image, in a data worker): JPEG decode with libjpeg-turbo through
  simplejpeg (the same library and settings as PIL's decoder: identical pixels, 0.65-0.8 ms
  instead of ~1.0 ms plus PIL's copy to numpy); PIL for other formats and as the fallback.
  One torch.rand call draws every crop's 36 uniforms (batched.py's layout), one kernel turns
  them into boxes and parameters, one transposes the image into planes and one resizes every
  box with PIL's fixed-point bicubic. Output: uint8 (3, S, S) crops + the float32 table.
- `per_batch(stacked)`: on CPU tensors, the photometric kernel per crop index (flip, colour
  jitter in the crop's own op order, grayscale, Gaussian blur, solarize, to_tensor +
  Normalize); on an accelerator, batched.py's torch ops (`photometric`), so `cpu_stage()` +
  `per_batch` on the GPU is the `gpu` path with this faster CPU side.

Given the same crop box and parameters the CPU output equals the reference's PIL +
torchvision ops bit for bit (tests/test_augment_fast.py), with two documented exceptions:

- hue: by default batched_ops' float HSV rotation (`exact_hue=False`, the shift quantised as
  the reference's; pixels a few levels from PIL's 8-bit HSV round trip), because PIL's exact
  round trip (`exact_hue=True`, `fast_kernels.hue_`, checked on all 2**24 colours) costs 5.5x
  more, ~0.8 ms per sample: 3.5x the reference instead of 4.0x (benchmarks/README.md).
- resize pass order: PIL's classic horizontal-then-vertical order is used; Pillow 13 sometimes
  runs the vertical pass first, which rounds the intermediate differently (up to 2 levels
  on some pixels of those crops).

What also differs from the reference is where the randomness comes from (torch's RNG, 36
uniforms per crop in batched.py's fixed order, instead of torch + Python's `random`
interleaved), not what is drawn.

Kernels compile on first use (numba, ~10-20 s) and are cached on disk next to the module (or in
NUMBA_CACHE_DIR), so later processes and forked data workers load them in well under a second.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dino_cluster.dino.augment import fast_kernels as K
from dino_cluster.dino.augment.batched import BatchedMultiCropAugment, keep_freed_memory
from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD

try:  # an installed dependency; the PIL path below keeps working without it
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: torchvision's to_tensor + Normalize of every level, per channel,
    computed by torchvision itself so the kernel's table lookup is bit-identical."""
    import torchvision.transforms.functional as TF

    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    img = Image.fromarray(levels.permute(1, 2, 0).numpy().copy())
    out = TF.normalize(TF.to_tensor(img), list(mean), list(std))
    return np.ascontiguousarray(out[:, 0, :].numpy())


class FastMultiCropAugment(BatchedMultiCropAugment):
    """PIL image -> [global1, global2, local_1 .. local_n] float CHW normalised (both stages);
    or `per_sample` (uint8 crops + parameters) and `per_batch` (stacked -> float crops).
    Arguments as `BatchedMultiCropAugment`; `use_simplejpeg=False` decodes with PIL only,
    `exact_hue=True` runs PIL's 8-bit HSV round trip for hue (bit-exact, slower)."""

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
        use_simplejpeg: bool = True,
        exact_hue: bool = False,
    ) -> None:
        super().__init__(global_size, local_size, n_local, global_scale, local_scale, mean, std,
                         draft=draft, generator=generator, tune_malloc=tune_malloc)  # fmt: skip
        self.lazy_decode = True  # the raw JPEG bytes are decoded here (see _decode)
        self.use_simplejpeg = use_simplejpeg and simplejpeg is not None
        self.exact_hue = exact_hue
        self._scales = np.array([v.scale for v in self.views], dtype=np.float64)
        self._thresholds_np = self._thresholds.numpy().astype(np.float32)
        self._low_np = self._low.numpy().astype(np.float32)
        self._span_np = self._span.numpy().astype(np.float32)
        self._lut = normalize_lut(self.mean, self.std)
        self._buffers: dict[str, np.ndarray] = {}
        # crop indices per output size, in view order (global1, global2 | locals)
        self._groups: dict[int, list[int]] = {}
        for i, v in enumerate(self.views):
            self._groups.setdefault(v.size, []).append(i)

    # -- stage 1: per sample ------------------------------------------------------------------
    def _scratch(self, name: str, size: int) -> np.ndarray:
        """A uint8 buffer of `size` bytes reused from sample to sample (never returned)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(max(size, 1 << 20), np.uint8)
        return buf[:size]

    def _decode(self, img: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 C-contiguous pixels of `img`, decoded at the draft scale."""
        k = self._draft_factor(*img.size) if self.draft else 1
        data = _pending_jpeg_bytes(img) if self.use_simplejpeg else None
        if data is not None:
            width, height = img.size
            # the smallest DCT scale at least size / k: 1/k, as PIL's draft picks
            size = dict(min_width=-(-width // k), min_height=-(-height // k)) if k > 1 else {}
            out_w, out_h = -(-width // k), -(-height // k)
            try:
                # into a buffer kept between samples: its pages stay mapped and cached
                # (measured: the transpose that reads it 0.31 ms instead of 0.38)
                buf = self._scratch("decode", out_w * out_h * 3)
                return simplejpeg.decode_jpeg(data, colorspace="rgb", buffer=buf, **size)
            except ValueError:
                pass  # CMYK, arithmetic coding, a recoverable libjpeg warning: let PIL decide
        img = self._prepare(img)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return np.ascontiguousarray(np.asarray(img))

    def draw_numpy(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_crops, 4) boxes (top, left, h, w) and the (n_crops, N_PARAMS) parameter table,
        from one torch.rand call (the global generator, or `generator`)."""
        u = torch.rand(self.n_crops, K.DRAWS, generator=self.generator).numpy()
        boxes = np.empty((self.n_crops, 4), np.int64)
        params = np.empty((self.n_crops, K.N_PARAMS), np.float32)
        K.draw_table(u, width, height, self._scales, self._thresholds_np, self._low_np,
                     self._span_np, boxes, params)  # fmt: skip
        return boxes, params

    def per_sample(self, img: Image.Image) -> list[Tensor]:
        """[uint8 (3, S, S) per crop] + [float32 (n_crops, N_PARAMS) parameters]."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        if self.tune_malloc:
            keep_freed_memory()
        hwc = self._decode(img)
        height, width = hwc.shape[:2]
        boxes, params = self.draw_numpy(width, height)
        planes = self._scratch("planes", 3 * width * height).reshape(3, width, height)
        K.transpose_to_planes(hwc, planes)
        out: list[Tensor | None] = [None] * self.n_crops
        for size, idx in self._groups.items():
            crops = np.empty((len(idx), 3, size, size), np.uint8)
            K.resize_crops(planes, boxes[idx], crops)
            tensors = torch.from_numpy(crops)
            for j, i in enumerate(idx):
                out[i] = tensors[j]
        return [*out, torch.from_numpy(params)]  # type: ignore[list-item]

    # -- stage 2: per batch -------------------------------------------------------------------
    def per_batch(self, stacked: list[Tensor]) -> list[Tensor]:
        """Collated `per_sample` outputs -> float32 (B, 3, S, S) per crop index, on the crops'
        device: compiled kernels on the CPU, batched.py's torch ops elsewhere."""
        if len(stacked) != self.n_crops + 1 or stacked[0].device.type != "cpu":
            return super().per_batch(stacked)
        *crops, params = stacked
        batch = crops[0].shape[0]
        if params.shape != (batch, self.n_crops, K.N_PARAMS):
            raise ValueError(f"parameter table of shape {tuple(params.shape)} does not fit")
        table = params.detach().to(torch.float32).numpy()
        out = []
        for i, c in enumerate(crops):
            if c.dtype != torch.uint8 or c.ndim != 4 or c.shape[1] != 3 or c.shape[2] != c.shape[3]:
                got = f"{c.dtype} {tuple(c.shape)}"
                raise ValueError(f"expected uint8 (B, 3, S, S) crops, got {got}")
            src = c.contiguous().numpy()
            dst = np.empty(src.shape, np.float32)
            K.photometric_batch(
                src, np.ascontiguousarray(table[:, i]), self._lut, dst, self.exact_hue
            )
            out.append(torch.from_numpy(dst))
        return out

    def cpu_stage(self) -> FastSampleStage:
        """A per-sample transform that stops after `per_sample` (the `gpu` path's CPU side)."""
        return FastSampleStage(self)


class FastSampleStage:
    """`FastMultiCropAugment.per_sample` as a plain per-image transform (no `per_batch`)."""

    def __init__(self, augment: FastMultiCropAugment) -> None:
        self.augment = augment
        self.lazy_decode = augment.lazy_decode

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return self.augment.per_sample(img)


def _pending_jpeg_bytes(img: Image.Image) -> bytes | None:
    """The undecoded JPEG bytes behind a lazily opened image (data/decode.py opens shard bytes
    from a BytesIO), or None when the pixels are already loaded or come from elsewhere."""
    fp = getattr(img, "fp", None)
    if img.format != "JPEG" or not getattr(img, "tile", None) or not isinstance(fp, io.BytesIO):
        return None
    if img.mode not in ("RGB", "L"):
        return None  # CMYK / YCCK: PIL's own conversion to RGB is the reference's
    return fp.getvalue()
