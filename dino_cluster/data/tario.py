"""Reading and writing WebDataset tar shards.

Reading streams a shard member by member (`tarfile` stream mode): nothing is seeked, nothing
is written to disk, and only the fields the pipeline needs are held in memory. Members that
are links, devices or whose names try to escape (absolute, `..`) are refused. Writing is
deterministic (fixed mtime/owner/mode, members in sample order) so re-packing the same input
produces byte-identical shards.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from dino_cluster.data.decode import IMAGE_EXTS, LABEL_EXT

# Fields whose bytes we keep; every other member is skipped unread.
WANTED_EXTS = frozenset((*IMAGE_EXTS, LABEL_EXT))
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
_READ_BUFSIZE = 1 << 20

OnBad = Callable[[str, str], None]  # (reason, member name)


class ShardReadError(Exception):
    """The shard stream ended in a broken state (truncated tar, connection gone for good)."""


@dataclass
class Record:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, ext.lower() if dot else ""


def unsafe_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return True
    return any(part == ".." for part in name.split("/"))


def iter_records(
    stream: BinaryIO,
    *,
    on_bad: OnBad | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Record]:
    """Yield complete samples from a tar stream, grouping adjacent members by key.

    Raises ShardReadError when the stream breaks mid-archive; the sample being assembled at
    that point is dropped (it may be partial). A tar cut exactly at a member boundary looks
    complete to tarfile: callers compare the record count with the index.
    """
    report: OnBad = on_bad or (lambda reason, name: None)
    current: Record | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_READ_BUFSIZE) as tar:
            for member in tar:
                name = member.name
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    report("link_member", name)
                    continue
                if not member.isreg():
                    report("unsafe_member", name)
                    continue
                if unsafe_name(name):
                    report("unsafe_member", name)
                    continue
                key, ext = split_name(name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Record(key)
                if ext not in WANTED_EXTS:
                    continue
                if member.size > max_member_bytes:
                    report("member_too_large", name)
                    continue
                fobj = tar.extractfile(member)
                if fobj is None:  # pragma: no cover - isreg() members always have data
                    continue
                data = fobj.read()
                if len(data) != member.size:
                    raise ShardReadError(f"member {name!r} cut short")
                current.fields[ext] = data
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        # OSError covers storage-level failures after retries and zlib-style stream errors.
        raise ShardReadError(f"{type(exc).__name__}: {exc}") from exc
    if current is not None:
        yield current


def count_records(stream: BinaryIO) -> int:
    """Number of samples in a shard (used only when no index gives the counts)."""
    return sum(1 for _ in iter_records(stream))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Append samples to one tar file; `bytes_written` tracks the size the archive will have."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, fields: Iterable[tuple[str, bytes]]) -> None:
        if "." in key or unsafe_name(key):
            raise ValueError(f"invalid sample key {key!r}")
        for ext, data in fields:
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.samples += 1

    @property
    def bytes_written(self) -> int:
        return self._tar.offset

    def close(self) -> None:
        self._tar.close()


def sample_tar_bytes(fields: Iterable[tuple[str, bytes]]) -> int:
    """Bytes one sample adds to a tar: a 512-byte header per member plus padded data."""
    return sum(512 + ((len(data) + 511) // 512) * 512 for _, data in fields)
