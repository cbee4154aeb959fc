"""The `dino-cluster` command.

    dino-cluster submit SPEC [--backend B] [--set KEY=VALUE ...] [--dry-run] [--detach]
    dino-cluster render SPEC [--backend B]
    dino-cluster validate SPEC [--set ...]
    dino-cluster status RUN | logs RUN [--follow] [--rank N] | cancel RUN
    dino-cluster checkpoints RUN
    dino-cluster data pack SRC DEST | data inspect URL
    dino-cluster eval knn|linear|watch ...
    dino-cluster visualize attention|neighbours CKPT ... -o DIR
    dino-cluster plot RUN -o FILE.png

Exit status: 0 success, 1 the run failed (or an unexpected error), 2 bad input: a mistake
named in one line, nothing created, spawned or submitted. `status` exits 0 for a running,
pending or completed run, 1 failed, 3 stopped or cancelled, 4 unknown. `--debug` (or
DINO_DEBUG=1) shows the traceback of an unexpected error.

Starting the command imports no torch, Ray or boto3: a command imports what it needs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dino_cluster import __version__
from dino_cluster.launch.base import BACKENDS, LaunchError, get_backend, run_backend
from dino_cluster.launch.run_record import resolve_run_dir
from dino_cluster.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="DINO self-supervised ViT pretraining on Ray, KubeRay, SLURM or this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)

DEBUG_ENV = "DINO_DEBUG"
# `status` exit codes: scripts can wait on a run with `until ! dino-cluster status RUN ...`.
STATUS_CODES = {"failed": 1, "stopped": 3, "cancelled": 3, "unknown": 4}

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec field, e.g. --set optim.epochs=10 (repeatable)."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help=f"Launcher backend: {', '.join(BACKENDS)}. Default: the spec's launcher.backend "
        "(ray when --address is given).",
    ),
]
RunArg = Annotated[str, typer.Argument(help="Run folder, run name under ./runs, or job spec.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    # The message is text from users and stores ("[/x]" in a key): never rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dino-cluster {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show tracebacks of unexpected errors (or {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _load(spec_path: Path, overrides: list[str] | None, backend: str | None) -> JobSpec:
    items = list(overrides or [])
    if backend is not None:
        if backend not in BACKENDS:
            raise _fail(f"--backend: unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        items.append(f"launcher.backend={backend}")
    try:
        return load_spec(spec_path, items)
    except SpecError as exc:
        raise _fail(str(exc)) from None


def _run_dir(run: str) -> Path:
    try:
        return resolve_run_dir(run)
    except LaunchError as exc:
        raise _fail(str(exc)) from None


def _address_items(address: str | None, backend: str | None) -> tuple[list[str], str | None]:
    """--address is a Ray cluster: it selects the ray backend unless another is named, and
    then it is a mistake rather than something to ignore."""
    if address is None:
        return [], backend
    if backend is None:
        backend = "ray"
    elif backend != "ray":
        raise _fail(
            f"--address {address} is a Ray cluster address; it does not apply to --backend "
            f"{backend} (drop one of them)"
        )
    return [f"launcher.ray.address={address}"], backend


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML, e.g. jobs/quickstart.yaml.")],
    backend: BackendOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be launched; launch nothing.")
    ] = False,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", "-d", help="Return once launched; follow with `dino-cluster logs`."
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster: http(s)://HEAD:8265 (Jobs API) or HOST:PORT / auto (driver "
            "here); selects the ray backend and sets launcher.ray.address.",
        ),
    ] = None,
) -> None:
    """Check SPEC and what it needs (data, checkpoint location, credentials, the backend),
    then launch the training run it describes."""
    from dino_cluster.launch.preflight import check_submit

    items, backend = _address_items(address, backend)
    job = _load(spec, list(set_ or []) + items, backend)
    try:
        check_submit(job, job.launcher.backend, dry_run=dry_run)
        be = get_backend(job.launcher.backend)
        result = be.submit(job, detach=detach, dry_run=dry_run)
    except (LaunchError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if dry_run:
        typer.echo(result.message, nl=False)
        return
    console.print(f"run folder: {result.run_dir}  job: {result.job_id}  status: {result.status}")
    from dino_cluster.metrics.summary import metrics_hint

    if hint := metrics_hint(job):
        console.print(hint, markup=False)
    if detach:
        console.print(f"follow with: dino-cluster logs {result.run_dir} --follow")
    if result.status == "failed":
        if result.message:
            err.print(result.message, markup=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def render(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    backend: BackendOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print what the backend would launch (sbatch script, RayJob manifest, commands)."""
    job = _load(spec, set_, backend)
    try:
        text = get_backend(job.launcher.backend).render(job)
    except (LaunchError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(text, nl=False)


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved spec.")] = False,
) -> None:
    """Check a job spec (exit 2 with the field and the reason when it is wrong)."""
    job = _load(spec, set_, None)
    if show:
        typer.echo(job.to_yaml(), nl=False)
    else:
        console.print(f"{spec}: ok ({job.launcher.backend}, world size {job.launcher.world_size})")


@app.command()
def status(run: RunArg) -> None:
    """Show whether a run is running, completed, stopped or failed, with its progress.

    Exit status: 0 running, pending or completed; 1 failed; 3 stopped or cancelled;
    4 unknown (the scheduler no longer knows the job).
    """
    from dino_cluster.metrics.summary import render_summary, summarize_run

    run_dir = _run_dir(run)
    try:
        backend = run_backend(run_dir)
        state = backend.status(run_dir)
    except LaunchError as exc:
        raise _fail(str(exc)) from None
    console.print(state)
    if state == "failed" and (why := backend.failure(run_dir)):
        typer.echo(f"why: {why}")
    typer.echo(render_summary(summarize_run(run_dir), running=state == "running"))
    raise typer.Exit(STATUS_CODES.get(state, 0))


@app.command()
def logs(
    run: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    rank: Annotated[
        int | None, typer.Option("--rank", help="Which rank's log (default 0).")
    ] = None,
) -> None:
    """Print a run's log."""
    run_dir = _run_dir(run)
    try:
        run_backend(run_dir).logs(run_dir, follow=follow, rank=rank)
    except LaunchError as exc:
        raise _fail(str(exc)) from None


@app.command()
def cancel(run: RunArg) -> None:
    """Stop a run; its ranks write a checkpoint first."""
    run_dir = _run_dir(run)
    try:
        run_backend(run_dir).cancel(run_dir)
    except LaunchError as exc:
        raise _fail(str(exc)) from None
    console.print(f"cancel requested: {run_dir}")


@app.command()
def checkpoints(
    run: Annotated[
        str,
        typer.Argument(
            help="Run folder, run name, job spec, or a checkpoint URL (s3://... or a folder)."
        ),
    ],
) -> None:
    """List a run's committed checkpoints (step, time, size, evaluation results)."""
    from dino_cluster.checkpointing import CheckpointManager, render_table
    from dino_cluster.storage import StorageError, StorageOptions

    folder = Path(run)
    if "://" in run or (folder.is_dir() and not (folder / "spec.resolved.yaml").exists()):
        url, options = run, StorageOptions()  # a checkpoint location itself
    else:
        run_dir = _run_dir(run)
        resolved = run_dir / "spec.resolved.yaml"
        if not resolved.exists():
            raise _fail(f"{run_dir}: no spec.resolved.yaml; pass the checkpoint URL instead")
        try:
            job = load_spec(resolved)
        except SpecError as exc:
            raise _fail(str(exc)) from None
        url, options = job.checkpoint_url, StorageOptions.from_spec(job.data.storage)
    try:
        manager = CheckpointManager(url, storage_options=options.interactive(), is_writer=False)
        infos = manager.list()
    except StorageError as exc:
        raise _fail(f"{url}: {exc.reason}") from None
    except (ValueError, OSError) as exc:
        raise _fail(f"{url}: {exc}") from None
    if not infos:
        console.print(f"{url}: no committed checkpoint")
        return
    console.print(render_table(infos))


def _mount_subcommands() -> None:
    from dino_cluster.data.cli import app as data_app
    from dino_cluster.evaluate.cli import app as eval_app
    from dino_cluster.visualize.cli import app as visualize_app
    from dino_cluster.visualize.cli import plot_command

    app.add_typer(data_app, name="data", help="Pack images into WebDataset shards; inspect them.")
    app.add_typer(eval_app, name="eval", help="Evaluate checkpoints (k-NN, linear); watch a run.")
    app.add_typer(
        visualize_app, name="visualize", help="Attention maps and nearest-neighbour grids (PNG)."
    )
    app.command("plot")(plot_command)


_mount_subcommands()


def main() -> None:
    """Entry point: every failure the commands do not explain is still one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3"):  # "found credentials in ..." is not news
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        text = " ".join(str(exc).split())
        err.print(
            f"error: {type(exc).__name__}: {text} (run with --debug or {DEBUG_ENV}=1 for the "
            "traceback)",
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
