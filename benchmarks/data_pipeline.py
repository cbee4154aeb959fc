"""Multi-crop samples per second per CPU core: our shard pipelines vs the reference augmentation.

Two image sets, both from scikit-image's public-domain colour photos:

  photos    500x375 / 375x500 crops of the photos, JPEG q90 (~45 KiB)
  imagenet  ImageNet-sized: shortest side 300-500, 4:3, re-encoded at high quality (q 96-98,
            ~110 KiB), what an ImageNet shard holds

Pipelines (2 global 224 + N local 96 crops, the recipe; every figure is per CPU core):

  reference : bytes -> PIL decode -> RGB -> MultiCropAugment (PIL + torchvision, the recipe)
  batched   : shards -> TrainStream (tar read, shuffle, decode, batching) ->
              BatchedMultiCropAugment (`data.augment: batched`): uint8 geometry per sample, torch
              photometrics once per batch in the worker
  batched CPU stage : the same with `cpu_stage()`: the CPU side of today's `gpu` value
  fast      : TrainStream -> FastMultiCropAugment (`data.augment: fast`): simplejpeg decode,
              compiled PIL-exact crops and photometrics (dino_cluster/dino/augment/fast.py),
              hue as batched_ops' float rotation; `exact_hue=True`: PIL's HSV round trip too
  fast CPU stage : `FastMultiCropAugment.cpu_stage()`: decode + crops + draws only, the
              photometrics then run batched on the accelerator (the `gpu` path)

One process, one torch thread, no data workers, timed in CPU seconds of this process
(time.process_time): samples per CPU-second is samples/s per core, and other load on the
machine counts less against either side. The load average is printed: it still moves the
figures (shared caches and memory bandwidth), about +-15 % here. glibc is told to keep freed
memory once, before any round (`keep_freed_memory`, what the batched augmentations do in a
worker). `cores/H100` is how many such cores feed one H100 at ViT-S/16 rates (~3,600 images/s:
110 GFLOP per 2x224 + 8x96 image at 50 % of 989 TFLOP/s bf16). Not a test.

    python benchmarks/data_pipeline.py [--images 48] [--samples 160] [--n-local 8] [--rounds 2]
        [--batch 16] [--sets photos,imagenet] [--device cuda]

`--device cuda` also times the device stage (per_batch of the CPU stage's batches on the GPU,
wall clock, synchronised) and prints its images/s; without a GPU it is skipped.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino_cluster.data import build_train_stream
from dino_cluster.data.pack import pack
from dino_cluster.dino.augment.batched import BatchedMultiCropAugment, keep_freed_memory
from dino_cluster.dino.augment.fast import FastMultiCropAugment
from dino_cluster.dino.augment.reference import MultiCropAugment

REPO = Path(__file__).resolve().parents[1]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
H100_IMAGES_PER_S = 3600.0  # ViT-S/16, 2x224 + 8x96 crops, 50 % MFU (see the issue)


def _photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """The `photos` set: 500x375 / 375x500 crops of the photos, q90."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = (500, 375) if i % 3 else (375, 500)
        scale = rng.uniform(0.6, 1.0)
        cw = int(min(photo.width, photo.height * w / h) * scale)
        ch = int(cw * h / w)
        x = int(rng.integers(0, photo.width - cw + 1))
        y = int(rng.integers(0, photo.height - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_imagenet_jpegs(n: int, seed: int = 1) -> list[bytes]:
    """The `imagenet` set: whole photos resized to a shortest side in [300, 500] (4:3, one in
    three portrait) and re-encoded at q 96-98: ~110 KiB, ImageNet's mean file size."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(n):
        short = int(rng.integers(300, 501))
        w, h = (short * 4 // 3, short) if i % 3 else (short, short * 4 // 3)
        img = photos[i % len(photos)].resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(96, 99)))
        out.append(buf.getvalue())
    return out


def bench_reference(jpegs: list[bytes], samples: int, aug) -> float:
    for b in jpegs[:4]:  # warm-up
        aug(Image.open(io.BytesIO(b)).convert("RGB"))
    start = time.process_time()
    for i in range(samples):
        aug(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB"))
    return samples / (time.process_time() - start)


def _stream(shards: Path, transform, batch: int):
    return build_train_stream(str(shards), transform=transform, global_batch=batch, rank=0,
                              world_size=1, num_workers=0, seed=0, shuffle_buffer=64)  # fmt: skip


def bench_pipeline(shards: Path, samples: int, transform, batch: int = 16) -> float:
    stream = _stream(shards, transform, batch)
    done, epoch, start = 0, 0, None
    while done < samples:
        for _ in stream.epoch_iter(epoch):
            if start is None:  # first batch = warm-up (opens shards, first decodes)
                start = time.process_time()
                continue
            done += batch
            if done >= samples:
                break
        epoch += 1
    return done / (time.process_time() - start)


def bench_device_stage(shards: Path, aug, batch: int, device: str, steps: int = 10) -> float:
    """Images/s of `aug.per_batch` on `device` for batches of the CPU stage (moved first)."""
    stream = _stream(shards, aug.cpu_stage(), batch).epoch_iter(0)
    batches = [b for _, b in zip(range(3), stream, strict=False)]
    moved = [[*(v.to(device) for v in b[:-1]), b[-1]] for b in batches]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    aug.per_batch(moved[0])
    sync()
    start = time.perf_counter()
    for i in range(steps):
        aug.per_batch(moved[i % len(moved)])
    sync()
    return steps * batch / (time.perf_counter() - start)


# (label, pipeline key); the first four labels are the ones earlier versions printed
_BATCHED, _BATCHED_STAGE = "ours (TrainStream + BatchedMultiCropAugment)", "ours, CPU stage only"
_FAST, _FAST_STAGE = "fast (TrainStream + FastMultiCropAugment)", "fast, CPU stage only"
_FAST_EXACT = "fast, exact_hue=True (PIL's HSV round trip)"


def _pipelines(n_local: int) -> dict[str, Callable]:
    batched = BatchedMultiCropAugment(n_local=n_local)
    fast = FastMultiCropAugment(n_local=n_local)
    exact = FastMultiCropAugment(n_local=n_local, exact_hue=True)
    return {_BATCHED: batched, _BATCHED_STAGE: batched.cpu_stage(), _FAST: fast,
            _FAST_EXACT: exact, _FAST_STAGE: fast.cpu_stage()}  # fmt: skip


def run_set(jpegs: list[bytes], args) -> tuple[float, dict[str, float], Path, object]:
    tmp = tempfile.TemporaryDirectory()  # the caller cleans up, after the device stage
    folder = Path(tmp.name) / "jpegs" / "photos"
    folder.mkdir(parents=True)
    for i, b in enumerate(jpegs):
        (folder / f"{i:04d}.jpg").write_bytes(b)
    shards = Path(tmp.name) / "shards"
    pack(str(folder.parent), str(shards), max_samples_per_shard=16, progress=False)
    reference = MultiCropAugment(n_local=args.n_local)
    pipelines = _pipelines(args.n_local)
    # compiles (first run on a machine) or loads the kernels before anything is timed
    bench_pipeline(shards, args.batch, pipelines[_FAST], args.batch)
    # Alternate and keep the best round (cache and frequency effects of other load).
    ref_rate, rates = 0.0, dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        ref_rate = max(ref_rate, bench_reference(jpegs, args.samples, reference))
        for name, transform in pipelines.items():
            n = args.samples * (2 if "stage" in name else 1)  # the cheap ones: more samples
            rates[name] = max(rates[name], bench_pipeline(shards, n, transform, args.batch))
    return ref_rate, rates, shards, tmp


def report(title: str, jpegs: list[bytes], ref_rate: float, rates: dict[str, float]) -> None:
    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
    short = sorted(min(s) for s in sizes)
    kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(f"\n[{title}] {len(jpegs)} JPEGs, mean {kib:.0f} KiB, shortest side "
          f"{short[0]}-{short[-1]}")  # fmt: skip

    def line(label: str, rate: float) -> None:
        print(f"{label:44s}: {rate:8.1f} samples/s/core  {1e3 / rate:6.2f} ms CPU/sample  "
              f"{H100_IMAGES_PER_S / rate:5.0f} cores/H100")  # fmt: skip

    def ratio(label: str, rate: float) -> None:
        print(f"{label:44s}: {rate / ref_rate:8.2f}x")

    line("reference (PIL decode + MultiCropAugment)", ref_rate)
    line(_BATCHED, rates[_BATCHED])
    ratio("ratio ours / reference", rates[_BATCHED])
    line(f"{_BATCHED_STAGE} (photometric on GPU)", rates[_BATCHED_STAGE])
    ratio("ratio CPU stage only / reference", rates[_BATCHED_STAGE])
    line(_FAST, rates[_FAST])
    ratio("ratio fast / reference", rates[_FAST])
    line(_FAST_EXACT, rates[_FAST_EXACT])
    ratio("ratio fast exact_hue / reference", rates[_FAST_EXACT])
    line(f"{_FAST_STAGE} (photometric on GPU)", rates[_FAST_STAGE])
    ratio("ratio fast CPU stage / reference", rates[_FAST_STAGE])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch of the stream")
    parser.add_argument("--sets", default="photos,imagenet", help="photos, imagenet or both")
    parser.add_argument("--device", default=None, help="also time the device stage (cuda)")
    parser.add_argument("--quickstart", default=None, metavar="SHARDS",
                        help="instead: each data.augment value with jobs/quickstart.yaml's "
                        "crops on these shards (e.g. data/fmnist/index.json)")  # fmt: skip
    args = parser.parse_args()
    if args.quickstart:
        torch.set_num_threads(1)
        return quickstart(args.quickstart, args.samples, args.rounds, args.batch)
    if args.images < args.batch:
        parser.error("--images must be >= --batch (the stream needs one batch per epoch)")
    torch.set_num_threads(1)  # per-core figures
    keep_freed_memory()
    makers = {"photos": make_jpegs, "imagenet": make_imagenet_jpegs}
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or any(s not in makers for s in sets):
        parser.error(f"--sets takes {', '.join(makers)}")
    load = [os.getloadavg()[0]]
    results = []
    for name in sets:
        jpegs = makers[name](args.images)
        ref_rate, rates, shards, tmp = run_set(jpegs, args)
        results.append((name, jpegs, ref_rate, rates))
        if args.device and (not args.device.startswith("cuda") or torch.cuda.is_available()):
            aug = FastMultiCropAugment(n_local=args.n_local)
            rate = bench_device_stage(shards, aug, args.batch, args.device)
            print(f"[{name}] device stage (per_batch on {args.device}): {rate:,.0f} images/s")
        tmp.cleanup()
        load.append(os.getloadavg()[0])
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, 1 thread, "
          f"{os.cpu_count()} CPUs on this machine, load average {min(load):.1f}-{max(load):.1f}; "
          f"2 global 224 + {args.n_local} local 96 crops, batch {args.batch}, "
          f"{args.samples} samples (CPU stages {2 * args.samples}), "
          f"best of {args.rounds} rounds")  # fmt: skip
    for name, jpegs, ref_rate, rates in results:
        report(name, jpegs, ref_rate, rates)


def quickstart(shards: str, samples: int, rounds: int, batch: int) -> None:
    """Samples/s/core of every `data.augment` value with the quickstart's crops, in the stream
    (as the quickstart runs it, photometrics included), ratios to `reference`."""
    from dino_cluster.spec import load_spec
    from dino_cluster.train.assemble import build_augment

    crops = load_spec(REPO / "jobs" / "quickstart.yaml").method.crops
    built = {a: build_augment(crops, a) for a in ("reference", "batched", "fast", "gpu")}
    transforms = {a: t for a, (t, _) in built.items() if a != "gpu"}
    for t in transforms.values():
        bench_pipeline(Path(shards), batch, t, batch)  # warm-up (and numba's compile)
    rates = dict.fromkeys(transforms, 0.0)
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for name, t in transforms.items():
            rates[name] = max(rates[name], bench_pipeline(Path(shards), samples, t, batch))
    load.append(os.getloadavg()[0])
    print(f"quickstart crops ({crops.global_size}/{crops.local_size} px, {crops.n_local} local) "
          f"on {shards}: {samples} samples, batch {batch}, best of {rounds}, 1 thread, "
          f"load average {min(load):.1f}-{max(load):.1f}")  # fmt: skip
    for name, rate in rates.items():
        print(f"{'data.augment: ' + name:28s}: {rate:8.1f} samples/s/core  "
              f"{rate / rates['reference']:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
