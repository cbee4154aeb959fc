"""The SLURM backend against a real one-machine SLURM cluster (tests/fixtures/slurm.py):
submitit submission, real preemption by a higher-priority partition, the time-limit signal
path of the rendered sbatch script, cancel, status/logs, and refused submissions.

Training jobs are the quickstart ViT cut to a handful of steps on real Fashion-MNIST shards,
one CPU task each. No periodic checkpoints: the only checkpoint before the end is the one
written on the signal, so resuming from it (and not from step 0) is unambiguous.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.launch.base import LaunchError
from dino_cluster.launch.slurm import env as slurm_env
from dino_cluster.launch.slurm.backend import SlurmBackend
from dino_cluster.launch.slurm.commands import query_job
from dino_cluster.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tiny_spec(tmp_path: Path, shards: Path, name: str, *extra: str) -> JobSpec:
    return load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [
            f"run.name={name}",
            f"run.dir={tmp_path / 'runs'}",
            f"data.url={shards}",
            "model.depth=1",
            "model.embed_dim=64",
            "model.num_heads=2",
            "model.out_dim=256",
            "model.hidden_dim=64",
            "model.bottleneck_dim=32",
            "method.crops.n_local=2",
            "data.num_workers=0",
            "evaluation.enabled=false",
            "data.shuffle_buffer=64",
            "optim.global_batch=16",
            "metrics.log_every_steps=1",
            "checkpoint.every_steps=1000",
            "checkpoint.keep_last=10",
            "launcher.backend=slurm",
            "launcher.slurm.partition=debug",
            "launcher.slurm.cpus_per_task=1",
            "launcher.slurm.time_min=30",
            f"launcher.slurm.folder={tmp_path / 'slurm'}",
            "launcher.slurm.max_requeues=3",
            *extra,
        ],
    )


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return rows[-1]["step"] if rows else 0


def checkpoint_steps(spec: JobSpec) -> list[int]:
    return [c.step for c in CheckpointManager(spec.checkpoint_url, is_writer=False).list()]


def rank_log(run_dir: Path, rank: int = 0) -> str:
    info = json.loads((run_dir / "launch.json").read_text())
    path = Path(info["log_pattern"].format(job_id=info["job_id"], rank=rank))
    return path.read_text() if path.exists() else ""


STEPS = 60


def test_submitit_job_is_preempted_checkpoints_requeues_resumes_and_completes(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c, be = slurm_cluster, SlurmBackend()
    # Enough steps that the preemption always lands before the run could finish.
    spec = tiny_spec(tmp_path, fmnist_shards, "preempt", f"optim.max_steps={STEPS}")
    run_dir = spec.run_dir
    job = be.submit(spec, detach=True).job_id
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["backend"] == "slurm" and launch["job_id"] == job
    assert "submitted SLURM job" in capsys.readouterr().out

    c.wait("training to pass step 2", lambda: last_step(run_dir) >= 2, timeout=180)
    assert be.status(str(run_dir)) == "running"
    # A job in the high-priority partition that needs the whole node preempts ours.
    high = c.sbatch("-p", "high", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1")
    c.wait(
        "the preempted job to requeue itself",
        lambda: be.status(str(run_dir)) == "requeued",
        timeout=120,
    )
    at_signal = checkpoint_steps(spec)
    stopped_at = last_step(run_dir)
    # One checkpoint, written on the signal, at the last step trained: no work lost.
    assert at_signal == [stopped_at] and 0 < stopped_at < STEPS
    assert slurm_env.read_requeues(run_dir)["requeues"] == 0  # written by the first start

    c.wait(
        "the preempting job to finish",
        lambda: slurm_env.map_state(query_job(high)[0]) == "completed",
        timeout=120,
    )
    c.resume_now(job, lambda: be.status(str(run_dir)) == "completed", "the resumed job to complete")
    log = rank_log(run_dir)
    assert "received SIGUSR2" in log
    assert f"resumed from step {stopped_at} " in log
    assert max(checkpoint_steps(spec)) == STEPS and last_step(run_dir) == STEPS
    record = slurm_env.read_requeues(run_dir)
    assert record["requeues"] == 1 and record["job_id"] == job and not record["cap_reached"]
    history = c.run("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State").stdout.split()
    assert history[-1] == "COMPLETED" and {"REQUEUED", "PREEMPTED"} & set(history)

    be.logs(str(run_dir), rank=0)
    assert "resumed from step" in capsys.readouterr().out
    with pytest.raises(LaunchError, match="rank 1 does not exist"):
        be.logs(str(run_dir), rank=1)
    cli = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "status", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and cli.stdout.splitlines()[0] == "completed", cli.stderr


def test_rendered_sbatch_script_time_limit_signal_requeues_and_resumes(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path
) -> None:
    """Plain `sbatch` of the rendered script. The time-limit path is driven by the very signal
    `--signal=B:USR2@grace` delivers before the limit (USR2 to the batch shell), without
    waiting minutes for a real limit."""
    c, be = slurm_cluster, SlurmBackend()
    spec = tiny_spec(tmp_path, fmnist_shards, "sbatch", f"optim.max_steps={STEPS}")
    run_dir = spec.run_dir
    script = tmp_path / "job.sbatch"
    script.write_text(be.render(spec))
    job = c.sbatch(f"--export=ALL,DINO_PYTHON={sys.executable}", str(script), cwd=tmp_path)

    c.wait("training to pass step 2", lambda: last_step(run_dir) >= 2, timeout=180)
    info = json.loads((run_dir / "launch.json").read_text())  # written by the job itself
    assert info["via"] == "sbatch" and info["job_id"] == job
    assert be.status(str(run_dir)) == "running"
    c.run("scancel", "--batch", "--signal=USR2", job)
    c.wait("the job to requeue itself", lambda: be.status(str(run_dir)) == "requeued", timeout=120)
    stopped_at = last_step(run_dir)
    assert checkpoint_steps(spec) == [stopped_at] and 0 < stopped_at < STEPS
    c.resume_now(job, lambda: be.status(str(run_dir)) == "completed", "the resumed job to complete")
    assert f"resumed from step {stopped_at} " in rank_log(run_dir)
    assert max(checkpoint_steps(spec)) == STEPS and last_step(run_dir) == STEPS
    assert slurm_env.read_requeues(run_dir)["requeues"] == 1
    batch_log = (tmp_path / f"dino-sbatch-{job}.out").read_text()
    assert "SIGUSR2: asking the ranks to checkpoint" in batch_log


def test_cancel_checkpoints_first_and_does_not_requeue(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path
) -> None:
    c, be = slurm_cluster, SlurmBackend()
    spec = tiny_spec(tmp_path, fmnist_shards, "cancel", "optim.max_steps=500")
    run_dir = spec.run_dir
    job = be.submit(spec, detach=True).job_id
    c.wait("training to pass step 1", lambda: last_step(run_dir) >= 1, timeout=180)
    with pytest.raises(LaunchError, match="is running"):
        be.submit(spec, detach=True)  # one live job per run folder
    be.cancel(str(run_dir))
    assert be.status(str(run_dir)) == "cancelled"
    steps = checkpoint_steps(spec)
    assert steps == [last_step(run_dir)] and steps[0] > 0
    assert c.job_field(job, "Restarts") in ("", "0")
    assert slurm_env.read_requeues(run_dir)["requeues"] == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("launcher.slurm.partition=nope", "launcher.slurm.partition 'nope' does not exist"),
        ("launcher.gpus_per_node=4", "launcher.gpus_per_node"),
        ("launcher.slurm.additional_parameters={time: soon}", "time"),
    ],
)
def test_invalid_slurm_settings_fail_at_submit_with_nothing_submitted(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path, override: str, expected: str
) -> None:
    c, be = slurm_cluster, SlurmBackend()
    spec = tiny_spec(tmp_path, fmnist_shards, "bad", override)
    before = c.run("squeue", "-h", "-o", "%i").stdout.split()
    with pytest.raises(LaunchError) as exc:
        be.submit(spec, detach=True)
    assert "nothing was submitted" in str(exc.value) and expected in str(exc.value)
    assert c.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert not (spec.run_dir / "launch.json").exists()
    folder = tmp_path / "slurm" / "bad"
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def test_hand_wrapper_trains_two_ranks_from_a_spec_file(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sbatch infra/slurm/dino.sbatch SPEC --set ...` with its resource lines edited as its
    header says (here: 2 CPU tasks): both ranks train in one torch.distributed group set up
    from SLURM's variables, and the run completes with its checkpoint."""
    c, be = slurm_cluster, SlurmBackend()
    spec = tiny_spec(tmp_path, fmnist_shards, "wrapper", "launcher.procs_per_node=2")
    spec_file = tmp_path / "wrapper.yaml"
    spec_file.write_text(spec.to_yaml())
    edits = {
        "--ntasks-per-node=8": "--ntasks-per-node=2",
        "--cpus-per-task=10": "--cpus-per-task=1",
        "--mem=480G": "--mem=4G",
        "--time=3-00:00:00": "--time=30",
    }
    lines = []
    for line in (REPO / "infra" / "slurm" / "dino.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH --gpus-per-node"):
            continue
        for old, new in edits.items():
            line = line.replace(f"#SBATCH {old}", f"#SBATCH {new}")
        lines.append(line)
    script = tmp_path / "dino.sbatch"
    script.write_text("\n".join(lines) + "\n")
    job = c.sbatch(
        f"--export=ALL,DINO_PYTHON={sys.executable}",
        str(script),
        str(spec_file),
        "--set",
        "optim.max_steps=2",
        cwd=tmp_path,
    )
    run_dir = spec.run_dir
    c.wait("the job to start", lambda: (run_dir / "launch.json").exists(), timeout=120)
    capsys.readouterr()
    be.logs(str(run_dir), follow=True)  # returns once the job has ended
    assert "step 2/2" in capsys.readouterr().out
    batch_log = (tmp_path / f"dino-{job}.out").read_text()
    assert be.status(str(run_dir)) == "completed", batch_log
    assert checkpoint_steps(spec) == [2]
    assert "resumed" not in rank_log(run_dir, 0)
    # rank 1 trained too (its own log), in the same group: DDP would hang otherwise
    assert (
        rank_log(run_dir, 1) != ""
        and json.loads((run_dir / "launch.json").read_text())["world_size"] == 2
    )
    resolved = load_spec(run_dir / "spec.resolved.yaml")
    assert resolved.optim.max_steps == 2  # the --set override reached the training


def test_submitted_run_starts_its_watcher_which_sbatches_one_knn_job_per_checkpoint(
    slurm_cluster, fmnist_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`submit --backend slurm` with evaluation on: the watcher it starts on the submit host
    sbatches one k-NN job per committed checkpoint, and exits after the run has ended."""
    from dino_cluster.evaluate.queue import EvalQueue
    from dino_cluster.launch.procs import pid_alive
    from dino_cluster.storage import open_store

    c, be = slurm_cluster, SlurmBackend()
    root = fmnist_shards.parent  # 8 shards of 128: 6 as the k-NN bank, 2 as queries
    spec = tiny_spec(
        tmp_path,
        fmnist_shards,
        "evaluated",
        "optim.max_steps=6",
        "checkpoint.every_steps=3",
        "evaluation.enabled=true",
        f"evaluation.train_url={root}/shard-{{000000..000005}}.tar",
        f"evaluation.val_url={root}/shard-{{000006..000007}}.tar",
        "evaluation.knn_k=[5,20]",
        "evaluation.cpus=1",
    )
    run_dir = spec.run_dir
    be.submit(spec, detach=True)
    out = capsys.readouterr().out
    assert "evaluation watcher started (pid" in out, out
    pid = int((run_dir / "eval-watch.pid").read_text())
    c.wait("the run to complete", lambda: be.status(str(run_dir)) == "completed", timeout=240)
    c.wait("the watcher to finish and exit", lambda: not pid_alive(pid), timeout=240)
    watch_log = (run_dir / "logs" / "eval-watch.log").read_text()
    assert "evaluations run on the slurm backend" in watch_log, watch_log[-3000:]
    assert "2 evaluated, 0 failed" in watch_log, watch_log[-3000:]

    steps = checkpoint_steps(spec)
    assert steps == [3, 6]
    queue = EvalQueue(open_store(spec.checkpoint_url), "knn")
    infos = CheckpointManager(spec.checkpoint_url, is_writer=False).list()
    for info in infos:
        status = queue.read_status(info.step)
        assert status["state"] == "done" and status["attempts"] == 1, status
        knn = info.evals["knn"]
        assert knn["info"]["n_train"] == 768 and knn["info"]["n_val"] == 256
        assert 10.0 < knn["top1"] <= 100.0
    # Each evaluation was its own sbatch job, named for its step, its output in the run.
    outs = sorted(p.name.rsplit("-", 1)[0] for p in (run_dir / "logs" / "eval").glob("*.out"))
    assert outs == ["dino-eval-knn-step-3", "dino-eval-knn-step-6"], outs
