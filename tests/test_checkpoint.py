"""Checkpoints against real stores: a local folder and moto's S3 server on loopback, plus the
fault-injecting proxy in front of it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.storage import open_store

pytestmark = pytest.mark.integration


def _tiny_training_state(step: int, seed: int = 0) -> dict:
    """A miniature of what the loop saves: models, loss center, AdamW state, scaler, meta."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    teacher = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.04)
    for _ in range(2):
        opt.zero_grad()
        student(torch.randn(3, 6)).pow(2).mean().backward()
        opt.step()
    return {
        "student": {f"backbone.{k}": v for k, v in student.state_dict().items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "dino_loss": {"center": torch.randn(1, 4)},
        "optimizer": opt.state_dict(),
        "scaler": {"scale": 65536.0, "growth_tracker": 0},
        "meta": {
            "step": step,
            "epoch": 1,
            "world_size": 2,
            "data": {"epoch": 1, "shard_order_seed": 7, "samples_seen": [10, 12]},
            "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2, 3), None)},
            "spec": "name: test\nlr: 5e-4\n",
        },
    }


def _assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(params=["file", "s3"])
def ckpt_url(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "run" / "checkpoints"), None
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.new_bucket('ckpt')}/runs/r1/checkpoints", s3.options


def test_round_trip_with_weights_only_and_optimizer_resume(ckpt_url):
    url, options = ckpt_url
    mgr = CheckpointManager(url, storage_options=options)
    state = _tiny_training_state(step=12)
    mgr.save(12, state, blocking=True)
    assert mgr.failed_uploads == 0 and mgr.last_committed_step == 12
    step, loaded = mgr.load()
    assert step == 12
    _assert_same(state, loaded)
    # The optimizer state loads into a fresh AdamW (what resume does).
    student = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    opt = torch.optim.AdamW(student.parameters())
    opt.load_state_dict(loaded["optimizer"])
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == 0.04
    # Every object is a plain torch file that weights_only reads on its own too.
    store = open_store(url, options)
    (info,) = mgr.list()
    assert info.step == 12 and info.world_size == 2 and info.size > 0
    assert sorted(info.objects) == sorted(f"{k}.pt" for k in state)
    assert store.read_bytes("latest") == b"12"
    mgr.close()


def test_partial_upload_is_invisible_and_latest_hint_is_not_trusted(ckpt_url):
    url, options = ckpt_url
    mgr = CheckpointManager(url, storage_options=options, keep_last=5)
    mgr.save(10, _tiny_training_state(10), blocking=True)
    mgr.save(20, _tiny_training_state(20), blocking=True)
    store = open_store(url, options)
    # A crash after uploading step 30's objects but before its manifest, with a `latest`
    # hint that (wrongly) already names it.
    for info in store.list("step-000000020/"):
        name = info.key.rsplit("/", 1)[1]
        if name != "manifest.json":
            store.write_bytes(f"step-000000030/{name}", store.read_bytes(info.key))
    store.write_bytes("latest", b"30")
    # A manifest that is not ours is no commit either.
    store.write_bytes("step-000000040/teacher.pt", b"x")
    store.write_bytes("step-000000040/manifest.json", b'{"format": "something else"}')
    assert [i.step for i in mgr.list()] == [10, 20]
    assert mgr.latest_step() == 20
    assert mgr.load(keys=["meta"])[0] == 20
    # Re-committing over the partial step is harmless and makes it visible.
    mgr.save(30, _tiny_training_state(30), blocking=True)
    assert mgr.latest_step() == 30 and mgr.verify(30) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_falls_back_with_warning(ckpt_url, damage, caplog):
    url, options = ckpt_url
    mgr = CheckpointManager(url, storage_options=options, keep_last=5)
    mgr.save(100, _tiny_training_state(100, seed=1), blocking=True)
    mgr.save(200, _tiny_training_state(200, seed=2), blocking=True)
    store = open_store(url, options)
    key = "step-000000200/teacher.pt"
    data = bytearray(store.read_bytes(key))
    if damage == "truncate":
        store.write_bytes(key, bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
        store.write_bytes(key, bytes(data))
    else:
        store.delete(key)
    with caplog.at_level(logging.WARNING):
        step, state = mgr.load()
    assert step == 100
    _assert_same(state["teacher"], _tiny_training_state(100, seed=1)["teacher"])
    assert "step 200" in caplog.text
    if damage == "flip":
        assert "sha256" in caplog.text
        assert mgr.verify(200) and mgr.verify(100) == []
    else:
        # Size checks already happen when listing: the damaged one is not offered at all.
        assert [i.step for i in mgr.list()] == [100]
    with pytest.raises(Exception, match="step 200"):
        mgr.load(200, fallback=False)


def test_retention_keeps_last_k_plus_every_mth_and_cleans_partials(tmp_path):
    url = str(tmp_path / "ckpt")
    store = open_store(url)
    store.write_bytes("step-000000003/student.pt", b"stale partial")  # older: cleaned
    store.write_bytes("step-000000099/student.pt", b"future partial")  # newer: left alone
    mgr = CheckpointManager(url, keep_last=2, keep_every=4)
    for step in range(1, 11):
        mgr.save(step, {"teacher": {"backbone.w": torch.full((2,), float(step))}})
    assert mgr.wait(60)
    assert [i.step for i in mgr.list()] == [4, 8, 9, 10]
    dirs = sorted({i.key.split("/")[0] for i in store.list()} - {"latest"})
    assert dirs == [f"step-{s:09d}" for s in (4, 8, 9, 10, 99)]
    # Resuming from step 8 (say 9 and 10 were unusable) and committing 9 again drops 10,
    # which belongs to the abandoned timeline, so the next resume cannot pick it.
    resumed = CheckpointManager(url, keep_last=2, keep_every=4)
    resumed.save(9, {"teacher": {"backbone.w": torch.full((2,), -9.0)}}, blocking=True)
    assert resumed.last_committed_step == 9  # committed; retention may still be running
    assert resumed.wait(60)
    assert [i.step for i in resumed.list()] == [4, 8, 9]
    step, state = resumed.load()
    assert step == 9 and state["teacher"]["backbone.w"][0] == -9.0


def test_recommitted_step_drops_the_evaluations_of_the_checkpoint_it_replaces(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3)
    mgr.save(5, {"teacher": {"backbone.w": torch.zeros(2)}}, blocking=True)
    mgr.record_eval(5, "knn", {"top1": {"20": 61.0}})
    assert mgr.wait(60)
    assert mgr.list()[0].evals["knn"]["top1"]["20"] == 61.0
    # The same step committed again (resumed from an older checkpoint, or restarted with
    # checkpoint.resume false): the old timeline's k-NN result must not show beside it.
    again = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3)
    again.save(5, {"teacher": {"backbone.w": torch.ones(2)}}, blocking=True)
    assert again.wait(60)
    [info] = again.list()
    assert info.step == 5 and info.evals == {}
    assert again.load()[1]["teacher"]["backbone.w"][0] == 1.0


def test_retention_sweeps_temporaries_of_killed_writers_only(tmp_path, caplog):
    """A local writer killed mid-write leaves a `.~tmp-*` file that no listing shows; the
    next retention pass removes it once it is stale, never a live writer's fresh one."""
    import os
    import time

    from dino_cluster.checkpointing.manager import STALE_TEMP_S

    root = tmp_path / "ckpt"
    dead = root / "step-000000004" / ".~tmp-killed"  # its step never got a manifest
    live = root / "step-000000005" / ".~tmp-writing"
    dead_eval = root / "step-000000001" / "evals" / ".~tmp-knn"
    for path in (dead, live, dead_eval):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    old = time.time() - STALE_TEMP_S - 60
    os.utime(dead, (old, old))
    os.utime(dead_eval, (old, old))
    mgr = CheckpointManager(str(root), keep_last=3)
    with caplog.at_level(logging.WARNING, logger="dino_cluster.checkpointing.manager"):
        for step in (1, 2):
            mgr.save(step, {"teacher": {"backbone.w": torch.zeros(2)}}, blocking=True)
        assert mgr.wait(60)
    assert not dead.exists() and not dead.parent.exists()  # its empty step folder too
    assert not dead_eval.exists()
    assert live.exists()
    assert [i.step for i in mgr.list()] == [1, 2]
    assert "removed 2 half-written temporary file(s)" in caplog.text


def test_faulty_s3_uploads_retry_and_commit_never_half_visible(faulty_s3):
    bucket = faulty_s3.new_bucket("ckptf")
    url = f"s3://{bucket}/run/checkpoints"
    faulty_s3.set_faults(
        rate=0.15, kinds=("503", "500", "drop_before", "drop_mid_body", "empty_200")
    )
    mgr = CheckpointManager(
        url, storage_options=faulty_s3.options, keep_last=2, retry_backoff_s=0.01
    )
    saved = [10, 20, 30, 40]
    for step in saved:
        mgr.save(step, _tiny_training_state(step, seed=step))
        listed = mgr.list()  # listing under faults while an upload runs
        assert {i.step for i in listed} <= set(saved[: saved.index(step) + 1])
    assert mgr.wait(120)
    injected = sum(v for k, v in faulty_s3.counts.items() if k != "requests")
    assert injected > 0
    assert mgr.commits + mgr.failed_uploads == len(saved)
    faulty_s3.set_faults(rate=0.0)
    clean = CheckpointManager(url, storage_options=faulty_s3.options)
    infos = clean.list()
    assert infos, "nothing committed despite retries"
    for info in infos:  # everything listed verifies byte for byte
        assert clean.verify(info.step) == []
    step, state = clean.load()
    _assert_same(state["teacher"], _tiny_training_state(step, seed=step)["teacher"])


def test_faulty_s3_hard_failure_is_loud_and_invisible(faulty_s3, caplog):
    bucket = faulty_s3.new_bucket("ckpth")
    url = f"s3://{bucket}/run/checkpoints"
    options = dataclasses.replace(faulty_s3.options, max_attempts=1)
    mgr = CheckpointManager(url, storage_options=options, upload_retries=1, retry_backoff_s=0.01)
    mgr.save(1, _tiny_training_state(1), blocking=True)  # fault-free baseline commit
    faulty_s3.set_faults(rate=1.0, kinds=("500",), methods=("PUT",))
    with caplog.at_level(logging.ERROR):
        mgr.save(2, _tiny_training_state(2), blocking=True)
    assert mgr.failed_uploads == 1 and mgr.last_error is not None
    assert "checkpoint step 2 was NOT committed" in caplog.text
    faulty_s3.set_faults(rate=0.0)
    assert [i.step for i in mgr.list()] == [1] and mgr.load()[0] == 1
    # The store recovers: the next save commits again.
    mgr.save(3, _tiny_training_state(3), blocking=True)
    assert mgr.latest_step() == 3 and mgr.verify(3) == []
