"""The fast multi-crop path: same decisions and pixels as the reference augmentation, and the
tensor photometric ops bit-exact against torchvision's PIL ops."""

from __future__ import annotations

import io
import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from skimage import data as skdata

from dino_cluster.dino import MultiCropAugment
from dino_cluster.dino import augment_fast as fast
from dino_cluster.dino.augment_fast import FastMultiCropAugment


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((80, 60), Image.BICUBIC)


@pytest.fixture(scope="module")
def pixels() -> tuple[np.ndarray, list[Image.Image]]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    arr[:, :8] = arr[:, :8, :, :1]  # grey pixels (zero saturation)
    arr[:, 8:12, :, 1] = arr[:, 8:12, :, 0]  # ties between channels
    return arr, [Image.fromarray(a) for a in arr]


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.mark.parametrize(
    ("name", "factors"),
    [
        ("brightness", (0.6, 1.0, 1.37)),
        ("contrast", (0.6, 0.93, 1.4)),
        ("saturation", (0.8, 1.0, 1.2)),
        ("hue", (-0.1, 0.0371, 0.0999)),
    ],
)
def test_tensor_ops_bit_exact_batched(pixels, name, factors):
    arr, images = pixels
    ref_fn = getattr(TF, f"adjust_{name}")
    ours_fn = getattr(fast, f"adjust_{name}")
    x = torch.from_numpy(arr.astype(np.float32))
    expected = np.stack([np.asarray(ref_fn(im, f)) for im, f in zip(images, factors, strict=True)])
    batched = ours_fn(x, torch.tensor(factors))
    np.testing.assert_array_equal(batched.numpy().astype(np.uint8), expected)
    single = ours_fn(x[:1], factors[0])
    np.testing.assert_array_equal(single.numpy().astype(np.uint8), expected[:1])


def test_tensor_grayscale_and_solarize_bit_exact(pixels):
    arr, images = pixels
    x = torch.from_numpy(arr.astype(np.float32))
    gray = np.stack([np.asarray(TF.rgb_to_grayscale(im, 3)) for im in images])
    sol = np.stack([np.asarray(ImageOps.solarize(im, 128)) for im in images])
    np.testing.assert_array_equal(fast.grayscale(x).numpy().astype(np.uint8), gray)
    np.testing.assert_array_equal(fast.solarize(x).numpy().astype(np.uint8), sol)


def test_same_decisions_and_pixels_as_reference(photo):
    grey = photo.convert("L")
    ref = MultiCropAugment(global_size=32, local_size=16, n_local=3)
    ours = FastMultiCropAugment(global_size=32, local_size=16, n_local=3)
    assert ours.probabilities() == ref.probabilities()
    applied: set[str] = set()
    for seed in range(15):
        for img in (photo, grey):
            rec_ref: list[tuple[str, bool]] = []
            rec_ours: list[tuple[str, bool]] = []
            seed_all(seed)
            a = ref(img, record=rec_ref)
            seed_all(seed)
            b = ours(img, record=rec_ours)
            assert rec_ours == rec_ref
            assert [t.shape for t in a] == [t.shape for t in b]
            for x, y in zip(a, b, strict=True):
                assert y.is_contiguous() and y.dtype == torch.float32
                torch.testing.assert_close(y, x, rtol=0, atol=1e-5)  # normalise rounding only
            applied |= {name for name, on in rec_ours if on}
    assert {"global1.color_jitter", "global2.solarize", "local.grayscale"} <= applied


def test_operation_frequencies_match_probabilities():
    img = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    aug = FastMultiCropAugment(global_size=8, local_size=4, n_local=2)
    seed_all(99)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _ in range(600):  # decisions equal the reference's; this checks the rates directly
        record: list[tuple[str, bool]] = []
        aug(img, record=record)
        for name, on in record:
            counts[name][0] += int(on)
            counts[name][1] += 1
    probs = aug.probabilities()
    assert set(counts) == set(probs)
    for name, (k, n) in counts.items():
        p = probs[name]
        assert abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1e-9, f"{name}: {k}/{n}"


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_decodes_large_jpeg_at_reduced_scale(photo):
    aug = FastMultiCropAugment(global_size=32, local_size=16, n_local=2)
    assert aug._draft_factor(80, 60) == 1
    assert aug._draft_factor(2000, 1500) == 8
    big = _jpeg(photo.resize((1200, 900), Image.BICUBIC))
    prepared = aug._prepare(Image.open(io.BytesIO(big)))
    assert prepared.size == (150, 113)  # 1/8: the smallest local crop (5% area) is >= 16 px
    crops = aug(Image.open(io.BytesIO(big)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    no_draft = FastMultiCropAugment(global_size=32, local_size=16, n_local=2, draft=False)
    assert no_draft._prepare(Image.open(io.BytesIO(big))).size == (1200, 900)
    # an already-decoded image is used as is
    loaded = Image.open(io.BytesIO(big))
    loaded.load()
    assert aug._prepare(loaded).size == (1200, 900)


def test_reducing_gap_option_stays_close(photo):
    big = photo.resize((640, 480), Image.BICUBIC)
    exact = FastMultiCropAugment(global_size=32, local_size=16, n_local=2)
    gap = FastMultiCropAugment(global_size=32, local_size=16, n_local=2, reducing_gap=2.0)
    seed_all(5)
    a = exact(big)
    seed_all(5)
    b = gap(big)
    diffs = [(x - y).abs().mean().item() for x, y in zip(a, b, strict=True)]
    assert max(diffs) < 0.1  # normalised units: a few uint8 levels on average at most
