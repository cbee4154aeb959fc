"""Packing real images into shards and reading them back (file:// and a loopback S3)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.data import FMNIST, read_tar_members
from typer.testing import CliRunner

from dino_cluster.data import build_train_stream
from dino_cluster.data.cli import app
from dino_cluster.data.pack import pack
from dino_cluster.data.sources import IdxSource
from dino_cluster.storage import open_store


def full_image(img: Image.Image) -> list[torch.Tensor]:
    """Identity 'augmentation': the decoded pixels, to compare with the source exactly."""
    return [torch.from_numpy(np.array(img)).permute(2, 0, 1)]


def thumb(img: Image.Image) -> list[torch.Tensor]:
    return full_image(img.resize((32, 24)))


def stream_all(url: str, total: int, batch: int, **kw) -> dict[int, tuple[np.ndarray, int]]:
    """index in the source -> (HWC pixels, label) for one epoch; fails on any repeat."""
    stream = build_train_stream(
        url,
        transform=kw.pop("transform", full_image),
        global_batch=batch,
        rank=0,
        world_size=1,
        num_workers=kw.pop("num_workers", 0),
        seed=3,
        **kw,
    )
    assert stream.iters_per_epoch == total // batch
    seen: dict[int, tuple[np.ndarray, int]] = {}
    for b in stream.epoch_batches(0):
        for key, img, label in zip(b.keys, b.crops[0], b.labels.tolist(), strict=True):
            idx = int(key.rsplit("/", 1)[1])
            assert idx not in seen, f"sample {key} came back twice in one epoch"
            seen[idx] = (img.permute(1, 2, 0).numpy(), label)
    assert stream.bad_samples == {}
    return seen


def check_fmnist(seen: dict[int, tuple[np.ndarray, int]], n: int) -> None:
    src = IdxSource(FMNIST, "test", limit=n)
    assert sorted(seen) == list(range(n))  # every source image exactly once
    for i in range(n):
        pixels, label = seen[i]
        assert label == int(src.labels[i])
        assert np.array_equal(pixels, np.repeat(src.images[i][:, :, None], 3, axis=2))


def test_pack_fashion_mnist_roundtrip_file(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    index = pack(
        str(FMNIST),
        f"file://{dest}",
        split="test",
        limit=300,
        max_samples_per_shard=64,
        image_format="png",
        progress=False,
    )
    assert [s["samples"] for s in index["shards"]] == [64, 64, 64, 64, 44]
    assert index["total_samples"] == 300 and index["classes"][0] == "T-shirt/top"
    on_disk = json.loads((dest / "index.json").read_text())
    assert on_disk == index
    assert sorted(p.name for p in dest.iterdir()) == ["index.json"] + [
        f"shard-{i:06d}.tar" for i in range(5)
    ]
    members = read_tar_members(dest / "shard-000000.tar")
    assert "000000000.png" in members and members["000000000.cls"] == b"9"
    # All three URL forms resolve to the same dataset.
    check_fmnist(stream_all(str(dest / "index.json"), 300, 60), 300)
    check_fmnist(stream_all(f"file://{dest}/shard-{{000000..000004}}.tar", 300, 100), 300)
    check_fmnist(stream_all(str(dest), 300, 30, num_workers=2), 300)


def test_pack_fashion_mnist_roundtrip_s3(s3_server) -> None:
    bucket = s3_server.new_bucket("pack")
    url = f"s3://{bucket}/fm/v1"
    index = pack(
        str(FMNIST),
        url,
        split="test",
        limit=200,
        shard_size_bytes=60_000,
        image_format="png",
        storage_options=s3_server.options,
        progress=False,
    )
    assert len(index["shards"]) >= 3
    assert all(s["bytes"] <= 60_000 for s in index["shards"])
    keys = [o.key for o in open_store(url, s3_server.options).list()]
    assert keys == ["index.json"] + [s["name"] for s in index["shards"]]
    seen = stream_all(url, 200, 50, num_workers=2, storage_options=s3_server.options)
    check_fmnist(seen, 200)


def _photo_folder(root: Path) -> dict[str, tuple[bytes, int]]:
    """Real colour photos (scikit-image, public domain) as JPEGs in class folders."""
    from skimage import data

    photos = {"animal": ["chelsea", "cat", "coffee"], "thing": ["astronaut", "rocket"]}
    out: dict[str, tuple[bytes, int]] = {}
    for label, (cls, names) in enumerate(sorted(photos.items())):
        (root / cls).mkdir(parents=True)
        for name in names:
            buf = io.BytesIO()
            Image.fromarray(getattr(data, name)()).save(buf, format="JPEG", quality=85)
            (root / cls / f"{name}.jpg").write_bytes(buf.getvalue())
            out[name] = (buf.getvalue(), label)
    # A grey photo as PNG: re-encoded to JPEG by pack, converted to RGB when decoded.
    Image.fromarray(data.camera()).save(root / "thing" / "camera.png")
    return out


def test_pack_colour_photos_passthrough_and_idempotent(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "shards"
    originals = _photo_folder(src)
    index = pack(str(src), str(dest), max_samples_per_shard=2, progress=False)
    assert index["classes"] == ["animal", "thing"] and index["total_samples"] == 6
    packed: dict[bytes, int] = {}
    for shard in index["shards"]:
        members = read_tar_members(dest / shard["name"])
        for name, data in members.items():
            if name.endswith(".jpg"):
                packed[data] = int(members[name[:-4] + ".cls"])
    for data, label in originals.values():
        assert packed[data] == label  # JPEGs are stored byte-for-byte, no re-encoding
    seen = stream_all(str(dest), 6, 6, transform=thumb)
    assert len(seen) == 6
    for pixels, _ in seen.values():
        assert pixels.ndim == 3 and pixels.shape[2] == 3  # grey camera came back as RGB

    # Re-running with the same inputs rewrites nothing and leaves identical bytes.
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in dest.iterdir()}
    assert pack(str(src), str(dest), max_samples_per_shard=2, progress=False) == index
    after = {p.name: (p.read_bytes(), p.stat().st_ino) for p in dest.iterdir()}
    assert after == before

    # Re-packing with bigger shards replaces the set: no stale shard, no duplicate sample.
    index2 = pack(str(src), str(dest), max_samples_per_shard=4, progress=False)
    assert [s["samples"] for s in index2["shards"]] == [4, 2]
    assert sorted(p.name for p in dest.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert len(stream_all(str(dest), 6, 3, transform=thumb)) == 6


def test_cli_pack_and_inspect(tmp_path: Path) -> None:
    runner = CliRunner()
    dest = tmp_path / "out"
    result = runner.invoke(
        app,
        ["pack", str(FMNIST), str(dest), "--split", "test", "--limit", "50",
         "--max-samples-per-shard", "20", "--format", "png", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((dest / "index.json").read_text())["total_samples"] == 50
    result = runner.invoke(app, ["inspect", str(dest)])
    assert result.exit_code == 0, result.output
    assert "3 shards" in result.output and "50 samples" in result.output
    assert "decoded 8/8" in result.output

    bad = runner.invoke(app, ["pack", str(tmp_path / "nope"), str(dest), "--no-progress"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(app, ["pack", str(FMNIST), str(dest), "--format", "gif"])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["pack", str(FMNIST), str(dest), "--shard-size", "lots"])
    assert bad.exit_code == 2 and "shard size" in bad.output
    bad = runner.invoke(app, ["inspect", str(tmp_path / "empty")])
    assert bad.exit_code == 2


@pytest.mark.parametrize("text,expected", [("64MiB", 64 << 20), ("1.5GB", 1_500_000_000),
                                           ("4096", 4096), ("10k", 10_000)])  # fmt: skip
def test_cli_size_parsing(text: str, expected: int) -> None:
    from dino_cluster.data.cli import parse_size

    assert parse_size(text) == expected
