"""Job specs: strict parsing, clear errors (file, dotted field, reason), exit 2, overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dino_cluster.cli import app
from dino_cluster.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

GOOD = """\
run: {name: t1, dir: RUNDIR}
model: {arch: vit_tiny_patch16_224, patch_size: 8, img_size: 32, depth: 2, out_dim: 64,
        hidden_dim: 32, bottleneck_dim: 16}
method: {crops: {global_size: 32, local_size: 16, n_local: 2}}
optim: {epochs: 1, global_batch: 8, base_lr: 5e-4, warmup_epochs: 0}
data: {url: data/none/index.json, num_workers: 0}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text.replace("RUNDIR", str(tmp_path / "runs")))
    return p


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.launcher.world_size >= 1
    assert spec.optim.global_batch % spec.launcher.world_size == 0 or spec.launcher.workers


def test_paper_recipes_numbers() -> None:
    s = load_spec(REPO / "jobs" / "vits16.yaml")
    assert s.optim.peak_lr == pytest.approx(5e-4 * 1024 / 256)
    assert s.method.crops.n_crops == 12 and s.model.out_dim == 65536
    b = load_spec(REPO / "jobs" / "vitb8.yaml")
    assert b.model.arch == "vit_base_patch8_224" and b.model.norm_last_layer
    assert b.launcher.nodes * b.launcher.gpus_per_node == 32
    assert b.optim.global_batch // 32 == 32  # 32 images per GPU


def test_defaults_are_the_reference_recipe(tmp_path: Path) -> None:
    s = load_spec(write(tmp_path, "data: {url: x}\n"))
    assert (s.method.student_temp, s.method.teacher_temp, s.method.center_momentum) == (
        0.1,
        0.04,
        0.9,
    )
    assert (s.method.teacher_momentum, s.method.teacher_momentum_final) == (0.996, 1.0)
    assert (s.optim.base_lr, s.optim.min_lr, s.optim.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (s.optim.weight_decay, s.optim.weight_decay_end, s.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert s.optim.freeze_last_layer == 1 and s.model.drop_path_rate == 0.1
    c = s.method.crops
    assert (c.global_size, c.local_size, c.n_local) == (224, 96, 8)
    assert c.global_scale == [0.4, 1.0] and c.local_scale == [0.05, 0.4]
    assert (s.model.hidden_dim, s.model.bottleneck_dim, s.model.head_layers) == (2048, 256, 3)


def test_set_overrides_and_yaml12_floats(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    s = load_spec(
        p,
        [
            "optim.epochs=7",
            "optim.min_lr=1e-5",
            "model.norm_last_layer=false",
            "method.crops.local_scale=[0.1, 0.3]",
        ],
    )
    assert s.optim.epochs == 7 and s.optim.min_lr == 1e-5
    assert s.model.norm_last_layer is False and s.method.crops.local_scale == [0.1, 0.3]
    assert isinstance(s.optim.base_lr, float) and s.optim.base_lr == 5e-4


BAD = [
    # (description, yaml edit (old, new) or full text, field expected in the message, reason part)
    ("unknown top-level key", ("run:", "runn: {}\nrun:"), "runn", "unknown key"),
    ("unknown nested key (typo)", ("epochs: 1", "epoch: 1"), "optim.epoch", "unknown key"),
    ("wrong type str for int", ("epochs: 1", "epochs: ten"), "optim.epochs", "integer"),
    ("float for int", ("global_batch: 8", "global_batch: 8.5"), "optim.global_batch", "integer"),
    ("negative lr", ("base_lr: 5e-4", "base_lr: -1.0"), "optim.base_lr", "greater than 0"),
    (
        "scale out of range",
        ("n_local: 2}", "n_local: 2, global_scale: [0.4, 1.5]}"),
        "method.crops.global_scale",
        "0 < min <= max <= 1",
    ),
    (
        "local bigger than global",
        ("local_size: 16", "local_size: 64"),
        "method.crops",
        "must not exceed",
    ),
    ("bad backend", ("optim:", "launcher: {backend: yarn}\noptim:"), "launcher.backend", "'local'"),
    (
        "warmup longer than training",
        ("warmup_epochs: 0", "warmup_epochs: 5"),
        "optim",
        "warmup_epochs (5) exceeds epochs (1)",
    ),
    (
        "batch not divisible by world",
        ("optim:", "launcher: {procs_per_node: 3}\noptim:"),
        "global_batch",
        "not divisible",
    ),
    ("run name escaping", ("name: t1", "name: ../evil"), "run.name", "letters, digits"),
    ("duplicate key", ("optim:", "model: {}\noptim:"), "duplicate key 'model'", "line"),
    (
        "missing data",
        ("data: {url: data/none/index.json, num_workers: 0}\n", ""),
        "data",
        "required",
    ),
    ("python tag", ("epochs: 1", "epochs: !!python/object:os.system 1"), "job.yaml", "tag"),
    (
        "elastic min > max",
        ("optim:", "launcher: {workers: {min: 4, max: 2}}\noptim:"),
        "launcher.workers",
        "min (4) exceeds max (2)",
    ),
    ("pipe url", ("url: data/none/index.json", "url: 'pipe:curl x'"), "data.url", "pipe:"),
    (
        "bool as string",
        ("optim:", "checkpoint: {resume: 'yes'}\noptim:"),
        "checkpoint.resume",
        "boolean",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_malformed_spec_exit_2_names_field(tmp_path: Path, case) -> None:
    _, (old, new), field, reason = case
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new, 1))
    result = runner.invoke(app, ["submit", str(p)])
    assert result.exit_code == 2, result.output
    out = result.output
    assert str(p) in out and field in out and reason in out, out
    assert not (tmp_path / "runs").exists(), "nothing may be created for a bad spec"


def test_bad_override_names_set(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    result = runner.invoke(app, ["validate", str(p), "--set", "optim.epochz=3"])
    assert result.exit_code == 2 and "optim.epochz" in result.output
    result = runner.invoke(app, ["validate", str(p), "--set", "optim.epochs"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_alias_bomb_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    with pytest.raises(SpecError, match="aliases"):
        load_spec(write(tmp_path, "\n".join(lines) + "\n"))


def test_console_script_exit_code(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("epochs: 1", "epochs: 0"))
    proc = subprocess.run(
        [sys.executable, "-m", "dino_cluster.cli", "validate", str(p)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "optim.epochs" in proc.stderr and "greater than 0" in proc.stderr


def test_dry_run_submits_nothing(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    result = runner.invoke(app, ["submit", str(p), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dino_cluster.train" in result.output
    assert not (tmp_path / "runs").exists()
