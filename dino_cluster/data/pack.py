"""Pack images into WebDataset shards (shard-000000.tar, ...) plus index.json, locally or in S3.

Shards are written with webdataset's TarWriter: no encoder (our image and label bytes go in as
they are), mtime 0, owner ids 0 with empty names and mode 0o444, members of a sample in sorted
extension order (TarWriter's rule: `000000001.cls` before `000000001.jpg`). webdataset's
ShardWriter is not used: it counts only payload bytes and checks the limit before a sample, so
its shards overshoot the size limit, while ours never exceed it (tar headers and end-of-archive
padding included); it opens the next shard eagerly and each shard here must be hashed and
compared with the old index before it is uploaded.

Each shard is written to a local temp file and then uploaded (S3) or renamed into place (local),
so a reader never sees half a shard. Packing is deterministic: the same source and options give
byte-identical shards, so re-running overwrites them with themselves, and a shard already
stored with the checksum the index records is not uploaded again. The old index is removed
before the first changed shard is written and the new one is written last, so an index never
describes shards it does not match. Shards named like ours but beyond the new count are removed.

Sources are checked before anything is stored: a source image that cannot be opened, is
larger than `max_pixels` (decompression bombs included: only the header is parsed), or whose
packed bytes the training reader cannot decode (a truncated JPEG passed through, say) is
skipped, counted in the index (`skipped_sources`) and named to `on_skip`; the pack goes on.
Source files are opened only with the decoders of the formats a source folder may hold, never
PIL's others (EPS runs Ghostscript). Without a terminal, `progress_line` gets a line every
`progress_every_s` seconds: images done, rate and time to go.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dino_cluster.data.decode import BadSample, decode_image
from dino_cluster.data.shards import INDEX_NAME, parse_index, read_index
from dino_cluster.data.sources import SourceImage, open_source
from dino_cluster.data.tario import unsafe_name
from dino_cluster.storage import StorageOptions, open_store

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"shard-\d{6}\.tar")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_TAR_END = 1024 + 10240  # end-of-archive blocks plus worst-case record padding
# The decoders a source file may be opened with (the formats FolderSource lists).
_SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 64_000_000  # data.max_image_pixels' default: what training would refuse
OnSkip = Callable[[str, str], None]  # (source image name, why it was skipped)


class SkippedSource(Exception):
    """A source image that is not packed; the message says why."""


def sample_tar_bytes(fields: dict[str, bytes]) -> int:
    """Bytes one sample adds to a tar: a 512-byte header per member plus padded data."""
    return sum(512 + ((len(data) + 511) // 512) * 512 for data in fields.values())


class _ShardFile:
    """One shard being written to a local file; `bytes_written` is the archive size so far
    (before the end-of-archive blocks)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        # Imported here: webdataset's package import loads torch, which packing never needs
        # otherwise (the CLI imports this module for `data pack`).
        from webdataset import TarWriter

        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        # encoder=False: bytes are written as given, nothing is re-encoded or pickled.
        # mtime/user/group fixed: the same input gives the same bytes (TarWriter would stamp
        # the current time and "bigdata" otherwise).
        self._tar = TarWriter(self._file, user="", group="", mode=0o444, mtime=0, encoder=False)
        self.samples = 0

    @property
    def bytes_written(self) -> int:
        return self._tar.tarstream.offset

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key or unsafe_name(key):
            raise ValueError(f"invalid sample key {key!r}")
        before = self.bytes_written
        self._tar.write({"__key__": key, **fields})
        # TarWriter's tarfile uses the default (PAX) format: for our short ASCII names,
        # integer mtime and sizes under 8 GiB it writes plain 512-byte headers, which is what
        # the size limit counts. Fail loudly if a webdataset version ever writes more.
        if self.bytes_written - before != sample_tar_bytes(fields):
            raise RuntimeError(f"tar size accounting is off for sample {key!r}")
        self.samples += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()


def encode_image(
    item: SourceImage,
    image_format: str,
    jpeg_quality: int = 95,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """Bytes of `item` in `image_format`; files already in that format are passed through.
    Raises SkippedSource for a source that cannot be packed, or whose packed bytes the
    training reader would not decode."""
    target = _PIL_FORMAT[image_format]
    try:
        data = _encode(item, target, jpeg_quality, max_pixels)
        decode_image(data, max_pixels=max_pixels)  # what every reader will do with it
    except BadSample as bad:
        raise SkippedSource(f"{bad.reason}: {bad.detail}") from None
    except Image.DecompressionBombError as exc:  # PIL's own bound, met before ours
        raise SkippedSource(f"image_too_large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SkippedSource(f"bad_image: {type(exc).__name__}: {exc}") from None
    return data


def _encode(item: SourceImage, target: str, jpeg_quality: int, max_pixels: int) -> bytes:
    if item.pixels is not None:
        img = Image.fromarray(item.pixels)
    else:
        if item.path is None:
            raise ValueError(f"{item.name}: source image has neither pixels nor a path")
        data = item.path.read_bytes()
        with warnings.catch_warnings():
            # Our bound below decides; PIL's bomb warning must not print per image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_SOURCE_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise BadSample("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
        if img.format == target:
            return data  # no generation loss, and packing stays fast (the caller verifies it)
        img.load()
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    out = io.BytesIO()
    if target == "JPEG":
        img.save(out, format="JPEG", quality=jpeg_quality)
    else:
        img.save(out, format="PNG", optimize=False)
    return out.getvalue()


class _ProgressLines:
    """A line every `every_s` seconds (images done, rate, time to go) for logs, where the
    progress bar (a terminal's) is not shown."""

    def __init__(
        self,
        line: Callable[[str], None] | None,
        total: int,
        every_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.line, self.total, self.every_s, self.clock = line, total, every_s, clock
        self.start = self.last = clock() if line is not None else 0.0

    def tick(self, done: int, skipped: int) -> None:
        if self.line is None:
            return
        now = self.clock()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = "-" if left == float("inf") else _duration(left)
        self.line(
            f"packing: {done}/{self.total} images ({100 * done / max(self.total, 1):.0f} %), "
            f"{rate:.1f} images/s, {skipped} skipped, elapsed {_duration(elapsed)}, "
            f"about {eta} to go"
        )


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
    )


def _old_index(store) -> dict[str, dict]:
    if not store.exists(INDEX_NAME):
        return {}
    try:
        doc = json.loads(read_index(store, INDEX_NAME))
        parse_index(json.dumps(doc).encode(), INDEX_NAME)
        return {e["name"]: e for e in doc["shards"]}
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring the unreadable existing %s", store.url_for(INDEX_NAME))
        return {}


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]packing[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class _ShardSink:
    """Writes samples into shard files under `tmp` and stores each finished shard, unless the
    store already holds it with the checksum the old index records (nothing rewritten)."""

    def __init__(self, store, tmp: Path, old: dict[str, dict], max_bytes: int, max_samples: int):  # type: ignore[no-untyped-def]
        self.store, self.tmp, self.old = store, tmp, old
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.index_removed = not old
        self.entries: list[dict] = []
        self.writer: _ShardFile | None = None

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        w = self.writer
        if w is not None and (
            w.samples >= self.max_samples
            or w.bytes_written + sample_tar_bytes(fields) + _TAR_END > self.max_bytes
        ):
            self.finish()
        if self.writer is None:
            self.writer = _ShardFile(self.tmp / f"{len(self.entries)}.tar")
        self.writer.add(key, fields)

    def finish(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        writer.close()
        name = SHARD_NAME.format(len(self.entries))
        path = Path(writer.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entry = {"name": name, "samples": writer.samples, "bytes": path.stat().st_size,
                 "sha256": digest}  # fmt: skip
        prev = self.old.get(name)
        unchanged = (
            prev is not None
            and prev.get("sha256") == digest
            and self.store.exists(name)
            and self.store.size(name) == entry["bytes"]
        )
        if not unchanged:
            if not self.index_removed:
                self.store.delete(INDEX_NAME)
                self.index_removed = True
            self.store.upload_file(name, path)
        path.unlink()
        self.entries.append(entry)


def _check_options(
    image_format: str,
    shard_size_bytes: int,
    max_samples_per_shard: int | None,
    limit: int | None,
    jpeg_quality: int,
    max_pixels: int,
) -> None:
    if image_format not in _PIL_FORMAT:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMAT)}, got {image_format!r}")
    if shard_size_bytes < 1:
        raise ValueError(f"shard_size_bytes must be >= 1, got {shard_size_bytes}")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")


def pack(
    src: str | os.PathLike[str],
    dest_url: str,
    *,
    shard_size_bytes: int = 64 << 20,
    max_samples_per_shard: int | None = None,
    image_format: str = "jpg",
    limit: int | None = None,
    split: str = "train",
    storage_options: StorageOptions | None = None,
    progress: bool = True,
    jpeg_quality: int = 95,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_skip: OnSkip | None = None,
    progress_line: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Pack `src` (image folder, list file or Fashion-MNIST IDX folder) into shards at
    `dest_url`; return the index that was written. `on_skip(name, why)` hears of each source
    image left out; `progress_line` gets periodic progress lines (for logs, without a bar)."""
    _check_options(image_format, shard_size_bytes, max_samples_per_shard, limit, jpeg_quality,
                   max_pixels)  # fmt: skip
    source = open_source(src, split=split, limit=limit)
    total = min(len(source), limit) if limit is not None else len(source)
    store = open_store(dest_url, storage_options)
    old = _old_index(store)
    skipped = 0
    with tempfile.TemporaryDirectory(prefix="dino-pack-") as tmp, _progress(progress) as bar:
        sink = _ShardSink(store, Path(tmp), old, shard_size_bytes, max_samples_per_shard or 1 << 62)
        task = bar.add_task(f"{src} -> {store.url}", total=total)
        lines = _ProgressLines(progress_line, total, progress_every_s, clock)
        for i, item in enumerate(itertools.islice(source, total)):
            bar.advance(task)
            lines.tick(i, skipped)
            try:
                data = encode_image(item, image_format, jpeg_quality, max_pixels)
            except SkippedSource as why:
                skipped += 1
                log.warning("skipping source image %s: %s", item.name, why)
                if on_skip is not None:
                    on_skip(item.name, str(why))
                continue
            fields = {image_format: data}
            if item.label >= 0:
                fields["cls"] = str(item.label).encode()
            sink.add(f"{i:09d}", fields)
        sink.finish()
        lines.tick(total, skipped)
    if not sink.entries:
        raise ValueError(f"no image from {src} could be packed ({skipped} unreadable)")
    index: dict = {
        "version": 1,
        "format": "webdataset",
        "image_format": image_format,
        "split": split if source.kind == "fashion-mnist" else None,
        "shards": sink.entries,
        "total_samples": sum(e["samples"] for e in sink.entries),
        "skipped_sources": skipped,
    }
    if source.classes:
        index["classes"] = list(source.classes)
    _commit(store, index, rewrite=not old or sink.index_removed)
    log.info("packed %d images into %d shards at %s (%d skipped)", index["total_samples"],
             len(sink.entries), store.url, skipped)  # fmt: skip
    return index


def _commit(store, index: dict, *, rewrite: bool) -> None:  # type: ignore[no-untyped-def]
    """Write the index last (unless the one stored is the same) and remove stale shards."""
    index_bytes = json.dumps(index, indent=1).encode()
    if rewrite or store.read_bytes(INDEX_NAME) != index_bytes:
        store.write_bytes(INDEX_NAME, index_bytes)
    names = {e["name"] for e in index["shards"]}
    for info in store.list("shard-"):
        if _SHARD_RE.fullmatch(info.key) and info.key not in names:
            log.info("removing stale shard %s from an earlier pack", store.url_for(info.key))
            store.delete(info.key)
