"""The shipped monitoring configuration, checked with the real tools: promtool accepts
infra/prometheus/prometheus.yml, its service discovery finds the files it promises to
(dino ranks' file-SD targets, Ray's discovery file from the default temp dir and from the
private Ray's link in the SD folder) without mixing the two jobs, and the Grafana dashboard's
per-rank panels tell every rank apart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra" / "prometheus"
DASHBOARD = REPO / "infra" / "grafana" / "dino-cluster.json"
# Ray's own name for it (ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE).
RAY_SD_FILE = "prom_metrics_service_discovery.json"


def _promtool() -> str:
    from fixtures.prometheus import ensure_prometheus

    ensure_prometheus()
    return shutil.which("promtool") or pytest.fail("promtool missing (Debian prometheus)")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """The shipped config and rules in a folder of their own, with its targets/ folders."""
    folder = tmp_path / "prometheus"
    (folder / "targets" / "ray").mkdir(parents=True)
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(INFRA / name, folder / name)
    return folder


def _discover(promtool: str, config: Path, job: str, cwd: Path) -> list[dict]:
    """`promtool check service-discovery`: the targets the job would scrape, after
    relabelling. It waits the whole timeout for discovery updates, hence a short one."""
    proc = subprocess.run(
        [promtool, "check", "service-discovery", "--timeout=2s", str(config), job],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout or "[]")


def test_promtool_accepts_the_shipped_config(config_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [_promtool(), "check", "config", str(config_dir / "prometheus.yml")],
        cwd=tmp_path,  # relative paths are the config folder's, not the caller's
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid prometheus config file syntax" in proc.stdout


def test_a_file_sd_glob_in_a_folder_name_is_refused(tmp_path: Path) -> None:
    """Why the private Ray's file is linked into the SD folder: its own folder,
    /tmp/dino-ray-XXXXXXXX, cannot be matched by a pattern (Prometheus 2.42)."""
    config = tmp_path / "p.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "scrape_configs": [
                    {
                        "job_name": "ray",
                        "file_sd_configs": [{"files": [f"/tmp/dino-ray-*/{RAY_SD_FILE}"]}],
                    }
                ]
            }
        )
    )
    proc = subprocess.run(
        [_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "not valid for file discovery" in proc.stdout + proc.stderr


def test_the_ray_job_finds_the_private_and_default_ray_discovery_files(
    config_dir: Path, tmp_path: Path
) -> None:
    promtool = _promtool()
    config = config_dir / "prometheus.yml"
    doc = yaml.safe_load(config.read_text())
    (ray_job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "ray"]
    files = [f for sd in ray_job["file_sd_configs"] for f in sd["files"]]
    # A Ray started with the default temp dir writes it there.
    assert f"/tmp/ray/{RAY_SD_FILE}" in files

    # The private Ray's file as its link in the SD folder: Ray's own content (labels
    # job=ray), named after the Ray's temp dir.
    ray_target = "127.0.0.1:45123"
    private = tmp_path / "dino-ray-abc12345"
    private.mkdir()
    (private / RAY_SD_FILE).write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": [ray_target]}])
    )
    (config_dir / "targets" / "ray" / "dino-ray-abc12345.json").symlink_to(private / RAY_SD_FILE)
    # And a dino rank's own targets file (PrometheusSink.write_targets).
    rank_target = "127.0.0.1:9464"
    (config_dir / "targets" / "vitb8-rank-0.json").write_text(
        json.dumps([{"targets": [rank_target], "labels": {"run": "vitb8", "rank": "0"}}])
    )

    found = _discover(promtool, config, "ray", cwd=tmp_path)
    assert [t["labels"]["__address__"] for t in found] == [ray_target]
    assert found[0]["labels"]["job"] == "ray"
    # The dino-cluster job sees the ranks only, not Ray's link in targets/ray/.
    ranks = _discover(promtool, config, "dino-cluster", cwd=tmp_path)
    assert [t["labels"]["__address__"] for t in ranks] == [rank_target]
    assert ranks[0]["labels"]["job"] == "dino-cluster"


# -- Grafana ------------------------------------------------------------------------------------

# Series only one rank exports: evaluations and store state (rank 0's store feed,
# train/assemble._store_feed) and upload times (the checkpoint writer, train/loop.py).
ONE_RANK = {
    "dino_eval_top1",
    "dino_eval_checkpoint_step",
    "dino_eval_failed",
    "dino_checkpoint_upload_seconds",
}


def _targets() -> list[tuple[str, dict]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t) for p in dash["panels"] for t in p.get("targets", [])]


def test_per_rank_panels_tell_every_rank_apart() -> None:
    """A query that keeps each rank's series (no aggregation, not pinned to rank 0) must
    name the rank in its legend: 8 ranks of a pod would otherwise share one legend."""
    per_rank = []
    for title, target in _targets():
        expr, legend = target["expr"], target.get("legendFormat", "")
        aggregated = re.search(r"\b(sum|max|min|avg|count)\s+by\s*\(", expr)
        pinned = 'rank="0"' in expr
        names = set(re.findall(r"\b(dino_[a-z0-9_]+)", expr))
        if aggregated or pinned or not names or names <= ONE_RANK or not legend:
            continue
        per_rank.append(title)
        assert "{{rank}}" in legend, f"{title}: {expr} keeps every rank; legend {legend!r}"
    # The panels that compare ranks are among them.
    for title in ("Loss", "Mean step time per rank", "Data wait (fraction of time)"):
        assert title in per_rank
