"""Pictures: attention maps, nearest-neighbour grids and run plots, on a tiny quickstart-shaped
checkpoint saved in the real layout (no training), real Fashion-MNIST shards, one S3 case."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.dino.model import build_backbone, set_attention
from dino_cluster.evaluate.results import EvalResult
from dino_cluster.spec import load_spec, write_resolved
from dino_cluster.visualize import VisualizeError
from dino_cluster.visualize.attention import cls_attention
from dino_cluster.visualize.cli import app, plot_command
from dino_cluster.visualize.draw import colormap, grid_size, nice_ticks
from dino_cluster.visualize.neighbours import StreamingTopK
from dino_cluster.visualize.plot import load_curves
from dino_cluster.visualize.source import VisImage

REPO = Path(__file__).resolve().parents[1]
# The quickstart's model (patch 8, img 32, width 128, 4 heads) with 2 blocks and a small head.
TINY = [
    "model.depth=2",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "evaluation.enabled=false",
]
HEADS = 4
STEP = 5


def tiny_spec(run_dir: Path, shards: Path, *extra: str):
    return load_spec(
        REPO / "jobs" / "quickstart-vit.yaml",
        [f"run.dir={run_dir}", "run.name=vis", f"data.url={shards}", *TINY, *extra],
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fmnist_shards: Path) -> Path:
    """A run folder: spec.resolved.yaml and one committed checkpoint (random weights)."""
    from dino_cluster.train.assemble import build_models

    spec = tiny_spec(tmp_path_factory.mktemp("runs"), fmnist_shards)
    write_resolved(spec, spec.run_dir)
    torch.manual_seed(0)
    student, teacher = build_models(spec.model)
    with CheckpointManager(spec.checkpoint_url) as manager:
        state = {"student": student.state_dict(), "teacher": teacher.state_dict()}
        manager.save(STEP, state, blocking=True)
    return spec.run_dir


def invoke(cli: typer.Typer, *args: str):  # noqa: ANN201
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_picture(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        assert im.mode == "RGB"
        pixels = np.asarray(im, dtype=np.float64)
    assert pixels.var() > 0  # not blank
    return pixels


def test_the_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, dino_cluster.visualize.cli\n"
        "heavy = ('torch', 'numpy', 'PIL', 'matplotlib', 'timm', 'boto3')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# ----------------------------------------------------------------------------------- attention


def test_cls_attention_is_timms_own_attention() -> None:
    torch.manual_seed(0)
    bb = build_backbone(
        "vit_tiny_patch16_224", patch_size=8, img_size=32, embed_dim=32, num_heads=4, depth=2
    ).eval()
    # timm's explicit path hands its softmax(q k^T) to attn_drop: capture what timm computed
    set_attention(bb, "eager")
    seen = {}
    bb.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.update(p=o))
    for side, grid in ((32, 4), (16, 2), (24, 3)):
        x = torch.randn(2, 3, side, side + 8)
        maps = cls_attention(bb, x)
        assert maps.shape == (2, 4, grid, grid + 1)
        torch.testing.assert_close(maps, seen["p"][:, :, 0, 1:].reshape(maps.shape))
        # the CLS row sums to one over all tokens: the patches get all but its self-attention
        assert torch.all(maps.sum(dim=(2, 3)) < 1) and torch.all(maps >= 0)
    # with the fused kernel the maps are the same; a module that computes differently is
    # refused instead of drawn (sdpa ignores a changed `scale`, the recomputation does not)
    x = torch.randn(1, 3, 32, 32)
    eager = cls_attention(bb, x)
    set_attention(bb, "sdpa")
    torch.testing.assert_close(cls_attention(bb, x), eager)
    bb.blocks[-1].attn.scale *= 2
    with pytest.raises(VisualizeError, match="does not compute"):
        cls_attention(bb, x)


def test_attention_command_on_shards_and_files(tiny_run: Path, fmnist_shards: Path, tmp_path):
    # a file that is not square and not a multiple of the patch: 45 x 70 RGB
    ramp = np.linspace(0, 255, 45 * 70 * 3).reshape(45, 70, 3).astype(np.uint8)
    photo = tmp_path / "photo.png"
    Image.fromarray(ramp).save(photo)
    out = tmp_path / "att"
    done = invoke(
        app, "attention", tiny_run, photo, "--shards", fmnist_shards, "--count", 2, "-o", out,
        "--tile", 64,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [
        "photo-attention.png",
        "shard-000000-000000000-attention.png",
        "shard-000000-000000001-attention.png",
    ]
    size = grid_size(1, 2 + HEADS, 64, title=True)  # image, mean, 4 heads
    for f in files:
        pixels = assert_picture(f, size)
        # every head tile differs from the plain image tile: an overlay was drawn
        image_tile, head_tile = pixels[30:60, 6:70], pixels[30:60, 6 + 2 * 70 : 70 + 2 * 70]
        assert np.abs(image_tile - head_tile).mean() > 5
    assert f"({size[0]}x{size[1]}, {HEADS} heads)" in done.output
    # a step folder and --size: the model sees 64-px images (reference-interpolated pos-embed)
    step_dir = tiny_run / "checkpoints" / f"step-{STEP:09d}"
    done = invoke(app, "attention", step_dir, photo, "-o", tmp_path / "big", "--size", 64)
    assert done.exit_code == 0, done.output
    assert_picture(tmp_path / "big" / "photo-attention.png", grid_size(1, 6, 160, title=True))


def test_attention_mistakes_are_one_line_and_exit_2(tiny_run: Path, tmp_path: Path) -> None:
    photo = tmp_path / "p.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(photo)
    cases = [
        ((tmp_path / "nope", photo), "no such run folder"),
        ((tiny_run, tmp_path / "missing.png"), "no such image file"),
        ((tiny_run,), "give image files"),
        ((tiny_run, photo, "--step", 7), "no committed checkpoint at step 7"),
        ((tmp_path, photo), "spec.resolved.yaml"),  # a folder that is no run: --spec needed
    ]
    for args, message in cases:
        done = invoke(app, "attention", *args, "-o", tmp_path / "o")
        assert done.exit_code == 2, (args, done.output)
        assert message in done.stderr and "Traceback" not in done.output
        assert len(done.stderr.strip().splitlines()) == 1
    # a spec that does not describe the checkpoint: named as such, not a traceback
    other = tmp_path / "other.yaml"
    spec = load_spec(tiny_run / "spec.resolved.yaml", ["model.depth=3"])
    other.write_text(spec.to_yaml())
    done = invoke(app, "attention", tiny_run, photo, "--spec", other, "-o", tmp_path / "o")
    assert done.exit_code == 2 and "spec's model section" in done.stderr
    not_image = tmp_path / "text.png"
    not_image.write_text("hello")
    done = invoke(app, "attention", tiny_run, not_image, "-o", tmp_path / "o")
    assert done.exit_code == 2 and "not a usable image" in done.stderr


# ---------------------------------------------------------------------------------- neighbours


def test_streaming_top_k_equals_the_full_top_k() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    images = [VisImage(str(i), torch.zeros(3, 4, 4), key=f"k{i}") for i in range(50)]
    top = StreamingTopK(q, 5, exclude=[None, "k7", None])
    for i in range(0, 50, 16):
        top.add(bank[i : i + 16], images[i : i + 16])
    sims = q @ bank.T
    sims[1, 7] = -math.inf
    expected = sims.topk(5, dim=1)
    for row in range(3):
        got = top.matches(row)
        assert [m.item.key for m in got] == [f"k{i}" for i in expected.indices[row].tolist()]
        np.testing.assert_allclose([m.similarity for m in got], expected.values[row], rtol=1e-6)
    assert len(top.items) <= 15  # only the current winners' thumbnails are kept


def test_neighbours_against_the_fmnist_bank(tiny_run: Path, fmnist_shards: Path, tmp_path):
    out = tmp_path / "nb"
    done = invoke(
        app, "neighbours", tiny_run, "--bank", fmnist_shards, "--count", 3, "-k", 4,
        "--bank-limit", 200, "-o", out, "--tile", 48,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert_picture(out / "neighbours.png", grid_size(3, 5, 48, title=True))
    doc = json.loads((out / "neighbours.json").read_text())
    assert len(doc) == 3
    classes = json.loads(fmnist_shards.read_text()).get("classes")
    for row in doc:
        sims = [n["similarity"] for n in row["neighbours"]]
        assert len(sims) == 4 and sims == sorted(sims, reverse=True)
        assert all(-1 - 1e-5 <= s <= 1 + 1e-5 for s in sims)
        assert row["query"] not in {n["key"] for n in row["neighbours"]}  # itself left out
        assert row["label"] is not None and all(n["label"] for n in row["neighbours"])
        if classes:
            assert row["label"] in classes
    # query files against the bank: nothing is left out
    photo = tmp_path / "q.png"
    Image.open(out / "neighbours.png").crop((6, 20, 54, 68)).save(photo)
    done = invoke(
        app, "neighbours", tiny_run, "--bank", fmnist_shards, "--queries", photo, "-k", 2,
        "--bank-limit", 64, "-o", tmp_path / "nb2",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert_picture(tmp_path / "nb2" / "neighbours.png", grid_size(1, 3, 96, title=True))
    done = invoke(app, "neighbours", tiny_run, "--bank", tmp_path / "none", "-o", tmp_path / "x")
    assert done.exit_code == 2 and "none" in done.stderr


def test_pictures_from_shards_and_a_checkpoint_on_s3(
    s3_server, tiny_run: Path, fmnist_dir, tmp_path
):
    from dino_cluster.data.pack import pack

    bucket = s3_server.new_bucket("vis")
    shards = f"s3://{bucket}/shards"
    pack(str(fmnist_dir), shards, limit=12, max_samples_per_shard=6, progress=False,
         storage_options=s3_server.options)  # fmt: skip
    # the checkpoint too: copied object by object into the bucket, the spec given with --spec
    src = CheckpointManager(str(tiny_run / "checkpoints"), is_writer=False)
    step, state = src.load(STEP, keys=["teacher"])
    with CheckpointManager(f"s3://{bucket}/ckpt", storage_options=s3_server.options) as dst:
        dst.save(step, {"teacher": state["teacher"]}, blocking=True)
    spec = tiny_run / "spec.resolved.yaml"
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    done = invoke(
        app, "attention", f"s3://{bucket}/ckpt", "--shards", f"{shards}/index.json", "--count",
        1, "-o", tmp_path / "att", "--spec", spec, "--tile", 32, *endpoint,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    (png,) = (tmp_path / "att").glob("*.png")
    assert_picture(png, grid_size(1, 2 + HEADS, 32, title=True))
    done = invoke(
        app, "neighbours", tiny_run, "--bank", shards, "--count", 2, "-k", 3, "-o",
        tmp_path / "nb", "--tile", 32, *endpoint,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert_picture(tmp_path / "nb" / "neighbours.png", grid_size(2, 4, 32, title=True))
    keys = [n["key"] for r in json.loads((tmp_path / "nb" / "neighbours.json").read_text())
            for n in r["neighbours"]]  # fmt: skip
    assert all(k.startswith(f"s3://{bucket}/shards/") for k in keys)


# ------------------------------------------------------------------------------------ plot


def write_metrics(run: Path) -> None:
    rows = []
    for step in range(0, 101, 10):
        rows.append(
            {
                "step": step,
                "time": 1.0 + step,
                "loss": "nan" if step == 50 else 5.5 - step / 50,
                "teacher_entropy": 5.0 - step / 100,
                "student_teacher_kl": "inf" if step == 60 else 0.5 / (1 + step),
                "lr": 1e-3 * min(1.0, step / 20),
            }
        )
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 110, "loss": 3.'  # cut short
    (run / "metrics.jsonl").write_text(text)
    evals = [{"step": 40, "time": 0.0, "eval/knn/top1": 41.5, "eval/knn/top5": 80.0}]
    (run / "metrics-eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


def test_plot_draws_the_run_with_nan_strings_and_store_records(
    tiny_run: Path, fmnist_shards: Path, tmp_path: Path
) -> None:
    # evaluation records beside the checkpoint count too (what `checkpoints` shows)
    manager = CheckpointManager(str(tiny_run / "checkpoints"), is_writer=False)
    result = EvalResult("knn", STEP, top1=12.5, top5=50.0, k=20, by_k={20: (12.5, 50.0)})
    manager.record_eval(STEP, "knn", result.to_json())
    spec = tiny_spec(tmp_path / "runs", fmnist_shards, f"checkpoint.url={tiny_run / 'checkpoints'}")
    write_resolved(spec, spec.run_dir)
    write_metrics(spec.run_dir)
    curves = load_curves(spec.run_dir)
    assert curves.out_dim == 256
    assert curves.non_finite == {"loss": 1, "teacher_entropy": 0, "student_teacher_kl": 1, "lr": 0}
    assert len(curves.train["loss"][0]) == 11  # the line being written is skipped
    assert curves.evals == {"knn": {STEP: 12.5, 40: 41.5}}
    out = tmp_path / "plots" / "run.png"
    done = invoke(app, "plot", spec.run_dir, "-o", out)
    assert done.exit_code == 0, done.output
    assert_picture(out, (1200, 900))
    done = invoke(app, "plot", spec.run_dir, "-o", tmp_path / "small.png", "--size", "640x480",
                  "--no-store")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert_picture(tmp_path / "small.png", (640, 480))


def test_plot_mistakes_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for args, message in (
        ((empty,), "no metrics to plot"),
        ((tmp_path / "absent",), "no such run folder"),
        ((empty, "--size", "12"), "WIDTHxHEIGHT"),
        ((empty, "--spec", tmp_path / "none.yaml"), "no such spec file"),
    ):
        done = invoke(app, "plot", *args, "-o", tmp_path / "p.png")
        assert done.exit_code == 2, (args, done.output)
        assert message in done.stderr and "Traceback" not in done.output
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert invoke(app, "plot", empty, "-o", tmp_path / "p.png", "--size", "50x50").exit_code == 2


def test_the_commands_mount_as_the_top_level_cli_does(tmp_path: Path) -> None:
    # exactly the lines dino_cluster/cli.py's _mount_subcommands adds
    top = typer.Typer(no_args_is_help=True, add_completion=False)
    top.callback()(lambda: None)
    top.add_typer(app, name="visualize", help="Attention maps, nearest neighbours, run plots.")
    top.command("plot")(plot_command)
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run)
    done = invoke(top, "plot", run, "-o", tmp_path / "p.png")
    assert done.exit_code == 0, done.output
    assert_picture(tmp_path / "p.png", (1200, 900))
    helped = invoke(top, "visualize", "--help")
    assert helped.exit_code == 0 and "attention" in helped.output and "neighbours" in helped.output


# ------------------------------------------------------------------------------------ drawing


def test_colormap_and_ticks() -> None:
    lut = colormap(np.array([0.0, 0.5, 1.0, -1.0, 2.0, np.nan]))
    assert lut.dtype == np.uint8 and lut.shape == (6, 3)
    assert tuple(lut[0]) == (68, 1, 84) and tuple(lut[2]) == (253, 231, 37)
    assert tuple(lut[3]) == tuple(lut[0]) and tuple(lut[4]) == tuple(lut[2])
    assert nice_ticks(0, 930) == [0, 200, 400, 600, 800]
    assert nice_ticks(0.0, 1e-3)[-1] == pytest.approx(1e-3)
    assert nice_ticks(1.0, 1.0) == [1.0]
