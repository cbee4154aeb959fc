"""End to end on real Fashion-MNIST: a quickstart-like training run on the local backend, a
watcher beside it starting real k-NN evaluations as subprocesses; every committed
checkpoint gets exactly one k-NN result. Also: the labelled reader and the runner's inputs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.data.labelled import build_labelled_reader, split_shards
from dino_cluster.dino.augment.reference import EvalTransform
from dino_cluster.evaluate import runner
from dino_cluster.evaluate.queue import EvalQueue
from dino_cluster.evaluate.submit import BackendSubmitter
from dino_cluster.evaluate.watcher import Watcher
from dino_cluster.launch.local import LocalBackend, run_status
from dino_cluster.spec import spec_from_dict
from dino_cluster.storage import open_store


@pytest.fixture(scope="module")
def fmnist_val(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> Path:
    """256 real Fashion-MNIST *test* images in 2 shards (the k-NN queries)."""
    from dino_cluster.data.pack import pack

    dest = tmp_path_factory.mktemp("fmnist-val")
    pack(str(fmnist_dir), str(dest), split="test", limit=256, max_samples_per_shard=128,
         progress=False)  # fmt: skip
    return dest / "index.json"


def tiny_spec(tmp_path: Path, train: Path, val: Path, **over: object) -> dict:
    doc = {
        "run": {"name": "evalrun", "dir": str(tmp_path / "runs")},
        "model": {
            "arch": "vit_tiny_patch16_224",
            "patch_size": 8,
            "img_size": 32,
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "out_dim": 128,
            "hidden_dim": 64,
            "bottleneck_dim": 32,
        },
        "method": {"crops": {"global_size": 32, "local_size": 16, "n_local": 2}},
        "optim": {"epochs": 1, "global_batch": 64, "warmup_epochs": 0, "max_steps": 6},
        "data": {"url": str(train), "num_workers": 0, "shuffle_buffer": 64},
        "checkpoint": {"every_steps": 3, "keep_last": 10},
        "evaluation": {
            "enabled": True,
            # Half the train shards as the bank, one val shard as queries: 512 x 128.
            "train_url": f"{train.parent}/shard-{{000000..000003}}.tar",
            "val_url": f"{val.parent}/shard-{{000000..000000}}.tar",
            "knn_k": [5, 20],
            "cpus": 1,
        },
        "metrics": {"log_every_steps": 3},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        doc[section][field] = value
    return doc


def test_labelled_reader_splits_ranks_disjointly_and_keeps_labels(fmnist_shards: Path) -> None:
    assert split_shards(list("abcdefgh"), 1, 3) == ["b", "e", "h"]
    t = EvalTransform(resize=37, crop=32)
    parts = [
        list(
            build_labelled_reader(
                str(fmnist_shards), transform=t, batch_size=100, rank=r, world_size=3, num_workers=w
            )
        )  # fmt: skip
        for r, w in ((0, 0), (1, 2), (2, 0))
    ]
    keys = [k for part in parts for b in part for k in b.keys]
    assert len(keys) == len(set(keys)) == 1024  # every sample once, across the 3 ranks
    labels = torch.cat([b.labels for part in parts for b in part])
    assert set(labels.tolist()) == set(range(10))
    assert parts[0][0].images.shape[1:] == (3, 32, 32)
    # Deterministic: two passes give the same order, images and labels.
    first, second = (
        list(
            itertools.islice(
                build_labelled_reader(str(fmnist_shards), transform=t, batch_size=32), 3
            )
        )  # fmt: skip
        for _ in range(2)
    )
    assert [k for b in first for k in b.keys] == [k for b in second for k in b.keys]
    assert torch.equal(first[2].images, second[2].images)
    assert torch.equal(first[2].labels, second[2].labels)


def test_runner_reports_bad_input_and_missing_checkpoints(tmp_path, fmnist_shards, fmnist_val):  # noqa: ANN001
    spec_path = tmp_path / "spec.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(tiny_spec(tmp_path, fmnist_shards, fmnist_val)))
    args = ["--kind", "knn", "--spec", str(spec_path), "--no-record"]
    empty = tmp_path / "no-checkpoints"
    assert runner.main([*args, "--checkpoint", str(empty)]) == 4  # nothing committed there
    assert runner.main(args) == 2  # no --checkpoint and no baseline asked for
    with pytest.raises(ValueError, match="contradicts"):
        runner.parse_checkpoint("s3://b/run/checkpoints/step-000000100", step=5)
    ref = runner.parse_checkpoint("s3://b/run/checkpoints/step-000000100/")
    assert (ref.root, ref.step) == ("s3://b/run/checkpoints", 100)


def test_training_run_gets_exactly_one_knn_result_per_checkpoint(
    tmp_path: Path, fmnist_shards: Path, fmnist_val: Path
) -> None:
    spec = spec_from_dict(tiny_spec(tmp_path, fmnist_shards, fmnist_val))
    result = LocalBackend().submit(spec, detach=True)
    run_dir = Path(result.run_dir)
    store = open_store(spec.checkpoint_url)
    watcher = Watcher(
        store,
        BackendSubmitter(LocalBackend(), spec, run_dir),
        kinds=["knn"],
        spec_path=str(run_dir / "spec.resolved.yaml"),
        lease_s=30,
        poll_s=0.5,
    )
    try:
        stats = watcher.run(finished=lambda: run_status(run_dir) != "running", deadline_s=400)
    finally:
        watcher.stop()
        if run_status(run_dir) == "running":
            LocalBackend().cancel(str(run_dir))
    assert run_status(run_dir) == "completed", (run_dir / "logs" / "rank-0.log").read_text()[-2000:]
    infos = CheckpointManager(spec.checkpoint_url, is_writer=False).list()
    assert [i.step for i in infos] == [3, 6]
    queue = EvalQueue(store, "knn")
    for info in infos:
        knn = info.evals["knn"]
        status = queue.read_status(info.step)
        assert status["state"] == "done" and status["attempts"] == 1, status
        assert status["results"] == knn
        assert knn["info"]["n_train"] == 512 and knn["info"]["n_val"] == 128
        assert knn["info"]["step"] == info.step
        assert 10.0 < knn["top1"] <= 100.0  # 10 classes: far above 0, a real number
    # The launcher started its own watcher beside the run (evaluation.enabled), so the two
    # watchers share the work: count evaluations across both (each local evaluation logs one
    # file per job, RUN/logs/eval/<kind>-step-N-attempt-A.log), not this watcher's stats.
    assert stats.started == stats.done  # what this watcher started, it finished
    jobs = sorted(p.name for p in (run_dir / "logs" / "eval").glob("knn-*.log"))
    assert jobs == [f"knn-step-{i.step}-attempt-1.log" for i in infos]  # one each, none twice
    # The table `dino-cluster checkpoints RUN` prints shows the results.
    from typer.testing import CliRunner

    from dino_cluster.cli import app as main_app

    table = CliRunner().invoke(main_app, ["checkpoints", str(run_dir)])
    assert table.exit_code == 0, table.output
    assert "knn" in table.output and "top1" in table.output  # may wrap at 80 columns
    # `dino-cluster eval watch RUN --once` on the finished run: nothing left to evaluate.
    from dino_cluster.evaluate.cli import app

    res = CliRunner().invoke(app, ["watch", str(run_dir), "--once", "--poll", "0.1"])
    assert res.exit_code == 0, res.output
    assert "0 evaluated, 0 failed" in res.output
    # The same architecture, randomly initialised, evaluated the same way (printed for
    # comparison; with 6 training steps the gap is too small to assert on).
    _, rand = runner.evaluate(spec, "knn", None, init="random", record=False)
    print(
        f"k-NN top-1 @20: trained {infos[-1].evals['knn']['top1']:.2f}, random {rand['top1']:.2f}"
    )


def test_linear_probe_and_pixel_baseline_through_the_runner(
    tmp_path: Path, fmnist_shards: Path, fmnist_val: Path
) -> None:
    spec = spec_from_dict(tiny_spec(tmp_path, fmnist_shards, fmnist_val))
    from dino_cluster.evaluate.features import LinearProbeFeatures, build_eval_backbone

    probe = LinearProbeFeatures(
        build_eval_backbone(spec), n_last_blocks=2, avgpool_patch_tokens=False
    )
    assert probe(torch.zeros(3, 3, 32, 32)).shape == (3, 2 * 32)  # CLS of both blocks
    _, lin = runner.evaluate(spec, "linear", None, init="random", record=False, linear_epochs=2)
    info = lin["info"]
    assert info["epochs"] == 2 and info["n_train"] == 512 and info["n_val"] == 128
    assert 0.0 <= lin["top1"] <= lin["top5"] <= 100.0
    _, pix = runner.evaluate(spec, "knn", None, init="pixels", record=False)
    print(f"linear (random init, 2 epochs) {lin['top1']:.2f}; raw-pixel k-NN {pix['top1']:.2f}")
    assert pix["top1"] > 50.0  # Fashion-MNIST pixels alone are a strong k-NN baseline
