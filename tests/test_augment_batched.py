"""The two-stage multi-crop augmentation: uint8 geometry per sample, photometrics per batch.

Checks the per-op pixels against PIL (bit-exact where the op is pointwise), the batching
machinery against a one-crop-at-a-time composition, the draw probabilities and ranges against
the recipe (binomial tolerance), determinism under seeds, the data stream's per-batch hook,
and the output statistics against the reference augmentation.
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

from dino_cluster.data import DataError, build_train_stream
from dino_cluster.data.pack import pack
from dino_cluster.data.reader import split_transform
from dino_cluster.dino.augment import batched as ab
from dino_cluster.dino.augment import batched_ops as ops
from dino_cluster.dino.augment.batched import BatchedMultiCropAugment, photometric
from dino_cluster.dino.augment.reference import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment

SMALL = dict(global_size=32, local_size=16, n_local=2)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Random colours plus grey pixels (zero chroma) and channel ties, 4 images of 24x20."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    arr[:, :4] = arr[:, :4, :, :1]
    arr[:, 4:6, :, 1] = arr[:, 4:6, :, 0]
    arr[:, 6:8, :, 2] = arr[:, 6:8, :, 1]
    return arr


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((120, 90), Image.BICUBIC)


def as_float(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).float()


def as_array(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8)


# -- per-op pixels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "factors"),
    [
        ("brightness", (0.6, 1.0, 1.23, 1.4)),
        ("contrast", (0.6, 0.93, 1.11, 1.4)),
        ("saturation", (0.8, 0.97, 1.0, 1.2)),
    ],
)
def test_blend_ops_bit_exact_with_pil_one_factor_per_image(pixels, name, factors):
    ours = getattr(ops, f"{name}_")(as_float(pixels), torch.tensor(factors))
    ref = getattr(TF, f"adjust_{name}")
    expected = np.stack(
        [np.asarray(ref(Image.fromarray(a), f)) for a, f in zip(pixels, factors, strict=True)]
    )
    np.testing.assert_array_equal(as_array(ours), expected)


def test_grayscale_and_solarize_bit_exact_with_pil(pixels):
    gray = ops.grayscale(as_float(pixels))
    expected = np.stack([np.asarray(TF.rgb_to_grayscale(Image.fromarray(a), 3)) for a in pixels])
    np.testing.assert_array_equal(as_array(gray), expected)
    for threshold in (128, 100):
        sol = ops.solarize_(as_float(pixels), float(threshold))
        expected = np.stack(
            [np.asarray(ImageOps.solarize(Image.fromarray(a), threshold)) for a in pixels]
        )
        np.testing.assert_array_equal(as_array(sol), expected)


def test_contrast_mean_exact_on_crops_larger_than_256x256():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (1, 300, 260, 3), dtype=np.uint8)
    ours = ops.contrast_(as_float(arr), torch.tensor([1.3]))
    np.testing.assert_array_equal(
        as_array(ours)[0], np.asarray(TF.adjust_contrast(Image.fromarray(arr[0]), 1.3))
    )


def test_hue_matches_pil_up_to_its_8_bit_hsv_rounding(pixels):
    assert torch.equal(ops.hue_(as_float(pixels), torch.zeros(4)), as_float(pixels))
    factors = (-0.1, -0.03, 0.05, 0.1)
    ours = ops.hue_(as_float(pixels), ops.hue_turns(torch.tensor(factors)))
    expected = np.stack(
        [
            np.asarray(TF.adjust_hue(Image.fromarray(a), f))
            for a, f in zip(pixels, factors, strict=True)
        ]
    ).astype(np.float32)
    diff = np.abs(ours.permute(0, 2, 3, 1).numpy() - expected)
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99) <= 6
    # a wrong shift (e.g. the opposite direction) would be far off
    wrong = ops.hue_(as_float(pixels), -ops.hue_turns(torch.tensor(factors)))
    assert np.abs(wrong.permute(0, 2, 3, 1).numpy() - expected).mean() > 5.0


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_close_to_pil_gaussian_blur(photo, sigma):
    arr = np.asarray(photo.resize((48, 40)))
    x = as_float(arr[None])
    ours = ops.gaussian_blur(x, torch.tensor([sigma]), ops.blur_radius(sigma))
    ref = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(sigma)))
    diff = np.abs(ours.permute(0, 2, 3, 1).numpy()[0] - ref.astype(np.float32))
    # PIL's three-box approximation vs a true Gaussian: about a level apart on average
    assert diff.mean() < 1.5
    assert ops.blur_radius(sigma) >= 3 * sigma
    # the amount of blur is the same: both remove about the same high-frequency energy
    detail = np.abs(np.diff(arr.astype(np.float32), axis=1)).mean()
    ours_detail = np.abs(np.diff(ours.permute(0, 2, 3, 1).numpy()[0], axis=1)).mean()
    ref_detail = np.abs(np.diff(ref.astype(np.float32), axis=1)).mean()
    assert abs(ours_detail - ref_detail) < 0.05 * detail + 0.5


# -- the batching machinery -------------------------------------------------------------------


def random_params(n: int, seed: int, **force) -> torch.Tensor:
    aug = BatchedMultiCropAugment(n_local=n - 2, generator=torch.Generator().manual_seed(seed))
    p = aug.draw()[1]
    for col, value in force.items():
        p[:, getattr(ab, col.upper())] = value
    return p


def one_by_one(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The photometric stage written per crop, straight from the parameter table."""
    out = []
    for xi, pi in zip(x, p, strict=True):
        c = xi[None].clone()
        if pi[ab.FLIP] > 0:
            c = c.flip(-1)
        c = c.float()
        if pi[ab.JITTER] > 0:
            for op in pi[ab.ORDER : ab.ORDER + 4].long().tolist():
                factor = pi[[ab.BRIGHTNESS, ab.CONTRAST, ab.SATURATION, ab.HUE][op]].view(1)
                if op == 3:
                    factor = ops.hue_turns(factor)
                c = ops.JITTER_OPS[op](c, factor)
        if pi[ab.GRAY] > 0:
            c = ops.grayscale(c).clone()
        if pi[ab.BLUR] > 0:
            sigma = float(pi[ab.SIGMA])
            c = ops.gaussian_blur(c, pi[ab.SIGMA].view(1), ops.blur_radius(sigma))
        if pi[ab.SOLARIZE] > 0:
            c = ops.solarize_(c)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out.append(((c / 255.0 - mean) / std)[0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("block_elements", "row_copies"),
    [(None, None), (1, True), (5 * 3 * 20 * 24, False), (1 << 30, False), (1 << 30, True)],
)
def test_photometric_equals_crop_by_crop_composition(pixels, block_elements, row_copies):
    # 24 crops so that many jitter orders, runs and blocks occur
    x = torch.from_numpy(np.concatenate([pixels] * 6)).permute(0, 3, 1, 2).contiguous()
    p = random_params(24, seed=3)
    p[::5, ab.SOLARIZE] = 1.0
    ours = photometric(x, p, block_elements=block_elements, row_copies=row_copies)
    expected = one_by_one(x, p)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_photometric_equals_pil_ops_when_hue_and_blur_are_off(pixels):
    """Flip, brightness/contrast/saturation in each crop's order, grayscale, solarize,
    normalise: exactly the reference's PIL + torchvision result."""
    x = torch.from_numpy(np.concatenate([pixels] * 3)).permute(0, 3, 1, 2).contiguous()
    p = random_params(12, seed=5, hue=0.0, blur=0.0, jitter=1.0)
    p[1::3, ab.SOLARIZE] = 1.0
    ours = photometric(x, p)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for i, (img, pi) in enumerate(zip(np.concatenate([pixels] * 3), p, strict=True)):
        im = Image.fromarray(img)
        if pi[ab.FLIP] > 0:
            im = TF.hflip(im)
        for op in pi[ab.ORDER : ab.ORDER + 4].long().tolist():
            if op < 3:  # hue shift 0 is the identity here (PIL would round-trip its HSV)
                fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[op]
                im = fn(im, float(pi[[ab.BRIGHTNESS, ab.CONTRAST, ab.SATURATION][op]]))
        if pi[ab.GRAY] > 0:
            im = TF.rgb_to_grayscale(im, 3)
        if pi[ab.SOLARIZE] > 0:
            im = ImageOps.solarize(im, 128)
        torch.testing.assert_close(ours[i], normalize(TF.to_tensor(im)), atol=1e-5, rtol=0)


# -- draws: probabilities, ranges, crop boxes -------------------------------------------------


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_draw_probabilities_and_ranges_match_the_recipe():
    aug = BatchedMultiCropAugment(n_local=8, generator=torch.Generator().manual_seed(0))
    draws = 3000
    p = torch.stack([aug.draw()[1] for _ in range(draws)])  # (draws, 10, N_PARAMS)
    expected = aug.probabilities()
    assert expected == MultiCropAugment(n_local=8).probabilities()
    columns = {"flip": ab.FLIP, "color_jitter": ab.JITTER, "grayscale": ab.GRAY}
    columns |= {"blur": ab.BLUR, "solarize": ab.SOLARIZE}
    for view, rows in (("global1", [0]), ("global2", [1]), ("local", list(range(2, 10)))):
        for op, col in columns.items():
            prob = expected.get(f"{view}.{op}", 0.0)
            hits = int(p[:, rows, col].sum())
            assert binomial_ok(hits, draws * len(rows), prob), (view, op, hits, prob)
    flat = p.reshape(-1, ab.N_PARAMS)
    for col, lo, hi in (
        (ab.BRIGHTNESS, 0.6, 1.4),
        (ab.CONTRAST, 0.6, 1.4),
        (ab.SATURATION, 0.8, 1.2),
        (ab.HUE, -0.1, 0.1),
        (ab.SIGMA, 0.1, 2.0),
    ):
        v = flat[:, col]
        assert lo <= float(v.min()) and float(v.max()) <= hi
        assert float(v.min()) < lo + 0.01 * (hi - lo) and float(v.max()) > hi - 0.01 * (hi - lo)
        assert abs(float(v.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo)
    # the jitter order is a uniform random permutation of the four ops
    orders = flat[:, ab.ORDER : ab.ORDER + 4].long()
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand_as(orders))
    codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    assert all(binomial_ok(int(c), len(codes), 1 / 24) for c in counts)


def test_crop_boxes_follow_torchvision_random_resized_crop():
    torch.manual_seed(0)
    w, h = 500, 375
    ours, theirs = [], []
    img = Image.new("RGB", (w, h))
    for scale in ((0.4, 1.0), (0.05, 0.4)):
        for _ in range(1500):
            top, left, ch, cw = ab.crop_box(w, h, scale, torch.rand(22).tolist())
            assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
            ours.append((ch * cw / (w * h), cw / ch, (left + cw / 2) / w))
            top, left, ch, cw = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
            theirs.append((ch * cw / (w * h), cw / ch, (left + cw / 2) / w))
    a, b = np.array(ours), np.array(theirs)
    for k in range(3):  # area fraction, aspect ratio, horizontal centre: same distribution
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(a[:, k], q) - np.quantile(b[:, k], q)) < 0.05 * max(
                1.0, np.quantile(b[:, k], q)
            )
    # an extreme aspect ratio falls back to torchvision's central crop
    wide = Image.new("RGB", (1000, 50))
    fallback = T.RandomResizedCrop.get_params(wide, [0.9, 1.0], [3 / 4, 4 / 3])
    assert ab.crop_box(1000, 50, (0.9, 1.0), [0.5] * 22) == tuple(fallback) == (0, 466, 50, 67)


# -- the per-sample stage, shapes, determinism ------------------------------------------------


def jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))  # opened, not decoded


def test_shapes_dtypes_and_modes(photo):
    aug = BatchedMultiCropAugment(**SMALL)
    for img in (photo, photo.convert("L"), photo.convert("RGBA"), photo.convert("P"), jpeg(photo)):
        stage = aug.per_sample(img)
        assert [tuple(t.shape) for t in stage] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2 + [
            (4, ab.N_PARAMS)
        ]
        assert all(t.dtype == torch.uint8 for t in stage[:-1]) and stage[-1].dtype == torch.float32
        crops = aug(img)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    none = BatchedMultiCropAugment(global_size=32, local_size=16, n_local=0)
    assert len(none(photo)) == 2


def test_deterministic_under_seeds(photo):
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return BatchedMultiCropAugment(**SMALL)(photo)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    gen = BatchedMultiCropAugment(**SMALL, generator=torch.Generator().manual_seed(7))
    again = BatchedMultiCropAugment(**SMALL, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(gen(photo), again(photo), strict=True))


def test_uint8_resize_within_one_level_of_pil(photo):
    aug = BatchedMultiCropAugment(global_size=64, local_size=16, n_local=0, draft=False)
    big = photo.resize((400, 300), Image.BICUBIC)
    torch.manual_seed(0)
    box, _ = aug.draw()
    torch.manual_seed(0)
    crops = aug.per_sample(big)
    for u, crop in zip(box.tolist(), crops[:2], strict=True):
        top, left, h, w = ab.crop_box(400, 300, aug.views[0].scale, u)
        # the reference's TF.resized_crop: crop, then resize (no pixels from outside the box)
        ref = big.crop((left, top, left + w, top + h)).resize((64, 64), Image.BICUBIC)
        diff = np.abs(crop.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int))
        assert diff.max() <= 1


def test_large_jpeg_is_decoded_at_reduced_scale(photo):
    aug = BatchedMultiCropAugment(**SMALL)
    big = jpeg(photo.resize((1200, 900), Image.BICUBIC))
    prepared = aug._prepare(big)
    assert prepared.size[0] < 1200  # DCT-scaled decode
    assert min(prepared.size) * math.sqrt(0.4 * 0.75) >= 32
    assert aug._draft_factor(120, 90) == 1  # small images are decoded whole
    crops = aug(jpeg(photo.resize((1200, 900), Image.BICUBIC)))
    assert crops[0].shape == (3, 32, 32)


def test_user_errors_are_value_errors():
    with pytest.raises(ValueError, match="global_scale"):
        BatchedMultiCropAugment(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="n_local"):
        BatchedMultiCropAugment(n_local=-1)
    with pytest.raises(ValueError, match="crop sizes"):
        BatchedMultiCropAugment(local_size=0)
    aug = BatchedMultiCropAugment(**SMALL)
    with pytest.raises(ValueError, match="parameter table"):
        aug.per_batch([torch.zeros(2, 3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        photometric(torch.zeros(2, 3, 8, 8), torch.zeros(2, ab.N_PARAMS))
    with pytest.raises(TypeError):
        aug.per_sample(np.zeros((8, 8, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_output_statistics_match_the_reference_augmentation(photo):
    """Over many draws, per crop kind: mean, spread and blur (mean gradient) of the output
    agree with the reference MultiCropAugment on the same image."""

    def stats(aug, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        rows = []
        for _ in range(60):
            crops = aug(photo.copy())
            for kind, group in (("g", crops[:2]), ("l", crops[2:])):
                c = torch.stack(group)
                grad = (c[..., 1:] - c[..., :-1]).abs().mean()
                rows.append([kind == "g", c.mean(), c.std(), grad])
        return np.array(rows, dtype=np.float64)

    ours = stats(BatchedMultiCropAugment(**SMALL), 0)
    ref = stats(MultiCropAugment(**SMALL), 0)
    for is_global in (1.0, 0.0):
        a, b = ours[ours[:, 0] == is_global, 1:], ref[ref[:, 0] == is_global, 1:]
        spread = np.maximum(a.std(axis=0), b.std(axis=0)) / math.sqrt(len(a))
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 5 * spread + 0.02), (
            a.mean(axis=0),
            b.mean(axis=0),
        )


# -- the data stream's per-batch hook ---------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo) -> Path:
    root = tmp_path_factory.mktemp("batched")
    folder = root / "images" / "photos"
    folder.mkdir(parents=True)
    for i in range(12):
        img = photo.rotate(i * 7).crop((i, i, 100 + i, 80 + i))
        img.save(folder / f"{i:03d}.jpg", quality=90)
    pack(str(root / "images"), str(root / "shards"), max_samples_per_shard=6, progress=False)
    return root / "shards"


def stream_batches(
    shards: Path, transform, batch: int = 4, workers: int = 0
) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    stream = build_train_stream(
        str(shards),
        transform=transform,
        global_batch=batch,
        rank=0,
        world_size=1,
        num_workers=workers,
        seed=0,
        shuffle_buffer=4,
    )
    return list(stream.epoch_iter(0))


class CountingAugment(BatchedMultiCropAugment):
    calls = 0
    rows: list[int] = []

    def per_batch(self, stacked):
        CountingAugment.calls += 1
        CountingAugment.rows.append(stacked[0].shape[0])
        return super().per_batch(stacked)


def test_stream_runs_per_batch_once_per_chunk(shards):
    aug = CountingAugment(**SMALL)
    assert split_transform(aug) == (aug.per_sample, aug.per_batch)
    assert split_transform(len)[1] is None  # any other callable: per sample, as before
    batches = stream_batches(shards, aug)
    assert len(batches) == 3
    assert CountingAugment.calls == 3 and set(CountingAugment.rows) == {4}
    for crops in batches:
        assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
        assert all(c.dtype == torch.float32 for c in crops)


def test_cpu_stage_in_workers_then_per_batch_later_gives_the_same_batches(shards):
    """The accelerator split: workers emit uint8 crops + parameters, the loop runs per_batch
    (on the GPU there; on the CPU here) and gets what the one-stage stream gives."""
    aug = BatchedMultiCropAugment(**SMALL)
    whole = stream_batches(shards, aug)
    split = stream_batches(shards, aug.cpu_stage())
    assert split[0][0].dtype == torch.uint8 and split[0][-1].shape == (4, 4, ab.N_PARAMS)
    for full, raw in zip(whole, split, strict=True):
        later = aug.per_batch(raw)
        assert all(torch.equal(a, b) for a, b in zip(full, later, strict=True))


def test_two_stage_transform_in_data_loader_workers_is_deterministic(shards):
    aug = BatchedMultiCropAugment(**SMALL)
    first = stream_batches(shards, aug, workers=2)
    second = stream_batches(shards, aug, workers=2)
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert a[0].dtype == torch.float32 and a[2].shape == (4, 3, 16, 16)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_failing_per_batch_stage_stops_with_a_data_error(shards):
    class Broken(BatchedMultiCropAugment):
        def per_batch(self, stacked):
            raise RuntimeError("boom")

    with pytest.raises(DataError, match="per_batch stage failed: boom"):
        stream_batches(shards, Broken(**SMALL))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_photometric_on_cuda_matches_cpu(pixels):
    x = torch.from_numpy(np.concatenate([pixels] * 8)).permute(0, 3, 1, 2).contiguous()
    p = random_params(32, seed=9)
    cpu = photometric(x, p)
    gpu = photometric(x.cuda(), p).cpu()  # parameters stay on the CPU: no device sync
    level = 1.0 / (255.0 * min(IMAGENET_STD))
    assert (gpu - cpu).abs().max() <= 2 * level
