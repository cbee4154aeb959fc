"""Our shards are WebDataset shards: the webdataset library reads what `pack` writes, and our
reader reads what webdataset's own writers write."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from support.data import FMNIST, jpeg_bytes, png_bytes, tiny_transform

from dino_cluster.data import build_train_stream
from dino_cluster.data.labelled import build_labelled_reader
from dino_cluster.data.pack import pack
from dino_cluster.data.sources import IdxSource
from dino_cluster.data.tario import iter_records


def _shard_paths(dest: Path, index: dict) -> list[str]:
    return [str(dest / s["name"]) for s in index["shards"]]


def test_plain_webdataset_reads_packed_jpegs_byte_for_byte(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "shards"
    originals: dict[bytes, int] = {}
    for label, cls in enumerate(("bird", "cat", "dog")):
        (src / cls).mkdir(parents=True)
        for j in range(3):
            data = jpeg_bytes(10 * label + j, size=(24 + j, 16))
            (src / cls / f"{j}.jpg").write_bytes(data)
            originals[data] = label
    index = pack(str(src), str(dest), max_samples_per_shard=4, progress=False)
    assert [s["samples"] for s in index["shards"]] == [4, 4, 1]

    samples = list(wds.WebDataset(_shard_paths(dest, index), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(9)]
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg", "cls"} for s in samples)
    # JPEGs are passed through by pack: webdataset hands back the very bytes that were packed.
    assert {s["jpg"]: int(s["cls"]) for s in samples} == originals


def test_plain_webdataset_reads_packed_fashion_mnist(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    index = pack(
        str(FMNIST), str(dest), split="test", limit=30, max_samples_per_shard=8,
        image_format="png", progress=False,
    )  # fmt: skip
    src = IdxSource(FMNIST, "test", limit=30)
    # No .decode(): webdataset's default decoders unpickle .pyd/.pth; bytes are all we need.
    samples = list(wds.WebDataset(_shard_paths(dest, index), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(30)]
    for i, s in enumerate(samples):
        assert int(s["cls"]) == int(src.labels[i])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), src.images[i])


def _write_with_webdataset(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Shards written by webdataset's ShardWriter (its TarWriter underneath) with its default
    encoders: an int label, a JSON document and a torch-pickled .pth next to each image."""
    folder.mkdir()
    expected: dict[str, tuple[bytes, int]] = {}
    with wds.ShardWriter(str(folder / "wds-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(7):
            key = f"img{i:03d}"
            image = png_bytes(20 * i, size=(7, 5), mode="RGB") if i % 2 else jpeg_bytes(i)
            ext = "png" if i % 2 else "jpg"
            sink.write(
                {"__key__": key, ext: image, "cls": i % 4, "json": {"i": i},
                 "pth": {"payload": torch.zeros(2)}}
            )  # fmt: skip
            expected[key] = (image, i % 4)
    return expected


def test_our_reader_reads_shards_written_by_webdataset(tmp_path: Path) -> None:
    folder = tmp_path / "wds"
    expected = _write_with_webdataset(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["wds-000000.tar", "wds-000001.tar", "wds-000002.tar"]

    bad: list[tuple[str, str]] = []
    records = []
    for name in names:
        with open(folder / name, "rb") as f:
            records += list(iter_records(f, on_bad=lambda r, n: bad.append((r, n))))
    assert bad == []
    assert [r.key for r in records] == sorted(expected)
    for rec in records:
        image, label = expected[rec.key]
        ext = "png" if rec.key[-1] in "13579" else "jpg"
        # Only the image and the label are kept: the .json and the pickled .pth never are.
        assert rec.fields == {ext: image, "cls": str(label).encode()}

    # The labelled (evaluation) reader over the folder: no index, so shards are counted first.
    reader = build_labelled_reader(
        str(folder), transform=lambda img: torch.from_numpy(np.array(img.resize((4, 4)))),
        batch_size=4,
    )  # fmt: skip
    assert reader.shards.total_samples == 7
    seen = {}
    for batch in reader:
        for key, label in zip(batch.keys, batch.labels.tolist(), strict=True):
            seen[key.rsplit("/", 1)[1]] = label
    assert seen == {k: label for k, (_, label) in expected.items()} and reader.bad == {}

    # The training stream: one epoch of 6 (7 samples, batches of 3) with labels and pixels.
    stream = build_train_stream(
        str(folder), transform=tiny_transform, global_batch=3, rank=0, world_size=1,
        num_workers=0, seed=1, shuffle_buffer=4,
    )  # fmt: skip
    got = {}
    for batch in stream.epoch_batches(0):
        for key, crop, label in zip(batch.keys, batch.crops[0], batch.labels.tolist(), strict=True):
            got[key.rsplit("/", 1)[1]] = (crop, label)
    assert len(got) == 6 and stream.bad_samples == {}
    for key, (crop, label) in got.items():
        image, want = expected[key]
        assert label == want
        rgb = Image.open(io.BytesIO(image)).convert("RGB")
        assert torch.equal(crop, tiny_transform(rgb)[0])


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_pack_is_deterministic_through_tarwriter(tmp_path: Path, image_format: str) -> None:
    """TarWriter stamps the time and a "bigdata" owner by default; pack fixes both, so two
    packs of the same input are byte-identical (and no encoder touched the bytes)."""
    a = pack(str(FMNIST), str(tmp_path / "a"), split="test", limit=12, image_format=image_format,
             max_samples_per_shard=5, progress=False)  # fmt: skip
    b = pack(str(FMNIST), str(tmp_path / "b"), split="test", limit=12, image_format=image_format,
             max_samples_per_shard=5, progress=False)  # fmt: skip
    assert a == b
    with tarfile.open(tmp_path / "a" / a["shards"][0]["name"]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["000000000.cls", f"000000000.{image_format}"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o444)
    }
    assert sum(s["bytes"] for s in a["shards"]) == sum(
        (tmp_path / "a" / s["name"]).stat().st_size for s in a["shards"]
    )
