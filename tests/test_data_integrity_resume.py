"""Mid-epoch resume with data workers is bit-identical: stopping a stream after k batches,
saving its position and building a new stream from it gives the same batches (keys, labels
and augmented crops) as one stream never stopped, at an unchanged world size and number of
workers; with a changed grid the samples still continue exactly (nothing skipped or repeated).

Workers are real DataLoader worker processes; the augmentations are the real ones on tiny
crops. Datasets: uneven shards (with two workers a batch is cut across two workers' chunks)
and a shard of mostly broken images (its worker runs short and repeats its shards, so the
resume point also falls inside a repeat pass).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from support.data import FMNIST, jpeg_bytes, tar_bytes

from dino_cluster.data import build_train_stream, merge_states
from dino_cluster.data.pack import pack
from dino_cluster.dino.augment.batched import BatchedMultiCropAugment
from dino_cluster.dino.augment.reference import MultiCropAugment

BATCH = 24


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """200 real Fashion-MNIST images in shards of 40 (5 shards do not split evenly over 2)."""
    dest = tmp_path_factory.mktemp("uneven")
    pack(str(FMNIST), str(dest), split="test", limit=200, max_samples_per_shard=40,
         image_format="png", progress=False)  # fmt: skip
    return dest


@pytest.fixture(scope="module")
def short_worker(tmp_path_factory) -> Path:
    """4 clean shards of 30 plus one of 30 records where 20 images are cut: its worker falls
    short of its quota and repeats its own shards."""
    dest = tmp_path_factory.mktemp("short")
    pack(str(FMNIST), str(dest), split="test", limit=120, max_samples_per_shard=30,
         image_format="jpg", progress=False)  # fmt: skip
    members = []
    for i in range(30):
        data = jpeg_bytes(i, size=(28, 28))
        members.append((f"bad{i:03d}.jpg", data if i % 3 == 0 else data[: len(data) // 3]))
        members.append((f"bad{i:03d}.cls", str(i % 10).encode()))
    (dest / "shard-broken.tar").write_bytes(tar_bytes(members))
    index = json.loads((dest / "index.json").read_text())
    index["shards"].append({"name": "shard-broken.tar", "samples": 30})
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def batched() -> BatchedMultiCropAugment:
    return BatchedMultiCropAugment(global_size=12, local_size=6, n_local=2)


def reference() -> MultiCropAugment:
    return MultiCropAugment(global_size=12, local_size=6, n_local=2)


def _stream(url: Path, workers: int, transform, *, rank=0, world=1, state=None):  # type: ignore[no-untyped-def]
    return build_train_stream(
        str(url), transform=transform, global_batch=BATCH, rank=rank, world_size=world,
        num_workers=workers, seed=11, shuffle_buffer=8, state=state,
    )  # fmt: skip


def _take(stream, epochs: int, stop: int | None = None) -> list:  # type: ignore[no-untyped-def]
    """Batches from the stream's epoch on, through `epochs`, or the first `stop` of them."""
    out: list = []
    for epoch in range(stream.position.epoch, epochs):
        for b in stream.epoch_batches(epoch):
            out.append((list(b.keys), b.labels.clone(), [c.clone() for c in b.crops]))
            if stop is not None and len(out) == stop:
                return out
    return out


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, ((ka, la, ca), (kb, lb, cb)) in enumerate(zip(a, b, strict=True)):
        assert ka == kb, f"batch {i}: other samples"
        assert torch.equal(la, lb), f"batch {i}: other labels"
        assert len(ca) == len(cb) and all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True)), (
            f"batch {i}: same samples, other augmentation draws"
        )


def _resumed(url: Path, workers: int, make, cuts: list[int], epochs: int) -> list:  # type: ignore[no-untyped-def]
    """Batches of a run stopped after each cut (counted from the start), resumed each time
    from the saved position (through JSON, as a checkpoint stores it) in a new stream."""
    out: list = []
    state = None
    for cut in [*cuts, None]:
        stream = _stream(url, workers, make(), state=state)
        out += _take(stream, epochs, None if cut is None else cut - len(out))
        state = json.loads(json.dumps(stream.state_dict()))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_with_workers_is_bit_identical_batched_augment(uneven: Path, workers: int) -> None:
    straight = _take(_stream(uneven, workers, batched()), epochs=2)
    ipe = 200 // BATCH
    assert len(straight) == 2 * ipe
    # mid-epoch (1, 3, 5: with 2 workers 5 cuts a batch across two workers' chunks), at the
    # epoch boundary, and mid-way through the next epoch, resumed one after the other
    _same(_resumed(uneven, workers, batched, [1, 3, 5, ipe, ipe + 2], epochs=2), straight)
    # one stop only, right after the first batch of epoch 1
    _same(_resumed(uneven, workers, batched, [ipe + 1], epochs=2), straight)


def test_resume_with_workers_is_bit_identical_reference_augment(uneven: Path) -> None:
    """The reference draws from torch's and Python's generators: both are restored."""
    straight = _take(_stream(uneven, 2, reference()), epochs=1)
    _same(_resumed(uneven, 2, reference, [2, 5], epochs=1), straight)


def test_resume_inside_a_repeat_pass_is_bit_identical(short_worker: Path) -> None:
    repeats = [b.repeats for b in _stream(short_worker, 2, batched()).epoch_batches(0)]
    # The broken shard's worker goes round its shards again from its 2nd chunk (batch 4) on.
    assert repeats[3] > 0 and repeats[5] > 0 and sum(repeats[:3]) == 0
    straight = _take(_stream(short_worker, 2, batched()), epochs=1)
    for cuts in ([2, 4, 5], [4], [5]):
        _same(_resumed(short_worker, 2, batched, cuts, epochs=1), straight)


def test_resume_without_workers_stays_bit_identical(uneven: Path) -> None:
    """num_workers=0: the augmentation draws from the trainer's generators, which the
    checkpoint restores (as here by hand); the data position does the rest, as before."""
    torch.manual_seed(3)
    random.seed(3)
    straight = _take(_stream(uneven, 0, batched()), epochs=2)
    torch.manual_seed(3)
    random.seed(3)
    stream = _stream(uneven, 0, batched())
    out = _take(stream, epochs=2, stop=11)
    state, rng = json.loads(json.dumps(stream.state_dict())), torch.get_rng_state()
    torch.manual_seed(99)  # whatever ran in between
    torch.set_rng_state(rng)
    out += _take(_stream(uneven, 0, batched(), state=state), epochs=2)
    _same(out, straight)


def test_two_ranks_resume_bit_identical_from_the_merged_position(uneven: Path) -> None:
    straight = [_take(_stream(uneven, 2, batched(), rank=r, world=2), epochs=1) for r in (0, 1)]
    streams = [_stream(uneven, 2, batched(), rank=r, world=2) for r in (0, 1)]
    first = [_take(s, epochs=1, stop=3) for s in streams]
    merged = json.loads(json.dumps(merge_states([s.state_dict() for s in streams])))
    assert sorted(merged["workers"]["ranks"]) == ["0", "1"]
    for r in (0, 1):
        rest = _take(_stream(uneven, 2, batched(), rank=r, world=2, state=merged), epochs=1)
        _same(first[r] + rest, straight[r])
    # A lone rank's position cannot resume the grid exactly: the epoch is re-planned, which
    # is safe (the tests in test_data_stream.py check the coverage).
    lone = streams[0].state_dict()
    again = _stream(uneven, 2, batched(), rank=0, world=2, state=lone)
    assert again.worker_tasks(0) != [] and again._exact is None


def test_changed_grid_continues_the_samples_with_fresh_draws(uneven: Path) -> None:
    straight = _take(_stream(uneven, 2, batched()), epochs=1)
    stream = _stream(uneven, 2, batched())
    first = _take(stream, epochs=1, stop=3)
    state = json.loads(json.dumps(stream.state_dict()))
    rest = _take(_stream(uneven, 1, batched(), state=state), epochs=1)
    keys = [k for b in first + rest for k in b[0]]
    assert len(keys) == len(set(keys)) == len(straight) * BATCH  # nothing twice, none lost
