"""The run record (RUN/launch.json): typed per backend, versioned, read through one function;
a record of another backend, another version or a damaged one is a one-line message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.launch.base import LaunchError, refuse_if_active
from dino_cluster.launch.run_record import (
    KubeRayRecord,
    LocalRecord,
    RayRecord,
    RunRecordError,
    SlurmRecord,
    read_record,
    resolve_run_dir,
    write_record,
)

RECORDS = [
    LocalRecord(pid=11, world_size=2, spec="/r/spec.resolved.yaml"),
    RayRecord(mode="driver", pid=13, address=None),
    RayRecord(mode="jobs", address="http://head:8265", job_id="dino-x-1"),
    SlurmRecord(via="submitit", job_id="42", log_pattern="/f/{job_id}_{rank}.out", world_size=8),
    KubeRayRecord(name="dino-x", namespace="ml"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{r.backend}")
def test_every_backend_record_round_trips(tmp_path: Path, record) -> None:  # noqa: ANN001
    write_record(tmp_path, record)
    doc = json.loads((tmp_path / "launch.json").read_text())
    assert doc["version"] == 2 and doc["backend"] == record.backend
    assert read_record(tmp_path) == record
    assert read_record(tmp_path, record.backend) == record


def test_a_record_of_another_backend_says_so_and_how_to_go_on(tmp_path: Path) -> None:
    write_record(tmp_path, RayRecord(mode="driver", pid=13))
    with pytest.raises(RunRecordError) as exc:
        read_record(tmp_path, "local")  # was: KeyError: 'pids'
    text = str(exc.value)
    assert "launched with the ray backend, not local" in text
    assert "--set run.name=NEW" in text and "\n" not in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no launch.json"),
        ("{not json", "damaged (not a JSON object)"),
        ("[1, 2]", "damaged (not a JSON object)"),
        (json.dumps({"backend": "local", "pids": [1], "world_size": 1}), "older dino-cluster"),
        (json.dumps({"version": 9, "backend": "slurm"}), "another dino-cluster"),
        (json.dumps({"version": 2, "backend": "local", "pid": "x"}), "damaged (pid"),
        (json.dumps({"version": 2, "backend": "ray", "mode": "jobs"}), "needs the job id"),
        (json.dumps({"version": 2, "backend": "k8s"}), "damaged"),
    ],
)
def test_unreadable_records_are_one_line_errors(tmp_path: Path, content, expected) -> None:  # noqa: ANN001
    if content is not None:
        (tmp_path / "launch.json").write_text(content)
    with pytest.raises(RunRecordError) as exc:
        read_record(tmp_path)
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, LaunchError)  # every command reports it like any launch error


def test_a_live_run_of_any_backend_keeps_its_folder(tmp_path: Path) -> None:
    # A driver that is alive (this process) makes the Ray run "running": no second run.
    write_record(tmp_path, RayRecord(mode="driver", pid=os.getpid()))
    with pytest.raises(LaunchError, match="running on the ray backend"):
        refuse_if_active(tmp_path)
    # An ended run (a pid that no longer exists) leaves the folder free for any backend.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    write_record(tmp_path, RayRecord(mode="driver", pid=int(done.stdout)))
    refuse_if_active(tmp_path)
    # So does a record this version cannot read.
    (tmp_path / "launch.json").write_text('{"backend": "local", "pids": [1]}')
    refuse_if_active(tmp_path)


def test_run_arguments_resolve_to_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert resolve_run_dir("a") == Path("runs") / "a"
    assert resolve_run_dir(str(tmp_path / "runs" / "a")) == tmp_path / "runs" / "a"
    with pytest.raises(RunRecordError, match="no such run folder"):
        resolve_run_dir("nope")


def test_status_of_an_old_record_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "launch.json").write_text(json.dumps({"backend": "local", "pids": [1]}))
    done = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "status", str(run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "older dino-cluster" in lines[0], done.stderr
