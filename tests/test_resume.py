"""Kill the training process (SIGKILL) at random points, 20 times, against a real S3 endpoint
on loopback, with a data worker: every restart resumes from a committed checkpoint, every
committed checkpoint stays intact (kills land in steps, serialisation, uploads, between
uploads and manifest, and in retention's deletions), and the final teacher is bit-identical to
an uninterrupted run. (Kills during a re-commit of an existing step: test_integrity_checkpoints.)"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.spec import load_spec, write_resolved

REPO = Path(__file__).resolve().parents[1]
FINISHED = re.compile(r"finished at step (\d+) \((\w+)\): teacher (\w+) center (\w+)")
RESUMED = re.compile(r"resumed from step (\d+)")
KILLS = 20


def _spec(tmp_path: Path, shards: Path, bucket: str, name: str) -> Path:
    spec = load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [
            f"run.name={name}",
            f"run.dir={tmp_path / 'runs'}",
            f"run.storage=s3://{bucket}/runs",
            f"data.url={shards}",
            "data.num_workers=1",
            "data.shuffle_buffer=32",
            "evaluation.enabled=false",
            "model.depth=1",
            "model.embed_dim=32",
            "model.num_heads=2",
            "model.out_dim=2048",
            "model.hidden_dim=64",
            "model.bottleneck_dim=32",
            "method.crops.n_local=2",
            "optim.global_batch=16",
            "optim.max_steps=180",
            "optim.epochs=3",
            "optim.warmup_epochs=1",
            "checkpoint.every_steps=4",
            "checkpoint.keep_last=2",
            "metrics.log_every_steps=20",
        ],
    )
    return write_resolved(spec, tmp_path / name)


def _env(s3_server) -> dict[str, str]:
    return dict(
        os.environ,
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )


def _start(spec_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - closed right after the child inherits it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "dino_cluster.train", "--spec", str(spec_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    finally:
        fh.close()


def test_sigkill_loop_resumes_bit_exact(tmp_path: Path, fmnist_shards: Path, s3_server) -> None:
    bucket = s3_server.new_bucket("kill")
    env = _env(s3_server)

    ref_spec = _spec(tmp_path, fmnist_shards, bucket, "reference")
    ref_log = tmp_path / "reference.log"
    assert _start(ref_spec, env, ref_log).wait(timeout=600) == 0, ref_log.read_text()[-3000:]
    ref = FINISHED.search(ref_log.read_text())
    assert ref and ref.group(1) == "180"

    spec_path = _spec(tmp_path, fmnist_shards, bucket, "killed")
    ckpt_url = f"s3://{bucket}/runs/killed/checkpoints"
    log = tmp_path / "killed.log"
    rng = random.Random(7)
    kills, resumed_from = 0, []
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        offset = log.stat().st_size if log.exists() else 0
        proc = _start(spec_path, env, log)
        if kills < KILLS:
            # Kill at a random moment after this process committed something new, so every
            # round makes progress whatever the machine's load, and kills land anywhere:
            # mid-step, mid-serialisation, mid-upload, between uploads and manifest.
            while proc.poll() is None and time.monotonic() < deadline:
                with open(log, "rb") as fh:
                    fh.seek(offset)
                    if b"committed" in fh.read():
                        break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.8))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                store = CheckpointManager(
                    ckpt_url, storage_options=s3_server.options, is_writer=False
                )
                committed = [info.step for info in store.list()]
                assert committed, f"nothing committed after kill {kills}"
                for step in committed:  # every committed checkpoint whole, not only the latest
                    assert store.verify(step) == [], f"step {step} damaged by kill {kills}"
                resumed_from.append(max(committed))
                continue
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        break
    text = log.read_text()
    assert kills >= KILLS, f"only {kills} kills landed: the run is too short for this test"
    steps = [int(m) for m in RESUMED.findall(text)]
    assert len(steps) >= kills and steps == sorted(steps), steps  # never went backwards
    assert resumed_from == sorted(resumed_from)
    got = FINISHED.search(text)
    assert got and got.group(1) == "180"
    # Bit-exact: same data position (in-flight records skipped), RNG restored, same schedules.
    assert (got.group(3), got.group(4)) == (ref.group(3), ref.group(4))
