"""Newcomer mistakes, each as a user makes it: the real `dino-cluster` command in a fresh
folder, against a real S3 endpoint (with and without credentials), real Ray addresses and
the real SLURM dev cluster where the mistake involves them. Every one must end with exit
status 2, one line that names the thing to fix, no traceback, and nothing created in the
folder or left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "jobs" / "quickstart.yaml")
VITB8 = str(REPO / "jobs" / "vitb8.yaml")
NO_EVAL = ("--set", "evaluation.enabled=false")  # the quickstart evaluates data/fmnist-test
NO_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a test's own folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(cmd)
    return found


def mistake(
    cwd: Path, *args: str, needles: tuple[str, ...], env: dict | None = None, code: int = 2
) -> str:
    """Run the command; check the exit code, one line naming every needle, no traceback,
    nothing new in `cwd`, nothing left running. Returns the line."""
    before = _tree(cwd)
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(env if env is not None else os.environ, COLUMNS="400"),
    )
    took = time.monotonic() - t0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    what = f"dino-cluster {' '.join(args)} (exit {done.returncode}, {took:.1f} s):\n{done.stderr}"
    assert done.returncode == code, what
    assert "Traceback" not in done.stderr + done.stdout, what
    assert len(lines) == 1 and lines[0].startswith("error: "), what
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing: {what}"
    assert _tree(cwd) == before, f"it created {_tree(cwd) - before}: {what}"
    assert not _our_processes(str(cwd)), f"left running: {_our_processes(str(cwd))}"
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    folder = tmp_path / "newcomer"
    folder.mkdir()
    return folder


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("submit", "jobs/nope.yaml"), ("jobs/nope.yaml", "file not found")),
        (("submit", QUICKSTART, "--backend", "k8s"), ("--backend", "'k8s'", "local, ray")),
        (("render", QUICKSTART, "-b", "slurmm"), ("'slurmm'", "valid:")),
        (("submit", QUICKSTART, "--set", "optim.epochs"), ("--set optim.epochs", "KEY=VALUE")),
        (("submit", QUICKSTART, "--set", "optim.epoch=3"), ("optim.epoch", "unknown key")),
        (("validate", QUICKSTART, "--set", "optim.base_lr=fast"), ("optim.base_lr", "'fast'")),
        (("validate", QUICKSTART, "--set", "optim.epochs=0"), ("optim.epochs", "greater than 0")),
        (("validate", QUICKSTART, "--set", "run.name=../up"), ("run.name", "'../up'")),
        (
            ("submit", QUICKSTART, "--address", "http://127.0.0.1:1", "--backend", "local"),
            ("--address", "does not apply to --backend local"),
        ),
        (("submit", VITB8, "--backend", "local", "--dry-run"), ("launcher.nodes=4", "slurm")),
        (
            ("submit", QUICKSTART, "--set", "launcher.gpus_per_node=1"),
            ("launcher.gpus_per_node=1", "--set launcher.gpus_per_node=0"),
        ),
        (("status", "nothing-here"), ("nothing-here", "no such run folder")),
        (("logs", "nothing-here"), ("nothing-here", "no such run folder")),
        (("cancel", "nothing-here"), ("nothing-here", "no such run folder")),
    ],
    ids=lambda v: (
        " ".join(v)
        if isinstance(v, tuple)
        and v
        and v[0] in ("submit", "render", "validate", "status", "logs", "cancel")
        else None
    ),  # fmt: skip
)
def test_command_line_mistakes(fresh: Path, args: tuple[str, ...], needles: tuple) -> None:
    mistake(fresh, *args, needles=needles)


def test_spec_files_that_are_not_specs(fresh: Path) -> None:
    (fresh / "binary.yaml").write_bytes(b"\x00\xff\xfe garbage \x81")
    mistake(fresh, "validate", "binary.yaml", needles=("binary.yaml",))
    (fresh / "list.yaml").write_text("- a\n- b\n")
    mistake(fresh, "validate", "list.yaml", needles=("list.yaml", "mapping"))
    (fresh / "tabs.yaml").write_text("run:\n\tname: x\n")
    mistake(fresh, "validate", "tabs.yaml", needles=("tabs.yaml", "invalid YAML"))
    (fresh / "folder.yaml").mkdir()
    mistake(fresh, "validate", "folder.yaml", needles=("folder.yaml", "cannot read"))


def test_credentials_in_a_storage_url_are_refused_and_not_echoed(fresh: Path) -> None:
    line = mistake(
        fresh,
        "validate",
        QUICKSTART,
        "--set",
        "data.storage.endpoint_url=http://AKIAEXAMPLE:s3cr3t@host:9000",
        needles=("data.storage.endpoint_url", "credentials"),
    )
    assert "s3cr3t" not in line and "AKIAEXAMPLE" not in line


# -- data and the run folder --------------------------------------------------------------


def test_data_that_is_not_a_shard_set(fresh: Path, fmnist_shards: Path) -> None:
    shards = fmnist_shards.parent
    mistake(
        fresh, "submit", QUICKSTART, needles=("data.url", "data/fmnist", "dino-cluster data pack")
    )
    mistake(fresh, "submit", QUICKSTART, "--set", "data.url=nowhere/",
            needles=("shards and no index.json", "nowhere"))  # fmt: skip
    one = f"data.url={shards / 'shard-000000.tar'}"
    mistake(fresh, "submit", QUICKSTART, "--set", one, needles=("is a file, not a shard set",))
    brace = f"data.url={shards}/shard-{{000000..000099}}.tar"
    mistake(fresh, "submit", QUICKSTART, "--set", brace, needles=("shard-000099.tar", "not exist"))
    (fresh / "bad").mkdir()
    (fresh / "bad" / "index.json").write_text("{not json")
    mistake(fresh, "submit", QUICKSTART, "--set", "data.url=bad", needles=("index.json", "JSON"))
    mistake(
        fresh,
        "submit",
        QUICKSTART,
        "--set",
        f"data.url={fmnist_shards}",
        "--set",
        f"evaluation.train_url={fmnist_shards}",
        "--set",
        "evaluation.val_url=missing/index.json",
        needles=("evaluation.val_url", "missing/index.json", "does not exist"),
    )


def test_a_checkpoint_location_that_cannot_be_written(fresh: Path, fmnist_shards: Path) -> None:
    (fresh / "afile").write_text("x")
    mistake(
        fresh,
        "submit",
        QUICKSTART,
        "--set",
        f"data.url={fmnist_shards}",
        "--set",
        "checkpoint.url=afile/checkpoints",
        *NO_EVAL,
        needles=("checkpoint.url", "is a file, not a folder"),
    )


def test_run_folders_that_cannot_be_read_or_reused(fresh: Path, fmnist_shards: Path) -> None:
    from dino_cluster.launch.run_record import LocalRecord, RayRecord, write_record

    run = fresh / "runs" / "quickstart"
    run.mkdir(parents=True)
    (run / "launch.json").write_text(json.dumps({"backend": "local", "pids": [1]}))
    mistake(fresh, "status", "quickstart", needles=("older dino-cluster", "run.name=NEW"))
    (run / "launch.json").write_text("{half a reco")
    mistake(fresh, "logs", "quickstart", needles=("damaged", "launch.json"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    write_record(run, LocalRecord(pid=int(ended.stdout), world_size=1))
    mistake(fresh, "logs", "quickstart", "--rank", "5", needles=("rank 5", "world size 1"))
    # A run of another backend that is still running keeps its folder.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_record(run, RayRecord(mode="driver", pid=alive.pid))
        mistake(
            fresh,
            "submit",
            QUICKSTART,
            "--set",
            f"data.url={fmnist_shards}",
            "--set",
            "evaluation.enabled=false",
            needles=("running on the ray backend", "cancel"),
        )
    finally:
        alive.kill()
        alive.wait()


# -- S3 -------------------------------------------------------------------------------------


def _env_without_credentials(tmp: Path, endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NO_AWS}
    empty = tmp / "no-aws"
    empty.write_text("")
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_CONFIG_FILE=str(empty),
    )
    return env


@pytest.mark.integration
def test_s3_mistakes(fresh: Path, tmp_path: Path, s3_server) -> None:
    bucket = s3_server.new_bucket("fc")
    data = f"data.url=s3://{bucket}/shards"
    with_creds = dict(os.environ, AWS_ENDPOINT_URL=s3_server.endpoint_url)
    # No credentials at all: said before anything starts, naming the standard variables.
    no_creds = _env_without_credentials(tmp_path, s3_server.endpoint_url)
    line = mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, env=no_creds,
                   needles=("data.url", "no AWS credentials", "AWS_ACCESS_KEY_ID"))  # fmt: skip
    assert "AWS_PROFILE" in line
    mistake(fresh, "checkpoints", f"s3://{bucket}/ckpt", env=no_creds,
            needles=("no AWS credentials",))  # fmt: skip
    # Credentials, but nothing at the URL, or no such bucket.
    mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, env=with_creds,
            needles=("data.url", f"s3://{bucket}/shards", "shards and no index.json"))  # fmt: skip
    mistake(fresh, "submit", QUICKSTART, "--set", "data.url=s3://no-such-bucket-x/shards",
            *NO_EVAL, env=with_creds, needles=("data.url", "bucket does not exist"))  # fmt: skip
    # An endpoint that does not answer: a message in seconds, not minutes of retries.
    dead = dict(with_creds, AWS_ENDPOINT_URL="http://127.0.0.1:1")
    t0 = time.monotonic()
    mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, env=dead,
            needles=("cannot connect to http://127.0.0.1:1", "AWS_ENDPOINT_URL"))  # fmt: skip
    mistake(fresh, "checkpoints", f"s3://{bucket}/ckpt", env=dead,
            needles=("cannot connect",))  # fmt: skip
    assert time.monotonic() - t0 < 60


# -- Ray addresses --------------------------------------------------------------------------


@pytest.mark.integration
def test_ray_addresses_that_answer_nothing_fail_at_once(fresh: Path, fmnist_shards: Path) -> None:
    data = f"data.url={fmnist_shards}"
    t0 = time.monotonic()
    mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, "--address", "127.0.0.1:1",
            needles=("no Ray cluster answers at 127.0.0.1:1", "--address"))  # fmt: skip
    mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, "--address", "http://127.0.0.1:1",
            needles=("no Ray Jobs API answers", "http://127.0.0.1:1"))  # fmt: skip
    mistake(fresh, "submit", QUICKSTART, "--set", data, *NO_EVAL, "--address", "head-without-port",
            needles=("'head-without-port'", "HOST:PORT"))  # fmt: skip
    assert time.monotonic() - t0 < 60


@pytest.mark.integration
def test_a_jobs_api_that_wants_a_token_says_so(fresh: Path, fmnist_shards: Path, ray_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN_PATH"] = str(fresh / "no-token-here")
    mistake(fresh, "submit", QUICKSTART, "--set", f"data.url={fmnist_shards}", *NO_EVAL,
            "--address", ray_cluster.dashboard_url, env=env,
            needles=("refused our token", "RAY_AUTH_TOKEN"))  # fmt: skip


# -- SLURM ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_slurm_requests_the_cluster_cannot_run(fresh: Path, fmnist_shards: Path, slurm_cluster):
    data = f"data.url={fmnist_shards}"
    mistake(fresh, "submit", QUICKSTART, "-b", "slurm", "--set", data, *NO_EVAL,
            "--set", "launcher.slurm.partition=nope",
            needles=("launcher.slurm.partition 'nope' does not exist",))  # fmt: skip
    mistake(fresh, "submit", QUICKSTART, "-b", "slurm", "--set", data, *NO_EVAL,
            "--set", "launcher.gpus_per_node=64", "--set", "optim.global_batch=64",
            needles=("GPU",))  # fmt: skip
