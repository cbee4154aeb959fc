"""The existing benchmark scripts run on CPU in their smallest mode (issue 9: benchmarks run in
CI in tiny mode). They print figures and ratios; speed is never asserted."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc.stdout


def figure(out: str, label: str) -> float:
    """The first number after `label` on its line."""
    match = re.search(re.escape(label) + r"[^\d\n]*([\d.]+)", out)
    assert match, f"no line {label!r} in:\n{out}"
    return float(match.group(1))


def test_data_pipeline_tiny_prints_rates_and_ratios() -> None:
    out = run_bench(
        "data_pipeline.py",
        *("--images", "4", "--samples", "8", "--batch", "4", "--rounds", "1"),
        *("--n-local", "1"),
    )
    ref = figure(out, "reference (PIL decode + MultiCropAugment)")
    ours = figure(out, "ours (TrainStream + BatchedMultiCropAugment)")
    stage = figure(out, "ours, CPU stage only")
    assert min(ref, ours, stage) > 0
    # The ratio lines are the printed rates divided, not independent numbers.
    assert figure(out, "ratio ours / reference") == pytest.approx(ours / ref, rel=0.02, abs=0.01)
    assert figure(out, "ratio CPU stage only / reference") == pytest.approx(
        stage / ref, rel=0.02, abs=0.01
    )


def test_checkpoint_tiny_prints_ratios_and_stops_its_s3() -> None:
    out = run_bench("checkpoint.py", "--size-mb", "8", "--rounds", "2")
    assert len(re.findall(r"^round \d+: sync", out, re.M)) == 2
    sync = figure(out, "synchronous save (best)")
    warm = figure(out, "async stall, warm (best)")
    assert sync > 0 and warm >= 0
    assert figure(out, "throughput ratio") > 0
    assert "of sync" in out and "of raw boto3" in out
    # It started its own moto_server on loopback: that endpoint must be gone afterwards.
    port = int(re.search(r"endpoint http://127\.0\.0\.1:(\d+)", out).group(1))
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
