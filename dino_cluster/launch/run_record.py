"""The record of a submitted run (RUN/launch.json): the one owner of that file.

A backend writes it when it launches a run (the SLURM job rewrites it when it starts, so a
hand-submitted sbatch script gets one too); `status`, `logs`, `cancel`, the evaluation
watcher and `submit` (is this run folder busy?) read it, always through `read_record`. It is
typed per backend and versioned:

    {"version": 2, "backend": "local",   "started": ..., "pid": ..., "world_size": 2}
    {"version": 2, "backend": "ray",     "mode": "driver", "pid": ..., "address": null}
    {"version": 2, "backend": "ray",     "mode": "jobs", "address": "http://..", "job_id": ..}
    {"version": 2, "backend": "slurm",   "via": "submitit", "job_id": "17", "log_pattern": ..}
    {"version": 2, "backend": "kuberay", "name": "dino-vitb8", "namespace": "ml"}

A record from another backend, an older dino-cluster or a damaged file is a `RunRecordError`
whose message says what the record is and how to go on (reuse the folder by submitting again,
or pick another run name); never a KeyError. No torch, no Ray, no boto3 here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from dino_cluster.launch.errors import LaunchError

RECORD_FILE = "launch.json"
VERSION = 2  # 1: the unversioned launch.json of dino-cluster 0.1.0


class RunRecordError(LaunchError):
    """RUN/launch.json is missing, damaged, from another version or from another backend."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[2] = VERSION
    started: float = Field(default_factory=time.time)
    spec: str | None = None  # the resolved spec the run was started from


class LocalRecord(_Record):
    backend: Literal["local"] = "local"
    pid: int  # the process supervising the ranks on this machine
    world_size: int


class RayRecord(_Record):
    backend: Literal["ray"] = "ray"
    mode: Literal["driver", "jobs"]
    address: str | None = None  # driver: GCS host:port (None: private Ray); jobs: its URL
    pid: int | None = None  # driver mode: the driver process here
    job_id: str | None = None  # jobs mode: the submission id

    @model_validator(mode="after")
    def _mode_fields(self) -> RayRecord:
        if self.mode == "driver" and self.pid is None:
            raise ValueError("a driver-mode record needs the driver's pid")
        if self.mode == "jobs" and not (self.job_id and self.address):
            raise ValueError("a jobs-mode record needs the job id and the Jobs API address")
        return self


class SlurmRecord(_Record):
    backend: Literal["slurm"] = "slurm"
    via: Literal["submitit", "sbatch"]
    job_id: str
    log_pattern: str  # "{job_id}" and "{rank}" placeholders
    world_size: int
    folder: str | None = None  # submitit's job folder
    grace_s: int | None = None  # --signal lead time: how long a checkpoint may take


class KubeRayRecord(_Record):
    backend: Literal["kuberay"] = "kuberay"
    name: str
    namespace: str


RunRecord = Annotated[
    LocalRecord | RayRecord | SlurmRecord | KubeRayRecord, Field(discriminator="backend")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunRecord)

_HOW_TO_GO_ON = (
    "submit the spec again to reuse this run folder (training resumes from its checkpoints), "
    "or start a separate run with --set run.name=NEW"
)


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_FILE


def write_record(run_dir: str | Path, record: _Record) -> Path:
    """Write RUN/launch.json atomically (a reader sees the old record or the new one)."""
    path = record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_record(run_dir: str | Path, backend: str | None = None) -> Any:
    """The run's record; `backend`: the record must be that backend's. RunRecordError with a
    one-line message otherwise (the returned object is one of the *Record classes)."""
    path = record_path(run_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunRecordError(
            f"{run_dir}: no {RECORD_FILE}: this folder holds no submitted run "
            "(`dino-cluster submit SPEC` starts one)"
        ) from None
    except OSError as exc:
        raise RunRecordError(f"{path}: cannot read the run record: {exc}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RunRecordError(
            f"{path}: the run record is damaged (not a JSON object); {_HOW_TO_GO_ON}"
        )
    version = doc.get("version", 1)
    if version != VERSION:
        what = doc.get("backend", "unknown")
        age = "an older" if isinstance(version, int) and version < VERSION else "another"
        raise RunRecordError(
            f"{path}: a {what} run record written by {age} dino-cluster (record version "
            f"{version}, this one reads {VERSION}); {_HOW_TO_GO_ON}"
        )
    try:
        record = _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if loc and loc[0] == doc.get("backend"):  # the union's tag, not a field
            loc = loc[1:]
        where = ".".join(loc) or "(top level)"
        raise RunRecordError(
            f"{path}: the run record is damaged ({where}: {first['msg']}); {_HOW_TO_GO_ON}"
        ) from None
    if backend is not None and record.backend != backend:
        raise RunRecordError(
            f"{run_dir} was launched with the {record.backend} backend, not {backend}: "
            f"`dino-cluster status|logs|cancel {run_dir}` follow its own backend; {_HOW_TO_GO_ON}"
        )
    return record


def resolve_run_dir(arg: str) -> Path:
    """A command's RUN argument: a run folder, a run name under ./runs, or a job spec file
    (its run folder). RunRecordError (one line) when it is none of them."""
    path = Path(arg)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in {".yaml", ".yml"}:
        from dino_cluster.spec import SpecError, load_spec

        try:
            return load_spec(path).run_dir
        except SpecError as exc:
            raise RunRecordError(str(exc)) from None
    candidate = Path("runs") / arg
    if candidate.is_dir():
        return candidate
    raise RunRecordError(f"{arg}: no such run folder, run name under ./runs, or job spec")
