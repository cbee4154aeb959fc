"""Checkpoints that must not be lost or poisoned: a step committed again (a resumed or
re-submitted run) is switched, never hidden first, so a kill at any moment leaves a whole
checkpoint; identical content is kept as it is; non-finite states are never committed and
never loaded; a checkpoint that does not fit the spec is refused with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.checkpointing.layout import CheckpointCorruptError, manifest_key
from dino_cluster.storage.local import LocalStore


def _state(step: int, value: float | None = None) -> dict:
    v = float(step) if value is None else value
    return {
        "student": {"backbone.w": torch.full((64, 64), v)},
        "teacher": {"backbone.w": torch.full((64, 64), v + 0.5)},
        "dino_loss": {"center": torch.zeros(1, 8)},
        "meta": {"step": step, "world_size": 1},
    }


class CountingStore(LocalStore):
    """A local store that records deletes and can fail the n-th upload."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.deleted: list[str] = []
        self.uploads = 0
        self.fail_at: int | None = None

    def upload_file(self, key, path):  # noqa: ANN001
        self.uploads += 1
        if self.fail_at is not None and self.uploads >= self.fail_at:
            raise OSError("injected: the writer died here")
        super().upload_file(key, path)

    def delete(self, key):  # noqa: ANN001
        self.deleted.append(key)
        super().delete(key)


def test_a_recommit_that_dies_midway_leaves_the_committed_step_whole(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path))
    with CheckpointManager(store, keep_last=1, upload_retries=0, pipeline=False) as mgr:
        mgr.save(8, _state(8), blocking=True)
    before = mgr.read_manifest(8)
    store.fail_at, store.uploads = 2, 0  # the second object of the re-commit fails
    with CheckpointManager(store, keep_last=1, upload_retries=0, pipeline=False) as mgr:
        mgr.save(8, _state(8, value=99.0), blocking=True)
        assert mgr.failed_uploads == 1
    # Old code: the manifest was deleted first, so keep_last=1 lost the run's only checkpoint.
    assert manifest_key(8) not in store.deleted
    reader = CheckpointManager(store, is_writer=False)
    assert [i.step for i in reader.list()] == [8]
    assert reader.read_manifest(8) == before and reader.verify(8) == []
    step, state = reader.load()
    assert step == 8 and float(state["student"]["backbone.w"][0, 0]) == 8.0


def test_a_recommit_with_new_content_switches_and_cleans_up(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path))
    with CheckpointManager(store, keep_last=3) as mgr:
        mgr.save(4, _state(4), blocking=True)
        mgr.record_eval(4, "knn", {"top1": 50.0, "info": {}})
    with CheckpointManager(store, keep_last=3) as mgr:  # a resumed run, saving step 4 again
        mgr.save(4, _state(4, value=7.0), blocking=True)
    reader = CheckpointManager(store, is_writer=False)
    (info,) = reader.list()
    assert info.evals == {}  # the results described the replaced weights
    assert sorted(info.objects) == sorted(o.name for o in reader.read_manifest(4).objects)
    assert all(".r" in name for name in info.objects)  # written beside, then switched
    leftovers = sorted(p.name for p in (tmp_path / "step-000000004").iterdir())
    assert leftovers == sorted([*info.objects, "manifest.json"])  # old objects deleted
    assert float(reader.load()[1]["teacher"]["backbone.w"][0, 0]) == 7.5


def test_an_identical_recommit_writes_nothing(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path))
    with CheckpointManager(store) as mgr:
        mgr.save(3, _state(3), blocking=True)
        mgr.record_eval(3, "knn", {"top1": 50.0, "info": {}})
    manifest = (tmp_path / "step-000000003" / "manifest.json").read_bytes()
    uploads = store.uploads
    with CheckpointManager(store) as mgr:
        mgr.save(3, _state(3), blocking=True)
    assert store.uploads == uploads and store.deleted == []
    assert (tmp_path / "step-000000003" / "manifest.json").read_bytes() == manifest
    assert CheckpointManager(store, is_writer=False).list()[0].evals["knn"]["top1"] == 50.0


_RECOMMIT = """
import sys, torch
from dino_cluster.checkpointing import CheckpointManager
mgr = CheckpointManager(sys.argv[1], keep_last=1, pipeline=False)
big = torch.randn(512, 1024)
for i in range(1000):
    mgr.save(8, {"student": {"w": big + i}, "teacher": {"w": big - i}, "meta": {"step": 8}},
             blocking=True)
    print("committed", i, flush=True)
"""


def test_sigkill_during_recommits_never_loses_the_step(tmp_path: Path) -> None:
    """Real kills of a process that re-commits one step over and over (keep_last 1)."""
    root = tmp_path / "ckpt"
    with CheckpointManager(str(root), keep_last=1) as mgr:
        mgr.save(8, _state(8), blocking=True)
    script = tmp_path / "recommit.py"
    script.write_text(_RECOMMIT)
    for delay in (0.4, 0.9, 1.3, 1.7, 2.2, 2.9):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader = CheckpointManager(str(root), is_writer=False)
        assert [i.step for i in reader.list()] == [8], f"killed after {delay} s"
        assert reader.verify(8) == [], f"killed after {delay} s"


def test_non_finite_states_are_never_committed_nor_loaded(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path))
    with CheckpointManager(store) as mgr:
        mgr.save(2, _state(2), blocking=True)
        poisoned = _state(4)
        poisoned["teacher"]["backbone.w"][3, 3] = float("nan")
        mgr.save(4, poisoned, blocking=True)
        assert mgr.failed_uploads == 1 and "teacher.backbone.w" in str(mgr.last_error)
    assert [i.step for i in CheckpointManager(store, is_writer=False).list()] == [2]

    # A committed checkpoint whose weights are NaN (written by an older version, or by hand)
    # is skipped like a damaged one: training resumes from the step before.
    with CheckpointManager(store) as mgr:
        mgr.save(6, _state(6), blocking=True)
    path = tmp_path / "step-000000006" / "student.pt"
    bad = _state(6)["student"]
    bad["backbone.w"][0, 0] = float("inf")
    torch.save(bad, path)
    _resign(tmp_path, 6, "student.pt")
    reader = CheckpointManager(store, is_writer=False)
    step, _ = reader.load()
    assert step == 2
    with pytest.raises(CheckpointCorruptError, match="non-finite"):
        reader.load(6, fallback=False)


def _resign(root: Path, step: int, name: str) -> None:
    """Rewrite the manifest entry of `name` to match the file (a checksum-valid bad object)."""
    import json

    from dino_cluster.checkpointing.layout import file_sha256

    path = root / f"step-{step:09d}" / "manifest.json"
    doc = json.loads(path.read_text())
    size, sha = file_sha256(root / f"step-{step:09d}" / name)
    for entry in doc["objects"]:
        if entry["name"] == name:
            entry["size"], entry["sha256"] = size, sha
    path.write_text(json.dumps(doc))


# -- through training ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.depth=1",
    "model.out_dim=64",
    "model.hidden_dim=32",
    "model.bottleneck_dim=16",
    "method.crops.n_local=1",
    "data.num_workers=0",
    "data.shuffle_buffer=32",
    "metrics.log_every_steps=2",
    "evaluation.enabled=false",
    "optim.global_batch=32",
    "checkpoint.every_steps=2",
]


def _train(tmp_path: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    from dino_cluster.spec import load_spec, write_resolved

    spec = load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [f"run.dir={tmp_path / 'runs'}", f"data.url={shards}", *TINY, *extra],
    )
    path = write_resolved(spec, tmp_path / "specs" / str(len(list(tmp_path.glob("specs/*")))))
    return subprocess.run(
        [sys.executable, "-m", "dino_cluster.train", "--spec", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def _ckpts(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(
        str(tmp_path / "runs" / "quickstart-vit" / "checkpoints"), is_writer=False
    )


def test_a_finished_run_submitted_again_says_so_and_keeps_its_checkpoints(
    tmp_path: Path, fmnist_shards: Path
) -> None:
    first = _train(tmp_path, fmnist_shards, "optim.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    manifests = {i.step: i.time for i in _ckpts(tmp_path).list()}
    again = _train(tmp_path, fmnist_shards, "optim.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run is already complete" in again.stderr
    assert {i.step: i.time for i in _ckpts(tmp_path).list()} == manifests  # nothing rewritten
    more = _train(tmp_path, fmnist_shards, "optim.max_steps=6")  # asks for more: continues
    assert more.returncode == 0 and "resumed from step 4" in more.stderr, more.stderr[-3000:]
    assert max(i.step for i in _ckpts(tmp_path).list()) == 6


def test_a_checkpoint_that_does_not_fit_the_spec_is_refused_with_a_hint(
    tmp_path: Path, fmnist_shards: Path
) -> None:
    assert _train(tmp_path, fmnist_shards, "optim.max_steps=2").returncode == 0
    changed = _train(tmp_path, fmnist_shards, "optim.max_steps=4", "model.out_dim=32")
    assert changed.returncode == 2, changed.stderr[-3000:]
    line = next(ln for ln in changed.stderr.splitlines() if ln.startswith("error: "))
    assert "head.last_layer" in line and "model.out_dim" in line
    assert "checkpoint.resume=false" in line and "run.name=NEW" in line
    assert "Traceback" not in changed.stderr
    # The way out works: start over in the same folder.
    over = _train(tmp_path, fmnist_shards, "optim.max_steps=2", "model.out_dim=32",
                  "checkpoint.resume=false")  # fmt: skip
    assert over.returncode == 0, over.stderr[-3000:]


def test_a_nan_checkpoint_is_not_resumed_from_nor_evaluated(
    tmp_path: Path, fmnist_shards: Path
) -> None:
    assert _train(tmp_path, fmnist_shards, "optim.max_steps=4").returncode == 0
    root = tmp_path / "runs" / "quickstart-vit" / "checkpoints"
    teacher = torch.load(root / "step-000000004" / "teacher.pt", weights_only=True)
    first = next(iter(teacher))
    teacher[first] = torch.full_like(teacher[first], float("nan"))
    torch.save(teacher, root / "step-000000004" / "teacher.pt")
    _resign(root, 4, "teacher.pt")
    knn = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "eval", "knn", "--checkpoint",
         str(root / "step-000000004"), "--spec", str(REPO / "jobs" / "quickstart-vit.yaml"),
         "--set", f"evaluation.train_url={fmnist_shards}",
         "--set", f"evaluation.val_url={fmnist_shards}", *_model_overrides(), "--no-record"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert knn.returncode == 2 and "non-finite" in knn.stderr, knn.stderr[-3000:]
    assert "Traceback" not in knn.stderr
    resumed = _train(tmp_path, fmnist_shards, "optim.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "non-finite" in resumed.stderr and "resumed from step 2" in resumed.stderr
    # Training went on from step 2 and committed finite checkpoints over the bad step 4.
    assert _ckpts(tmp_path).verify(4) == [] and _ckpts(tmp_path).load(4, fallback=False)


def _model_overrides() -> list[str]:
    """The TINY model fields as `--set` arguments (eval-knn.yaml must describe the same net)."""
    out = []
    for item in TINY:
        if item.startswith("model."):
            out += ["--set", item]
    return out
