"""benchmarks/train_step.py and benchmarks/gpu_check.sh run on CPU in tiny mode (issue 9: the
benchmarks run in CI). They print and write figures for both steps; speed is never asserted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _check_figures(doc: dict, stdout: str) -> None:
    assert doc["device"] == "cpu" and doc["peak_tflops"] is None
    (res,) = doc["results"]
    assert res["model"] == "tiny" and res["crops"] == "2x32 + 10x16"
    assert res["model_tflop_per_step"] > 0
    rows = res["variants"]
    assert set(rows) == {"reference", "ours"}
    for name, row in rows.items():
        assert row["step_time_s"] > 0 and row["images_per_s"] > 0, name
        assert row["images_per_s"] == pytest.approx(res["batch"] / row["step_time_s"])
        assert row["mfu"] is None and row["peak_memory_mib"] is None  # n/a on CPU
        # The printed table is the JSON's figures.
        line = re.search(rf"^\s+{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+n/a", stdout, re.M)
        assert line, stdout
        assert float(line.group(1)) == pytest.approx(1e3 * row["step_time_s"], abs=0.01)
    ratio = res["ratios_vs_reference"]["ours"]["images_per_s"]
    assert ratio == pytest.approx(rows["ours"]["images_per_s"] / rows["reference"]["images_per_s"])
    printed = re.search(r"ratio ours / reference: images/s ([\d.]+)x", stdout)
    assert printed and float(printed.group(1)) == pytest.approx(ratio, abs=0.01)


def test_train_step_tiny_prints_and_writes_both_steps(tmp_path: Path) -> None:
    out = tmp_path / "figures" / "ts.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--model", "s16"]
        + ["--steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),  # CPU: s16 becomes the tiny model
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "running the tiny model instead of s16" in proc.stdout
    _check_figures(json.loads(out.read_text()), proc.stdout)


def test_train_step_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--steps is out of range" in proc.stderr


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_script_runs_in_tiny_mode(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    outdir = tmp_path / "gpu-check"
    proc = subprocess.run(
        ["bash", str(script), str(outdir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, DINO_GPU_CHECK_TINY="1", PYTHON=sys.executable),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (outdir / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [
        ["train_step_tiny", "rc=0"],
        ["pytest_gpu", "rc=0"],
    ]
    log = (outdir / "train_step_tiny.log").read_text()
    _check_figures(json.loads((outdir / "train_step_tiny.json").read_text()), log)
    # The GPU tests were selected (and only collected on CPU).
    assert "test_cuda_step_makes_no_host_sync" in (outdir / "pytest_gpu.log").read_text()
    assert (outdir / "env.txt").read_text().strip()
