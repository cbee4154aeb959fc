"""Observability against real services: a running quickstart job scraped by a real Prometheus
through its file-SD targets, the shipped config and alert rules through promtool, and the
custom metrics on a real Ray node's metrics endpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.evaluate.knn import KnnResult
from dino_cluster.launch.local import LocalBackend, run_status
from dino_cluster.launch.run_record import read_record
from dino_cluster.metrics.summary import read_last_metrics, render_summary, summarize_run

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra" / "prometheus"

TINY = [
    "model.depth=1",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.out_dim=128",
    "model.hidden_dim=32",
    "model.bottleneck_dim=16",
    "method.crops.n_local=2",
    "optim.global_batch=16",
    "optim.epochs=30",  # far more than the test needs: it cancels the run
    "optim.warmup_epochs=1",
    "data.num_workers=0",
    "data.shuffle_buffer=32",
    "evaluation.enabled=false",
]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _wait(cond, timeout_s: float, what: str, alive=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if alive is not None and not alive():
            break
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _value(result: list[dict]) -> float:
    return float(result[0]["value"][1])


@pytest.mark.integration
@pytest.mark.slow
def test_running_quickstart_is_scraped_through_file_sd(
    prometheus_server, fmnist_shards: Path, tmp_path: Path
) -> None:
    prom = prometheus_server
    run = "obs-e2e"
    run_dir = tmp_path / "runs" / run
    env = dict(
        os.environ,
        DINO_PROMETHEUS_SD_DIR=str(prom.sd_dir),
        DINO_METRICS_POLL_S="0.5",
        OMP_NUM_THREADS="1",
    )
    sets = [
        f"run.name={run}",
        f"run.dir={tmp_path / 'runs'}",
        f"data.url={fmnist_shards}",
        *TINY,
        "metrics.prometheus=true",
        "metrics.host=127.0.0.1",
        "metrics.log_every_steps=1",
        "checkpoint.every_steps=5",
        "checkpoint.keep_every_steps=5",  # keep the evaluated checkpoint
    ]
    args = ["submit", "jobs/quickstart-vit.yaml", "--detach"]
    for s in sets:
        args += ["--set", s]
    done = _cli(*args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    alive = lambda: run_status(run_dir) == "running"  # noqa: E731
    try:
        # The rank publishes its address in the run folder and in the operator's SD folder.
        targets = run_dir / "prometheus" / "targets-rank-0.json"
        _wait(targets.exists, 120, "the targets file", alive)
        group = json.loads(targets.read_text())
        assert group[0]["labels"] == {
            "run": run,
            "rank": "0",
            "node": group[0]["labels"]["node"],
            "backend": "local",
        }
        host, port = group[0]["targets"][0].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert json.loads((prom.sd_dir / f"{run}-rank-0.json").read_text()) == group

        sel = f'run="{run}",rank="0",backend="local"'
        up = prom.wait_for(
            f'up{{job="dino-cluster",run="{run}"}}', lambda r: r and _value(r) == 1, 90, alive
        )
        assert up[0]["metric"]["instance"] == group[0]["targets"][0]
        loss = prom.wait_for(f"dino_loss{{{sel}}}", timeout_s=60, alive=alive)
        assert math.isfinite(_value(loss)) and _value(loss) > 0
        ips = prom.wait_for(
            f"dino_images_per_second{{{sel}}}", lambda r: r and _value(r) > 0, 60, alive
        )
        assert _value(ips) > 0
        assert _value(prom.query(f"dino_log_out_dim{{{sel}}}")) == pytest.approx(math.log(128))
        first = _value(prom.query(f"dino_step{{{sel}}}"))
        prom.wait_for(f"dino_step{{{sel}}}", lambda r: r and _value(r) > first, 60, alive)

        # An evaluation recorded beside a committed checkpoint comes back as a k-NN series.
        ckpt = CheckpointManager(str(run_dir / "checkpoints"), is_writer=False)
        infos = _wait(ckpt.list, 120, "a committed checkpoint", alive)
        step = infos[0].step
        knn_result = KnnResult({20: (43.75, 90.0), 200: (41.0, 88.0)}, 1000, 200, 10, 0.07)
        ckpt.record_eval(step, "knn", knn_result.as_results())
        knn = prom.wait_for(
            f'dino_eval_top1{{{sel},kind="knn",k="20"}}', lambda r: bool(r), 60, alive
        )
        assert _value(knn) == pytest.approx(0.4375)
        at = prom.wait_for(f'dino_eval_checkpoint_step{{{sel},kind="knn"}}', timeout_s=30)
        assert _value(at) == step
        committed = prom.wait_for(f"dino_checkpoint_last_committed_step{{{sel}}}", timeout_s=30)
        assert _value(committed) >= step
        hist = prom.wait_for(f"dino_step_seconds_count{{{sel}}}", timeout_s=30)
        assert _value(hist) >= 1

        # The loop logs the new collapse / timing / checkpoint values (JSONL keeps them too).
        row = read_last_metrics(run_dir / "metrics.jsonl")
        assert row is not None
        keys = {"student_teacher_kl", "center_norm", "step_time_s", "world_size"}
        assert keys | {"checkpoint_commits"} <= row.keys()
        assert row["world_size"] == 1 and row["center_norm"] >= 0

        # `dino-cluster status` material, read from the run folder and the store.
        text = render_summary(summarize_run(run_dir))
        assert "progress: step" in text and "img/s" in text
        assert "last checkpoint: step" in text
        assert f"last eval: step {step} knn top1 43.75" in text
        assert group[0]["targets"][0] in text
    finally:
        if (run_dir / "launch.json").exists():
            LocalBackend().cancel(str(run_dir))  # what `dino-cluster cancel` does
            ok = _wait(lambda: not alive(), 90, "the run to stop")
            assert ok
            from dino_cluster.launch.local_agent import run_processes

            supervisor = read_record(run_dir).pid
            for pid in [*run_processes(supervisor), supervisor]:  # never leave a rank behind
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
    # A rank that stops cleanly withdraws its targets.
    assert not (run_dir / "prometheus" / "targets-rank-0.json").exists()
    assert not (prom.sd_dir / f"{run}-rank-0.json").exists()


# -- promtool ---------------------------------------------------------------------------------


def _promtool() -> str:
    from fixtures.prometheus import ensure_prometheus

    ensure_prometheus()
    return shutil.which("promtool") or pytest.fail("promtool missing (Debian prometheus)")


def test_promtool_checks_the_shipped_config_and_rules(tmp_path: Path) -> None:
    promtool = _promtool()
    for name in ("prometheus.yml", "alerts.yml", "alerts_test.yml"):
        shutil.copy(INFRA / name, tmp_path / name)
    (tmp_path / "targets").mkdir()
    check = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "7 rules found" in check.stdout
    test = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a healthy series turned into a collapse breaks them."""
    promtool = _promtool()
    shutil.copy(INFRA / "alerts.yml", tmp_path / "alerts.yml")
    doc = yaml.safe_load((INFRA / "alerts_test.yml").read_text())
    healthy = next(
        t for t in doc["tests"] if any('run="ok"' in s["series"] for s in t["input_series"])
    )
    for s in healthy["input_series"]:
        if s["series"].startswith("dino_teacher_entropy"):
            s["values"] = "0.01x60"
    doc["tests"] = [healthy]
    (tmp_path / "t.yml").write_text(yaml.safe_dump(doc))
    test = subprocess.run(
        [promtool, "test", "rules", "t.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert test.returncode != 0
    assert "DinoCollapse" in test.stdout + test.stderr


# -- Ray --------------------------------------------------------------------------------------

_RAY_DRIVER = textwrap.dedent(
    """
    import sys, time
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR")

    @ray.remote(num_cpus=0)
    class Rank:
        def log(self):
            from dino_cluster.metrics.catalogue import RunLabels
            from dino_cluster.metrics.ray_sink import RaySink
            sink = RaySink(RunLabels("ray-obs", 0, "n0", "ray"), out_dim=1024)
            sink.log(3, {"loss": 7.25, "images_per_s": 99.0, "skipped_steps": 1.0,
                         "step_time_s": 0.2})
            self.sink = sink
            return True

    rank = Rank.remote()
    assert ray.get(rank.log.remote())
    print("LOGGED", flush=True)
    time.sleep(120)  # keep the worker (and its metrics) alive until the test kills us
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_custom_metrics_reach_rays_metrics_endpoint(ray_cluster, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(_RAY_DRIVER)
    env = dict(ray_cluster.env(), PYTHONPATH=str(REPO))
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(driver), ray_cluster.address],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{ray_cluster.cluster.ports['metrics']}/metrics"
    body = ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = resp.read().decode()
            except OSError:  # the metrics agent starts a few seconds after the head
                time.sleep(1)
                continue
            if "ray_dino_loss{" in body and "ray_dino_images_per_second{" in body:
                break
            time.sleep(1)
        lines = [x for x in body.splitlines() if x.startswith("ray_dino_loss{")]
        assert lines, (tmp_path / "driver.log").read_text()[-3000:]
        assert 'run="ray-obs"' in lines[0] and 'rank="0"' in lines[0]
        assert lines[0].rsplit(" ", 1)[1] == "7.25"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
