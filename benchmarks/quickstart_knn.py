"""Does a recipe learn features? Train a job file (default `jobs/quickstart.yaml`) and print
the k-NN top-1 of its final teacher next to the same backbone at random initialisation and
raw pixels, all three evaluated identically, plus the teacher entropy and the
teacher-student KL at the end of training (the collapse signals).

    python benchmarks/quickstart_knn.py [--job jobs/quickstart.yaml] [--queries 2000]
                                        [--workdir DIR] [--set KEY=VALUE ...]
    python benchmarks/quickstart_knn.py --job jobs/quickstart-long.yaml

Data: the README's quickstart shards (the first 6,000 Fashion-MNIST training images, 1,000 per
shard) as the training set and the k-NN bank, and the first `--queries` test images as
queries, packed into the work dir from `--source`. `--set` overrides job values (e.g.
`--set optim.epochs=6`) to try a recipe without editing the file. The evaluation is the
job's own `evaluation` section (k values, k-NN temperature) on the run's resolved spec, so
its model section always matches the checkpoint; the run's watcher is off, all three are
evaluated here, after training. It takes the job's training time plus about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
# Rows of metrics.jsonl averaged for the end-of-training entropy and KL (one row per
# `metrics.log_every_steps`): one row is a single batch's value, a few are steadier.
END_ROWS = 5


def end_of_training(metrics: Path, rows: int = END_ROWS) -> dict[str, float]:
    """Teacher entropy and KL(teacher || student) at the end of a run: the last logged row
    and the mean of the last `rows` rows of its metrics.jsonl."""
    logged = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not logged:
        raise ValueError(f"{metrics}: no logged rows")
    tail = logged[-rows:]
    out = {"step": float(logged[-1]["step"])}
    for key in ("teacher_entropy", "student_teacher_kl", "loss"):
        out[key] = float(logged[-1][key])
        out[key + "_mean"] = sum(float(r[key]) for r in tail) / len(tail)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(QUICKSTART), help="job spec to train")
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--queries", type=int, default=2000, help="test images used as queries")
    ap.add_argument("--workdir", default=None, help="keep data and run here (default: a tmp dir)")
    ap.add_argument("--cpus", type=int, default=2, help="threads for the evaluations")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.queries < 1:
        ap.error("--queries must be >= 1")

    from dino_cluster.data.pack import pack
    from dino_cluster.evaluate.runner import evaluate
    from dino_cluster.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="dino-qs-knn-") as tmp:
        root = Path(args.workdir or tmp).resolve()
        train_idx = root / "fmnist" / "index.json"
        val_idx = root / f"fmnist-test-{args.queries}" / "index.json"
        if not train_idx.exists():
            pack(args.source, str(train_idx.parent), limit=6000, max_samples_per_shard=1000)
        if not val_idx.exists():
            pack(args.source, str(val_idx.parent), split="test", limit=args.queries)
        runs = root / "runs"
        # Evaluated below, all three the same way: no watcher beside the run.
        overrides = [f"run.dir={runs}", f"data.url={train_idx}", "evaluation.enabled=false"]
        overrides += args.set
        job = Path(args.job).resolve()
        cmd = [sys.executable, "-m", "dino_cluster.cli", "submit", str(job)]
        for item in overrides:
            cmd += ["--set", item]
        t0 = time.monotonic()
        print("training:", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=root, check=False).returncode != 0:
            print(f"the {job.name} run failed", file=sys.stderr)
            return 1
        train_s = time.monotonic() - t0
        run_dir = runs / load_spec(job, overrides).run.name
        # The run's own resolved spec: its model section is the checkpoint's.
        spec = load_spec(
            run_dir / "spec.resolved.yaml",
            [
                f"evaluation.train_url={train_idx}",
                f"evaluation.val_url={val_idx}",
                f"evaluation.cpus={args.cpus}",
            ],
        )
        end = end_of_training(run_dir / "metrics.jsonl")
        rows = []
        for init in ("checkpoint", "random", "pixels"):
            ckpt = str(run_dir / "checkpoints") if init == "checkpoint" else None
            step, res = evaluate(spec, "knn", ckpt, init=init, record=False)
            rows.append((init, step, res["by_k"]))
    print(
        f"\n{job.name} ({spec.model.arch}, {spec.optim.epochs} epochs) trained in {train_s:.0f} s"
    )
    uniform = math.log(spec.model.out_dim)
    print(
        f"end of training (step {end['step']:.0f}, mean of the last {END_ROWS} logged rows): "
        f"teacher entropy {end['teacher_entropy_mean']:.2f} nats "
        f"({end['teacher_entropy_mean'] / uniform:.2f} x ln({spec.model.out_dim}) = "
        f"{uniform:.2f}), KL(teacher || student) {end['student_teacher_kl_mean']:.2f}"
    )
    print(f"k-NN top-1 (bank: 6,000 training images, queries: {args.queries} test images)")
    ks = sorted(rows[0][2], key=int)
    print(f"{'features':<28}" + "".join(f"{'k=' + k:>9}" for k in ks))
    names = {"checkpoint": "trained teacher", "random": "random init", "pixels": "raw pixels"}
    for init, step, by_k in rows:
        label = names[init] + (f" (step {step})" if init == "checkpoint" else "")
        print(f"{label:<28}" + "".join(f"{by_k[k]['top1']:>8.2f}%" for k in ks))
    if "20" in ks:
        trained, random, pixels = (r[2]["20"]["top1"] for r in rows)
        print(f"trained - random at k=20: {trained - random:+.2f} points")
        print(f"trained - pixels at k=20: {trained - pixels:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
