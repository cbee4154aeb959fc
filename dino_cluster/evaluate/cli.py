"""`dino-cluster eval`: evaluate one checkpoint (knn, linear) or watch a run (watch).

    dino-cluster eval knn --checkpoint URL --spec SPEC [--step N] [--init random|pixels]
    dino-cluster eval linear --checkpoint URL --spec SPEC [--epochs N]
    dino-cluster eval watch RUN [--once] [--poll S] [--max-attempts N] [--backend B]

Exit status as the runner: 0 ok, 1 failed, 2 bad input, 4 no such checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="k-NN / linear evaluation of checkpoints, and the watcher that queues them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
if TYPE_CHECKING:
    from dino_cluster.spec import JobSpec

console = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)

CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="A run folder, its checkpoint root (s3://... or folder), one step folder, or an "
        "exported teacher .pth.",
    ),
]
SpecOpt = Annotated[
    Path, typer.Option("--spec", "-s", help="Job spec with model + evaluation sections.")
]
StepOpt = Annotated[int | None, typer.Option("--step", help="Step to evaluate (default newest).")]
InitOpt = Annotated[
    str,
    typer.Option(
        "--init", help="checkpoint (the teacher), random (same backbone, untrained) or pixels."
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field (repeatable).")
]
RecordOpt = Annotated[
    bool, typer.Option("--record/--no-record", help="Record results beside the checkpoint.")
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Also write the results JSON here.")
]


def _argv(kind: str, checkpoint, spec, step, init, set_, record, output) -> list[str]:  # noqa: ANN001
    argv = ["--kind", kind, "--spec", str(spec), "--init", init]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    if step is not None:
        argv += ["--step", str(step)]
    for item in set_ or []:
        argv += ["--set", item]
    if not record:
        argv.append("--no-record")
    if output is not None:
        argv += ["--output", str(output)]
    return argv


@app.command()
def knn(
    checkpoint: CheckpointOpt = None,
    spec: SpecOpt = Path("jobs/eval-knn.yaml"),
    step: StepOpt = None,
    init: InitOpt = "checkpoint",
    set_: SetOpt = None,
    record: RecordOpt = True,
    output: OutputOpt = None,
) -> None:
    """Weighted k-NN top-1/top-5 of a checkpoint's frozen teacher backbone."""
    from dino_cluster.evaluate import runner

    raise typer.Exit(runner.main(_argv("knn", checkpoint, spec, step, init, set_, record, output)))


@app.command()
def linear(
    checkpoint: CheckpointOpt = None,
    spec: SpecOpt = Path("jobs/eval-knn.yaml"),
    step: StepOpt = None,
    init: InitOpt = "checkpoint",
    set_: SetOpt = None,
    record: RecordOpt = True,
    output: OutputOpt = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Default: the spec's evaluation.linear_epochs.")
    ] = None,
) -> None:
    """Linear probe (frozen backbone, the reference feature recipe, SGD + cosine)."""
    from dino_cluster.evaluate import runner

    argv = _argv("linear", checkpoint, spec, step, init, set_, record, output)
    if epochs is not None:
        argv += ["--linear-epochs", str(epochs)]
    raise typer.Exit(runner.main(argv))


# Backend states after which a run writes no more checkpoints (every backend's vocabulary).
ENDED_STATES = frozenset({"completed", "stopped", "failed", "cancelled", "canceled"})


def _finished(run_dir: Path):  # noqa: ANN202
    """A callable: has the run stopped producing checkpoints? (its backend's status verb;
    not launched yet, pending, requeued or unknown all mean "not yet")."""
    from dino_cluster.launch.base import LaunchError, run_backend
    from dino_cluster.launch.run_record import record_path

    log = logging.getLogger(__name__)

    def finished() -> bool:
        if not record_path(run_dir).exists():
            return False  # launched a moment later (the launcher starts us first)
        try:
            return run_backend(run_dir).status(run_dir) in ENDED_STATES
        except (LaunchError, ValueError, OSError) as exc:
            log.warning("run status unknown (%s); still watching", exc)
            return False

    return finished


def eval_backend(job: JobSpec, run_dir: Path, choice: str | None) -> str:
    """Where a run's evaluations go: `choice` (--backend), else `evaluation.backend`; auto =
    the backend the run was launched with (its record), else `launcher.backend`."""
    from dino_cluster.launch.base import LaunchError
    from dino_cluster.launch.run_record import read_record, record_path

    name = choice or job.evaluation.backend
    valid = ("auto", "local", "ray", "slurm")
    if name not in valid:
        raise ValueError(f"unknown evaluation backend {name!r}; valid: {', '.join(valid)}")
    if name != "auto":
        return name
    if record_path(run_dir).exists():
        try:
            return read_record(run_dir).backend
        except LaunchError:
            pass  # being rewritten, or an older record: the spec says the same
    return job.launcher.backend


@app.command()
def watch(
    run: Annotated[str, typer.Argument(help="Run folder, run name or job spec.")],
    once: Annotated[
        bool, typer.Option("--once", help="Evaluate what is pending now, then exit.")
    ] = False,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between polls.")] = 10.0,
    lease: Annotated[float, typer.Option("--lease", help="Claim lease in seconds.")] = 60.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Tries per eval.")] = 3,
    parallel: Annotated[int, typer.Option("--parallel", help="Evaluations at once.")] = 1,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help="knn/linear (default: the spec's kinds).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="Where evaluations run: auto (the run's backend), local, ray or slurm. "
            "Default: the spec's evaluation.backend.",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="Ray cluster (host:port) for --backend ray; default: the run's."
        ),
    ] = None,
) -> None:
    """Evaluate every committed checkpoint of RUN once per kind, until the run has ended.

    With --once: evaluate what can be claimed now, then exit.
    """
    from dino_cluster.evaluate.submit import BackendSubmitter
    from dino_cluster.evaluate.watcher import make_watcher
    from dino_cluster.launch.base import LaunchError, get_backend
    from dino_cluster.launch.run_record import resolve_run_dir
    from dino_cluster.spec import SpecError, load_spec

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_dir = resolve_run_dir(run)
        spec_path = run_dir / "spec.resolved.yaml"
        if not spec_path.exists():
            raise ValueError(f"{run_dir}: no spec.resolved.yaml (has the run started?)")
        job = load_spec(spec_path)
        name = eval_backend(job, run_dir, backend)
        submitter = BackendSubmitter(get_backend(name), job, run_dir, address=address)
        watcher, sink = make_watcher(
            job,
            spec_path,
            run_dir,
            submitter,
            kinds=kind,
            max_attempts=max_attempts,
            parallel=parallel,
            lease=lease,
            poll=poll,
        )
    except (SpecError, ValueError, LaunchError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"watching {run_dir}: evaluations run on the {name} backend", soft_wrap=True)
    started = time.time()
    try:
        stats = watcher.run(once=once, finished=_finished(run_dir))
    except KeyboardInterrupt:
        watcher.stop()
        raise typer.Exit(130) from None
    finally:
        sink.close()
    console.print(
        f"watcher done in {time.time() - started:.0f} s: {stats.done} evaluated, "
        f"{stats.failed} failed, {stats.skipped} skipped, {stats.failed_attempts} failed attempts"
    )
    if stats.failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
