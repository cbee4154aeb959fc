"""The quickstart through the embedded (private, local) Ray: no address, 2 CPU workers with
DDP over gloo, run to the end through the real CLI. The backend starts its own Ray with its
own temp dir and ports and stops it by process id when the run ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_on_embedded_ray_two_workers(tmp_path: Path, fmnist_shards: Path) -> None:
    sets = [
        f"run.dir={tmp_path / 'runs'}",
        f"data.url={fmnist_shards}",
        "launcher.procs_per_node=2",
        "data.num_workers=0",
        "model.depth=1",
        "model.embed_dim=32",
        "model.num_heads=2",
        "optim.global_batch=16",
        "optim.max_steps=6",
        "checkpoint.every_steps=3",
        "metrics.log_every_steps=3",
        "evaluation.enabled=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "dino_cluster.cli",
        "submit",
        str(REPO / "jobs/quickstart-vit.yaml"),
    ]
    cmd += ["--backend", "ray"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "127.0.0.1" in out  # the dashboard URL of the private Ray, on loopback
    run_dir = tmp_path / "runs" / "quickstart-vit"
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["backend"] == "ray"
    spec = load_spec(run_dir / "spec.resolved.yaml")
    steps = [c.step for c in CheckpointManager(spec.checkpoint_url, is_writer=False).list()]
    assert steps and max(steps) == 6
    info = CheckpointManager(spec.checkpoint_url, is_writer=False).list()[-1]
    assert info.world_size == 2  # DDP over 2 gloo workers
