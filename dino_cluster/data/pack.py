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
from pathlib import Path

from PIL import Image

from dino_cluster.data.shards import INDEX_NAME, parse_index
from dino_cluster.data.sources import SourceImage, open_source
from dino_cluster.data.tario import unsafe_name
from dino_cluster.storage import StorageOptions, open_store

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"shard-\d{6}\.tar")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_TAR_END = 1024 + 10240  # end-of-archive blocks plus worst-case record padding


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


def encode_image(item: SourceImage, image_format: str, jpeg_quality: int = 95) -> bytes:
    """Bytes of `item` in `image_format`; files already in that format are passed through."""
    target = _PIL_FORMAT[image_format]
    if item.pixels is not None:
        img = Image.fromarray(item.pixels)
    else:
        if item.path is None:
            raise ValueError(f"{item.name}: source image has neither pixels nor a path")
        data = item.path.read_bytes()
        img = Image.open(io.BytesIO(data))
        if img.format == target:
            return data  # no generation loss, and packing stays fast
        img.load()
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    out = io.BytesIO()
    if target == "JPEG":
        img.save(out, format="JPEG", quality=jpeg_quality)
    else:
        img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _old_index(store) -> dict[str, dict]:
    if not store.exists(INDEX_NAME):
        return {}
    try:
        doc = json.loads(store.read_bytes(INDEX_NAME))
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
) -> dict:
    """Pack `src` (image folder, list file or Fashion-MNIST IDX folder) into shards at
    `dest_url`; return the index that was written."""
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
    source = open_source(src, split=split, limit=limit)
    total = min(len(source), limit) if limit is not None else len(source)
    store = open_store(dest_url, storage_options)
    old = _old_index(store)
    index_removed = not old
    entries: list[dict] = []
    skipped = 0
    per_shard = max_samples_per_shard or (1 << 62)

    with tempfile.TemporaryDirectory(prefix="dino-pack-") as tmp, _progress(progress) as bar:
        task = bar.add_task(f"{src} -> {store.url}", total=total)
        state: dict = {"writer": None}

        def finish() -> None:
            nonlocal index_removed
            writer = state["writer"]
            writer.close()
            name = SHARD_NAME.format(len(entries))
            path = Path(writer.name)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entry = {
                "name": name,
                "samples": writer.samples,
                "bytes": path.stat().st_size,
                "sha256": digest,
            }
            prev = old.get(name)
            unchanged = (
                prev is not None
                and prev.get("sha256") == digest
                and store.exists(name)
                and store.size(name) == entry["bytes"]
            )
            if not unchanged:
                if not index_removed:
                    store.delete(INDEX_NAME)
                    index_removed = True
                store.upload_file(name, path)
            path.unlink()
            entries.append(entry)
            state["writer"] = None

        for i, item in enumerate(itertools.islice(source, total)):
            bar.advance(task)
            try:
                data = encode_image(item, image_format, jpeg_quality)
            except (OSError, ValueError, SyntaxError) as exc:
                skipped += 1
                log.warning("skipping unreadable source image %s: %s", item.name, exc)
                continue
            fields = {image_format: data}
            if item.label >= 0:
                fields["cls"] = str(item.label).encode()
            writer = state["writer"]
            if writer is not None and (
                writer.samples >= per_shard
                or writer.bytes_written + sample_tar_bytes(fields) + _TAR_END > shard_size_bytes
            ):
                finish()
            if state["writer"] is None:
                state["writer"] = _ShardFile(Path(tmp) / f"{len(entries)}.tar")
            state["writer"].add(f"{i:09d}", fields)
        if state["writer"] is not None:
            finish()

    if not entries:
        raise ValueError(f"no image from {src} could be packed ({skipped} unreadable)")
    index: dict = {
        "version": 1,
        "format": "webdataset",
        "image_format": image_format,
        "split": split if source.kind == "fashion-mnist" else None,
        "shards": entries,
        "total_samples": sum(e["samples"] for e in entries),
        "skipped_sources": skipped,
    }
    if source.classes:
        index["classes"] = list(source.classes)
    index_bytes = json.dumps(index, indent=1).encode()
    if not (old and not index_removed and store.read_bytes(INDEX_NAME) == index_bytes):
        store.write_bytes(INDEX_NAME, index_bytes)
    names = {e["name"] for e in entries}
    for info in store.list("shard-"):
        if _SHARD_RE.fullmatch(info.key) and info.key not in names:
            log.info("removing stale shard %s from an earlier pack", store.url_for(info.key))
            store.delete(info.key)
    log.info(
        "packed %d images into %d shards at %s (%d skipped)",
        index["total_samples"],
        len(entries),
        store.url,
        skipped,
    )
    return index
