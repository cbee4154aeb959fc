"""Multi-crop augmentation exactly as the DINO reference (PIL + torchvision), and the eval
transform used by k-NN evaluation.

Per image: global crop 1, global crop 2, then `n_local` local crops. Every crop is a
RandomResizedCrop (bicubic), horizontal flip (p=0.5), ColorJitter(0.4, 0.4, 0.2, 0.1) (p=0.8),
grayscale (p=0.2), then a crop-specific Gaussian blur (global 1: p=1.0, global 2: p=0.1,
locals: p=0.5; PIL radius ~ U[0.1, 2.0]), solarize at 128 on global 2 only (p=0.2), and
ImageNet normalisation.

Randomness comes from the same sources, in the same order, as the reference: torch's RNG for
the crop box, flip, jitter and grayscale, Python's `random` for blur and solarize. Seeding both
makes the output deterministic. Each random operation is a small named `RandomOp` whose
probability is visible (`MultiCropAugment.probabilities()`), and `__call__` can record every
decision it takes, so tests can check the probabilities without looking at pixels.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC

# A decision log: (crop name + "." + op name, applied?) appended in the order taken.
Record = list[tuple[str, bool]]
ImageOp = Callable[[Image.Image], Image.Image]


@dataclass
class RandomOp:
    """Applies `fn` with probability `p`; the decision uses torch's or Python's RNG."""

    name: str
    p: float
    fn: ImageOp
    rng: Literal["torch", "python"] = "torch"

    def decide(self) -> bool:
        if self.rng == "torch":
            return bool(torch.rand(1) < self.p)
        return random.random() < self.p

    def __call__(self, img: Image.Image) -> tuple[Image.Image, bool]:
        applied = self.decide()
        return (self.fn(img) if applied else img), applied


def gaussian_blur(radius_min: float = 0.1, radius_max: float = 2.0) -> ImageOp:
    """PIL Gaussian blur with radius ~ U[radius_min, radius_max] (Python RNG)."""

    def blur(img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(radius_min, radius_max)))

    return blur


def solarize(threshold: int = 128) -> ImageOp:
    def op(img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=threshold)

    return op


def grayscale(img: Image.Image) -> Image.Image:
    return TF.rgb_to_grayscale(img, num_output_channels=3)


@dataclass
class CropView:
    """One kind of crop: RandomResizedCrop(size, scale) followed by `ops` and normalisation."""

    name: str
    size: int
    scale: tuple[float, float]
    ops: list[RandomOp]
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    _normalize: T.Normalize = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._normalize = T.Normalize(self.mean, self.std)

    def __call__(self, img: Image.Image, record: Record | None = None) -> Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], BICUBIC, antialias=True)
        for op in self.ops:
            img, applied = op(img)
            if record is not None:
                record.append((f"{self.name}.{op.name}", applied))
        return self._normalize(TF.to_tensor(img))


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    if not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale}")


class MultiCropAugment:
    """PIL image -> [global1, global2, local_1 .. local_n] float CHW tensors, normalised."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if global_size < 1 or local_size < 1:
            raise ValueError("crop sizes must be >= 1")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        self.n_local = n_local

        def common() -> list[RandomOp]:
            # Fresh objects per view so that probabilities can be inspected per view.
            return [
                RandomOp("flip", 0.5, TF.hflip),
                RandomOp("color_jitter", 0.8, T.ColorJitter(0.4, 0.4, 0.2, 0.1)),
                RandomOp("grayscale", 0.2, grayscale),
            ]

        blur = gaussian_blur(0.1, 2.0)
        norm = dict(mean=tuple(mean), std=tuple(std))
        self.global1 = CropView(
            "global1",
            global_size,
            global_scale,
            common() + [RandomOp("blur", 1.0, blur, "python")],
            **norm,
        )
        self.global2 = CropView(
            "global2",
            global_size,
            global_scale,
            common()
            + [
                RandomOp("blur", 0.1, blur, "python"),
                RandomOp("solarize", 0.2, solarize(128), "python"),
            ],
            **norm,
        )
        self.local = CropView(
            "local",
            local_size,
            local_scale,
            common() + [RandomOp("blur", 0.5, blur, "python")],
            **norm,
        )

    @property
    def views(self) -> list[CropView]:
        return [self.global1, self.global2, self.local]

    def probabilities(self) -> dict[str, float]:
        """{"global1.flip": 0.5, ..., "local.blur": 0.5}: the probability of every random op."""
        return {f"{v.name}.{op.name}": op.p for v in self.views for op in v.ops}

    def __call__(self, img: Image.Image, record: Record | None = None) -> list[Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(f"MultiCropAugment expects a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")  # grey (Fashion-MNIST), palette, RGBA ...
        crops = [self.global1(img, record), self.global2(img, record)]
        crops += [self.local(img, record) for _ in range(self.n_local)]
        return crops


class EvalTransform:
    """Resize (shorter side, bicubic) + centre crop + normalise: the k-NN/linear eval input."""

    def __init__(
        self,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if crop < 1 or resize < crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
        self.transform = T.Compose(
            [
                T.Resize(resize, interpolation=BICUBIC),
                T.CenterCrop(crop),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, img: Image.Image) -> Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.transform(img)
