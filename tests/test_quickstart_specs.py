"""The shipped quickstart recipe and the evaluation spec beside it fit together.

Whether the quickstart's teacher beats a randomly initialised backbone (issue 7) is shown by
tests/test_quickstart_knn.py, which trains it as shipped; `python
benchmarks/quickstart_knn.py` prints the same comparison with the raw-pixel baseline."""

from __future__ import annotations

from pathlib import Path

from dino_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
EVAL_SPEC = REPO / "jobs" / "eval-knn.yaml"


def test_eval_spec_matches_the_quickstart_model_and_data() -> None:
    # The eval spec rebuilds the backbone from its own model section and loads the
    # checkpoint strictly, so the two must describe the same backbone.
    train, ev = load_spec(QUICKSTART), load_spec(EVAL_SPEC)
    backbone = ("arch", "patch_size", "img_size", "depth", "embed_dim", "num_heads")
    assert {k: getattr(ev.model, k) for k in backbone} == {
        k: getattr(train.model, k) for k in backbone
    }
    assert ev.method.crops.global_size == train.method.crops.global_size
    assert ev.run.seed == train.run.seed  # `--init random` is then the run's own start
    # The watcher beside the quickstart evaluates on the same shards as `eval knn --spec`.
    for field in ("train_url", "val_url", "knn_k", "knn_temperature"):
        assert getattr(train.evaluation, field) == getattr(ev.evaluation, field), field
    assert train.evaluation.enabled and train.evaluation.kinds == ["knn"]
    assert train.evaluation.train_url == train.data.url  # the bank is the training set


def test_quickstart_without_its_shards_is_refused_before_anything_is_written(
    tmp_path: Path, fmnist_shards: Path
) -> None:
    """The quickstart's evaluation reads data/fmnist-test: a user who packed only the training
    shards is told which field and path are missing, and no run folder is created."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dino_cluster.cli", "submit", str(QUICKSTART)]
    cmd += ["--set", f"run.dir={tmp_path / 'runs'}", "--set", f"data.url={fmnist_shards}"]
    cmd += ["--set", f"evaluation.train_url={fmnist_shards}"]  # the bank: the training shards
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "evaluation.val_url: data/fmnist-test/index.json does not exist" in proc.stderr
    assert "data.url" not in proc.stderr  # that one exists
    assert "--set evaluation.enabled=false" in proc.stderr
    assert not (tmp_path / "runs").exists()
