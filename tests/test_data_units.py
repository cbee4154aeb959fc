"""Unit tests of the data pipeline's own logic: shard listing, the epoch plan and position,
tar safety, safe decoding and the image sources."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from support.data import FMNIST, jpeg_bytes, png_bytes, tar_bytes, tiny_transform

from dino_cluster.data.decode import BadSample, decode_image, decode_label, decode_sample
from dino_cluster.data.position import (
    DataPosition,
    greedy_assign,
    merge_states,
    plan_rank,
    shard_order,
    split_quota,
    stable_seed,
)
from dino_cluster.data.shards import expand_braces, parse_index, resolve_shards
from dino_cluster.data.sources import FolderSource, IdxSource, ListFileSource, open_source
from dino_cluster.data.tario import ShardReadError, iter_records, split_name

# ---------------------------------------------------------------------------- shard listing


def test_expand_braces_ranges_alternatives_and_padding() -> None:
    assert expand_braces("s3://b/p/shard-{000..003}.tar") == [
        f"s3://b/p/shard-{i:03d}.tar" for i in range(4)
    ]
    assert expand_braces("a{1..2}{x,y}") == ["a1x", "a1y", "a2x", "a2y"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("shard-{000..003.tar")
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("shard-{5..1}.tar")


def test_parse_index_refuses_escaping_names_and_bad_counts() -> None:
    good = {"shards": [{"name": "a.tar", "samples": 3, "bytes": 10}], "classes": ["x"]}
    shards, classes = parse_index(json.dumps(good).encode(), "idx")
    assert shards[0].name == "a.tar" and shards[0].samples == 3 and classes == ("x",)
    for bad_name in ("../up.tar", "/abs.tar", "s3://other/x.tar", "a/../../b.tar", ""):
        doc = {"shards": [{"name": bad_name, "samples": 1}]}
        with pytest.raises(ValueError, match="invalid shard name"):
            parse_index(json.dumps(doc).encode(), "idx")
    with pytest.raises(ValueError, match="samples"):
        parse_index(json.dumps({"shards": [{"name": "a.tar", "samples": -1}]}).encode(), "i")
    with pytest.raises(ValueError, match="twice"):
        doc = {"shards": [{"name": "a.tar", "samples": 1}, {"name": "a.tar", "samples": 1}]}
        parse_index(json.dumps(doc).encode(), "idx")
    with pytest.raises(ValueError, match="JSON"):
        parse_index(b"{not json", "idx")


def test_resolve_refuses_pipe_urls() -> None:
    with pytest.raises(ValueError, match="pipe:"):
        resolve_shards("pipe:curl http://evil/x.tar")


def test_resolve_without_index_counts_samples(tmp_path) -> None:
    for i in range(3):
        members = [(f"k{i}{j}.png", png_bytes(j)) for j in range(i + 1)]
        (tmp_path / f"s-{i}.tar").write_bytes(tar_bytes(members))
    (tmp_path / "notes.txt").write_text("ignored")
    by_dir = resolve_shards(str(tmp_path))
    assert [(s.name, s.samples) for s in by_dir.shards] == [
        ("s-0.tar", 1),
        ("s-1.tar", 2),
        ("s-2.tar", 3),
    ]
    by_pattern = resolve_shards(f"file://{tmp_path}/s-{{1..2}}.tar")
    assert [(s.name, s.samples) for s in by_pattern.shards] == [("s-1.tar", 2), ("s-2.tar", 3)]
    assert by_pattern.root_url == f"file://{tmp_path}"


# ---------------------------------------------------------------------------- plan & position


def test_shard_order_depends_on_seed_and_epoch_only() -> None:
    names = [f"s{i}" for i in range(20)]
    assert shard_order(names, 1, 0) == shard_order(reversed(names), 1, 0)
    assert shard_order(names, 1, 0) != shard_order(names, 1, 1)
    assert shard_order(names, 1, 0) != shard_order(names, 2, 0)
    assert sorted(shard_order(names, 1, 3)) == sorted(names)
    assert stable_seed("a", 1) == stable_seed("a", 1) != stable_seed("a", 2)


def test_split_quota_is_exact_and_proportional() -> None:
    assert split_quota(10, [1, 1, 1]) == [4, 3, 3]
    assert split_quota(7, [0, 5, 0]) == [0, 7, 0]
    assert split_quota(6, [0, 0]) == [3, 3]
    for total, weights in itertools.product(range(0, 40, 7), ([3, 1, 2], [10, 0, 1, 1], [5])):
        out = split_quota(total, weights)
        assert sum(out) == total
        assert all(o <= total * w / sum(weights) + 1 for o, w in zip(out, weights, strict=True))


def test_greedy_assign_balances_uneven_shards() -> None:
    weight = {"a": 100, "b": 100, "c": 100, "d": 100, "e": 20}
    bins = greedy_assign(list(weight), weight, 2)
    assert sorted(itertools.chain(*bins)) == sorted(weight)
    loads = [sum(weight[n] for n in b) for b in bins]
    assert max(loads) - min(loads) <= 100


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 2), (4, 1), (2, 3)])
@pytest.mark.parametrize("n_shards", [1, 2, 5, 9])
def test_plan_disjoint_complete_and_equal(world: int, workers: int, n_shards: int) -> None:
    samples = {f"s{i}": 10 + 7 * (i % 3) for i in range(n_shards)}
    order = shard_order(samples, 0, 0)
    consumed = set(order[:1]) if n_shards > 2 else set()
    in_flight = {order[1]: 4} if n_shards > 2 else {}
    per_rank_needed = 12
    owners: dict[str, int] = {}
    for rank in range(world):
        tasks = plan_rank(
            samples,
            order,
            consumed,
            in_flight,
            rank=rank,
            world_size=world,
            num_workers=workers,
            samples_needed=per_rank_needed,
        )
        assert len(tasks) == workers
        assert sum(t.quota for t in tasks) == per_rank_needed  # same count on every rank
        for t in tasks:
            for name, skip in t.own:
                assert name not in owners, f"{name} read by two rank-workers"
                owners[name] = t.global_index
                assert skip == in_flight.get(name, 0)
            assert t.quota == 0 or t.repeat_pool  # a worker with a quota has something to read
    assert set(owners) == set(order) - consumed  # no shard skipped


def test_position_roundtrip_and_merge() -> None:
    pos = DataPosition(epoch=2, batches_done=5, consumed={"b", "a"}, in_flight={"c": 3})
    kw = {"seed": 1, "global_batch": 8, "shuffle_buffer": 10, "dataset": "f"}
    state = pos.to_dict(**kw)
    assert json.loads(json.dumps(state)) == state
    back = DataPosition.from_dict(state)
    assert back == pos
    other = DataPosition(epoch=2, batches_done=5, consumed={"c"}, in_flight={"d": 1}).to_dict(**kw)
    merged = merge_states([state, other])
    assert merged["consumed"] == ["a", "b", "c"] and merged["in_flight"] == {"d": 1}
    late = DataPosition(epoch=2, batches_done=6).to_dict(**kw)
    with pytest.raises(ValueError, match="batches_done"):
        merge_states([state, late])
    with pytest.raises(ValueError, match="version"):
        DataPosition.from_dict({"version": 99})


# ---------------------------------------------------------------------------- tar reading


def test_tar_groups_by_key_and_ignores_unwanted_fields() -> None:
    data = tar_bytes(
        [
            ("a.png", png_bytes(1)),
            ("a.cls", b"3"),
            ("a.pyd", b"\x80\x04 pickle payload"),
            ("dir/b.jpg", jpeg_bytes(0)),
        ]
    )
    recs = list(iter_records(io.BytesIO(data)))
    assert [r.key for r in recs] == ["a", "dir/b"]
    assert set(recs[0].fields) == {"png", "cls"}  # the pickle never even reaches memory
    assert split_name("x/y.seg.png") == ("x/y", "seg.png")


def test_tar_refuses_links_and_escaping_names() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        link = tarfile.TarInfo("evil.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        for name in ("../escape.png", "/abs.png"):
            info = tarfile.TarInfo(name)
            data = png_bytes(2)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("ok.png")
        data = png_bytes(3)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    bad: list[tuple[str, str]] = []
    recs = list(iter_records(io.BytesIO(out.getvalue()), on_bad=lambda r, n: bad.append((r, n))))
    assert [r.key for r in recs] == ["ok"]
    assert ("link_member", "evil.png") in bad
    assert {r for r, _ in bad} == {"link_member", "unsafe_member"}
    assert len(bad) == 3


def test_truncated_tar_raises_after_complete_records() -> None:
    data = tar_bytes([(f"k{i}.jpg", jpeg_bytes(i)) for i in range(4)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    third, last = members[2], members[3]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks start
    seen = []
    with pytest.raises(ShardReadError):  # cut inside a member's data
        for rec in iter_records(io.BytesIO(data[: third.offset_data + 100])):
            seen.append(rec.key)
    assert seen == ["k0", "k1"]
    # Cut inside a header, or exactly between members: tarfile sees a clean end, but the
    # end-of-archive block is missing, so the shard is reported broken too (no index needed),
    # after the samples whose members are whole.
    for cut in (third.offset + 100, third.offset):
        seen = []
        with pytest.raises(ShardReadError, match="end-of-archive"):
            for rec in iter_records(io.BytesIO(data[:cut])):
                seen.append(rec.key)
        assert seen == ["k0", "k1"]
    # A complete archive ends with zero blocks; one is enough (tarfile stops at the first).
    for cut in (end + 512, len(data)):
        assert [r.key for r in iter_records(io.BytesIO(data[:cut]))] == ["k0", "k1", "k2", "k3"]
    with pytest.raises(ShardReadError, match="end-of-archive"):
        list(iter_records(io.BytesIO(data[: end + 511])))


class _VirtualTar(io.RawIOBase):
    """A tar stream whose big members are zeros made on the fly, so a test can offer a 1 GiB
    member without the test itself holding it."""

    def __init__(self, members: list[tuple[str, bytes | int]]) -> None:
        self._parts: list[bytes | int] = []
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            self._parts += [info.tobuf(tarfile.USTAR_FORMAT), data, -info.size % 512]
        self._parts.append(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        while self._parts:
            part = self._parts[0]
            if isinstance(part, int):
                n = min(part, len(buf))
                buf[:n] = bytes(n)
                self._parts[0] = part - n
            else:
                n = min(len(part), len(buf))
                buf[:n] = part[:n]
                self._parts[0] = part[n:]
            if not self._parts[0]:
                self._parts.pop(0)
            if n:
                return n
        return 0


def test_tar_skips_unwanted_members_unread_and_bounds_wanted_ones() -> None:
    big = 1 << 30
    stream = _VirtualTar(
        [
            ("a.jpg", jpeg_bytes(0)),
            ("a.pth", big),  # a 1 GiB pickle: never read into memory, never unpickled
            ("b.png", 5 << 20),  # a wanted field over the bound: refused unread
            ("b.cls", b"1"),
            ("c.png", png_bytes(4)),
        ]
    )
    bad: list[tuple[str, str]] = []
    tracemalloc.start()
    try:
        recs = list(
            iter_records(stream, on_bad=lambda r, n: bad.append((r, n)), max_member_bytes=1 << 20)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    assert [(r.key, sorted(r.fields)) for r in recs] == [("a", ["jpg"]), ("b", ["cls"]),
                                                         ("c", ["png"])]  # fmt: skip
    assert bad == [("member_too_large", "b.png")]


def test_tar_refuses_devices_and_duplicate_fields() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind in (("dev.png", tarfile.CHRTYPE), ("fifo.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
        for name, data in (("a.png", png_bytes(1)), ("a.PNG", png_bytes(2)), ("a.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bad: list[tuple[str, str]] = []
    recs = list(iter_records(io.BytesIO(out.getvalue()), on_bad=lambda r, n: bad.append((r, n))))
    assert bad == [("unsafe_member", "dev.png"), ("unsafe_member", "fifo.png")]
    # A repeated field starts a repeat of the sample: the first copy stays as it was, the
    # repeat (with the members after it) is one duplicate_key record, never merged into it.
    assert [(r.key, r.problem) for r in recs] == [("a", None), ("a", "duplicate_key")]
    assert recs[0].fields == {"png": png_bytes(1)} and recs[1].fields == {}


def test_tar_record_boundaries_are_those_the_data_position_counts() -> None:
    """Every member that is not refused starts a record when its key changes, including names
    webdataset's own iterator would drop (no dot, `__meta__`-like) and samples with no wanted
    field: the position counts records, so these must not come and go."""
    data = tar_bytes(
        [
            ("a.jpg", jpeg_bytes(0)),
            ("notes", b"x"),
            ("b.json", b"{}"),
            ("__x__/c.png", png_bytes(1)),
            ("__y__", b"x"),
            ("a.cls", b"2"),
        ]
    )
    keys = [r.key for r in iter_records(io.BytesIO(data))]
    assert keys == ["a", "notes", "b", "__x__/c", "__y__", "a"]
    for key in ("a", "d/b", "d/", "", "x.y/z"):  # the no-data entries the reader hands over
        assert split_name(key + ".") == (key, "")


# ---------------------------------------------------------------------------- decoding


def test_decode_grey_to_rgb_and_label() -> None:
    s = decode_sample({"png": png_bytes(77), "cls": b" 4\n"}, max_pixels=10_000)
    assert s.image.mode == "RGB" and s.image.getpixel((0, 0)) == (77, 77, 77) and s.label == 4
    assert decode_sample({"jpg": jpeg_bytes(1)}, max_pixels=10_000).label == -1


def test_decode_refuses_bombs_non_images_and_corrupt_data() -> None:
    big = png_bytes(1, size=(2000, 2000))
    with pytest.raises(BadSample) as exc:
        decode_image(big, max_pixels=1_000_000)
    assert exc.value.reason == "image_too_large"
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    for data in (gif.getvalue(), b"not an image", jpeg_bytes(2)[:200]):
        with pytest.raises(BadSample) as exc:
            decode_image(data, max_pixels=1_000_000)
        assert exc.value.reason == "bad_image"
    with pytest.raises(BadSample) as exc:
        decode_sample({"cls": b"1"}, max_pixels=100)
    assert exc.value.reason == "missing_image"
    with pytest.raises(BadSample):
        decode_label(b"x" * 100)


# ---------------------------------------------------------------------------- sources


def test_folder_source_classes_from_subfolders(tmp_path) -> None:
    for cls, n in (("cat", 2), ("dog", 1)):
        (tmp_path / cls / "deep").mkdir(parents=True)
        for i in range(n):
            (tmp_path / cls / "deep" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (tmp_path / "loose.png").write_bytes(png_bytes(5))
    src = open_source(tmp_path)
    assert isinstance(src, FolderSource) and src.classes == ["cat", "dog"]
    assert [i.label for i in src] == [-1, 0, 0, 1] and len(src) == 4


def test_list_file_source(tmp_path) -> None:
    (tmp_path / "a b.png").write_bytes(png_bytes(1))
    (tmp_path / "c.jpg").write_bytes(jpeg_bytes(1))
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\na b.png 3\n\nc.jpg\n")
    src = open_source(lst)
    assert isinstance(src, ListFileSource)
    assert [(i.path.name, i.label) for i in src] == [("a b.png", 3), ("c.jpg", -1)]
    lst.write_text("missing.png 1\n")
    with pytest.raises(ValueError, match="not found"):
        ListFileSource(lst)


def test_idx_source_reads_fashion_mnist() -> None:
    src = IdxSource(FMNIST, "test", limit=5)
    items = list(src)
    assert len(items) == 5 and items[0].pixels.shape == (28, 28)
    assert items[0].pixels.dtype == np.uint8 and 0 <= items[0].label < 10
    assert src.classes[9] == "Ankle boot"
    with pytest.raises(ValueError, match="split"):
        IdxSource(FMNIST, "validation")


def test_tiny_transform_shapes() -> None:
    crops = tiny_transform(Image.new("RGB", (20, 10), (10, 20, 30)))
    assert [tuple(c.shape) for c in crops] == [(3, 8, 8), (3, 4, 4)]
    assert abs(float(crops[0][0, 0, 0]) - 10 / 255) < 1e-6
