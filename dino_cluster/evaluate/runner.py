"""Evaluate one checkpoint: `python -m dino_cluster.evaluate.runner --kind knn ...`.

What the watcher's submitters start (locally, or on a cluster through a backend), and what
`dino-cluster eval knn|linear` runs. Under torchrun-style environment variables every rank
takes part (features sharded across ranks); rank 0 records the results.

    --checkpoint URL   a run folder, the run's checkpoint root (with --step, default: the newest),
                       a step folder .../step-000000150, or an exported teacher .pth
    --init checkpoint|random|pixels
                       the trained teacher, or the same backbone randomly initialised, or
                       raw pixels: the two baselines a trained teacher must beat

Exit codes: 0 results recorded/printed, 1 evaluation failed, 2 bad input (spec, URL,
checkpoint contents), 4 the checkpoint does not exist (deleted by retention).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dino_cluster.checkpointing.layout import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    parse_step_dir,
)
from dino_cluster.evaluate.features import (
    CLSFeatures,
    EvalError,
    LinearProbeFeatures,
    PixelFeatures,
    backbone_state,
    build_eval_backbone,
    eval_transform,
    linear_recipe,
    load_backbone_weights,
)
from dino_cluster.evaluate.submit import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_GONE, EXIT_OK, KINDS
from dino_cluster.spec import JobSpec, SpecError, load_spec
from dino_cluster.storage import StorageOptions, open_url, split_url

log = logging.getLogger(__name__)

Init = Literal["checkpoint", "random", "pixels"]
_STEP_TAIL = re.compile(r"/(step-\d{9,})/?$")


@dataclass(frozen=True)
class CheckpointRef:
    """Where the weights come from: a checkpoint root + step, or an exported .pth file."""

    root: str | None
    step: int | None
    export_url: str | None = None


def parse_checkpoint(url: str, step: int | None = None) -> CheckpointRef:
    if not url:
        raise ValueError("--checkpoint must not be empty")
    if url.endswith((".pth", ".pt")):
        if step is not None:
            raise ValueError("--step does not apply to an exported .pth file")
        return CheckpointRef(None, None, export_url=url)
    url = _run_checkpoints(url)
    m = _STEP_TAIL.search(url)
    if m:
        at = parse_step_dir(m.group(1))
        if step is not None and step != at:
            raise ValueError(f"--step {step} contradicts the step folder in {url}")
        return CheckpointRef(url[: m.start()] or "/", at)
    return CheckpointRef(url.rstrip("/") or "/", step)


def _run_checkpoints(url: str) -> str:
    """A run folder (it has spec.resolved.yaml) stands for its checkpoint location."""
    if "://" in url and not url.startswith("file://"):
        return url
    folder = Path(url.removeprefix("file://"))
    resolved = folder / "spec.resolved.yaml"
    if folder.is_dir() and resolved.is_file() and not (folder / "manifest.json").exists():
        return load_spec(resolved).checkpoint_url
    return url


def load_teacher(
    ref: CheckpointRef, options: StorageOptions | None
) -> tuple[int | None, dict[str, torch.Tensor]]:
    """(step, teacher backbone state) from a committed checkpoint (verified) or an export."""
    if ref.export_url is not None:
        split_url(ref.export_url)  # validates; refuses credentials
        try:
            with open_url(ref.export_url, options) as f:
                doc = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no such file: {ref.export_url}") from None
        except Exception as exc:  # noqa: BLE001 - an unreadable or unsafe file
            raise EvalError(
                f"{ref.export_url} does not load with weights_only=True: {exc}"
            ) from exc
        if not isinstance(doc, dict):
            raise EvalError(f"{ref.export_url} holds a {type(doc).__name__}, not a dict")
        teacher = doc.get("teacher", doc)
        step = doc.get("step") if isinstance(doc.get("step"), int) else None
        return step, backbone_state(teacher, f"{ref.export_url} teacher")
    from dino_cluster.checkpointing import CheckpointManager

    manager = CheckpointManager(ref.root, storage_options=options, is_writer=False)
    step = ref.step if ref.step is not None else manager.latest_step()
    if step is None:
        raise CheckpointNotFoundError(f"no committed checkpoint under {ref.root}")
    loaded = manager.load(step, keys=["teacher"], fallback=False)
    if loaded is None:  # load(step) raises instead; kept for type checkers
        raise CheckpointNotFoundError(f"no committed checkpoint at step {step}")
    return step, backbone_state(loaded[1]["teacher"], f"step {step} teacher")


def storage_options(spec: JobSpec, endpoint_url: str | None = None) -> StorageOptions:
    """The spec's store options; `endpoint_url` (the job's --endpoint-url) wins."""
    options = StorageOptions.from_spec(spec.data.storage)
    return replace(options, endpoint_url=endpoint_url) if endpoint_url else options


def evaluate(
    spec: JobSpec,
    kind: str,
    checkpoint: str | None,
    **kwargs: Any,
) -> tuple[int | None, dict[str, Any]]:
    """Run evaluation `kind` and return (step, results); rank 0 records them beside the
    checkpoint when `record` and the weights came from a checkpoint root.

    Keyword arguments: step, init ("checkpoint" | "random" | "pixels"), record, options,
    batch_size, num_workers, linear_epochs, seed (default: the run's seed, so that
    init="random" is the run's own starting point). Uses `evaluation.cpus` threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, spec.evaluation.cpus))
    try:
        return _evaluate(spec, kind, checkpoint, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _reader(
    spec: JobSpec,
    url: str,
    info: Any,
    options: StorageOptions | None,
    batch_size: int,
    num_workers: int,
) -> Any:
    """This rank's part of a labelled shard set, through the evaluation transform."""
    from dino_cluster.data.labelled import build_labelled_reader

    return build_labelled_reader(
        url,
        transform=eval_transform(spec),
        batch_size=batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=num_workers,
        storage_options=options,
        max_image_pixels=spec.data.max_image_pixels,
    )


def _features(
    spec: JobSpec,
    kind: str,
    init: Init,
    ref: CheckpointRef | None,
    options: StorageOptions | None,
) -> tuple[torch.nn.Module, int | None]:
    """The feature extractor `kind` evaluates, and the checkpoint step it came from."""
    if init == "pixels":
        return PixelFeatures(), None
    at_step = None
    backbone = build_eval_backbone(spec)
    if init == "checkpoint":
        if ref is None:
            raise ValueError("--checkpoint is required (or --init random|pixels)")
        at_step, state = load_teacher(ref, options)
        load_backbone_weights(backbone, state)
    if kind == "knn":
        return CLSFeatures(backbone), at_step
    n_last, avgpool = linear_recipe(spec)
    return LinearProbeFeatures(backbone, n_last, avgpool), at_step


def _evaluate(
    spec: JobSpec,
    kind: str,
    checkpoint: str | None,
    *,
    step: int | None = None,
    init: Init = "checkpoint",
    record: bool = True,
    options: StorageOptions | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    linear_epochs: int | None = None,
    seed: int | None = None,
) -> tuple[int | None, dict[str, Any]]:
    from dino_cluster.evaluate.features import feature_dim
    from dino_cluster.evaluate.knn import run_knn
    from dino_cluster.evaluate.linear import run_linear
    from dino_cluster.train.distributed import init_distributed

    if kind not in KINDS:
        raise ValueError(f"unknown evaluation kind {kind!r}; valid: {', '.join(KINDS)}")
    ev = spec.evaluation
    if not (ev.train_url and ev.val_url):
        raise ValueError("evaluation.train_url and evaluation.val_url must be set in the spec")
    options = options or storage_options(spec)
    started = time.perf_counter()
    info = init_distributed(use_gpu=ev.gpus > 0 and torch.cuda.is_available())
    ref = parse_checkpoint(checkpoint, step) if checkpoint else None
    # The run's seed: `--init random` is then exactly the run's initial weights, so the
    # comparison shows what training added.
    seed = spec.run.seed if seed is None else seed
    torch.manual_seed(seed)
    features, at_step = _features(spec, kind, init, ref, options)
    features.to(info.device)
    dim = feature_dim(features, spec)
    readers = [
        _reader(spec, url, info, options, batch_size, num_workers)
        for url in (ev.train_url, ev.val_url)
    ]
    if kind == "knn":
        outcome = run_knn(
            features,
            readers[0],
            readers[1],
            ev.knn_k,
            device=info.device,
            temperature=ev.knn_temperature,
            feature_dim=dim,
        )
    else:
        outcome = run_linear(
            features,
            readers[0],
            readers[1],
            device=info.device,
            epochs=linear_epochs or ev.linear_epochs,
            batch_size=batch_size,
            feature_dim=dim,
            seed=seed,
        )
    results = outcome.as_results(
        init=init,
        world_size=info.world_size,
        device=str(info.device),
        seconds=round(time.perf_counter() - started, 2),
    )
    bad = {k: v for r in readers for k, v in r.bad.items()}
    if bad:
        results["info"]["bad_samples"] = bad
    if at_step is not None:
        results["info"]["step"] = at_step
    if record and info.is_main and at_step is not None and ref is not None and ref.root:
        from dino_cluster.checkpointing import CheckpointManager

        manager = CheckpointManager(ref.root, storage_options=options, is_writer=False)
        manager.record_eval(at_step, kind, results)
    return at_step, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.evaluate.runner")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--spec", required=True, help="job spec with an evaluation section")
    parser.add_argument(
        "--checkpoint", help="run folder, checkpoint root, step folder or exported .pth"
    )
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--init", choices=("checkpoint", "random", "pixels"), default="checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-record", action="store_true", help="print only; record nothing")
    parser.add_argument("--output", help="also write the results JSON to this local file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--linear-epochs", type=int, default=None)
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (else the spec's)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = load_spec(args.spec, args.set)
        step, results = evaluate(
            spec,
            args.kind,
            args.checkpoint,
            step=args.step,
            init=args.init,
            record=not args.no_record,
            options=storage_options(spec, args.endpoint_url),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            linear_epochs=args.linear_epochs,
        )
    except CheckpointNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_GONE
    except (SpecError, ValueError, EvalError, CheckpointCorruptError) as exc:
        # A damaged or non-finite checkpoint evaluates the same way every time: not retried.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - reported with its traceback; the watcher retries
        log.exception("evaluation failed")
        return EXIT_FAILED
    text = json.dumps({"step": step, "kind": args.kind, "results": results}, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
