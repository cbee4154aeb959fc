"""Evaluations submitted on the run's backend: Ray tasks and SLURM jobs, on the session's
real Ray head and SLURM cluster, evaluating a real tiny checkpoint; plus the eval sbatch
script (golden file), the SLURM state mapping and `evaluation.backend` validation.

The pytest process never connects to Ray (as in test_ray.py): Ray submitters run in
subprocesses, this file run as a script (`python tests/test_eval_submit.py ray-probe ...`).

Regenerate the golden file after an intended change:
    DINO_UPDATE_GOLDEN=1 python -m pytest tests/test_eval_submit.py -q -k golden
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_eval_run import fmnist_val, tiny_spec  # noqa: F401 - a fixture and a helper, reused

from dino_cluster.evaluate.cli import eval_backend
from dino_cluster.evaluate.submit import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EvalJob,
)
from dino_cluster.launch.run_record import RayRecord, write_record

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


# -- no cluster needed --------------------------------------------------------------------


def test_evaluation_backend_is_validated_and_resolved(tmp_path: Path) -> None:
    from dino_cluster.spec import SpecError, spec_from_dict

    with pytest.raises(SpecError) as exc:
        spec_from_dict({"data": {"url": "x"}, "evaluation": {"backend": "k8s"}}, "job.yaml")
    text = str(exc.value)
    assert "job.yaml" in text and "evaluation.backend" in text
    assert all(f"'{name}'" in text for name in ("auto", "local", "ray", "slurm")), text
    with pytest.raises(SpecError, match="evaluation.slurm_partition"):
        spec_from_dict({"data": {"url": "x"}, "evaluation": {"slurm_partition": "a b"}})

    def spec(backend: str, launcher: str = "local"):  # noqa: ANN202
        doc = {"data": {"url": "x"}, "evaluation": {"backend": backend}}
        return spec_from_dict({**doc, "launcher": {"backend": launcher}})

    assert eval_backend(spec("auto", "kuberay"), tmp_path, None) == "kuberay"
    assert eval_backend(spec("auto", "slurm"), tmp_path, None) == "slurm"
    assert eval_backend(spec("local", "slurm"), tmp_path, None) == "local"
    # auto follows how the run was launched (`submit --backend` may differ from the spec).
    write_record(tmp_path, RayRecord(mode="driver", pid=os.getpid()))
    assert eval_backend(spec("auto"), tmp_path, None) == "ray"
    assert eval_backend(spec("auto"), tmp_path, "slurm") == "slurm"
    with pytest.raises(ValueError, match="valid: auto, local, ray, slurm"):
        eval_backend(spec("auto"), tmp_path, "k8s")


def test_slurm_states_map_to_exit_codes() -> None:
    from dino_cluster.launch.slurm.evaluations import exit_code

    assert exit_code("COMPLETED", "0:0") == EXIT_OK
    assert exit_code("FAILED", "2:0") == EXIT_BAD_INPUT  # the runner's own code comes back
    assert exit_code("FAILED", "4:0") == 4
    assert exit_code("FAILED", "0:9") == EXIT_FAILED  # killed by a signal
    for state in ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
        assert exit_code(state, "0:15") == EXIT_FAILED
    for state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", ""):
        assert exit_code(state, "0:0") is None


def test_eval_sbatch_script_matches_golden_file() -> None:
    from dino_cluster.launch.slurm.evaluations import eval_resources, render_eval_sbatch
    from dino_cluster.spec import load_spec
    from dino_cluster.storage import StorageOptions

    spec = load_spec(
        REPO / "jobs" / "vitb8.yaml",
        [
            "launcher.backend=slurm",
            "evaluation.cpus=10",
            "evaluation.gpus=1",
            "evaluation.mem_gb=64",
            "evaluation.slurm_time_min=90",
            "evaluation.slurm_qos=eval",
            "launcher.python=/opt/venv/bin/python",
        ],
    )
    job = EvalJob(
        checkpoint_url="s3://bucket/runs/vitb8/checkpoints",
        step=2500,
        kind="knn",
        spec_path="/shared/runs/vitb8/spec.resolved.yaml",
        storage_options=StorageOptions(endpoint_url="https://s3.example.org"),
        attempt=2,
    )
    text = render_eval_sbatch(job, eval_resources(spec, "/shared/runs/vitb8"))
    path = GOLDEN / "slurm_eval_knn.sbatch"
    if os.environ.get("DINO_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"differs from {path}; DINO_UPDATE_GOLDEN=1 regenerates"
    for line in (  # what a reviewer checks first, independently of the golden file
        "#SBATCH --job-name=dino-eval-knn-step-2500",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --gpus=1",
        "#SBATCH --mem=64G",
        "#SBATCH --time=01:30:00",
        f"#SBATCH --partition={spec.launcher.slurm.partition}",
        "#SBATCH --qos=eval",
        "#SBATCH --no-requeue",
        "#SBATCH --output=/shared/runs/vitb8/logs/eval/%x-%j.out",
    ):
        assert line in text.splitlines(), line
    assert "--endpoint-url https://s3.example.org" in text
    assert "CUDA_VISIBLE_DEVICES=" not in text  # it has a GPU


# -- a real tiny checkpoint -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fmnist_shards: Path, fmnist_val: Path):  # noqa: ANN201, F811
    """A finished local training run (checkpoints at steps 3 and 6), nothing evaluated yet."""
    from dino_cluster.launch.local import LocalBackend, run_status
    from dino_cluster.spec import spec_from_dict

    tmp = tmp_path_factory.mktemp("evalsubmit")
    spec = spec_from_dict(tiny_spec(tmp, fmnist_shards, fmnist_val, evaluation__enabled=False))
    run_dir = Path(LocalBackend().submit(spec, detach=True).run_dir)
    deadline = time.monotonic() + 600
    while run_status(run_dir) == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_status(run_dir) == "completed", (run_dir / "logs" / "rank-0.log").read_text()[-2000:]
    return spec, run_dir


def _evals(spec) -> dict[int, dict]:  # noqa: ANN001
    from dino_cluster.checkpointing import CheckpointManager

    infos = CheckpointManager(spec.checkpoint_url, is_writer=False).list()
    return {i.step: i.evals for i in infos}


def _wait_code(handle, timeout_s: float = 300) -> int:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while (code := handle.poll()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no exit code after {timeout_s:.0f} s")
        time.sleep(0.2)
    return code


# -- Ray ------------------------------------------------------------------------------------


def _exit_bad_input(job: EvalJob) -> int:
    return EXIT_BAD_INPUT


def _crash(job: EvalJob) -> int:
    raise RuntimeError("evaluator crashed")


def _sleep_long(job: EvalJob) -> int:
    Path(job.checkpoint_url, "pid").write_text(str(os.getpid()))
    time.sleep(600)
    return EXIT_OK


def _ray_probe(address: str, folder: str) -> None:
    """Run in a subprocess: exit codes of failing tasks, and a cancelled long task."""
    from dino_cluster.launch.ray.evaluations import submit_task
    from dino_cluster.spec import spec_from_dict

    spec = spec_from_dict({"data": {"url": "x"}, "evaluation": {"cpus": 1}})

    def submit(target):  # noqa: ANN001, ANN202
        return submit_task(job, spec, address=address, target=target)

    job = EvalJob(checkpoint_url=folder, step=3, kind="knn")
    out = {
        "bad_input": _wait_code(submit(_exit_bad_input)),
        "crash": _wait_code(submit(_crash)),
    }
    long = submit(_sleep_long)
    pid_file = Path(folder, "pid")
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline:
        assert long.poll() is None
        time.sleep(0.2)
    out["pid"] = int(pid_file.read_text())
    t0 = time.monotonic()
    long.cancel()
    out["cancelled"] = _wait_code(long, 60)
    out["cancel_s"] = time.monotonic() - t0
    print("PROBE " + json.dumps(out), flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
def test_ray_tasks_evaluate_fail_with_their_code_and_cancel(
    trained, ray_cluster, tmp_path: Path
) -> None:
    spec, run_dir = trained
    # The runner as Ray tasks, through `eval watch --backend ray` joined to the session Ray.
    cmd = [sys.executable, "-m", "dino_cluster.evaluate.cli", "watch", str(run_dir), "--once"]
    cmd += ["--backend", "ray", "--address", ray_cluster.address, "--poll", "0.5"]
    env = dict(ray_cluster.env(), COLUMNS="200")  # rich wraps at 80 otherwise
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "evaluations run on the ray backend" in out and "2 evaluated, 0 failed" in out, out
    evals = _evals(spec)
    assert sorted(evals) == [3, 6]
    for step, by_kind in evals.items():
        assert by_kind["knn"]["info"]["step"] == step and 10.0 < by_kind["knn"]["top1"] <= 100.0

    probe = [sys.executable, str(Path(__file__)), "ray-probe", ray_cluster.address, str(tmp_path)]
    proc = subprocess.run(
        probe, capture_output=True, text=True, timeout=400, env=ray_cluster.env(), cwd=tmp_path
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(lines[-1].removeprefix("PROBE "))
    assert got["bad_input"] == EXIT_BAD_INPUT and got["crash"] == EXIT_FAILED
    assert got["cancelled"] == EXIT_FAILED and got["cancel_s"] < 30
    deadline = time.monotonic() + 30  # the task's worker process is killed
    while _pid_alive(got["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(got["pid"]), "the cancelled evaluation's process still runs"


@pytest.mark.integration
@pytest.mark.slow
def test_ray_run_evaluates_its_checkpoints_from_the_driver(
    tmp_path: Path,
    fmnist_shards: Path,
    fmnist_val: Path,  # noqa: F811
    ray_cluster,
    capsys,
) -> None:
    from dino_cluster.evaluate.queue import EvalQueue
    from dino_cluster.launch.ray.backend import RayBackend
    from dino_cluster.spec import spec_from_dict
    from dino_cluster.storage import open_store

    doc = tiny_spec(tmp_path, fmnist_shards, fmnist_val)
    doc["launcher"] = {"backend": "ray", "ray": {"address": ray_cluster.address}}
    spec = spec_from_dict(doc)
    result = RayBackend().submit(spec)
    out = capsys.readouterr().out
    assert result.status == "completed", out[-4000:]
    evals = _evals(spec)
    assert sorted(evals) == [3, 6], out[-4000:]
    queue = EvalQueue(open_store(spec.checkpoint_url), "knn")
    for step, by_kind in evals.items():
        status = queue.read_status(step)
        assert status["state"] == "done" and status["attempts"] == 1, status
        assert by_kind["knn"]["info"]["step"] == step
    assert (spec.run_dir / "metrics-eval.jsonl").read_text().count('"eval/knn/top1":') == 2


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_api_run_evaluates_its_checkpoints_from_the_driver_on_the_cluster(
    tmp_path: Path,
    fmnist_shards: Path,
    fmnist_val: Path,  # noqa: F811
    ray_cluster,
) -> None:
    """The driver runs on the cluster (submitted through the Jobs API, token auth on): its
    watcher thread starts one Ray task per checkpoint, exactly as an embedded run's does."""
    from dino_cluster.evaluate.queue import EvalQueue
    from dino_cluster.launch.ray.backend import RayBackend, localize_paths
    from dino_cluster.launch.run_record import read_record
    from dino_cluster.spec import spec_from_dict
    from dino_cluster.storage import open_store

    doc = tiny_spec(tmp_path, fmnist_shards, fmnist_val)
    doc["launcher"] = {"backend": "ray", "ray": {"address": ray_cluster.dashboard_url}}
    spec = localize_paths(spec_from_dict(doc))
    backend = RayBackend()
    backend.submit(spec, detach=True)
    record = read_record(spec.run_dir, "ray")
    assert record.mode == "jobs" and record.address == ray_cluster.dashboard_url
    deadline = time.monotonic() + 600
    while backend.status(spec.run_dir) in ("pending", "running"):
        assert time.monotonic() < deadline, "the Jobs API run did not finish in 10 minutes"
        time.sleep(2)
    from dino_cluster.launch.ray.jobs import client

    logs = client(ray_cluster.dashboard_url).get_job_logs(record.job_id)
    assert backend.status(spec.run_dir) == "completed", logs[-4000:]
    evals = _evals(spec)
    assert sorted(evals) == [3, 6], logs[-4000:]
    queue = EvalQueue(open_store(spec.checkpoint_url), "knn")
    for step, by_kind in evals.items():
        status = queue.read_status(step)
        assert status["state"] == "done" and status["attempts"] == 1, status
        assert by_kind["knn"]["info"]["step"] == step
    assert "evaluation watcher started (evaluations on the ray backend)" in logs


# -- SLURM ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_slurm_jobs_evaluate_fail_with_their_code_and_cancel(
    trained, slurm_cluster, tmp_path: Path
) -> None:
    from dino_cluster.launch.slurm.evaluations import submit_eval_job

    spec, run_dir = trained
    spec_path = str(run_dir / "spec.resolved.yaml")

    def submit(job: EvalJob):  # noqa: ANN202
        return submit_eval_job(job, spec, run_dir)  # launcher.python unset: this interpreter

    job = EvalJob(checkpoint_url=spec.checkpoint_url, step=3, kind="knn", spec_path=spec_path)
    before = _evals(spec)[3].get("knn")
    handle = submit(job)
    assert slurm_cluster.job_field(handle.job_id, "JobName") == "dino-eval-knn-step-3"
    out = run_dir / "logs" / "eval" / f"dino-eval-knn-step-3-{handle.job_id}.out"
    assert _wait_code(handle) == EXIT_OK, out.read_text()[-3000:] if out.exists() else "no log"
    knn = _evals(spec)[3]["knn"]
    assert knn != before and knn["info"]["step"] == 3 and 10.0 < knn["top1"] <= 100.0
    assert '"kind": "knn"' in out.read_text()  # the runner's output lands in the run folder

    bad = tmp_path / "bad.yaml"  # the runner exits 2: bad input, not worth retrying
    bad.write_text(yaml.safe_dump({**yaml.safe_load(Path(spec_path).read_text()), "oops": 1}))
    handle = submit(EvalJob(spec.checkpoint_url, 3, "knn", spec_path=str(bad)))
    assert _wait_code(handle) == EXIT_BAD_INPUT
    assert handle.state == "FAILED"

    # A long linear probe, cancelled once it runs.
    doc = yaml.safe_load(Path(spec_path).read_text())
    doc["evaluation"]["linear_epochs"] = 100000
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(doc))
    handle = submit(EvalJob(spec.checkpoint_url, 6, "linear", spec_path=str(slow)))
    slurm_cluster.wait(
        "the linear probe to run",
        lambda: slurm_cluster.job_field(handle.job_id, "JobState") == "RUNNING",
    )
    assert handle.poll() is None
    handle.cancel()
    assert _wait_code(handle, 120) == EXIT_FAILED
    assert handle.state == "CANCELLED"
    assert "linear" not in _evals(spec)[6]


if __name__ == "__main__":
    if sys.argv[1:2] == ["ray-probe"]:
        _ray_probe(sys.argv[2], sys.argv[3])
