"""The malformed-checkpoint corpus (tests/corpus/checkpoints/, made by make_corpus.py): every
case holds a good step 1 and a bad step 2. Listing, loading, `checkpoints` and `eval knn` must
each end in a fallback to step 1 or a one-line refusal: no traceback, and nothing in a
checkpoint is ever executed (one case is a pickle that would write a marker file)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.checkpointing.layout import CheckpointCorruptError, CheckpointNotFoundError

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "corpus" / "checkpoints"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
MARKER = "UNPICKLED-MARKER"


def test_the_corpus_is_there() -> None:
    assert len(CASES) >= 15, CASES


@pytest.fixture
def case_root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001
    root = tmp_path / request.param
    shutil.copytree(CORPUS / request.param, root)
    monkeypatch.chdir(tmp_path)  # where the code-running pickle would leave its marker
    return root


@pytest.mark.parametrize("case_root", CASES, indirect=True)
def test_a_bad_step_falls_back_to_the_good_one(case_root: Path) -> None:
    manager = CheckpointManager(str(case_root), is_writer=False)
    steps = [info.step for info in manager.list()]
    assert 1 in steps and set(steps) <= {1, 2}
    step, state = manager.load()
    assert step == 1 and float(state["teacher"]["backbone.w"][0, 0]) == 1.0
    if 2 in steps:  # a manifest that parses: loading step 2 itself is refused, not run
        with pytest.raises((CheckpointCorruptError, CheckpointNotFoundError)):
            manager.load(2, fallback=False)
    assert not (case_root.parent / MARKER).exists()


def test_an_oversized_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "huge"
    shutil.copytree(CORPUS / "manifest-not-json", root)
    (root / "step-000000002" / "manifest.json").write_text("[" + " " * (2 << 20) + "]")
    manager = CheckpointManager(str(root), is_writer=False)
    assert [i.step for i in manager.list()] == [1] and manager.load()[0] == 1


@pytest.mark.parametrize("case", CASES)
def test_the_checkpoints_command_lists_them_without_a_traceback(tmp_path: Path, case: str):
    root = tmp_path / case
    shutil.copytree(CORPUS / case, root)
    done = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "checkpoints", str(root)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and " 1 " in done.stdout


@pytest.mark.parametrize(
    "case", ["object-pickle-that-runs-code", "object-nan-weights", "object-flipped-byte"]
)
def test_eval_of_a_bad_step_is_a_one_line_refusal(tmp_path: Path, case: str) -> None:
    root = tmp_path / case
    shutil.copytree(CORPUS / case, root)
    done = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "eval", "knn", "--no-record",
         "--checkpoint", str(root / "step-000000002"),
         "--spec", str(REPO / "jobs" / "eval-knn.yaml")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "step 2" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / MARKER).exists()
