"""SLURM backend logic that needs no cluster: the rendered sbatch script (golden files),
submitit parameters, state mapping, the torch.distributed environment from SLURM variables,
the requeue decision and the run-folder records.

Regenerate the golden files after an intended change:
    DINO_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_unit.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dino_cluster.launch.slurm import env as slurm_env
from dino_cluster.launch.slurm import job as slurm_job
from dino_cluster.launch.slurm.backend import SlurmBackend, explain_sbatch_error
from dino_cluster.launch.slurm.render import (
    JOB_BODY,
    format_time,
    render_sbatch,
    resources,
    sbatch_options,
    submitit_parameters,
)
from dino_cluster.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"

CPU_SPEC = [
    "launcher.backend=slurm",
    "launcher.procs_per_node=2",
    "optim.global_batch=64",
    "launcher.slurm.partition=debug",
    "launcher.slurm.cpus_per_task=1",
    "launcher.slurm.time_min=90",
    "launcher.slurm.signal_grace_s=30",
    "launcher.slurm.max_requeues=3",
    "launcher.slurm.folder=/shared/slurm",
    "launcher.python=/opt/venv/bin/python",
    'launcher.slurm.setup=["module load cuda/12.4", "source /opt/venv/bin/activate"]',
    "launcher.slurm.additional_parameters={exclude: node7, exclusive: true}",
]


def _without_embedded_spec(text: str) -> str:
    """The script with the embedded YAML replaced by a marker: the golden files pin the
    script, not every spec field other sections add (the embedding is tested on its own)."""
    head, _, rest = text.partition("<<'DINO_SPEC_EOF'\n")
    _, _, tail = rest.partition("\nDINO_SPEC_EOF\n")
    return f"{head}<<'DINO_SPEC_EOF'\n<the resolved job spec>\nDINO_SPEC_EOF\n{tail}"


def _check_golden(name: str, text: str) -> None:
    text = _without_embedded_spec(text)
    path = GOLDEN / name
    if os.environ.get("DINO_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with DINO_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"rendered script differs from {path}; if the change is intended, regenerate with "
        "DINO_UPDATE_GOLDEN=1"
    )


def test_render_vitb8_matches_golden_file() -> None:
    spec = load_spec(
        REPO / "jobs" / "vitb8.yaml",
        ["launcher.backend=slurm", "launcher.python=/opt/venv/bin/python"],
    )
    text = render_sbatch(spec)
    _check_golden("slurm_vitb8.sbatch", text)
    # The lines a reviewer checks first, independently of the golden file.
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480G",
        "#SBATCH --time=3-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ):
        assert line in text.splitlines()
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert '-m dino_cluster.train --spec "$DINO_SPEC"' in text
    assert "DINO_PYTHON=${DINO_PYTHON:-/opt/venv/bin/python}" in text.splitlines()
    # Unset, the job runs the interpreter that rendered it: never a `python3` from PATH.
    plain = render_sbatch(load_spec(REPO / "jobs" / "vitb8.yaml", ["launcher.backend=slurm"]))
    assert f"DINO_PYTHON=${{DINO_PYTHON:-{sys.executable}}}" in plain.splitlines()


def test_render_cpu_spec_matches_golden_file() -> None:
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", CPU_SPEC)
    text = render_sbatch(spec)
    _check_golden("slurm_cpu.sbatch", text)
    lines = text.splitlines()
    assert "#SBATCH --ntasks-per-node=2" in lines
    assert not any("gpus" in ln for ln in lines if ln.startswith("#SBATCH"))
    assert "#SBATCH --exclude=node7" in lines and "#SBATCH --exclusive" in lines
    assert "#SBATCH --time=01:30:00" in lines and "#SBATCH --signal=B:USR2@30" in lines
    # setup lines run before the job body, in order
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/venv/bin/activate")
    assert lines.index("source /opt/venv/bin/activate") < lines.index(JOB_BODY.splitlines()[0])
    assert "DINO_MAX_REQUEUES=3" in lines


def test_rendered_scripts_are_valid_bash_and_embed_the_resolved_spec(tmp_path: Path) -> None:
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", CPU_SPEC)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(spec))
    subprocess.run(["bash", "-n", str(script)], check=True)
    # Run only the preamble (up to the job body) to check the embedded spec round-trips.
    pre = render_sbatch(spec).split(JOB_BODY.splitlines()[0])[0]
    pre = "\n".join(ln for ln in pre.splitlines() if not ln.startswith(("module", "source")))
    env = dict(os.environ, SLURM_JOB_ID="77")
    subprocess.run(["bash", "-c", pre], cwd=tmp_path, env=env, check=True)
    written = load_spec(tmp_path / spec.run_dir / "spec.resolved.yaml")
    assert written == spec


def test_hand_wrapper_has_the_same_job_body() -> None:
    text = (REPO / "infra" / "slurm" / "dino.sbatch").read_text()
    begin, end = JOB_BODY.splitlines()[0], JOB_BODY.rstrip("\n").splitlines()[-1]
    assert text[text.index(begin) : text.index(end) + len(end)] + "\n" == JOB_BODY, (
        "infra/slurm/dino.sbatch's job body drifted from launch.slurm.render.JOB_BODY"
    )
    subprocess.run(["bash", "-n", str(REPO / "infra" / "slurm" / "dino.sbatch")], check=True)
    for opt in ("--signal=B:USR2@", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {opt}" in text


def test_submitit_parameters_follow_the_spec() -> None:
    spec = load_spec(
        REPO / "jobs" / "vitb8.yaml",
        [
            "launcher.backend=slurm",
            "launcher.slurm.account=proj1",
            "launcher.slurm.qos=high",
            "launcher.slurm.constraint=h100",
        ],
    )
    p = submitit_parameters(resources(spec))
    assert p["nodes"] == 4 and p["ntasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["cpus_per_task"] == 10 and p["mem"] == "480GB" and p["time"] == 4320
    assert (p["partition"], p["account"], p["qos"], p["constraint"]) == (
        "gpu",
        "proj1",
        "high",
        "h100",
    )
    assert p["signal_delay_s"] == 120 and p["additional_parameters"]["requeue"] is True
    cpu = submitit_parameters(resources(load_spec(REPO / "jobs" / "quickstart.yaml", CPU_SPEC)))
    assert cpu["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu
    assert cpu["setup"] == ["module load cuda/12.4", "source /opt/venv/bin/activate"]
    # submitit accepts every parameter we hand it (its own validation, no cluster needed)
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="true", folder="/tmp/x/%j", **cpu)
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --signal=USR2@30" in text


def test_dry_run_submits_nothing_and_shows_the_parameters(tmp_path: Path) -> None:
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", CPU_SPEC + [f"run.dir={tmp_path}"])
    result = SlurmBackend().submit(spec, dry_run=True)
    assert result.status == "dry-run" and result.job_id is None
    assert "ntasks_per_node: 2" in result.message and "#SBATCH --requeue" in result.message
    assert not (tmp_path / "quickstart").exists()


@pytest.mark.parametrize(
    ("minutes", "text"),
    [(1, "00:01:00"), (90, "01:30:00"), (1440, "1-00:00:00"), (4399, "3-01:19:00")],
)
def test_format_time(minutes: int, text: str) -> None:
    assert format_time(minutes) == text


def test_additional_parameters_override_generated_options() -> None:
    spec = load_spec(
        REPO / "jobs" / "quickstart.yaml",
        CPU_SPEC + ["launcher.slurm.additional_parameters={output: 'logs/%j.out'}"],
    )
    opts = dict(sbatch_options(resources(spec)))
    assert opts["output"] == "logs/%j.out"
    assert [k for k, _ in sbatch_options(resources(spec))].count("output") == 1


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ('launcher.slurm.partition="gpu\\n#SBATCH --x"', "launcher.slurm.partition"),
        ("launcher.slurm.account=''", "launcher.slurm.account"),
        (
            "launcher.slurm.additional_parameters={'Bad Key': 1}",
            "launcher.slurm.additional_parameters",
        ),
        ('launcher.slurm.setup=["a\\nb"]', "launcher.slurm.setup"),
        ("launcher.slurm.time_min=0", "launcher.slurm.time_min"),
        ("launcher.slurm.signal_grace_s=5", "launcher.slurm.signal_grace_s"),
    ],
)
def test_bad_slurm_settings_are_spec_errors(override: str, field: str) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec(REPO / "jobs" / "quickstart.yaml", [override])
    assert field in str(exc.value)


@pytest.mark.parametrize(
    ("state", "restarts", "ours"),
    [
        ("PENDING", 0, "pending"),
        ("PENDING", 2, "requeued"),
        ("RUNNING", 0, "running"),
        ("COMPLETING", 0, "running"),
        ("COMPLETED", 0, "completed"),
        ("PREEMPTED", 0, "requeued"),
        ("REQUEUED", 1, "requeued"),
        ("CANCELLED by 0", 0, "cancelled"),
        ("FAILED", 0, "failed"),
        ("TIMEOUT", 0, "failed"),
        ("NODE_FAIL", 0, "failed"),
        ("OUT_OF_MEMORY", 0, "failed"),
        ("", 0, "unknown"),
        ("SOMETHING_NEW", 0, "unknown"),
    ],
)
def test_state_mapping(state: str, restarts: int, ours: str) -> None:
    assert slurm_env.map_state(state, restarts) == ours


def test_expand_nodelist() -> None:
    assert slurm_env.expand_nodelist("localhost") == ["localhost"]
    assert slurm_env.expand_nodelist("gpu[01-03,7],login") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu7",
        "login",
    ]
    assert slurm_env.expand_nodelist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]
    with pytest.raises(ValueError):
        slurm_env.expand_nodelist("n[5-2]")


def test_torch_env_from_slurm_variables() -> None:
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_RESTART_COUNT": "2",
    }
    out = slurm_env.torch_env(env)
    assert out == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm_env.master_port(1234, 2)),
    }
    # every restart gets another port; all stay in the advertised range
    assert slurm_env.master_port(1234, 2) != slurm_env.master_port(1234, 1)
    assert all(
        20000 <= slurm_env.master_port(j, r) < 60000 for j in (0, 1, 39999, 10**7) for r in (0, 5)
    )
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        slurm_env.torch_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})


def test_master_port_matches_the_batch_script_formula() -> None:
    formula = re.search(r"MASTER_PORT=\$\(\( (.+) \)\)", JOB_BODY).group(1)
    for job_id, restarts in ((5, 0), (123457, 3), (39999, 1)):
        out = subprocess.run(
            ["bash", "-c", f"restarts={restarts}; SLURM_JOB_ID={job_id}; echo $(( {formula} ))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert int(out) == slurm_env.master_port(job_id, restarts)


@pytest.mark.parametrize(
    ("kw", "decision"),
    [
        ({"stopped": False}, "done"),
        ({"stopped": True, "cancel": True}, "cancel"),
        ({"stopped": True, "requeues": 3, "max_requeues": 3}, "cap"),
        ({"stopped": True, "job_state": "COMPLETING"}, "leave"),
        ({"stopped": True, "job_state": "RUNNING"}, "requeue"),
    ],
)
def test_requeue_decision(kw: dict, decision: str) -> None:
    args = {
        "stopped": True,
        "cancel": False,
        "requeues": 0,
        "max_requeues": 3,
        "job_state": "RUNNING",
        **kw,
    }
    assert slurm_env.requeue_decision(**args) == decision


def test_records_and_requeue_cap(tmp_path: Path) -> None:
    assert slurm_job.record_start(tmp_path, job_id="5", restarts=2, max_requeues=2)
    rec = slurm_env.read_requeues(tmp_path)
    assert rec["requeues"] == 2 and rec["max_requeues"] == 2 and rec["cap_reached"] is False
    slurm_env.request_cancel(tmp_path)
    assert slurm_job.record_start(tmp_path, job_id="5", restarts=1, max_requeues=2)
    assert slurm_env.cancel_requested(tmp_path), "a restart keeps a pending cancel request"
    assert slurm_job.record_start(tmp_path, job_id="6", restarts=0, max_requeues=2)
    assert not slurm_env.cancel_requested(tmp_path), "a new job clears an old cancel request"
    assert not slurm_job.record_start(tmp_path, job_id="5", restarts=3, max_requeues=2)
    assert slurm_env.read_requeues(tmp_path)["cap_reached"] is True


def test_decide_at_the_cap_records_it(tmp_path: Path) -> None:
    out = slurm_job.decide(tmp_path, code=3, job_id="999999", restarts=4, max_requeues=4)
    assert out == "cap"
    assert slurm_env.read_requeues(tmp_path)["cap_reached"] is True
    assert slurm_job.decide(tmp_path, code=0, job_id="999999", restarts=0, max_requeues=4) == "done"


def test_sbatch_errors_get_a_hint() -> None:
    r = resources(load_spec(REPO / "jobs" / "vitb8.yaml", ["launcher.backend=slurm"]))
    msg = explain_sbatch_error("sbatch: error: invalid partition specified: gpu", r)
    assert "nothing was submitted" in msg and "launcher.slurm.partition 'gpu'" in msg
    msg = explain_sbatch_error(
        "sbatch: error: Batch job submission failed: Requested node configuration is not available",
        r,
    )
    assert "8 GPU(s)" in msg and "launcher.gpus_per_node" in msg


def test_cli_render_prints_the_script_unchanged(tmp_path: Path) -> None:
    """`dino-cluster render SPEC --backend slurm > job.sbatch` must give a runnable script:
    no line wrapping by the console, whatever the terminal width."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dino_cluster.cli",
            "render",
            str(REPO / "jobs" / "vitb8.yaml"),
            "--backend",
            "slurm",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="60"),
    )
    assert out.returncode == 0, out.stderr
    expected = render_sbatch(load_spec(REPO / "jobs" / "vitb8.yaml", ["launcher.backend=slurm"]))
    assert out.stdout == expected
