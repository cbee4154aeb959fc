"""`dino-cluster visualize ...` and `dino-cluster plot`: pictures of a run, as PNG files.

    dino-cluster visualize attention CKPT [IMAGES...] [--shards URL --count N] -o DIR
    dino-cluster visualize neighbours CKPT --bank URL [--queries URL|FILE...] [-k 5] -o DIR
    dino-cluster plot RUN -o FILE.png

CKPT: a run folder, a checkpoint root (newest step, or --step), a step folder or an exported
teacher .pth; the backbone is built from the run's spec.resolved.yaml (or --spec). URLs may be
local paths, file:// or s3://. Exit status: 0 written, 2 a user mistake (missing file, no
metrics, a checkpoint that does not fit the spec) in one line, 1 a store that cannot be read.

Mounted by the top-level CLI: `app` as the `visualize` sub-command and `plot_command` as the
top-level `plot` (also here as `visualize plot`). Imports nothing heavy until a command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from dino_cluster.visualize import VisualizeError

app = typer.Typer(
    help="Pictures of a run: attention maps, nearest neighbours, training curves (PNG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
T = TypeVar("T")

CkptArg = Annotated[
    str,
    typer.Argument(
        help="Run folder, checkpoint root (s3://... or folder), step folder, or teacher .pth."
    ),
]
OutDirOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to write the PNGs to.")]
SpecOpt = Annotated[
    Path | None,
    typer.Option("--spec", "-s", help="The run's spec (default: spec.resolved.yaml beside CKPT)."),
]
StepOpt = Annotated[int | None, typer.Option("--step", help="Checkpoint step (default newest).")]
EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint-url", help="S3 endpoint (else the spec's / AWS_*).")
]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def _guarded(fn: Callable[[], T]) -> T:
    """Run a command body: user mistakes and store failures are one line, no traceback."""
    from dino_cluster.storage import StorageError

    try:
        return fn()
    except VisualizeError as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(str(exc), code=1)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _in_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        _fail(f"{name} must be in {lo}..{hi}, got {value}")


@app.command()
def attention(
    checkpoint: CkptArg,
    images: Annotated[
        list[str] | None, typer.Argument(help="Image files (PNG/JPEG; paths or s3:// URLs).")
    ] = None,
    output: OutDirOpt = Path("attention"),
    shards: Annotated[
        str | None, typer.Option("--shards", help="Also (or instead) the first --count samples.")
    ] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Samples from --shards.")] = 4,
    size: Annotated[
        int | None,
        typer.Option("--size", help="Shorter image side fed to the model (default: img_size)."),
    ] = None,
    tile: Annotated[int, typer.Option("--tile", help="Pixels per picture in the PNG.")] = 160,
    spec: SpecOpt = None,
    step: StepOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """The last block's CLS self-attention per head (and their mean), overlaid on each image:
    one PNG per image in DIR."""
    if not images and not shards:
        _fail("give image files, or --shards URL (with --count N)")
    _in_range("--count", count, 1, 1000)
    _in_range("--tile", tile, 16, 1024)

    def body() -> None:
        import itertools

        from dino_cluster.visualize import attention as att
        from dino_cluster.visualize import source

        model = source.load_model(checkpoint, spec_path=spec, step=step, endpoint_url=endpoint_url)
        patch = model.patch_size
        if patch is None:
            raise VisualizeError(f"{model.spec.model.arch}: attention maps need a ViT backbone")
        att.last_attention(model.backbone)
        side = size or model.spec.model.img_size
        if not 1 <= side <= 4096:
            raise VisualizeError(f"--size must be in 1..4096, got {side}")
        transform = att.AttentionTransform(side, patch)
        options = source.storage_options(model.spec, endpoint_url)
        max_pixels = model.spec.data.max_image_pixels
        inputs = [
            source.image_files(images or [], transform, options=options, max_pixels=max_pixels)
        ]
        if shards:
            batches = source.shard_images(
                shards, transform, count=count, options=options, max_pixels=max_pixels
            )
            inputs.append(im for batch in batches for im in batch)
        written = att.write_attention(
            model.backbone,
            itertools.chain(*inputs),
            output,
            tile=tile,
            title=_title(model),
            device=source.pick_device(),
        )
        for fig in written:
            typer.echo(f"{fig.path}  ({fig.size[0]}x{fig.size[1]}, {fig.heads} heads)")

    _guarded(body)


@app.command()
def neighbours(
    checkpoint: CkptArg,
    bank: Annotated[
        str, typer.Option("--bank", help="Shards to search (index.json, folder, s3://...).")
    ],
    output: OutDirOpt = Path("neighbours"),
    queries: Annotated[
        list[str] | None,
        typer.Option(
            "--queries",
            "-q",
            help="Query image files (repeatable), or one shard URL (its first --count samples). "
            "Default: the first --count samples of the bank, each left out of its own neighbours.",
        ),
    ] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Queries taken from shards.")] = 8,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 5,
    bank_limit: Annotated[
        int | None, typer.Option("--bank-limit", help="Search only the bank's first N samples.")
    ] = None,
    tile: Annotated[int, typer.Option("--tile", help="Pixels per picture in the grid.")] = 96,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward.")] = 64,
    spec: SpecOpt = None,
    step: StepOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """A grid of queries and their k nearest bank images (teacher CLS features, cosine), with
    similarities and labels; also DIR/neighbours.json."""
    _in_range("-k", k, 1, 50)
    _in_range("--count", count, 1, 256)
    _in_range("--tile", tile, 16, 512)
    _in_range("--batch-size", batch_size, 1, 4096)
    if bank_limit is not None:
        _in_range("--bank-limit", bank_limit, 1, 1 << 40)

    def body() -> None:
        from dino_cluster.evaluate.features import eval_transform
        from dino_cluster.visualize import neighbours as nb
        from dino_cluster.visualize import source

        model = source.load_model(checkpoint, spec_path=spec, step=step, endpoint_url=endpoint_url)
        transform = eval_transform(model.spec)
        options = source.storage_options(model.spec, endpoint_url)
        pixels = model.spec.data.max_image_pixels
        qs = list(queries or [])
        if qs and all(source.is_image_file(q) for q in qs):
            query_images = list(
                source.image_files(qs, transform, options=options, max_pixels=pixels)
            )
        elif len(qs) > 1:
            raise VisualizeError("--queries: image files (.png/.jpg), or one shard URL")
        else:
            url = qs[0] if qs else bank
            batches = source.shard_images(
                url, transform, count=count, options=options, max_pixels=pixels
            )
            query_images = [im for b in batches for im in b]
        bank_batches = source.shard_images(
            bank,
            transform,
            count=bank_limit,
            options=options,
            max_pixels=pixels,
            batch_size=batch_size,
        )
        results = nb.find_neighbours(
            model.backbone,
            query_images,
            bank_batches,
            k,
            device=source.pick_device(),
            exclude_self=True,  # keys are full URLs: only a sample of the bank itself matches
        )
        png, doc, fig_size = nb.write_neighbours(
            results, output, k=k, tile=tile, title=_title(model)
        )
        typer.echo(f"{png}  ({fig_size[0]}x{fig_size[1]}, {len(results)} queries x {k} neighbours)")
        typer.echo(f"{doc}")

    _guarded(body)


def _title(model) -> str:  # noqa: ANN001 - a source.LoadedModel (imported lazily)
    at = f"step {model.step}" if model.step is not None else "exported teacher"
    return f"{model.spec.run.name}, {at} ({model.spec.model.arch})"


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        _fail(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1200x900")
    return w, h


def plot_command(
    run: Annotated[str, typer.Argument(help="Run folder, run name under ./runs, or job spec.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG file to write.")],
    spec: Annotated[
        Path | None,
        typer.Option("--spec", "-s", help="Spec for out_dim and the store (default: the run's)."),
    ] = None,
    store: Annotated[
        bool,
        typer.Option("--store/--no-store", help="Also read evaluation records from the store."),
    ] = True,
    size: Annotated[str, typer.Option("--size", help="Image size WIDTHxHEIGHT.")] = "1200x900",
) -> None:
    """Loss, teacher entropy (with the uniform ln(out_dim)), student-teacher KL, lr and each
    checkpoint's evaluation top-1 against steps, as one PNG."""
    width, height = _parse_size(size)

    def body() -> None:
        from dino_cluster.launch.run_record import RunRecordError, resolve_run_dir
        from dino_cluster.visualize.plot import plot_run

        try:
            run_dir = resolve_run_dir(run)
        except RunRecordError as exc:
            raise VisualizeError(str(exc)) from None
        curves = plot_run(run_dir, output, spec_path=spec, store=store, size=(width, height))
        kinds = ", ".join(f"{k} at {len(v)} steps" for k, v in sorted(curves.evals.items()))
        typer.echo(f"{output}  ({width}x{height}; evaluations: {kinds or 'none'})")

    _guarded(body)


app.command("plot")(plot_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
