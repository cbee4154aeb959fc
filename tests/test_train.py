"""The per-rank training loop on CPU: DDP sync across two gloo ranks, learning on real images,
non-finite loss handling, and the local launcher end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dino_cluster.spec import JobSpec, load_spec
from dino_cluster.train.loop import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.depth=2",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "method.crops.n_local=2",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "metrics.log_every_steps=2",
    "evaluation.enabled=false",  # the quickstart's watcher: tested in test_quickstart_knn
]


def tiny_spec(tmp_path: Path, shards: Path, *extra: str) -> JobSpec:
    return load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [f"run.dir={tmp_path / 'runs'}", f"data.url={shards}", *TINY, *extra],
    )


def _rank_main(rank: int, world: int, port: int, spec_yaml: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from dino_cluster.spec import load_spec as _load
    from dino_cluster.train.distributed import shutdown

    result = train(_load(spec_yaml), install_signal_handlers=False)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"digest": result.digest, "step": result.step})
    )
    shutdown()


def _two_ranks(spec: JobSpec, out: Path) -> dict:
    from dino_cluster.launch.procs import free_port
    from dino_cluster.spec import write_resolved

    out.mkdir(parents=True, exist_ok=True)
    spec_path = write_resolved(spec, out / "spec")
    mp.start_processes(
        _rank_main,
        args=(2, free_port(), str(spec_path), str(out)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0 == r1  # same step, bit-identical teacher and center on both ranks
    return r0


def test_two_gloo_ranks_stay_in_sync(tmp_path: Path, fmnist_shards: Path) -> None:
    spec = tiny_spec(
        tmp_path,
        fmnist_shards,
        "launcher.procs_per_node=2",
        "optim.max_steps=4",
        "optim.global_batch=16",
        "checkpoint.every_steps=2",
    )
    # Bit-identical teacher and center on both ranks; DDP keeps the students in sync too.
    assert _two_ranks(spec, tmp_path / "ranks")["step"] == 4


def test_two_ranks_resume_bit_exact(tmp_path: Path, fmnist_shards: Path) -> None:
    """Stopped and resumed at the same world size, a two-rank run ends bit-identical to an
    uninterrupted one: each rank's own RNG stream (drop path here) is checkpointed and
    restored, not only rank 0's."""
    common = [
        "launcher.procs_per_node=2",
        "optim.global_batch=16",
        "model.drop_path_rate=0.2",  # draws from each rank's stream every step
        "checkpoint.every_steps=2",
    ]
    straight = tiny_spec(tmp_path, fmnist_shards, "run.name=straight", "optim.max_steps=4", *common)
    ref = _two_ranks(straight, tmp_path / "straight")
    assert ref["step"] == 4
    # max_steps cuts a run short without touching its schedules (they follow optim.epochs).
    first = tiny_spec(tmp_path, fmnist_shards, "run.name=resumed", "optim.max_steps=2", *common)
    assert _two_ranks(first, tmp_path / "first")["step"] == 2
    again = tiny_spec(tmp_path, fmnist_shards, "run.name=resumed", "optim.max_steps=4", *common)
    assert _two_ranks(again, tmp_path / "again") == ref


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_learns_on_real_images(tmp_path: Path, fmnist_shards: Path) -> None:
    """The quickstart job cut to a few dozen steps through the real CLI and local launcher."""
    run_dir = tmp_path / "runs" / "quickstart"
    cmd = [
        sys.executable,
        "-m",
        "dino_cluster.cli",
        "submit",
        str(REPO / "jobs/quickstart.yaml"),
        "--set",
        f"run.dir={tmp_path / 'runs'}",
        "--set",
        f"data.url={fmnist_shards}",
        "--set",
        "optim.max_steps=40",
        "--set",
        "optim.warmup_epochs=0",
        "--set",
        "data.num_workers=1",
        "--set",
        "metrics.log_every_steps=5",
        "--set",
        "checkpoint.every_steps=20",
        "--set",
        "evaluation.enabled=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 40/40" in proc.stdout and "img/s" in proc.stdout
    rows = _read_metrics(run_dir)
    assert len(rows) == 8
    # DINO's loss is H(P_t) + KL(P_t || P_s). In the first tens of steps H(P_t) rises while
    # the center (EMA from zero) warms up, so the raw loss can rise; the part the student
    # lowers is the KL between teacher and student, the loss minus the teacher entropy.
    kl = [r["loss"] - r["teacher_entropy"] for r in rows]
    assert all(abs(a - r["student_teacher_kl"]) < 1e-3 for a, r in zip(kl, rows, strict=True))
    assert sum(kl[-2:]) / 2 < sum(kl[:2]) / 2 - 0.1, kl
    entropies = [r["teacher_entropy"] for r in rows]
    log_k = math.log(1024)
    assert all(0.05 < h < log_k - 0.05 for h in entropies), entropies  # neither collapse
    assert (run_dir / "spec.resolved.yaml").exists()
    resolved = load_spec(run_dir / "spec.resolved.yaml")
    assert resolved.optim.max_steps == 40
    st = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "status", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert st.stdout.strip() == "max_steps" or "completed" in st.stdout
    ck = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "checkpoints", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ck.returncode == 0 and "40" in ck.stdout, ck.stdout + ck.stderr


def test_nonfinite_losses_skip_then_stop(
    tmp_path: Path, fmnist_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dino_cluster.dino import loss as loss_mod

    calls = {"n": 0}
    real_forward = loss_mod.DINOLoss.forward

    def flaky(self, s, t, temp):  # steps 2 and 3 are non-finite, then 4 in a row from 6 on
        calls["n"] += 1
        out = real_forward(self, s, t, temp)
        return out * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else out

    monkeypatch.setattr(loss_mod.DINOLoss, "forward", flaky)
    spec = tiny_spec(
        tmp_path,
        fmnist_shards,
        "optim.max_steps=20",
        "optim.global_batch=16",
        "method.max_nonfinite_steps=4",
    )
    with pytest.raises(NonFiniteLossError, match="4 consecutive non-finite losses"):
        train(spec, install_signal_handlers=False)
    rows = _read_metrics(spec.run_dir)
    assert rows and rows[-1]["skipped_steps"] >= 2


@pytest.mark.parametrize("augment", ["batched", "fast", "gpu"])
def test_fast_augment_paths_train(tmp_path: Path, fmnist_shards: Path, augment: str) -> None:
    """data.augment=batched and fast (photometrics per chunk in the stream) and gpu (fast's CPU
    stage in the stream, photometrics in the loop on the training device: here the CPU) feed
    the same loop with 2+n crops."""
    spec = tiny_spec(
        tmp_path,
        fmnist_shards,
        f"data.augment={augment}",
        "optim.max_steps=3",
        "optim.global_batch=16",
        "model.embed_dim=32",
        "model.num_heads=2",
        "model.depth=1",
    )
    result = train(spec, install_signal_handlers=False)
    assert result.step == 3 and result.status == "max_steps"
    rows = _read_metrics(spec.run_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_each_augment_value_builds_its_pipeline() -> None:
    """Every data.augment value reaches its own implementation (none is dead code)."""
    from dino_cluster.dino.augment.batched import BatchedMultiCropAugment
    from dino_cluster.dino.augment.fast import FastMultiCropAugment, FastSampleStage
    from dino_cluster.dino.augment.reference import MultiCropAugment
    from dino_cluster.spec.sections import CropsSpec
    from dino_cluster.train.assemble import build_augment

    crops = CropsSpec(global_size=32, local_size=16, n_local=2)
    built = {a: build_augment(crops, a) for a in ("reference", "batched", "fast", "gpu")}
    assert type(built["reference"][0]) is MultiCropAugment and built["reference"][1] is None
    assert type(built["batched"][0]) is BatchedMultiCropAugment and built["batched"][1] is None
    assert type(built["fast"][0]) is FastMultiCropAugment and built["fast"][1] is None
    stage, device = built["gpu"]
    assert isinstance(stage, FastSampleStage) and isinstance(device, FastMultiCropAugment)
    assert stage.augment is device and device.n_crops == 4
