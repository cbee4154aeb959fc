"""Unit tests of the checkpoint logic: manifest parsing, retention policy, host snapshot, the
background thread (with instrumented local stores), retries and the reference export layout."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from dino_cluster.checkpointing import (
    CheckpointManager,
    CheckpointNotFoundError,
    Manifest,
    ManifestError,
    ManifestObject,
    plan_retention,
    reference_layout,
    render_table,
    select_retained,
)
from dino_cluster.checkpointing.layout import HashingWriter, file_sha256
from dino_cluster.checkpointing.snapshot import HostSnapshot
from dino_cluster.dino.model import DINOHead
from dino_cluster.storage import StorageError
from dino_cluster.storage.local import LocalStore

SHA = "ab" * 32


def _state(step: int) -> dict:
    return {
        "student": {"backbone.w": torch.full((4, 4), float(step))},
        "teacher": {"backbone.w": torch.full((4, 4), step + 0.5)},
        "meta": {"step": step, "epoch": step // 10, "world_size": 2},
    }


# ------------------------------------------------------------------ manifest


def test_manifest_round_trip_and_rejects_untrusted_fields():
    m = Manifest(
        step=7,
        time=123.5,
        objects=[ManifestObject("teacher.pt", 10, SHA)],
        world_size=4,
        meta={"epoch": 1},
    )
    back = Manifest.from_json(m.to_json(), expect_step=7)
    assert back == m and back.size == 10

    def doc(**over):
        d = json.loads(m.to_json())
        d.update(over)
        return json.dumps(d).encode()

    bad = [
        b"not json",
        doc(format="other/1"),
        doc(step=-1),
        doc(step=True),
        doc(objects=[]),
        doc(objects=[{"name": "../escape.pt", "size": 1, "sha256": SHA}]),
        doc(objects=[{"name": "a/b.pt", "size": 1, "sha256": SHA}]),
        doc(objects=[{"name": "t.pt", "size": -1, "sha256": SHA}]),
        doc(objects=[{"name": "t.pt", "size": 1, "sha256": "xyz"}]),
        doc(objects=[{"name": "t.pt", "size": 1, "sha256": SHA}] * 2),
        doc(world_size=0),
        b" " * (2 << 20),
    ]
    for data in bad:
        with pytest.raises(ManifestError):
            Manifest.from_json(data)
    with pytest.raises(ManifestError, match="sits in"):
        Manifest.from_json(m.to_json(), expect_step=8)


def test_hashing_writer_matches_file_hash(tmp_path):
    path = tmp_path / "x.pt"
    with open(path, "wb") as f:
        w = HashingWriter(f)
        torch.save({"a": torch.arange(100_000)}, w)
        w.flush()
    assert file_sha256(path) == (w.size, w.hexdigest())


# ------------------------------------------------------------------ retention policy


def test_select_retained_keeps_last_k_plus_every_mth():
    steps = range(100, 1100, 100)
    assert select_retained(steps, keep_last=3) == {800, 900, 1000}
    assert select_retained(steps, keep_last=2, keep_every=300) == {300, 600, 900, 1000}
    assert select_retained([5], keep_last=3) == {5}
    with pytest.raises(ValueError, match="keep_last"):
        select_retained(steps, keep_last=0)
    with pytest.raises(ValueError, match="keep_every"):
        select_retained(steps, keep_last=1, keep_every=-1)


def test_plan_retention_abandoned_timeline_and_stale_partials():
    plan = plan_retention(
        committed=[10, 20, 30, 40], partial=[5, 35, 60], just_committed=30, keep_last=2
    )
    assert plan.abandoned == [40]
    assert plan.delete_committed == [10, 40]  # 20 and 30 are the last two of the live timeline
    assert plan.delete_partial == [5]  # 35 and 60 may still be written (or overwritten)


# ------------------------------------------------------------------ host snapshot


def test_snapshot_copies_and_reuses_buffers_and_refuses_non_weights_only_types():
    snap = HostSnapshot()
    src = {"m": OrderedDict(w=torch.ones(3)), "l": [1, (2.5, "x")], "s": torch.Size([2])}
    first = snap.copy(src)
    src["m"]["w"].add_(1)  # the caller keeps training after save() returned
    assert torch.equal(first["m"]["w"], torch.ones(3))
    assert type(first["m"]) is OrderedDict and first["l"] == [1, (2.5, "x")]
    buf = first["m"]["w"]
    second = snap.copy(src)
    assert second["m"]["w"].data_ptr() == buf.data_ptr()  # reused host buffer
    assert torch.equal(second["m"]["w"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=r"state\['rng'\]\[1\].*numpy"):
        snap.copy({"rng": ("MT19937", np.zeros(3, dtype=np.uint32))})
    with pytest.raises(ValueError, match="numpy"):
        snap.copy({"x": np.float64(1.0)})  # a float subclass that weights_only cannot load
    with pytest.raises(ValueError, match="Linear"):
        snap.copy({"model": nn.Linear(2, 2)})


# ------------------------------------------------------------------ background thread


class GatedStore(LocalStore):
    """A local store whose uploads wait for a gate, recording the order of writes."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.writes: list[str] = []

    def upload_file(self, key, path):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        self.writes.append(key)
        super().upload_file(key, path)

    def write_bytes(self, key, data):
        self.writes.append(key)
        super().write_bytes(key, data)


def test_save_returns_before_upload_and_next_save_waits(tmp_path):
    store = GatedStore(str(tmp_path))
    mgr = CheckpointManager(store, keep_last=5)
    store.gate.clear()
    mgr.save(1, _state(1))  # returns although the upload cannot proceed
    assert store.entered.wait(10)
    assert mgr.list() == [] and not mgr.wait(timeout=0)

    second = threading.Thread(target=mgr.save, args=(2, _state(2)))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # blocked behind step 1's upload
    assert not any("step-000000002" in k for k in store.writes)
    store.gate.set()
    second.join(30)
    assert not second.is_alive() and mgr.wait(30)
    m1 = store.writes.index("step-000000001/manifest.json")
    first2 = min(i for i, k in enumerate(store.writes) if k.startswith("step-000000002/"))
    assert m1 < first2  # step 1 fully committed before step 2 started
    # Manifest after every object of its step, `latest` after the manifest.
    for step in (1, 2):
        keys = [k for k in store.writes if k.startswith(f"step-00000000{step}/")]
        assert keys[-1].endswith("manifest.json") and len(keys) == 4  # 3 objects + manifest
    assert [i.step for i in mgr.list()] == [1, 2]
    assert store.writes[-1] == "latest"
    mgr.close()


class FlakyStore(LocalStore):
    """Fails the first ``fail`` uploads; with ``store_anyway`` the failed put landed whole."""

    def __init__(self, root: str, fail: int, store_anyway: bool = False) -> None:
        super().__init__(root)
        self.fail = fail
        self.store_anyway = store_anyway
        self.calls = 0

    def upload_file(self, key, path):
        self.calls += 1
        if self.calls <= self.fail:
            if self.store_anyway:
                super().upload_file(key, path)
            raise StorageError("upload_file", self.url_for(key), "connection reset")
        super().upload_file(key, path)


@pytest.mark.parametrize("store_anyway", [False, True])
def test_upload_retries_then_commits(tmp_path, store_anyway):
    store = FlakyStore(str(tmp_path), fail=2, store_anyway=store_anyway)
    mgr = CheckpointManager(store, upload_retries=3, retry_backoff_s=0.001)
    mgr.save(3, _state(3), blocking=True)
    assert mgr.failed_uploads == 0 and mgr.last_error is None
    assert mgr.load() is not None and mgr.load()[0] == 3


def test_upload_failure_is_reported_not_raised_and_invisible(tmp_path, caplog):
    store = FlakyStore(str(tmp_path), fail=10**6)
    mgr = CheckpointManager(store, upload_retries=2, retry_backoff_s=0.001)
    with caplog.at_level(logging.ERROR):
        mgr.save(4, _state(4), blocking=True)
        mgr.save(5, _state(5))  # the loop keeps going; a later save is attempted again
        assert mgr.wait(30)
    assert mgr.failed_uploads == 2
    assert isinstance(mgr.last_error, StorageError)
    assert store.calls == 2 * 3  # first try + 2 retries, per checkpoint
    assert "checkpoint step 4 was NOT committed" in caplog.text
    assert mgr.list() == [] and mgr.latest_step() is None and mgr.load() is None


def test_non_writer_is_a_noop_and_state_keys_are_checked(tmp_path):
    reader = CheckpointManager(str(tmp_path), is_writer=False)
    reader.save(1, _state(1), blocking=True)
    assert reader.list() == [] and not any(tmp_path.iterdir())
    writer = CheckpointManager(str(tmp_path))
    with pytest.raises(ValueError, match="state key"):
        writer.save(1, {"../x": torch.ones(1)})
    with pytest.raises(ValueError, match="non-negative"):
        writer.save(-1, _state(1))
    with pytest.raises(CheckpointNotFoundError):
        writer.load(step=9)


# ------------------------------------------------------------------ export + table


def _reference_head(in_dim: int, out_dim: int) -> nn.Module:
    """The reference implementation's head structure (old weight_norm spelling)."""
    head = nn.Module()
    head.mlp = nn.Sequential(
        nn.Linear(in_dim, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)
    )
    head.last_layer = nn.utils.weight_norm(nn.Linear(8, out_dim, bias=False))
    return head


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_teacher_uses_reference_layout(tmp_path):
    head = DINOHead(in_dim=12, out_dim=10, hidden_dim=16, bottleneck_dim=8)
    model_state = {
        "backbone.cls_token": torch.zeros(1, 1, 12),
        **{f"head.{k}": v for k, v in head.state_dict().items()},
    }
    mgr = CheckpointManager(str(tmp_path))
    state = _state(5)
    state["teacher"] = model_state
    state["student"] = {f"module.{k}": v + 1 for k, v in model_state.items()}  # DDP-wrapped
    mgr.save(5, state, blocking=True)
    url = mgr.export_teacher(5)
    assert url.endswith("step-000000005/export/teacher.pth")
    export = torch.load(url.removeprefix("file://"), weights_only=True)
    assert set(export) == {"teacher", "student", "step"}
    for key in ("teacher", "student"):
        keys = set(export[key])
        assert {"head.last_layer.weight_g", "head.last_layer.weight_v"} <= keys
        assert not any("parametrizations" in k or k.startswith("module.") for k in keys)
    ref = _reference_head(12, 10)
    ref.load_state_dict(
        {k[len("head.") :]: v for k, v in export["teacher"].items() if k.startswith("head.")},
        strict=True,
    )
    assert torch.equal(export["student"]["backbone.cls_token"], torch.ones(1, 1, 12))
    # An export can go anywhere else too, and the export is not part of the checkpoint.
    other = mgr.export_teacher(5, str(tmp_path / "elsewhere" / "t.pth"))
    assert torch.load(other.removeprefix("file://"), weights_only=True)["step"] == 5
    assert mgr.verify(5) == [] and mgr.list()[0].objects == ["student.pt", "teacher.pt", "meta.pt"]
    with pytest.raises(ValueError, match="outside backbone"):
        reference_layout({"blocks.0.w": torch.ones(1)})


def test_record_eval_and_render_table(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(10, _state(10), blocking=True)
    mgr.record_eval(10, "knn", {"top1": torch.tensor(71.25), "k": 20})
    mgr.record_eval(77, "knn", {"top1": 1.0})  # no such checkpoint: not shown
    (info,) = mgr.list()
    assert info.evals == {"knn": {"top1": 71.25, "k": 20}} and info.world_size == 2
    with pytest.raises(ValueError, match="eval kind"):
        mgr.record_eval(10, "../knn", {})
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(mgr.list()))
    text = console.export_text()
    assert "knn top1 71.25 (k=20)" in text and " 10 " in text


def test_stuck_upload_skips_the_next_checkpoint_instead_of_blocking(tmp_path, caplog):
    store = GatedStore(str(tmp_path))
    store.gate.clear()
    mgr = CheckpointManager(store, wait_timeout_s=0.05)
    mgr.save(1, _state(1))
    assert store.entered.wait(10)
    with caplog.at_level(logging.ERROR):
        mgr.save(2, _state(2))  # returns after wait_timeout_s, without checkpointing
    assert mgr.failed_uploads == 1 and isinstance(mgr.last_error, TimeoutError)
    assert "checkpoint step 2 was NOT committed" in caplog.text
    store.gate.set()
    with mgr:  # close() finishes the upload in flight
        pass
    assert [i.step for i in mgr.list()] == [1] and mgr.commits == 1
