"""benchmarks/scaling.py: the scaling model's table is internally consistent, and the measured
part runs 1 and 2 Ray workers through the real launcher and reports from metrics.jsonl.
Relations between figures are checked, never their values (no speed is asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scaling.py"


def run_script(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_scaling_model_table_is_consistent(tmp_path: Path) -> None:
    out_file = tmp_path / "model.json"
    nodes = 4  # not the default: the figures must follow the inputs
    stdout = run_script(["--model", "--nodes", str(nodes), "--out", str(out_file)], timeout=300)
    rows = json.loads(out_file.read_text())["model"]
    mfus = (0.25, 0.5)
    assert [(r["model"], r["mfu"]) for r in rows] == [
        (m, f) for m in ("ViT-S/16", "ViT-B/16", "ViT-B/8") for f in mfus
    ]
    for name in ("ViT-S/16", "ViT-B/16", "ViT-B/8"):
        assert len(re.findall(rf"^\| {re.escape(name)} \|", stdout, re.M)) == len(mfus)
    ranks = nodes * 8
    assert f"{ranks} ranks" in stdout
    by = {(r["model"], r["mfu"]): r for r in rows}
    for r in rows:
        assert r["ranks"] == ranks
        assert 0 < r["trainable"] <= r["params"]
        # The 65536-way head is a large share of every student.
        assert r["head_params"] > 0.15 * r["params"]
        assert r["grad_bytes"] == 4 * r["trainable"]
        assert r["allreduce_bytes_per_rank"] == pytest.approx(
            2 * (ranks - 1) / ranks * r["grad_bytes"]
        )
        # 4x the bandwidth, a quarter of the time.
        assert r["allreduce_ms_eth"] == pytest.approx(4 * r["allreduce_ms_ib"])
        assert r["step_ms"] == pytest.approx(1000 * r["batch_per_gpu"] / r["images_per_s_per_gpu"])
        assert r["s3_mb_s_per_gpu"] == pytest.approx(r["images_per_s_per_gpu"] * 0.110)
        assert r["s3_gbit_s_per_node"] == pytest.approx(r["s3_mb_s_per_gpu"] * 8 * 8 / 1000)
        # weights of student and teacher, two AdamW moments, the center: all fp32
        assert r["ckpt_bytes"] >= 16 * r["trainable"]
        assert r["ckpt_bytes"] == 4 * (2 * r["params"] + 2 * r["trainable"] + 65536)
        assert r["ckpt_write_frac_of_interval"] == pytest.approx(
            r["ckpt_write_s"] / (1250 * r["step_ms"] / 1000)
        )
    # Twice the MFU: twice the images per second on the same model.
    for name in ("ViT-S/16", "ViT-B/16", "ViT-B/8"):
        lo, hi = by[(name, 0.25)], by[(name, 0.5)]
        assert hi["images_per_s_per_gpu"] == pytest.approx(2 * lo["images_per_s_per_gpu"])
        assert hi["params"] == lo["params"]
    # Same backbone width and head: B/8 has B/16's parameters (but for position embeddings)
    # and several times its FLOPs per image (4x the tokens).
    b16, b8 = by[("ViT-B/16", 0.5)], by[("ViT-B/8", 0.5)]
    assert b8["params"] == pytest.approx(b16["params"], rel=0.01)
    assert b8["gflop_per_image"] > 3 * b16["gflop_per_image"]
    assert by[("ViT-S/16", 0.5)]["params"] < b16["params"]


@pytest.mark.integration
@pytest.mark.slow
def test_scaling_throughput_tiny_on_ray(tmp_path: Path, ray_cluster) -> None:
    out_file = tmp_path / "scaling.json"
    stdout = run_script(
        ["--tiny", "--no-model", "--address", ray_cluster.address, "--out", str(out_file)],
        timeout=540,
        env=ray_cluster.env(),
    )
    result = json.loads(out_file.read_text())
    t = result["throughput"]
    one, two = t["runs"]["1w"], t["runs"]["2w"]
    inputs = result["inputs"]
    # Strong scaling: the same global batch, split over the workers DDP really ran.
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_batch"] == two["global_batch"] == inputs["batch"]
    assert two["per_worker_batch"] * 2 == one["per_worker_batch"]
    for r in (one, two):
        assert r["steps_measured"] == inputs["steps"] - inputs["warmup"]
        assert r["images_per_s"] == pytest.approx(r["global_batch"] / r["step_time_s"])
        assert 0 <= r["data_wait_frac"] <= 1
    assert t["strong_speedup"] == pytest.approx(two["images_per_s"] / one["images_per_s"])
    assert t["strong_efficiency"] == pytest.approx(t["strong_speedup"] / 2)
    assert "2 workers / 1 worker" in stdout and "parallel efficiency" in stdout
    # Its temp dir (shards, run folders) is removed.
    work = re.search(r"work dir (\S+)", stdout).group(1)
    assert not Path(work).exists()
