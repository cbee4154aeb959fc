"""Streaming shards: rank/worker split, equal batch counts, bad samples, resume, faulty S3.

Ranks are simulated in-process (one TrainStream per rank, rank=0/1); data workers are real
DataLoader worker processes.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from support.data import FMNIST, jpeg_bytes, tar_bytes, tiny_transform

from dino_cluster.data import DataError, TrainStream, build_train_stream, merge_states
from dino_cluster.data.pack import pack


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory) -> Path:
    """200 real Fashion-MNIST images in 5 shards of 40 (5 does not divide over 2x2)."""
    dest = tmp_path_factory.mktemp("five")
    pack(str(FMNIST), str(dest), split="test", limit=200, max_samples_per_shard=40,
         image_format="png", progress=False)  # fmt: skip
    return dest


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> Path:
    """240 real Fashion-MNIST images in 8 shards of 30."""
    dest = tmp_path_factory.mktemp("eight")
    pack(str(FMNIST), str(dest), split="test", limit=240, max_samples_per_shard=30,
         image_format="png", progress=False)  # fmt: skip
    return dest


def make_stream(url, *, rank=0, world=1, workers=0, batch=20, state=None, **kw) -> TrainStream:
    return build_train_stream(
        str(url),
        transform=kw.pop("transform", tiny_transform),
        global_batch=batch,
        rank=rank,
        world_size=world,
        num_workers=workers,
        seed=7,
        shuffle_buffer=kw.pop("shuffle_buffer", 16),
        state=state,
        **kw,
    )


def run(stream: TrainStream, epoch: int, stop: int | None = None) -> list:
    out = []
    for batch in stream.epoch_batches(epoch):
        assert len(batch.keys) == stream.per_rank_batch
        assert [tuple(c.shape) for c in batch.crops] == [
            (stream.per_rank_batch, 3, 8, 8),
            (stream.per_rank_batch, 3, 4, 4),
        ]
        out.append(batch)
        if stop is not None and len(out) == stop:
            break
    return out


def test_api_contract_and_errors(five_shards: Path) -> None:
    s1 = make_stream(five_shards, batch=40)
    s4 = make_stream(five_shards, batch=40, rank=3, world=4)
    assert s1.iters_per_epoch == s4.iters_per_epoch == 5  # independent of world size
    assert (s1.per_rank_batch, s4.per_rank_batch) == (40, 10)
    with pytest.raises(ValueError, match="global_batch 30 is not divisible by world_size 4"):
        make_stream(five_shards, batch=30, world=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_stream(five_shards, batch=400)
    batches = list(s1.epoch_iter(0))
    assert len(batches) == 5 and all(isinstance(b, list) and len(b) == 2 for b in batches)
    state = s1.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["epoch"] == 0 and state["batches_done"] == 5
    assert sorted(state["consumed"]) == [f"shard-{i:06d}.tar" for i in range(5)]
    assert list(s1.epoch_iter(0)) == []  # the epoch is done: nothing left
    with pytest.raises(ValueError, match="seed"):
        build_train_stream(str(five_shards), transform=tiny_transform, global_batch=40,
                           rank=0, world_size=1, num_workers=0, seed=8, state=state)  # fmt: skip


def test_two_ranks_two_workers_five_shards(five_shards: Path) -> None:
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = make_stream(five_shards, rank=rank, world=2, workers=2, batch=20)
            tasks = stream.worker_tasks(epoch)
            batches = run(stream, epoch)
            assert len(batches) == stream.iters_per_epoch == 10  # equal on both ranks
            per_rank.append((stream, batches, tasks))
        shards_of = []
        for _, batches, tasks in per_rank:
            keys = [k for b in batches for k in b.keys]
            repeats = sum(b.repeats for b in batches)
            # Without repeats a rank never sees a sample twice.
            assert len(keys) - len(set(keys)) <= repeats
            shards_of.append({k.split("/")[0] for k in keys})
            own = [name for t in tasks for name, _ in t.own]
            assert len(own) == len(set(own))
            assert {k.split("/")[0] for k in keys} <= set(own)  # only its own shards
        # Disjoint across ranks, and together every shard.
        assert not shards_of[0] & shards_of[1]
        assert shards_of[0] | shards_of[1] == {f"shard-{i:06d}.tar" for i in range(5)}
        state = merge_states([s.state_dict() for s, _, _ in per_rank])
        assert state["batches_done"] == 10


def _corrupt_dataset(root: Path) -> None:
    """Shards: clean, bad JPEG + missing image, cut mid-member, cut at a header, missing,
    complete but shorter than its index says."""

    def sample(i: int) -> list[tuple[str, bytes]]:
        return [(f"s{i:03d}.jpg", jpeg_bytes(i)), (f"s{i:03d}.cls", str(i % 3).encode())]

    shards = {
        "a.tar": [m for i in range(0, 10) for m in sample(i)],
        "b.tar": [m for i in range(10, 18) for m in sample(i)]
        + [("s018.jpg", jpeg_bytes(18)[:150]), ("s018.cls", b"1"), ("s019.cls", b"2")],
        "c.tar": [m for i in range(20, 30) for m in sample(i)],
        "d.tar": [m for i in range(30, 40) for m in sample(i)],
        "f.tar": [m for i in range(40, 46) for m in sample(i)],
    }
    for name, members in shards.items():
        data = tar_bytes(members)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            offsets = {m.name: (m.offset, m.offset_data) for m in tar}
        if name == "c.tar":
            data = data[: offsets["s022.jpg"][1] + 100]  # inside a member: tarfile raises
        if name == "d.tar":
            # Inside a header: tarfile sees a clean end, the missing end-of-archive block
            # tells it is cut.
            data = data[: offsets["s035.jpg"][0] + 100]
        (root / name).write_bytes(data)
    # e.tar is in the index but not in storage: the whole shard is unreadable; f.tar is
    # complete with 6 samples, the index says 10.
    index = {"shards": [{"name": n, "samples": 10} for n in [*sorted(shards), "e.tar"]]}
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_and_jpeg_skipped_counted_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    _corrupt_dataset(tmp_path)
    stream = make_stream(tmp_path, batch=8, workers=workers)
    assert stream.iters_per_epoch == 7
    with caplog.at_level(logging.WARNING, logger="dino_cluster.data"):
        first = run(stream, 0)
        second = run(stream, 1)
    assert len(first) == len(second) == 7  # the run goes on, full batch count
    bad = stream.bad_samples
    assert bad["bad_image"] == 1 and bad["missing_image"] == 1
    # c.tar: 2 of 10 samples read before the cut; d.tar: 5 of 10 before a cut header
    assert bad["truncated_shard"] == 8 + 5
    assert bad["short_shard"] == 4  # f.tar: ends cleanly after 6 of 10
    assert bad["unreadable_shard"] == 10
    good = {k.split("/")[1] for b in first for k in b.keys}
    assert "s018" not in good and "s019" not in good
    assert all(f"s{i:03d}" in good for i in range(10, 18))
    messages = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    ids = [m.split()[3] for m in messages]
    assert len(ids) == len(set(ids)) == 6  # each distinct bad sample logged once, two epochs
    assert stream.bad_samples == bad


def _phase(url, world, workers, batch, state=None, stop=None):
    streams = [make_stream(url, rank=r, world=world, workers=workers, batch=batch, state=state)
               for r in range(world)]  # fmt: skip
    batches = [run(s, 0, stop) for s in streams]
    return streams, batches


def test_resume_mid_epoch_with_fewer_ranks_covers_epoch_exactly(eight_shards: Path) -> None:
    streams, first = _phase(eight_shards, world=2, workers=2, batch=24, stop=3)
    assert [len(b) for b in first] == [3, 3]
    state = merge_states([s.state_dict() for s in streams])
    assert state["batches_done"] == 3
    in_flight = state["in_flight"]
    assert len(in_flight) <= 2 * 2  # at most one in-flight shard per rank-worker
    json.loads(json.dumps(state))

    streams2, second = _phase(eight_shards, world=1, workers=2, batch=24, state=state)
    assert len(second[0]) == 10 - 3
    seen1 = [k for bs in first for b in bs for k in b.keys]
    seen2 = [k for bs in second for b in bs for k in b.keys]
    assert sum(b.repeats for bs in first + second for b in bs) == 0
    assert not set(seen1) & set(seen2)  # in-flight shards re-read, seen samples skipped
    assert sorted(seen1 + seen2) == sorted(set(seen1 + seen2))
    assert len(seen1) + len(seen2) == 240  # the whole epoch, exactly once
    consumed = set(state["consumed"])
    assert not {k.split("/")[0] for k in seen2} & consumed  # consumed shards not read again


def test_resume_with_more_ranks_and_single_rank_state(eight_shards: Path) -> None:
    streams, first = _phase(eight_shards, world=2, workers=2, batch=24, stop=4)
    merged = merge_states([s.state_dict() for s in streams])
    for state in (merged, streams[0].state_dict()):  # a lone rank's state is safe, too
        planned = [
            name
            for r in range(3)
            for t in make_stream(eight_shards, rank=r, world=3, batch=24, state=state).worker_tasks(
                0
            )
            for name, _ in t.own
        ]
        streams2, second = _phase(eight_shards, world=3, workers=1, batch=24, state=state)
        assert [len(b) for b in second] == [6, 6, 6]  # equal counts on every new rank
        remaining = {f"shard-{i:06d}.tar" for i in range(8)} - set(state["consumed"])
        assert sorted(planned) == sorted(remaining)  # no shard skipped, none twice
        seen1 = {k for bs in first for b in bs for k in b.keys}
        seen2 = [k for bs in second for b in bs for k in b.keys]
        dup_shards = {k.split("/")[0] for k in seen2 if k in seen1}
        assert len(dup_shards) <= 2 * 2  # bounded by one in-flight shard per rank-worker
        if state is merged:
            repeats = sum(b.repeats for bs in second for b in bs)
            assert len([k for k in seen2 if k in seen1]) <= repeats


def test_faulty_s3_still_yields_full_epoch(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket("faults")
    url = f"s3://{bucket}/fm"
    pack(str(FMNIST), url, split="test", limit=120, max_samples_per_shard=30,
         image_format="png", storage_options=faulty_s3.options, progress=False)  # fmt: skip
    faulty_s3.set_faults(rate=0.3, kinds=("503", "500", "drop_before", "drop_mid_body"),
                         methods=("GET", "HEAD"))  # fmt: skip
    stream = build_train_stream(
        url,
        transform=tiny_transform,
        global_batch=24,
        rank=0,
        world_size=1,
        num_workers=2,
        seed=1,
        storage_options=faulty_s3.options,
    )
    keys = [k for b in run(stream, 0) for k in b.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 120
    assert stream.bad_samples == {}
    counts = collections.Counter(faulty_s3.counts)
    assert counts["drop_mid_body"] + counts["503"] + counts["500"] + counts["drop_before"] > 0


class LazyThumb:
    """A transform that decodes at reduced scale itself (the lazy_decode hook)."""

    lazy_decode = True

    def __init__(self) -> None:
        self.modes: set[str] = set()

    def __call__(self, img):
        self.modes.add(str(img.mode) + ("-unloaded" if getattr(img, "_im", None) is None else ""))
        img.draft("RGB", (16, 16))
        return tiny_transform(img.convert("RGB"))


def test_lazy_decode_transform_and_broken_transform(tmp_path: Path) -> None:
    _corrupt_dataset(tmp_path)
    lazy = LazyThumb()
    stream = make_stream(tmp_path, batch=8, transform=lazy)
    assert len(run(stream, 0)) == 7
    assert "RGB-unloaded" in lazy.modes  # got the image before its pixels were decoded
    assert stream.bad_samples["bad_image"] == 1  # the cut JPEG fails inside the transform

    def broken(img):
        raise RuntimeError("bug in the augmentation")

    stream = make_stream(tmp_path, batch=8, transform=broken)
    with pytest.raises(DataError, match="not a data problem"):
        run(stream, 0)


def _gather_worker(rank: int, url: str, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    store = torch.distributed.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        stream = make_stream(url, rank=rank, world=2, workers=0, batch=24)
        for i, _ in enumerate(stream.epoch_iter(0)):
            if i == 2:
                break
        local = stream.state_dict()
        merged = stream.state_dict(gather=True)  # a collective: every rank calls it
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"local": local, "merged": merged}))
    finally:
        dist.destroy_process_group()


def test_state_dict_gather_merges_ranks_over_torch_distributed(
    eight_shards: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    # fork: the children need no re-import of torch (spawn costs ~10 s on 2 cores).
    mp.start_processes(
        _gather_worker,
        args=(str(eight_shards), str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    out = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    expected = merge_states([o["local"] for o in out])
    assert out[0]["merged"] == out[1]["merged"] == expected
    assert out[0]["local"]["in_flight"] != out[1]["local"]["in_flight"]
    assert set(expected["in_flight"]) == set(out[0]["local"]["in_flight"]) | set(
        out[1]["local"]["in_flight"]
    )


def test_with_the_real_multicrop_augmentation(five_shards: Path) -> None:
    from dino_cluster.dino.augment.reference import MultiCropAugment

    aug = MultiCropAugment(global_size=32, local_size=16, n_local=2)
    stream = make_stream(five_shards, batch=20, workers=2, world=4, rank=3, transform=aug)
    batches = list(stream.epoch_iter(0))
    assert len(batches) == 10
    assert [tuple(c.shape) for c in batches[0]] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 2
    assert all(torch.isfinite(c).all() for b in batches for c in b)
