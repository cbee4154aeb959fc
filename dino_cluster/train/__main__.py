"""Per-rank entry: `python -m dino_cluster.train --spec RUN/spec.resolved.yaml`.

Launchers that start processes themselves (local multi-process, SLURM srun, sbatch) run
this in every rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dino_cluster.spec import SpecError, load_spec
from dino_cluster.train.loop import NonFiniteLossError, train

EXIT_STOPPED = 3  # stopped by a signal after writing a checkpoint (requeue me)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.train")
    parser.add_argument("--spec", required=True, help="resolved job spec (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        result = train(spec)
        code = EXIT_STOPPED if result.status == "stopped" else 0
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
    finally:
        _write_exit(spec, code)
    return code


def _write_exit(spec, code: int) -> None:  # type: ignore[no-untyped-def]
    """Record how this rank ended, for `dino-cluster status` of detached local runs."""
    rank = os.environ.get("RANK", "0")
    exit_dir = spec.run_dir / "exit"
    exit_dir.mkdir(parents=True, exist_ok=True)
    (exit_dir / f"rank-{rank}.json").write_text(json.dumps({"code": code}))


if __name__ == "__main__":
    sys.exit(main())
