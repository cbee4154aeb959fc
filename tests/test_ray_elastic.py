"""Elastic Ray Train on a multi-node Ray inside one machine (ray.cluster_utils.Cluster).

The cluster starts with one 1-CPU node, so the run (workers {min: 1, max: 2}) starts with one
worker; a second node joins (the run grows to 2 by a restart from a checkpoint) and is then
removed (it shrinks back to 1, counted as a failure). The global batch stays 16 throughout.
This needs its own Ray (nodes are added and removed), so it runs in a subprocess with its
own temp dir; `add_node` runs on that process's main thread, the driver in a thread.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.launch.ray.backend import localize_paths
from dino_cluster.spec import load_spec, write_resolved

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = r"""
import json, os, shutil, sys, tempfile, threading, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every node on 127.0.0.1
# Our own temp root: Ray writes its "current cluster" file there, not in the shared /tmp/ray.
temp_root = tempfile.mkdtemp(prefix="dray-el-", dir="/tmp")
os.environ["RAY_TMPDIR"] = temp_root
temp_dir = os.path.join(temp_root, "ray")
os.makedirs(temp_dir)
# A worker group that cannot start (a stale view of a removed node) retries after 20 s.
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
from ray.cluster_utils import Cluster

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.launch.ray.driver import run_driver
from dino_cluster.launch.procs import free_port
from dino_cluster.spec import load_spec

spec = load_spec(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])

def committed():
    return CheckpointManager(spec.checkpoint_url, is_writer=False).list()

def wait(what, pred):
    while not pred():
        if time.monotonic() > deadline or not thread.is_alive():
            print(f"PHASE-FAILED waiting for {what}", flush=True)
            stop.set()
            thread.join(120)
            cluster.shutdown()
            shutil.rmtree(temp_root, ignore_errors=True)
            sys.exit(1)
        time.sleep(0.5)
    print(f"PHASE-DONE {what}", flush=True)

def node_args():
    return {"num_cpus": 1, "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}

cluster = Cluster(initialize_head=True,
                  head_node_args={**node_args(), "temp_dir": temp_dir, "include_dashboard": False})
result = {}
stop = threading.Event()

def drive():
    result["r"] = run_driver(spec, address=cluster.address, stop_event=stop)

thread = threading.Thread(target=drive, daemon=True)
thread.start()
wait("a checkpoint at world size 1", lambda: any(c.world_size == 1 for c in committed()))
node = cluster.add_node(**node_args())
wait("a checkpoint at world size 2", lambda: any(c.world_size == 2 for c in committed()))
at_removal = committed()[-1].step
cluster.remove_node(node)
wait("a checkpoint at world size 1 after the node left",
     lambda: any(c.world_size == 1 and c.step > at_removal for c in committed()))
stop.set()  # the single worker checkpoints and stops
thread.join(180)
r = result.get("r")
print("RESULT " + json.dumps({"status": r.status if r else None,
                              "attempts": r.attempts if r else None,
                              "step": r.step if r else None}), flush=True)
cluster.shutdown()
shutil.rmtree(temp_root, ignore_errors=True)
"""


def test_grows_and_shrinks_with_the_cluster_keeping_the_global_batch(
    tmp_path: Path, fmnist_shards: Path, ray_cluster
) -> None:
    # ray_cluster: only for its token (auth env); this test's Ray is its own.
    spec = localize_paths(
        load_spec(
            REPO / "jobs" / "quickstart-vit.yaml",
            [
                f"run.dir={tmp_path / 'runs'}",
                f"data.url={fmnist_shards}",
                "model.depth=2",
                "model.out_dim=256",
                "model.hidden_dim=64",
                "model.bottleneck_dim=32",
                "method.crops.n_local=2",
                "data.num_workers=0",
                "data.shuffle_buffer=64",
                "evaluation.enabled=false",
                "metrics.log_every_steps=2",
                "optim.global_batch=16",
                "checkpoint.every_steps=2",
                "checkpoint.keep_last=200",
                "launcher.backend=ray",
                "launcher.workers={min: 1, max: 2}",
                "launcher.ray.resize_interval_s=2",
                "launcher.ray.max_failures=4",
            ],
        )
    )
    path = write_resolved(spec, tmp_path / "spec")
    env = dict(ray_cluster.env(), PYTHONUNBUFFERED="1")
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), "420"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["status"] == "stopped", result
    attempts = result["attempts"]
    assert attempts[0] == 1 and 2 in attempts and attempts[-1] == 1, attempts

    # Every restart resumed from a committed checkpoint, at the new world size.
    resumes = re.findall(r"resumed from step (\d+) \(written at world size (\d+), now (\d+)\)", out)
    moves = [(int(a), int(b)) for _, a, b in resumes]
    assert (1, 2) in moves and (2, 1) in moves, resumes

    # The global batch never changed: iterations per epoch (samples / global batch) set the
    # schedules, so every logged lr, at either world size, is the one-machine schedule's.
    infos = CheckpointManager(spec.checkpoint_url, is_writer=False).list()
    assert {c.world_size for c in infos} == {1, 2}
    steps = [c.step for c in infos]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    from dino_cluster.dino.schedules import cosine_schedule

    o = spec.optim
    lr = cosine_schedule(o.peak_lr, o.min_lr, o.epochs, 1024 // 16, warmup_epochs=o.warmup_epochs)
    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 3
    for row in rows:
        assert row["lr"] == pytest.approx(float(lr[row["step"] - 1]), rel=1e-6), row
