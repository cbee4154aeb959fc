"""Ray backend against a real Ray head on loopback (one per session, token auth on).

Drivers run as subprocesses joined to the session Ray, so a killed or failed driver cannot
take the test process with it. Every run is a tiny ViT on real Fashion-MNIST images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.launch.ray.backend import RayBackend, localize_paths
from dino_cluster.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.depth=2",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "method.crops.n_local=2",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "metrics.log_every_steps=2",
    "optim.global_batch=16",
    "checkpoint.every_steps=2",
    "launcher.backend=ray",
    "launcher.procs_per_node=2",
    "evaluation.enabled=false",
]


def ray_spec(tmp_path: Path, shards: Path, *extra: str) -> JobSpec:
    return load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [f"run.dir={tmp_path / 'runs'}", f"data.url={shards}", *TINY, *extra],
    )


def committed(spec: JobSpec) -> list:
    return CheckpointManager(spec.checkpoint_url, is_writer=False).list()


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def driver_log(spec: JobSpec) -> str:
    return (spec.run_dir / "logs" / "driver.log").read_text(errors="replace")


def alive_actors(ray_cluster, class_names: set[str]) -> list[dict]:
    url = (
        f"{ray_cluster.dashboard_url}/api/v0/actors?limit=1000&filter_keys=state"
        "&filter_predicates=%3D&filter_values=ALIVE"
    )
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_cluster.token()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    rows = body["data"]["result"]["result"]
    return [r for r in rows if r.get("class_name") in class_names]


def test_two_gloo_workers_train_and_a_second_driver_resumes(
    tmp_path: Path, fmnist_shards: Path, ray_cluster, capsys
) -> None:
    spec = ray_spec(
        tmp_path, fmnist_shards, "optim.max_steps=4", f"launcher.ray.address={ray_cluster.address}"
    )
    result = RayBackend().submit(spec)
    out = capsys.readouterr().out
    assert result.status == "completed", out[-4000:]
    # DDP over gloo: both Ray workers trained and finished at the same step.
    assert "rank 0 finished at step 4" in out and "rank 1 finished at step 4" in out
    assert "world_size=2" in out or "world size 2" in out
    assert [c.step for c in committed(localize_paths(spec))][-1] == 4

    # A new driver for the same run continues from the committed checkpoint (our store).
    # It gets 3 workers (as an elastic range may): 3 cannot split the global batch of 16,
    # so 2 ranks train (same global batch, same schedules) and 1 waits.
    spec2 = ray_spec(
        tmp_path,
        fmnist_shards,
        "optim.max_steps=6",
        "launcher.workers={min: 3, max: 3}",
        f"launcher.ray.address={ray_cluster.address}",
    )
    result2 = RayBackend().submit(spec2)
    out2 = capsys.readouterr().out
    assert result2.status == "completed", out2[-4000:]
    assert "resumed from step 4" in out2
    assert "step 2/" not in out2  # it did not start over
    assert "training on 2 ranks, 1 idle" in out2
    run_dir = localize_paths(spec2).run_dir
    outcome = json.loads((run_dir / "ray" / "driver-result.json").read_text())
    assert outcome["attempts"] == [3] and outcome["world_size"] == 2
    assert [c.step for c in committed(localize_paths(spec2))][-1] == 6
    assert RayBackend().status(str(run_dir)) == "completed"


def test_jobs_api_detach_status_logs_cancel(
    tmp_path: Path, fmnist_shards: Path, ray_cluster, capsys, monkeypatch
) -> None:
    # Token auth is really on: the Jobs API refuses a request without the bearer token.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401

    secret = "wJalrXUtnFEMI-K7MDENG-not-a-real-key"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    spec = localize_paths(
        ray_spec(
            tmp_path,
            fmnist_shards,
            "optim.max_steps=150",
            f"launcher.ray.address={ray_cluster.dashboard_url}",
        )
    )
    backend = RayBackend()
    t0 = time.monotonic()
    result = backend.submit(spec, detach=True)
    assert time.monotonic() - t0 < 30  # returns at once, the job runs on the cluster
    launch = json.loads((spec.run_dir / "launch.json").read_text())
    assert launch["backend"] == "ray" and launch["job_id"] == result.job_id
    assert launch["address"] == ray_cluster.dashboard_url
    run_dir = str(spec.run_dir)

    wait_for(
        "the job to train and commit a checkpoint",
        lambda: backend.status(run_dir) == "running" and committed(spec),
        240,
    )

    seen = {"out": ""}

    def logs_show_training() -> bool:
        backend.logs(run_dir)
        seen["out"] = capsys.readouterr().out
        return "step 2/150" in seen["out"]

    try:
        wait_for("the job's logs to show training progress", logs_show_training, 60, every_s=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{seen['out'][-3000:]}") from None

    backend.cancel(run_dir)
    assert wait_for("the job to stop", lambda: backend.status(run_dir) == "stopped", 180)

    # No credential reached the cluster: not in the job's runtime env, not in the run folder.
    from dino_cluster.launch.ray.jobs import client

    info = client(ray_cluster.dashboard_url).get_job_info(result.job_id)
    assert secret not in json.dumps(info.runtime_env)
    assert ray_cluster.token() not in json.dumps(info.runtime_env)
    for path in spec.run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            text = path.read_bytes()
            assert secret.encode() not in text and ray_cluster.token().encode() not in text


def test_too_many_workers_fail_at_the_startup_deadline(
    tmp_path: Path, fmnist_shards: Path, ray_cluster
) -> None:
    spec = localize_paths(
        ray_spec(
            tmp_path,
            fmnist_shards,
            "launcher.procs_per_node=8",
            "launcher.ray.startup_timeout_s=15",
            f"launcher.ray.address={ray_cluster.address}",
        )
    )
    from dino_cluster.spec import write_resolved

    path = write_resolved(spec, spec.run_dir)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dino_cluster.launch.ray.driver", "--spec", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=ray_cluster.env(),
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "startup_timeout_s=15" in proc.stderr
    assert "at least 8 worker(s)" in proc.stderr and "'CPU': 4.0" in proc.stderr
    assert elapsed < 15 + 90
    result = json.loads((spec.run_dir / "ray" / "driver-result.json").read_text())
    assert result["status"] == "failed" and "startup_timeout_s" in result["message"]
    # Nothing of that run stays behind on the cluster.
    wait_for(
        "the run's Ray actors to go away",
        lambda: not alive_actors(ray_cluster, {"TrainController", "RayTrainWorker", "RunLink"}),
        60,
    )


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmd)
    return table


def _train_worker_pids(ray_cluster) -> list[int]:
    """Ray Train worker processes under this session's Ray (never another Ray's)."""
    table = _processes()
    ours = {ray_cluster.pid}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return sorted(pid for pid in ours if "RayTrainWorker" in table.get(pid, (0, ""))[1])


def test_killed_worker_resumes_from_the_latest_checkpoint(
    tmp_path: Path, fmnist_shards: Path, ray_cluster
) -> None:
    spec = localize_paths(
        ray_spec(
            tmp_path,
            fmnist_shards,
            "optim.max_steps=10",
            "launcher.ray.max_failures=2",
            f"launcher.ray.address={ray_cluster.address}",
        )
    )
    backend = RayBackend()
    backend.submit(spec, detach=True)
    run_dir = str(spec.run_dir)
    try:
        wait_for("a committed checkpoint", lambda: committed(spec), 240, every_s=0.5)
        pids = wait_for(
            "two Ray Train workers",
            lambda: len(_train_worker_pids(ray_cluster)) == 2 and _train_worker_pids(ray_cluster),
            30,
        )
        killed_after = committed(spec)[-1].step
        os.kill(pids[-1], signal.SIGKILL)
        wait_for("the run to end", lambda: backend.status(run_dir) != "running", 300)
    finally:
        if backend.status(run_dir) == "running":
            backend.cancel(run_dir)
    log = driver_log(spec)
    assert backend.status(run_dir) == "completed", log[-4000:]
    result = json.loads((spec.run_dir / "ray" / "driver-result.json").read_text())
    assert result["attempts"] == [2, 2], result  # one restart, same world size
    # The restart resumed from a committed checkpoint, not from scratch, and ran to the end.
    resumed = [
        int(line.rsplit("resumed from step ", 1)[1].split()[0])
        for line in log.splitlines()
        if "resumed from step " in line
    ]
    assert resumed and killed_after <= resumed[0] < 10
    assert committed(spec)[-1].step == 10
    # Same schedules as an uninterrupted run: the lr at the last step is the schedule's.
    from dino_cluster.dino.schedules import cosine_schedule

    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] == 10][-1]
    o = spec.optim
    ipe = 1024 // o.global_batch
    lr = cosine_schedule(o.peak_lr, o.min_lr, o.epochs, ipe, warmup_epochs=o.warmup_epochs)
    assert last["lr"] == pytest.approx(float(lr[9]), rel=1e-6)


def test_active_world_size_keeps_the_global_batch() -> None:
    from dino_cluster.launch.ray.worker import active_world_size

    assert active_world_size(1024, 32) == 32
    assert active_world_size(1024, 24) == 16  # 24 does not divide 1024: 8 ranks sit out
    assert active_world_size(16, 3) == 2
    assert active_world_size(7, 4) == 1
