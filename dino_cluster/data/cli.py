"""`dino-cluster data ...`: pack images into shards, inspect a shard set.

Mounted by the top-level CLI as the `data` sub-command. User errors exit with code 2 and a
one-line message; storage failures (after retries) exit with code 1.
"""

from __future__ import annotations

import itertools
import re
import sys
from typing import NoReturn

import typer

from dino_cluster.storage import StorageError, StorageOptions, open_store

app = typer.Typer(
    help="Pack images into WebDataset shards and inspect shard sets.",
    no_args_is_help=True,
    add_completion=False,
)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9}
_UNITS |= {"gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'64MiB', '1.5GB', '4096' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid shard size {text!r} (examples: 64MiB, 500MB, 1GiB, 1048576)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"shard size {text!r} must be at least 1 byte")
    return value


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _options(endpoint_url: str | None, region: str | None, profile: str | None):
    if not (endpoint_url or region or profile):
        return None
    return StorageOptions(endpoint_url=endpoint_url, region=region, profile=profile)


_ENDPOINT = typer.Option(None, "--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL).")
_REGION = typer.Option(None, "--region", help="S3 region.")
_PROFILE = typer.Option(None, "--profile", help="AWS profile name (credentials stay there).")


@app.command("pack")
def pack_cmd(
    src: str = typer.Argument(
        ..., help="Image folder (class = sub-folder), list file, or Fashion-MNIST IDX folder."
    ),
    dest: str = typer.Argument(..., help="Destination folder, file:// or s3:// URL."),
    shard_size: str = typer.Option("64MiB", "--shard-size", help="Target shard size."),
    max_samples_per_shard: int | None = typer.Option(None, "--max-samples-per-shard"),
    image_format: str = typer.Option("jpg", "--format", help="jpg or png."),
    limit: int | None = typer.Option(None, "--limit", help="Pack only the first N images."),
    split: str = typer.Option("train", "--split", help="IDX split: train or test."),
    endpoint_url: str | None = _ENDPOINT,
    region: str | None = _REGION,
    profile: str | None = _PROFILE,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    log_every: float = typer.Option(
        10.0, "--log-every", help="Seconds between progress lines when stderr is no terminal."
    ),
) -> None:
    """Pack images into shard-000000.tar, ... plus index.json at DEST."""
    from dino_cluster.data.pack import pack  # PIL and the sources: only when packing

    skipped: list[tuple[str, str]] = []
    bar = progress and sys.stderr.isatty()
    try:
        size = parse_size(shard_size)
        index = pack(
            src,
            dest,
            shard_size_bytes=size,
            max_samples_per_shard=max_samples_per_shard,
            image_format=image_format,
            limit=limit,
            split=split,
            storage_options=_options(endpoint_url, region, profile),
            progress=bar,
            on_skip=lambda name, why: skipped.append((name, why)),
            # Without a terminal (a log, CI) the bar is off: a line now and then instead.
            progress_line=(lambda line: typer.echo(line, err=True))
            if progress and not bar
            else None,
            progress_every_s=max(0.0, log_every),
        )
    except ValueError as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(str(exc), code=1)
    typer.echo(
        f"packed {index['total_samples']} images into {len(index['shards'])} shards at {dest}"
        + (f" ({len(skipped)} source images skipped)" if skipped else "")
    )
    for name, why in skipped[:_SHOWN_SKIPS]:
        typer.echo(f"  skipped {name}: {why}")
    if len(skipped) > _SHOWN_SKIPS:
        typer.echo(f"  ... and {len(skipped) - _SHOWN_SKIPS} more (each is in the log above)")


_SHOWN_SKIPS = 20


@app.command("inspect")
def inspect_cmd(
    url: str = typer.Argument(..., help="index.json, brace pattern, or folder/prefix URL."),
    check: int = typer.Option(8, "--check", help="Decode this many samples of the first shard."),
    endpoint_url: str | None = _ENDPOINT,
    region: str | None = _REGION,
    profile: str | None = _PROFILE,
) -> None:
    """Show shard count and samples, and decode a few samples as a check."""
    from dino_cluster.data.shards import resolve_shards

    options = _options(endpoint_url, region, profile)
    try:
        shards = resolve_shards(url, options)
        typer.echo(
            f"{shards.root_url}: {len(shards.shards)} shards, {shards.total_samples} samples"
        )
        if shards.classes:
            typer.echo(f"classes ({len(shards.classes)}): {', '.join(shards.classes[:20])}")
        if check <= 0:
            return
        first = shards.shards[0].name
        ok, tried, problems, sizes = _check_shard(
            open_store(shards.root_url, options), first, check
        )
    except ValueError as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(str(exc), code=1)
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
    typer.echo(f"decoded {ok}/{tried} samples from {first} (sizes: {shown or '-'})")
    for problem in problems:
        typer.echo(f"  bad: {problem}")
    if problems:
        raise typer.Exit(1)


def _check_shard(store, name: str, check: int) -> tuple[int, int, list[str], set]:  # type: ignore[no-untyped-def]
    """Decode the first `check` records of one shard: (decoded, tried, problems, sizes)."""
    from dino_cluster.data.decode import BadSample, decode_sample
    from dino_cluster.data.tario import ShardReadError, is_gzip_shard, iter_records

    ok, tried, problems, sizes = 0, 0, [], set()
    members: list[str] = []
    with store.open_read(name) as f:
        records = iter_records(
            f, on_bad=lambda r, m: members.append(f"{m}: {r}"), compressed=is_gzip_shard(name)
        )
        try:
            for rec in itertools.islice(records, check):
                tried += 1
                if rec.problem is not None:
                    problems.append(f"{rec.key}: {rec.problem}")
                    continue
                try:
                    sample = decode_sample(rec.fields, max_pixels=64_000_000)
                except BadSample as bad:
                    problems.append(f"{rec.key}: {bad}")
                    continue
                ok += 1
                sizes.add(sample.image.size)
                if sample.label_error is not None:
                    problems.append(f"{rec.key}: bad_label (used unlabelled): {sample.label_error}")
        except ShardReadError as exc:
            problems.append(f"shard broken: {exc}")
    return ok, tried, [*(f"refused member {m}" for m in members), *problems], sizes
