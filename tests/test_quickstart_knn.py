"""The README quickstart, as shipped, learns features: trained on the 6,000 quickstart
Fashion-MNIST images with the watcher beside it, every committed checkpoint gets exactly one
k-NN result, the final teacher's k-NN top-1 is at least 12 points above the same backbone at
random initialisation evaluated the same way (both printed, with the raw-pixel baseline), and
the run ends with healthy DINO dynamics: the teacher entropy well below uniform (ln out_dim)
and the teacher-student KL clearly above 0, neither collapse of the paper's fig. 7.

The one test in the suite that trains a recipe to the end (several minutes on 2 idle CPU
cores, much longer when other work shares them: it has its own timeout); only paths are
overridden, so a change to jobs/quickstart.yaml that stops it learning fails here. Queries:
the first 2,000 Fashion-MNIST test images, as in the README."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.evaluate.queue import EvalQueue
from dino_cluster.spec import load_spec
from dino_cluster.storage import open_store

REPO = Path(__file__).resolve().parents[1]
QUERIES = 2000
# The bar: the final teacher at least 12 points above the same backbone at random
# initialisation at k = 20 (README, Evaluation: measured 14.0; the standard error
# of one accuracy on 2,000 queries is about 1 point).
MIN_GAP = 12.0
# The collapse signals at the end of training, from metrics.jsonl (mean of the last END_ROWS
# logged rows: one row is one batch). Uniform collapse is H(P_t) -> ln(out_dim) with
# KL -> 0; one-dimension collapse is H(P_t) -> 0 with KL -> 0 (the paper's fig. 7).
# Measured at the end of the shipped quickstart: entropy 2.36 nats (0.34 x ln 1024), KL
# 0.91; over the second half the entropy peaked at 3.40 (0.49 x ln 1024), the KL never
# fell below 0.67.
END_ROWS = 5
MAX_ENTROPY_FRACTION = 0.75  # of ln(out_dim): well below uniform
MIN_ENTROPY = 1.0  # nats: far from one-dimension collapse
MAX_SECOND_HALF = 0.8  # of ln(out_dim): the most any logged row of the second half may reach
MIN_KL = 0.3  # nats: the student still has something to learn from the teacher
# The whole test: training with the watcher beside it, then two baselines. About 7 minutes
# on 2 idle cores; a machine shared with other work has taken several times that, so this
# test has its own limit instead of the suite's 600 s.
TIMEOUT_S = 3600
SUBMIT_TIMEOUT_S = 3000
BASELINE_TIMEOUT_S = 250


@pytest.fixture(scope="module")
def quickstart_data(
    tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path
) -> tuple[Path, Path]:
    """The README's quickstart shards (6,000 training images, 1,000 per shard) and the k-NN
    queries, packed the way the README says."""
    from dino_cluster.data.pack import pack

    root = tmp_path_factory.mktemp("quickstart-data")
    pack(str(fmnist_dir), str(root / "fmnist"), limit=6000, max_samples_per_shard=1000,
         progress=False)  # fmt: skip
    pack(str(fmnist_dir), str(root / "fmnist-test"), split="test", limit=QUERIES, progress=False)
    return root / "fmnist" / "index.json", root / "fmnist-test" / "index.json"


def _cli(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dino_cluster.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _knn_baseline(init: str, spec: Path, out: Path, cwd: Path) -> dict:
    proc = _cli("eval", "knn", "--init", init, "--spec", str(spec), "--no-record",
                "--output", str(out), cwd=cwd, timeout=BASELINE_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())["results"]


def _end_of_training(run_dir: Path) -> tuple[list[dict], float, float]:
    """(logged rows, mean teacher entropy, mean KL) over the last END_ROWS rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-END_ROWS:]
    entropy = sum(r["teacher_entropy"] for r in tail) / len(tail)
    kl = sum(r["student_teacher_kl"] for r in tail) / len(tail)
    return rows, entropy, kl


@pytest.mark.timeout(TIMEOUT_S)
def test_quickstart_teacher_beats_random_init_and_every_checkpoint_is_evaluated_once(
    tmp_path: Path, quickstart_data: tuple[Path, Path]
) -> None:
    train, val = quickstart_data
    paths = [
        f"run.dir={tmp_path / 'runs'}",
        f"data.url={train}",
        f"evaluation.train_url={train}",
        f"evaluation.val_url={val}",
    ]
    args = ["submit", str(REPO / "jobs" / "quickstart.yaml")]
    for item in paths:
        args += ["--set", item]
    run_dir = tmp_path / "runs" / "quickstart"
    try:
        proc = _cli(*args, cwd=tmp_path, timeout=SUBMIT_TIMEOUT_S)
    finally:
        # The run's supervisor is detached from `submit`: if submit was killed (timeout,
        # Ctrl-C) it would train on, so stop it the way a user does (a no-op once it ended).
        if (run_dir / "launch.json").exists():
            _cli("cancel", str(run_dir), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = load_spec(run_dir / "spec.resolved.yaml")
    # In the foreground `submit` waits for the watcher, so every evaluation is over by now,
    # and it echoed the results.
    assert "waiting for the evaluations" in proc.stdout
    done = re.search(r"watcher done in \d+ s: (\d+) evaluated, (\d+) failed", proc.stdout)
    assert done is not None, proc.stdout[-3000:]

    infos = CheckpointManager(spec.checkpoint_url, is_writer=False).list()
    last = spec.optim.epochs * (6000 // spec.optim.global_batch)
    steps = [i.step for i in infos]
    assert steps[-1] == last and len(steps) == 3, steps  # the job's cadence: 3 evaluations
    assert (int(done[1]), int(done[2])) == (len(steps), 0), done[0]
    queue = EvalQueue(open_store(spec.checkpoint_url), "knn")
    for info in infos:
        status = queue.read_status(info.step)
        assert status["state"] == "done" and status["attempts"] == 1, (info.step, status)
        assert info.evals["knn"] == status["results"]
        assert info.evals["knn"]["info"]["n_val"] == QUERIES
        assert f"step {info.step} knn top1 " in proc.stdout
    # One evaluation job per checkpoint, none twice (the local submitter logs one file each).
    jobs = sorted(p.name for p in (run_dir / "logs" / "eval").glob("knn-*.log"))
    assert jobs == sorted(f"knn-step-{s}-attempt-1.log" for s in steps), jobs

    # Healthy dynamics at the end: the teacher is sharp but not collapsed, and the loss is
    # clearly above its entropy (KL = loss - H(P_t), logged as student_teacher_kl).
    rows, entropy, kl = _end_of_training(run_dir)
    uniform = math.log(spec.model.out_dim)
    assert rows[-1]["step"] == last, rows[-1]
    assert all(abs(r["loss"] - r["teacher_entropy"] - r["student_teacher_kl"]) < 1e-3 for r in rows)
    print(
        f"\nquickstart end of training (mean of the last {END_ROWS} logged rows): teacher "
        f"entropy {entropy:.2f} nats ({entropy / uniform:.2f} x ln({spec.model.out_dim})), "
        f"KL {kl:.2f}"
    )
    assert MIN_ENTROPY <= entropy <= MAX_ENTROPY_FRACTION * uniform, (entropy, uniform)
    assert kl >= MIN_KL, kl
    # ... and not only at the end: over the second half the teacher never drifts back
    # towards uniform (the old recipe sat at 5.8-6.3 of 6.93 nats the whole run).
    second_half = [r["teacher_entropy"] for r in rows if r["step"] > last // 2]
    assert max(second_half) <= MAX_SECOND_HALF * uniform, max(second_half)

    resolved = run_dir / "spec.resolved.yaml"
    random = _knn_baseline("random", resolved, tmp_path / "random.json", tmp_path)
    pixels = _knn_baseline("pixels", resolved, tmp_path / "pixels.json", tmp_path)
    trained = infos[-1].evals["knn"]
    assert trained["k"] == random["k"] == 20
    print(
        f"quickstart k-NN top-1 @20 ({QUERIES} queries, bank 6,000): trained teacher "
        f"{trained['top1']:.2f} % (by checkpoint: "
        + ", ".join(f"{i.step}: {i.evals['knn']['top1']:.2f}" for i in infos)
        + f"), random init {random['top1']:.2f} %, raw pixels {pixels['top1']:.2f} %"
    )
    assert trained["top1"] >= random["top1"] + MIN_GAP, (trained["top1"], random["top1"])
    for k in ("10", "100"):  # not one lucky k: the whole k-NN curve moved up
        assert trained["by_k"][k]["top1"] > random["by_k"][k]["top1"], (k, trained, random)
