"""The fast multi-crop augmentation (`data.augment: fast`, and the CPU side of `gpu`).

Distribution equality with the reference is shown three ways: every compiled kernel is
bit-exact with the PIL / torchvision op it replaces (resize, brightness, contrast, saturation,
hue on a full colour cube, grayscale, blur, solarize, to_tensor + Normalize, decode); the whole
photometric stage equals the reference's op sequence given the same parameters; and the draws
(probabilities, ranges, op order, crop boxes) and the per-channel pixel statistics over 2,000
draws on real photos match the reference pipeline's within sampling tolerance.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from skimage import data as skdata

from dino_cluster.data import build_train_stream
from dino_cluster.data.pack import pack
from dino_cluster.dino.augment import batched as ab
from dino_cluster.dino.augment import fast_kernels as K
from dino_cluster.dino.augment.batched import BatchedMultiCropAugment, photometric
from dino_cluster.dino.augment.fast import FastMultiCropAugment, normalize_lut
from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment

SMALL = dict(global_size=32, local_size=16, n_local=2)
NORMALIZE = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((120, 90), Image.BICUBIC)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Random colours, greys and channel ties, 4 images of 24x24 (square: the kernels' crops)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    arr[:, :4] = arr[:, :4, :, :1]
    arr[:, 4:6, :, 1] = arr[:, 4:6, :, 0]
    arr[:, 6:8, :, 2] = arr[:, 6:8, :, 1]
    return arr


def planar(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)).reshape(3, -1)


def interleaved(x: np.ndarray, side: int) -> np.ndarray:
    return x.reshape(3, side, side).transpose(1, 2, 0)


def f32(v: float) -> float:
    """The reference draws factors as float32 torch values; use the same values."""
    return float(np.float32(v))


# -- kernels, one by one, against PIL ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "reference", "factors"),
    [
        (K.brightness_, TF.adjust_brightness, (0.6, 0.83, 1.0, 1.23, 1.4)),
        (K.contrast_, TF.adjust_contrast, (0.6, 0.93, 1.11, 1.4)),
        (K.saturation_, TF.adjust_saturation, (0.8, 0.97, 1.0, 1.2)),
    ],
)
def test_blend_kernels_bit_exact_with_pil(pixels, kernel, reference, factors):
    for img in pixels:
        for f in map(f32, factors):
            x = planar(img)
            kernel(x, np.float32(f))
            expected = np.asarray(reference(Image.fromarray(img), f))
            np.testing.assert_array_equal(interleaved(x, 24), expected)


def test_hue_kernel_bit_exact_with_pil_on_every_colour():
    codes = np.arange(1 << 24, dtype=np.uint32)
    cube = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    img = Image.fromarray(cube.reshape(4096, 4096, 3))
    for hue_factor in map(f32, (-0.1, 0.0371)):
        x = np.ascontiguousarray(cube.T)
        K.hue_(x, np.int32(np.float64(hue_factor) * 255.0) & 255)
        expected = np.asarray(TF.adjust_hue(img, hue_factor)).reshape(-1, 3)
        np.testing.assert_array_equal(x.T, expected)


def test_grayscale_and_normalize_bit_exact(pixels):
    x = planar(pixels[0])
    K.grayscale_(x)
    expected = np.asarray(TF.rgb_to_grayscale(Image.fromarray(pixels[0]), 3))
    np.testing.assert_array_equal(interleaved(x, 24), expected)
    lut = normalize_lut(IMAGENET_MEAN, IMAGENET_STD)
    ref = NORMALIZE(TF.to_tensor(Image.fromarray(pixels[1]))).numpy()
    ours = np.stack([lut[c][pixels[1][..., c]] for c in range(3)])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("side", [5, 16, 96, 224])
def test_blur_kernel_bit_exact_with_pil_gaussian_blur(photo, side):
    img = np.asarray(photo.resize((side, side), Image.BICUBIC))
    rng = np.random.default_rng(side)
    for sigma in map(f32, (0.1, 0.5, 1.0, 1.5, 2.0, *rng.uniform(0.1, 2.0, 6))):
        x = planar(img)
        K.gaussian_blur_(x, side, np.float32(sigma))
        expected = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))
        np.testing.assert_array_equal(interleaved(x, side), expected)


def test_resize_is_pils_bicubic_crop_and_resize(photo):
    img = np.asarray(photo.resize((300, 200), Image.BICUBIC))
    planes = np.empty((3, 300, 200), np.uint8)
    K.transpose_to_planes(img, planes)
    boxes = np.array([[0, 0, 200, 300], [10, 20, 150, 120], [5, 7, 40, 33], [100, 250, 9, 50]])
    pil = Image.fromarray(img)
    for size in (96, 32, 16):
        out = np.empty((len(boxes), 3, size, size), np.uint8)
        K.resize_crops(planes, boxes, out)
        for crop, (top, left, h, w) in zip(out, boxes.tolist(), strict=True):
            region = pil.crop((left, top, left + w, top + h))
            # PIL's two passes in their classic order (horizontal, then vertical): exact
            two_pass = region.resize((size, h), Image.BICUBIC).resize((size, size), Image.BICUBIC)
            np.testing.assert_array_equal(crop.transpose(1, 2, 0), np.asarray(two_pass))
            # Pillow 13 sometimes runs the vertical pass first: within 2 levels then
            direct = np.asarray(region.resize((size, size), Image.BICUBIC)).astype(int)
            assert np.abs(crop.transpose(1, 2, 0).astype(int) - direct).max() <= 2


def jpeg_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "save",
    [dict(quality=90), dict(quality=97, subsampling=0), dict(quality=85, progressive=True)],
)
def test_decode_equals_pils(photo, save):
    data = jpeg_bytes(photo.resize((333, 250)), **save)
    for draft in (True, False):
        aug = FastMultiCropAugment(**SMALL, draft=draft)
        ours = aug._decode(Image.open(io.BytesIO(data)))
        expected = aug._prepare(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(ours, np.asarray(expected))
    for mode in ("L", "CMYK"):
        other = jpeg_bytes(photo.convert(mode))
        ours = FastMultiCropAugment(**SMALL)._decode(Image.open(io.BytesIO(other)))
        expected = Image.open(io.BytesIO(other)).convert("RGB")
        np.testing.assert_array_equal(ours, np.asarray(expected))
    # corrupt data surfaces as PIL's OSError (the reader counts it as a bad image)
    with pytest.raises(OSError):
        FastMultiCropAugment(**SMALL).per_sample(Image.open(io.BytesIO(data[:2000])))


# -- the whole photometric stage against the reference's op sequence --------------------------


def random_table(n: int, seed: int, **force: float) -> torch.Tensor:
    aug = BatchedMultiCropAugment(n_local=n - 2, generator=torch.Generator().manual_seed(seed))
    p = aug.draw()[1]
    for col, value in force.items():
        p[:, getattr(ab, col.upper())] = value
    return p


def reference_ops(img: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    """The reference's per-crop ops (reference.py: flip, ColorJitter in its op order,
    grayscale, blur, solarize, to_tensor + Normalize) driven by one parameter row."""
    im = Image.fromarray(img)
    if p[ab.FLIP] > 0:
        im = TF.hflip(im)
    if p[ab.JITTER] > 0:
        for op in p[ab.ORDER : ab.ORDER + 4].long().tolist():
            factor = float(p[[ab.BRIGHTNESS, ab.CONTRAST, ab.SATURATION, ab.HUE][op]])
            fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            im = fn[op](im, factor)
    if p[ab.GRAY] > 0:
        im = TF.rgb_to_grayscale(im, 3)
    if p[ab.BLUR] > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius=float(p[ab.SIGMA])))
    if p[ab.SOLARIZE] > 0:
        im = ImageOps.solarize(im, 128)
    return NORMALIZE(TF.to_tensor(im))


def test_photometric_stage_equals_the_reference_ops_bit_for_bit(pixels, photo):
    crops = np.concatenate([pixels] * 6)  # 24 crops: many op orders, flips, blurs
    crops[:4] = np.asarray(photo.resize((24, 24)))
    p = random_table(24, seed=11)
    p[::3, ab.SOLARIZE] = 1.0
    p[1::4, ab.BLUR] = 1.0
    aug = FastMultiCropAugment(global_size=24, local_size=24, n_local=22, exact_hue=True)
    stacked = [torch.from_numpy(c.transpose(2, 0, 1).copy())[None] for c in crops]
    ours = aug.per_batch([*stacked, p[None]])
    for i, crop in enumerate(crops):
        assert torch.equal(ours[i][0], reference_ops(crop, p[i])), i
    assert {int(p[i, ab.ORDER]) for i in range(24) if p[i, ab.JITTER] > 0} == {0, 1, 2, 3}


def test_default_float_hue_is_batched_ops_hue_and_close_to_the_reference(pixels, photo):
    """exact_hue=False (the default): hue is batched_ops' float HSV rotation; every other op
    stays bit-exact, so crops without colour jitter equal the reference exactly."""
    x = planar(pixels[0])
    turns = float(np.float32(np.int32(0.07 * 255) / 255.0))
    K.hue_float_(x, np.float32(turns))
    theirs = ops_hue(pixels[0], turns)
    diff = np.abs(interleaved(x, 24).astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float association, at most a level
    crops = np.concatenate([pixels] * 4)
    crops[:4] = np.asarray(photo.resize((24, 24)))
    p = random_table(16, seed=12)
    p[::2, ab.JITTER] = 0.0
    aug = FastMultiCropAugment(global_size=24, local_size=24, n_local=14)
    stacked = [torch.from_numpy(c.transpose(2, 0, 1).copy())[None] for c in crops]
    ours = aug.per_batch([*stacked, p[None]])
    level = 1.0 / (255.0 * max(IMAGENET_STD))
    for i, crop in enumerate(crops):
        expected = reference_ops(crop, p[i])
        if p[i, ab.JITTER] == 0:
            assert torch.equal(ours[i][0], expected), i
        else:  # PIL's 8-bit HSV rounding: a few levels, on average below one
            assert (ours[i][0] - expected).abs().mean() < 2 * level, i


def ops_hue(img: np.ndarray, turns: float) -> np.ndarray:
    from dino_cluster.dino.augment import batched_ops

    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None]
    return batched_ops.hue_(x, torch.tensor([turns]))[0].permute(1, 2, 0).numpy().astype(int)


def test_per_sample_crops_are_the_references_resized_crops(photo):
    aug = FastMultiCropAugment(global_size=48, local_size=24, n_local=4, draft=False)
    torch.manual_seed(3)
    *crops, params = aug.per_sample(photo)
    torch.manual_seed(3)
    boxes, again = aug.draw_numpy(*photo.size)
    assert torch.equal(params, torch.from_numpy(again))
    for crop, (top, left, h, w), view in zip(crops, boxes.tolist(), aug.views, strict=True):
        region = photo.crop((left, top, left + w, top + h))
        two_pass = region.resize((view.size, h), Image.BICUBIC)
        expected = two_pass.resize((view.size, view.size), Image.BICUBIC)
        assert crop.dtype == torch.uint8 and crop.shape == (3, view.size, view.size)
        np.testing.assert_array_equal(crop.permute(1, 2, 0).numpy(), np.asarray(expected))


# -- draws -------------------------------------------------------------------------------------


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_draw_table_is_batched_draw_and_follows_the_recipe():
    aug = FastMultiCropAugment(n_local=8, generator=torch.Generator().manual_seed(0))
    twin = BatchedMultiCropAugment(n_local=8, generator=torch.Generator().manual_seed(0))
    assert aug.probabilities() == MultiCropAugment(n_local=8).probabilities()
    tables = []
    for _ in range(3000):
        _, p = aug.draw_numpy(500, 375)
        _, q = twin.draw()
        # same uniforms, same table: decisions and order exactly, factors to float32 rounding
        cols = [ab.FLIP, ab.JITTER, ab.GRAY, ab.BLUR, ab.SOLARIZE, *range(ab.ORDER, ab.ORDER + 4)]
        assert np.array_equal(p[:, cols], q[:, cols].numpy())
        np.testing.assert_allclose(p, q.numpy(), rtol=0, atol=1e-6)
        tables.append(p)
    flat = np.stack(tables)  # (draws, 10, N_PARAMS)
    expected = aug.probabilities()
    for view, rows in (("global1", [0]), ("global2", [1]), ("local", list(range(2, 10)))):
        for op, col in (("flip", ab.FLIP), ("color_jitter", ab.JITTER), ("grayscale", ab.GRAY),
                        ("blur", ab.BLUR), ("solarize", ab.SOLARIZE)):  # fmt: skip
            prob = expected.get(f"{view}.{op}", 0.0)
            hits = int(flat[:, rows, col].sum())
            assert binomial_ok(hits, 3000 * len(rows), prob), (view, op, hits, prob)
    values = flat.reshape(-1, ab.N_PARAMS)
    ranges = {ab.BRIGHTNESS: (0.6, 1.4), ab.CONTRAST: (0.6, 1.4), ab.SATURATION: (0.8, 1.2),
              ab.HUE: (-0.1, 0.1), ab.SIGMA: (0.1, 2.0)}  # fmt: skip
    for col, (lo, hi) in ranges.items():
        v = values[:, col]
        assert lo <= v.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < v.max() <= hi
        assert abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)


def test_crop_boxes_follow_torchvision_random_resized_crop():
    torch.manual_seed(0)
    w, h = 500, 375
    aug = FastMultiCropAugment(n_local=8)
    ours, theirs = [], []
    img = Image.new("RGB", (w, h))
    for _ in range(300):
        boxes, _ = aug.draw_numpy(w, h)
        for i, (top, left, ch, cw) in enumerate(boxes.tolist()):
            assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
            ours.append((i < 2, ch * cw / (w * h), cw / ch, (left + cw / 2) / w))
            scale = aug.views[i].scale
            top, left, ch, cw = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            theirs.append((i < 2, ch * cw / (w * h), cw / ch, (left + cw / 2) / w))
    a, b = np.array(ours), np.array(theirs)
    for kind in (1.0, 0.0):
        x, y = a[a[:, 0] == kind, 1:], b[b[:, 0] == kind, 1:]
        for k in range(3):  # area fraction, aspect ratio, horizontal centre
            for q in (0.1, 0.5, 0.9):
                assert abs(np.quantile(x[:, k], q) - np.quantile(y[:, k], q)) < 0.05 * max(
                    1.0, np.quantile(y[:, k], q)
                )
    u = np.full((1, K.DRAWS), 0.5)
    assert K.crop_box(1000, 50, 0.9, 1.0, u[0]) == (0, 466, 50, 67)  # torchvision's fallback


# -- the output distribution against the reference pipeline -----------------------------------


def crop_statistics(aug, images: list[Image.Image], draws: int, seed: int) -> np.ndarray:
    """Per draw and crop kind (global1, global2, local): per-channel mean and std of the
    normalised output and the mean horizontal gradient (the amount of blur)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random

    random.seed(seed)
    rows = []
    for d in range(draws):
        crops = aug(images[d % len(images)].copy())
        for kind, group in enumerate((crops[:1], crops[1:2], crops[2:])):
            c = torch.stack(group)
            grad = (c[..., 1:] - c[..., :-1]).abs().mean()
            stats = [kind, *c.mean(dim=(0, 2, 3)).tolist(), *c.std(dim=(0, 2, 3)).tolist(), grad]
            rows.append(stats)
    return np.array(rows, dtype=np.float64)


def test_pixel_statistics_match_the_reference_over_2000_draws_on_real_photos():
    names = ("astronaut", "chelsea", "coffee", "rocket")
    images = [Image.fromarray(getattr(skdata, n)()).resize((160, 120)) for n in names]
    kw = dict(global_size=48, local_size=24, n_local=2)
    ref = crop_statistics(MultiCropAugment(**kw), images, 2000, seed=1)
    for exact_hue in (False, True):
        ours = crop_statistics(FastMultiCropAugment(**kw, exact_hue=exact_hue), images, 2000, 0)
        for kind in (0, 1, 2):
            a, b = ours[ours[:, 0] == kind, 1:], ref[ref[:, 0] == kind, 1:]
            se = np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b))
            diff = np.abs(a.mean(axis=0) - b.mean(axis=0))
            # 7 statistics per kind: 4.5 standard errors each, plus float slack
            assert np.all(diff < 4.5 * se + 1e-3), (exact_hue, kind, a.mean(0), b.mean(0), se)


# -- stages, stream, modes ---------------------------------------------------------------------


def test_shapes_modes_and_determinism(photo):
    aug = FastMultiCropAugment(**SMALL)
    encoded = Image.open(io.BytesIO(jpeg_bytes(photo)))
    for img in (photo, photo.convert("L"), photo.convert("RGBA"), photo.convert("P"), encoded):
        crops = aug(img)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    torch.manual_seed(5)
    a = aug(photo)
    torch.manual_seed(5)
    b = aug(photo)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(TypeError):
        aug.per_sample(np.zeros((8, 8, 3), dtype=np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameter table"):
        aug.per_batch([torch.zeros(1, 3, 32, 32, dtype=torch.uint8)] * 4 + [torch.zeros(1, 3, 9)])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo) -> Path:
    root = tmp_path_factory.mktemp("fast")
    folder = root / "images" / "photos"
    folder.mkdir(parents=True)
    for i in range(12):
        img = photo.rotate(i * 7).crop((i, i, 100 + i, 80 + i))
        img.save(folder / f"{i:03d}.jpg", quality=90)
    pack(str(root / "images"), str(root / "shards"), max_samples_per_shard=6, progress=False)
    return root / "shards"


def stream_batches(shards: Path, transform, workers: int = 0) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    stream = build_train_stream(
        str(shards), transform=transform, global_batch=4, rank=0, world_size=1,
        num_workers=workers, seed=0, shuffle_buffer=4,
    )  # fmt: skip
    return list(stream.epoch_iter(0))


def test_stream_cpu_stage_then_per_batch_gives_the_same_batches(shards):
    aug = FastMultiCropAugment(**SMALL)
    whole = stream_batches(shards, aug)
    split = stream_batches(shards, aug.cpu_stage())
    assert len(whole) == 3 and split[0][0].dtype == torch.uint8
    assert split[0][-1].shape == (4, 4, K.N_PARAMS)
    for full, raw in zip(whole, split, strict=True):
        assert all(c.dtype == torch.float32 for c in full)
        assert all(torch.equal(a, b) for a, b in zip(full, aug.per_batch(raw), strict=True))
    # the device stage (batched.py's torch ops) takes the same batches: close, not exact
    # (its hue and blur approximate PIL's, see batched_ops.py)
    crops = split[0][0]
    approx = photometric(crops, split[0][-1][:, 0])
    assert (approx - whole[0][0]).abs().mean() < 0.05


def test_data_loader_workers_are_deterministic(shards):
    aug = FastMultiCropAugment(**SMALL)
    first = stream_batches(shards, aug, workers=2)
    second = stream_batches(shards, aug, workers=2)
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_stage_batches_run_on_cuda(shards):
    aug = FastMultiCropAugment(**SMALL)
    raw = stream_batches(shards, aug.cpu_stage())[0]
    on_gpu = aug.per_batch([*(c.cuda() for c in raw[:-1]), raw[-1]])
    on_cpu = aug.per_batch(raw)
    assert on_gpu[0].is_cuda
    assert all((g.cpu() - c).abs().mean() < 0.05 for g, c in zip(on_gpu, on_cpu, strict=True))
