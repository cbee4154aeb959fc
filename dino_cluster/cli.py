"""The `dino-cluster` command.

    dino-cluster submit SPEC [--backend B] [--set KEY=VALUE ...] [--dry-run] [--detach]
    dino-cluster render SPEC [--backend B]
    dino-cluster validate SPEC [--set ...]
    dino-cluster status RUN | logs RUN [--follow] [--rank N] | cancel RUN
    dino-cluster checkpoints RUN
    dino-cluster data pack SRC DEST

Exit status: 0 success, 1 the job failed, 2 bad input (nothing was submitted).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dino_cluster.launch.base import BACKENDS, LaunchError, get_backend, run_backend
from dino_cluster.launch.run_record import resolve_run_dir
from dino_cluster.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="DINO self-supervised ViT pretraining on Ray, KubeRay, SLURM or this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec field, e.g. --set optim.epochs=10 (repeatable)."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        "-b",
        help=f"Launcher backend: {', '.join(BACKENDS)}. Default: the spec's launcher.backend.",
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


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
            "here); sets launcher.ray.address.",
        ),
    ] = None,
) -> None:
    """Validate SPEC and launch the training run it describes."""
    items = list(set_ or []) + ([f"launcher.ray.address={address}"] if address else [])
    job = _load(spec, items, backend)
    try:
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
def status(run: Annotated[str, typer.Argument(help="Run folder, run name or job spec.")]) -> None:
    """Show whether a run is running, completed, stopped or failed."""
    from dino_cluster.metrics.summary import render_summary, summarize_run

    run_dir = _run_dir(run)
    try:
        console.print(run_backend(run_dir).status(run_dir))
    except LaunchError as exc:
        raise _fail(str(exc)) from None
    typer.echo(render_summary(summarize_run(run_dir)))


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="Run folder, run name or job spec.")],
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
def cancel(run: Annotated[str, typer.Argument(help="Run folder, run name or job spec.")]) -> None:
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
    from dino_cluster.storage import StorageOptions

    if "://" in run:
        url, options = run, None
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
        infos = CheckpointManager(url, storage_options=options, is_writer=False).list()
    except (ValueError, OSError) as exc:
        raise _fail(f"{url}: {exc}", code=1) from None
    if not infos:
        console.print(f"{url}: no committed checkpoint")
        return
    console.print(render_table(infos))


def _mount_subcommands() -> None:
    from dino_cluster.data.cli import app as data_app
    from dino_cluster.evaluate.cli import app as eval_app

    app.add_typer(data_app, name="data", help="Pack images into WebDataset shards; inspect them.")
    app.add_typer(eval_app, name="eval", help="Evaluate checkpoints (k-NN, linear); watch a run.")


_mount_subcommands()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
