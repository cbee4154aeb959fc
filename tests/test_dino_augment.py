"""Multi-crop augmentation: crop counts/sizes, equality with a torchvision composition written
from the recipe, and the probability of every operation over many seeded draws."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from skimage import data as skdata

from dino_cluster.dino.augment.reference import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropAugment,
)

RECIPE_P = {
    "flip": 0.5,
    "color_jitter": 0.8,
    "grayscale": 0.2,
}
RECIPE_BLUR = {"global1": 1.0, "global2": 0.1, "local": 0.5}
RECIPE_SOLARIZE = {"global2": 0.2}


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((64, 64), Image.BICUBIC)


@pytest.fixture(scope="module")
def grey_image() -> Image.Image:
    return Image.fromarray(skdata.camera()).resize((28, 28), Image.BICUBIC)  # mode "L"


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def test_crop_counts_sizes_and_dtype(astronaut, grey_image):
    aug = MultiCropAugment(global_size=32, local_size=16, n_local=3)
    for img in (astronaut, grey_image):
        crops = aug(img)
        assert len(crops) == 5
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        assert all(c.dtype == torch.float32 for c in crops)
    # defaults: 2 x 224 + 8 x 96
    crops = MultiCropAugment()(astronaut)
    assert [tuple(c.shape[1:]) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 8
    assert len(MultiCropAugment(n_local=0)(astronaut)) == 2
    with pytest.raises(TypeError):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        MultiCropAugment(local_scale=(0.5, 0.1))


def test_deterministic_given_seeds(astronaut):
    aug = MultiCropAugment(global_size=24, local_size=12, n_local=2)
    seed_all(3)
    a = aug(astronaut)
    seed_all(3)
    b = aug(astronaut)
    seed_all(4)
    c = aug(astronaut)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# A composition written directly from the recipe with stock torchvision / PIL pieces.
class _RecipeBlur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _RecipeSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def _recipe_pipeline(gsize: int, lsize: int, n_local: int):
    flip_jitter_gray = [
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bic = T.InterpolationMode.BICUBIC
    g1 = T.Compose(
        [T.RandomResizedCrop(gsize, (0.4, 1.0), interpolation=bic), *flip_jitter_gray]
        + [_RecipeBlur(1.0), *norm]
    )
    g2 = T.Compose(
        [T.RandomResizedCrop(gsize, (0.4, 1.0), interpolation=bic), *flip_jitter_gray]
        + [_RecipeBlur(0.1), _RecipeSolarize(0.2), *norm]
    )
    loc = T.Compose(
        [T.RandomResizedCrop(lsize, (0.05, 0.4), interpolation=bic), *flip_jitter_gray]
        + [_RecipeBlur(0.5), *norm]
    )
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(n_local)]


def test_equals_recipe_composition_bit_for_bit(astronaut, grey_image):
    ours = MultiCropAugment(global_size=32, local_size=16, n_local=2)
    recipe = _recipe_pipeline(32, 16, 2)
    seen: set[str] = set()
    for seed in range(12):
        for img in (astronaut, grey_image):
            record: list[tuple[str, bool]] = []
            seed_all(seed)
            a = ours(img, record=record)
            seed_all(seed)
            b = recipe(img.convert("RGB"))
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)
            seen |= {name for name, applied in record if applied}
    # the comparison exercised every operation, solarize included
    assert {"global2.solarize", "global2.blur", "local.grayscale", "local.blur"} <= seen


def test_probabilities_are_the_recipe(astronaut):
    probs = MultiCropAugment().probabilities()
    expected = {}
    for view in ("global1", "global2", "local"):
        for op, p in RECIPE_P.items():
            expected[f"{view}.{op}"] = p
        expected[f"{view}.blur"] = RECIPE_BLUR[view]
    expected["global2.solarize"] = RECIPE_SOLARIZE["global2"]
    assert probs == expected


def test_operation_frequencies_match_probabilities():
    # Tiny images keep 1,200 full draws fast; decisions are read from the record.
    img = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    aug = MultiCropAugment(global_size=8, local_size=4, n_local=2)
    seed_all(1234)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _ in range(1200):
        record: list[tuple[str, bool]] = []
        aug(img, record=record)
        for name, applied in record:
            counts[name][0] += int(applied)
            counts[name][1] += 1
    probs = aug.probabilities()
    assert set(counts) == set(probs)
    for name, (k, n) in counts.items():
        p = probs[name]
        assert n == (2400 if name.startswith("local") else 1200)
        sd = math.sqrt(n * p * (1 - p))
        assert abs(k - n * p) <= 4.5 * sd + 1e-9, f"{name}: {k}/{n} vs p={p}"


def test_blur_radius_uniform_between_0_1_and_2(monkeypatch, astronaut):
    radii: list[float] = []
    real_blur = ImageFilter.GaussianBlur

    def spy(radius=2):
        radii.append(radius)
        return real_blur(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", spy)
    img = astronaut.resize((8, 8))
    aug = MultiCropAugment(global_size=4, local_size=4, n_local=0)
    seed_all(7)
    for _ in range(600):
        aug(img)
    r = np.array(radii)
    assert 600 <= len(r) < 800  # global1 always (p=1), global2 with p=0.1
    assert r.min() >= 0.1 and r.max() <= 2.0
    assert r.min() < 0.15 and r.max() > 1.95
    assert abs(r.mean() - 1.05) < 4.5 * (1.9 / math.sqrt(12)) / math.sqrt(len(r))


def test_crop_area_fraction_within_scale(monkeypatch, astronaut):
    import torchvision.transforms.functional as TF

    areas: list[float] = []
    real = TF.resized_crop

    def spy(img, top, left, height, width, *args, **kwargs):
        areas.append(height * width / (img.size[0] * img.size[1]))
        return real(img, top, left, height, width, *args, **kwargs)

    monkeypatch.setattr("dino_cluster.dino.augment.reference.TF.resized_crop", spy)
    aug = MultiCropAugment(global_size=8, local_size=4, n_local=1)
    seed_all(0)
    for _ in range(200):
        aug(astronaut)
    glob = np.array([a for i, a in enumerate(areas) if i % 3 < 2])
    loc = np.array(areas[2::3])
    assert glob.min() >= 0.4 - 0.03 and glob.max() <= 1.0
    assert loc.min() >= 0.05 - 0.01 and loc.max() <= 0.4 + 0.03
    assert loc.mean() < 0.3 < glob.mean()


def test_eval_transform(astronaut, grey_image):
    big = astronaut.resize((400, 300))
    out = EvalTransform()(big)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert EvalTransform(resize=36, crop=32)(grey_image).shape == (3, 32, 32)
    # resize of the short side then centre crop, normalised with ImageNet statistics
    expected = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
        ]
    )(big)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (expected - mean) / std)
    with pytest.raises(ValueError):
        EvalTransform(resize=100, crop=224)
