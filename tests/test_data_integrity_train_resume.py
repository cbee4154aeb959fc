"""The training loop with a data worker (as jobs/quickstart-vit.yaml runs it), killed with SIGKILL
after a checkpoint commits and restarted, twice: the final teacher and center are
bit-identical to an uninterrupted run. Before the data position held the worker's random
state, a mid-epoch resume saw the same samples with other augmentation draws."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dino_cluster.spec import load_spec, write_resolved

REPO = Path(__file__).resolve().parents[1]
FINISHED = re.compile(r"finished at step (\d+) \((\w+)\): teacher (\w+) center (\w+)")
RESUMED = re.compile(r"resumed from step (\d+)")


def _spec(tmp_path: Path, shards: Path, name: str) -> Path:
    spec = load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [
            f"run.name={name}",
            f"run.dir={tmp_path / 'runs'}",
            f"data.url={shards}",
            "data.num_workers=1",
            "data.shuffle_buffer=32",
            "evaluation.enabled=false",
            "model.depth=1",
            "model.embed_dim=32",
            "model.num_heads=2",
            "model.out_dim=512",
            "model.hidden_dim=64",
            "model.bottleneck_dim=32",
            "method.crops.n_local=2",
            "optim.global_batch=16",  # 1,024 images: 64 steps per epoch
            "optim.max_steps=80",
            "optim.epochs=2",
            "optim.warmup_epochs=1",
            "checkpoint.every_steps=17",
            "checkpoint.keep_last=2",
            "metrics.log_every_steps=20",
        ],
    )
    return write_resolved(spec, tmp_path / name)


def _start(spec_path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    fh = open(log, "ab")  # noqa: SIM115 - closed right after the child inherits it
    try:
        cmd = [sys.executable, "-m", "dino_cluster.train", "--spec", str(spec_path)]
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    finally:
        fh.close()


def _commits(log: Path, offset: int) -> int:
    with open(log, "rb") as fh:
        fh.seek(offset)
        return fh.read().count(b"committed")


def test_training_with_a_data_worker_resumes_bit_identical(
    tmp_path: Path, fmnist_shards: Path
) -> None:
    ref_log = tmp_path / "reference.log"
    assert _start(_spec(tmp_path, fmnist_shards, "reference"), ref_log).wait(timeout=900) == 0
    ref = FINISHED.search(ref_log.read_text())
    assert ref and ref.group(1) == "80"

    spec_path = _spec(tmp_path, fmnist_shards, "killed")
    log = tmp_path / "killed.log"
    kills = 0
    for _ in range(3):
        offset = log.stat().st_size if log.exists() else 0
        proc = _start(spec_path, log)
        if kills < 2:
            # Killed as soon as this process has committed a checkpoint of its own: training
            # goes on past it (commits every 17 of 80 steps), so the kill lands mid-run.
            while proc.poll() is None and _commits(log, offset) == 0:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
        break
    text = log.read_text()
    resumed = [int(s) for s in RESUMED.findall(text)]
    # (A machine fast enough to finish before a commit is seen would kill fewer times.)
    assert kills >= 1 and len(resumed) == kills, text[-3000:]
    assert all(s % 64 for s in resumed)  # commits every 17 steps: every resume is mid-epoch
    got = FINISHED.search(text)
    assert got and got.group(1) == "80"
    assert (got.group(3), got.group(4)) == (ref.group(3), ref.group(4))
