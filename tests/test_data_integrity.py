"""Data integrity: labels are optional data (a bad one never stops training), `data pack`
skips and names bad source images and verifies what it packs, duplicate keys and shards cut
short are counted even without an index, and `.tar.gz` shards stream.

(The malformed-shard corpus is run by test_data_integrity_corpus.py; exact resume with data
workers by test_data_integrity_resume.py.)
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from support.data import jpeg_bytes, png_bytes, read_tar_members, tar_bytes, tiny_transform
from typer.testing import CliRunner

from dino_cluster.data import build_train_stream
from dino_cluster.data.cli import app
from dino_cluster.data.decode import BadSample, decode_image, decode_label, decode_sample
from dino_cluster.data.labelled import build_labelled_reader
from dino_cluster.data.pack import pack
from dino_cluster.data.shards import resolve_shards

GOOD_LABELS = {"g0": b"0", "g1": b"3", "g2": b" 9\n", "g3": b"9223372036854775807"}
BAD_LABELS = {
    "b0": b"99999999999999999999",  # what stopped pretraining on every restart
    "b1": b"-3",
    "b2": b"abc",
    "b3": "\u0663".encode(),  # an Arabic-Indic three: a digit to str.isdigit, not ASCII
    "b4": b"7" * 40,
}


def _stream(url: Path, batch: int, **kw):  # type: ignore[no-untyped-def]
    return build_train_stream(
        str(url), transform=kw.pop("transform", tiny_transform), global_batch=batch, rank=0,
        world_size=1, num_workers=kw.pop("workers", 0), seed=2, shuffle_buffer=0, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------- item 1: labels


def test_label_parsing_accepts_int64_naturals_only() -> None:
    for data, value in GOOD_LABELS.items():
        assert decode_label(value) == int(value), data
    for value in [*BAD_LABELS.values(), b"+5", b"1_0", b"", b" ", b"9223372036854775808"]:
        with pytest.raises(BadSample) as exc:
            decode_label(value)
        assert exc.value.reason == "bad_label"
    sample = decode_sample({"png": png_bytes(3), "cls": b"99999999999999999999"}, max_pixels=100)
    assert sample.label == -1 and "int64" in (sample.label_error or "")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_labels_never_stop_training_and_the_images_still_train(
    tmp_path: Path, workers: int
) -> None:
    labels = {**GOOD_LABELS, **BAD_LABELS}
    members = []
    for i, (key, label) in enumerate(labels.items()):
        members += [(f"{key}.png", png_bytes(10 * i)), (f"{key}.cls", label)]
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    stream = _stream(tmp_path, 9, workers=workers)
    for _ in range(2):  # a restart used to fail the same way: build it again from its state
        got = {}
        for batch in stream.epoch_batches(stream.position.epoch):
            got.update(
                zip((k.split("/")[1] for k in batch.keys), batch.labels.tolist(), strict=True)
            )
        assert got == {k: (int(v) if k in GOOD_LABELS else -1) for k, v in labels.items()}
        assert stream.bad_samples == {"bad_label": 5}
        restart = {**stream.state_dict(), "epoch": 0, "batches_done": 0, "consumed": []}
        stream = _stream(tmp_path, 9, workers=workers, state=restart)
    # Evaluation needs labels: there an unusable label skips the sample, counted.
    reader = build_labelled_reader(str(tmp_path), transform=lambda img: tiny_transform(img)[0])
    keys = [k.split("/")[1] for b in reader for k in b.keys]
    assert keys == list(GOOD_LABELS) and reader.bad == {"bad_label": 5}


def test_list_file_labels_beyond_int64_are_refused_at_pack(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "list.txt").write_text("a.png 99999999999999999999\n")
    with pytest.raises(ValueError, match="list.txt:1: label must be in"):
        pack(str(tmp_path / "list.txt"), str(tmp_path / "out"), progress=False)


# ---------------------------------------------------------------------------- item 7: pack


def _bomb_png() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels (a few hundred bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _messy_folder(root: Path, bomb: bool = True) -> dict[str, bytes]:
    """Good photos in two classes plus bad sources: a bomb, a cut JPEG (would pass through
    unchecked), text named .jpg, and an EPS named .jpg."""
    good: dict[str, bytes] = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            data = jpeg_bytes(len(good), size=(20 + i, 16))
            (root / cls / f"{i}.jpg").write_bytes(data)
            good[f"{cls}/{i}.jpg"] = data
    if bomb:
        (root / "cat" / "bomb.png").write_bytes(_bomb_png())
    cut = jpeg_bytes(50)
    (root / "cat" / "cut.jpg").write_bytes(cut[: len(cut) - 300])  # the header whole: it opens
    (root / "dog" / "notes.jpg").write_bytes(b"not an image at all\n")
    (root / "dog" / "eps.jpg").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\nshowpage\n"
    )
    return good


@pytest.mark.parametrize("bomb", [True, False])
def test_pack_skips_bad_sources_and_verifies_every_image(tmp_path: Path, bomb: bool) -> None:
    good = _messy_folder(tmp_path / "src", bomb=bomb)
    index = pack(str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert index["total_samples"] == 6 and index["skipped_sources"] == 3 + bomb
    packed = {}
    for shard in index["shards"]:
        for name, data in read_tar_members(tmp_path / "out" / shard["name"]).items():
            if name.endswith(".jpg"):
                decode_image(data, max_pixels=1 << 20)  # every packed image decodes
                packed[data] = name
    assert set(packed) == set(good.values())  # the good ones byte for byte, nothing else


def test_pack_names_what_it_skipped(tmp_path: Path) -> None:
    _messy_folder(tmp_path / "src")
    skipped: list[tuple[str, str]] = []
    pack(str(tmp_path / "src"), str(tmp_path / "out"), progress=False,
         on_skip=lambda name, why: skipped.append((name, why)))  # fmt: skip
    assert sorted(Path(n).name for n, _ in skipped) == [
        "bomb.png",
        "cut.jpg",
        "eps.jpg",
        "notes.jpg",
    ]
    why = dict((Path(n).name, w) for n, w in skipped)
    assert why["bomb.png"].startswith("image_too_large") and why["cut.jpg"].startswith("bad_image")


def test_cli_pack_summary_names_skipped_images_and_logs_progress(tmp_path: Path) -> None:
    _messy_folder(tmp_path / "src")
    # CliRunner's stderr is no terminal, as in a log or CI: progress comes as lines.
    result = CliRunner().invoke(app, ["pack", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "--log-every", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "packed 6 images into 1 shards" in result.output
    assert "(4 source images skipped)" in result.output
    for name in ("bomb.png", "cut.jpg", "eps.jpg", "notes.jpg"):
        assert f"skipped {tmp_path / 'src'}" in result.output and name in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("packing: ")]
    assert lines and lines[-1].startswith("packing: 10/10 images (100 %)")
    assert "images/s" in lines[-1] and "to go" in lines[-1]
    assert "Traceback" not in result.output


def test_pack_progress_lines_come_every_interval(tmp_path: Path) -> None:
    _messy_folder(tmp_path / "src")
    now = [0.0]

    def clock() -> float:  # 4 s per image, whatever the machine's speed
        now[0] += 4.0
        return now[0]

    lines: list[str] = []
    pack(str(tmp_path / "src"), str(tmp_path / "out"), progress=False, progress_line=lines.append,
         progress_every_s=10.0, clock=clock)  # fmt: skip
    assert 3 <= len(lines) <= 5  # ~40 s of fake time in lines 10 s apart, and the last one
    assert lines[-1].startswith("packing: 10/10 images") and "4 skipped" in lines[-1]
    assert "0m00s to go" in lines[-1]


# ---------------------------------------------------------------------------- item 7: shards


def test_duplicate_keys_are_counted_never_merged(tmp_path: Path) -> None:
    def sample(key: str, i: int) -> list[tuple[str, bytes]]:
        return [(f"{key}.png", png_bytes(i)), (f"{key}.cls", str(i).encode())]

    # a again after b; c twice in a row
    members = sample("a", 1) + sample("b", 2) + sample("a", 3) + sample("c", 4) + sample("c", 5)
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    stream = _stream(tmp_path, 1)
    assert stream.iters_per_epoch == 5  # five records: the repeats count, as records do
    got = {k: label for b in stream.epoch_batches(0) for k, label in
           zip(b.keys, b.labels.tolist(), strict=True)}  # fmt: skip
    assert {k.split("/")[1]: v for k, v in got.items()} == {"a": 1, "b": 2, "c": 4}
    assert stream.bad_samples == {"duplicate_key": 2}
    reader = build_labelled_reader(str(tmp_path), transform=lambda img: tiny_transform(img)[0])
    assert sorted(k for b in reader for k in b.keys) == ["s.tar/a", "s.tar/b", "s.tar/c"]
    assert reader.bad == {"duplicate_key": 2}


def _cut_tar(n: int, cut: str) -> bytes:
    data = tar_bytes(
        [m for i in range(n) for m in ((f"k{i}.png", png_bytes(i)), (f"k{i}.cls", b"1"))]
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    if cut == "no-end":  # every member whole, the end-of-archive blocks missing
        return data[:end]
    return data[: members[6].offset_data + 10]  # inside k3.png's data


@pytest.mark.parametrize("cut", ["no-end", "mid-member"])
def test_a_shard_cut_short_is_counted_without_an_index(tmp_path: Path, cut: str) -> None:
    (tmp_path / "a.tar").write_bytes(tar_bytes([(f"g{i}.png", png_bytes(i)) for i in range(4)]))
    (tmp_path / "b.tar").write_bytes(_cut_tar(6, cut))
    shards = resolve_shards(str(tmp_path))
    kept = 6 if cut == "no-end" else 3
    assert [(s.name, s.samples) for s in shards.shards] == [("a.tar", 4), ("b.tar", kept)]
    stream = _stream(tmp_path, 1)
    keys = {k for b in stream.epoch_batches(0) for k in b.keys}
    assert keys == {f"a.tar/g{i}" for i in range(4)} | {f"b.tar/k{i}" for i in range(kept)}
    assert stream.bad_samples == {"truncated_shard": 1}
    reader = build_labelled_reader(str(tmp_path), transform=lambda img: tiny_transform(img)[0],
                                   require_labels=False)  # fmt: skip
    assert len([k for b in reader for k in b.keys]) == 4 + kept
    assert reader.bad == {"truncated_shard": 1}


def test_tar_gz_shards_are_listed_and_streamed(tmp_path: Path) -> None:
    from dino_cluster.data.shards import probe_shards  # (the pre-flight check; newer than 8a4fdbe)

    def shard(prefix: str) -> bytes:
        return tar_bytes([(f"{prefix}{i}.jpg", jpeg_bytes(i)) for i in range(3)])

    (tmp_path / "s-0.tar.gz").write_bytes(gzip.compress(shard("x"), mtime=0))
    (tmp_path / "s-1.tgz").write_bytes(gzip.compress(shard("y"), mtime=0))
    (tmp_path / "s-2.tar").write_bytes(shard("z"))
    (tmp_path / "notes.gz").write_bytes(gzip.compress(b"not a shard"))
    assert probe_shards(str(tmp_path)).startswith("shards without an index")
    listed = resolve_shards(str(tmp_path))
    assert [(s.name, s.samples) for s in listed.shards] == [
        ("s-0.tar.gz", 3), ("s-1.tgz", 3), ("s-2.tar", 3)]  # fmt: skip
    braces = resolve_shards(f"{tmp_path}/{{s-0.tar.gz,s-1.tgz}}")
    assert [s.name for s in braces.shards] == ["s-0.tar.gz", "s-1.tgz"]
    with pytest.raises(ValueError, match="s-1.tar.gz does not exist"):
        resolve_shards(f"{tmp_path}/s-{{0..1}}.tar.gz")
    keys = sorted(k for b in _stream(tmp_path, 3, workers=2).epoch_batches(0) for k in b.keys)
    names = {"s-0.tar.gz": "x", "s-1.tgz": "y", "s-2.tar": "z"}
    assert keys == sorted(f"{n}/{p}{i}" for n, p in names.items() for i in range(3))
    (tmp_path / "index.json").write_text(
        json.dumps({"shards": [{"name": "s-1.tgz", "samples": 3}]})
    )
    assert [k for b in _stream(tmp_path / "index.json", 3).epoch_batches(0) for k in b.keys] != []
    (tmp_path / "index.json").write_text(
        json.dumps({"shards": [{"name": "s.tar.xz", "samples": 3}]})
    )
    with pytest.raises(ValueError, match="compressed in a format that is not read"):
        probe_shards(str(tmp_path))
