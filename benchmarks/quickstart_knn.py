"""Does the quickstart learn features? Train the shipped `jobs/quickstart.yaml` and print the
k-NN top-1 of its final teacher next to the same backbone at random initialisation and raw
pixels, all evaluated identically with `jobs/eval-knn.yaml`.

    python benchmarks/quickstart_knn.py [--job jobs/quickstart.yaml] [--queries 2000]
                                        [--workdir DIR] [--set KEY=VALUE ...]

Data: the README's quickstart shards (the first 6,000 Fashion-MNIST training images, 1,000 per
shard) as the k-NN bank, and the first `--queries` test images as queries, packed into the
work dir from `--source`. `--set` overrides quickstart values (e.g. `--set optim.epochs=6`)
to try a recipe without editing the file. It takes the quickstart's training time (several
minutes on 2 CPU cores) plus about a minute of feature extraction.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
EVAL_SPEC = REPO / "jobs" / "eval-knn.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(QUICKSTART), help="job spec to train (quickstart model)")
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--queries", type=int, default=2000, help="test images used as queries")
    ap.add_argument("--workdir", default=None, help="keep data and run here (default: a tmp dir)")
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
            print("the quickstart run failed", file=sys.stderr)
            return 1
        train_s = time.monotonic() - t0
        shipped = load_spec(job, args.set)
        checkpoints = runs / shipped.run.name / "checkpoints"
        spec = load_spec(
            EVAL_SPEC,
            [
                f"run.dir={runs}",
                f"data.url={train_idx}",
                f"evaluation.train_url={train_idx}",
                f"evaluation.val_url={val_idx}",
            ],
        )
        rows = []
        for init in ("checkpoint", "random", "pixels"):
            ckpt = str(checkpoints) if init == "checkpoint" else None
            step, res = evaluate(spec, "knn", ckpt, init=init, record=False)
            rows.append((init, step, res["by_k"]))
    print(f"\n{job.name} trained in {train_s:.0f} s")
    print(f"k-NN top-1 (bank: 6,000 training images, queries: {args.queries} test images)")
    ks = sorted(rows[0][2], key=int)
    print(f"{'features':<28}" + "".join(f"{'k=' + k:>9}" for k in ks))
    names = {"checkpoint": "trained teacher", "random": "random init", "pixels": "raw pixels"}
    for init, step, by_k in rows:
        label = names[init] + (f" (step {step})" if init == "checkpoint" else "")
        print(f"{label:<28}" + "".join(f"{by_k[k]['top1']:>8.2f}%" for k in ks))
    gain = rows[0][2]["20"]["top1"] - rows[1][2]["20"]["top1"] if "20" in ks else float("nan")
    print(f"trained - random at k=20: {gain:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
