"""Reading WebDataset tar shards safely; webdataset groups members into samples.

Shards come from users and buckets, so reading keeps these guarantees (see DESIGN.md,
"Untrusted input"): only image and `.cls` members are held in memory, every other member is
skipped without its bytes being read into memory; link and device members and names that
escape (absolute, `..`) are refused and reported; no member larger than `max_member_bytes`
is read; a stream that breaks mid-archive raises ShardReadError and the sample being
assembled is dropped; records come out in a fixed order that the training data position
counts. Nothing is decoded here (decode.py does images and labels, and never unpickles).

Who does what, and why:

- Sample grouping is webdataset's `tariterators.group_by_keys`, given our `split_name` as its
  key function (key = path up to the first dot of the basename, as webdataset's
  `base_plus_ext` does for ordinary names; ours also gives a key to names without a dot,
  which `base_plus_ext` drops, so record boundaries and counts stay what they were) and the
  wanted extensions as `suffixes`. Adjacent members with the same key form a sample; a member
  of another key ends it. A second member with the same extension in one sample is refused by
  webdataset (the first one stays; our own loop used to keep the last, silently) and is
  reported as `duplicate_member`: keys and record order do not change.
- Member iteration stays ours (stdlib `tarfile` in stream mode, as webdataset uses too)
  because `tariterators.tar_file_iterator` cannot keep these guarantees:
  * it reads the whole of every member its `select_files` hook accepts
    (`extractfile(...).read()`, no limit), and that hook (like `rename_files`) sees only the
    name, never the member header, so the size bound cannot be expressed through it;
  * it drops link, device and other non-regular members silently: safe, but the
    `link_member` / `unsafe_member` reports the bad-sample counters rely on are lost;
  * a member refused through `select_files` vanishes from grouping, so a sample made only of
    unwanted members (say a lone `.json`) would stop counting as a record and shift the data
    position; letting it through instead means reading its bytes (a 1 GB `.pth` included);
  * it drops members whose names look like metadata (`__x__`, `__dir__/...`), which we have
    always read as ordinary members, and it opens `r|*`, decompressing gzip/bz2/xz tars we
    refuse as unreadable;
  * handing it a pre-filtered stream would mean re-serialising a tar from ours and parsing
    every shard twice to reuse a loop of a dozen lines.
  Our loop hands `group_by_keys`, for every member it does not refuse, a bare `key.` entry
  (no data) as soon as the header is read, then the member's bytes if they are kept: unwanted
  and too-large members still end the previous sample as they always did, and a sample is
  complete (and yielded) before the next member's data is read, so a cut there keeps it.

Writing is in pack.py, with webdataset's TarWriter.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from dino_cluster.data.decode import IMAGE_EXTS, LABEL_EXT

# Fields whose bytes we keep; every other member is skipped unread.
WANTED_EXTS = frozenset((*IMAGE_EXTS, LABEL_EXT))
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
_READ_BUFSIZE = 1 << 20
# group_by_keys copies each member's "__url__" into its sample; the reader knows the shard.
_NO_URL = ""

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


def _boundary(key: str) -> dict[str, Any]:
    # split_name(key + ".") == (key, ""): same key, and an empty extension, which is never
    # among the kept suffixes, so group_by_keys stores nothing and sees no duplicate.
    return {"fname": key + ".", "data": None, "__url__": _NO_URL}


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fobj = tar.extractfile(member)
    if fobj is None:  # pragma: no cover - isreg() members always have data
        return b""
    data = fobj.read()
    if len(data) != member.size:
        raise ShardReadError(f"member {member.name!r} cut short")
    return data


def _members(
    stream: BinaryIO, report: OnBad, max_member_bytes: int, last: list[str]
) -> Iterator[dict[str, Any]]:
    """The members group_by_keys may see, as its {"fname", "data", "__url__"} entries;
    `last[0]` is the name of the last member handed out with data (for reports about it)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_READ_BUFSIZE) as tar:
            for member in tar:
                name = member.name
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    report("link_member", name)
                    continue
                if not member.isreg() or unsafe_name(name):
                    report("unsafe_member", name)
                    continue
                key, ext = split_name(name)
                # The key is handed over before any data byte is read: a member of a new key
                # completes the previous sample even if this member's data is then cut short.
                yield _boundary(key)
                if ext not in WANTED_EXTS:
                    continue  # tarfile skips its data when moving on, unread
                if member.size > max_member_bytes:
                    report("member_too_large", name)
                    continue
                last[0] = name
                yield {"fname": name, "data": _read_member(tar, member), "__url__": _NO_URL}
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        # OSError covers storage-level failures after retries and zlib-style stream errors.
        raise ShardReadError(f"{type(exc).__name__}: {exc}") from exc


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
    # Imported here: webdataset's package import loads torch (it imports its PyTorch datasets
    # first); importing this module (shards.py does, to list shards) must not pay for that,
    # only reading a shard does.
    from webdataset.tariterators import group_by_keys

    report: OnBad = on_bad or (lambda reason, name: None)
    last = [""]

    def handler(exc: Exception) -> bool:
        # group_by_keys raises ValueError for a repeated extension within one sample (the
        # only error its loop can meet here: split_name never fails); True = skip the member.
        if isinstance(exc, ValueError) and "duplicate" in str(exc):
            report("duplicate_member", last[0])
            return True
        raise exc

    members = _members(stream, report, max_member_bytes, last)
    # A ShardReadError from `members` leaves group_by_keys outside its handler, so it
    # propagates and the partial sample group_by_keys holds is never yielded.
    samples = group_by_keys(
        members, keys=split_name, lcase=True, suffixes=set(WANTED_EXTS), handler=handler
    )
    with closing(members), closing(samples):
        for sample in samples:
            fields = {k: v for k, v in sample.items() if k in WANTED_EXTS}
            yield Record(sample["__key__"], fields)


def count_records(stream: BinaryIO) -> int:
    """Number of samples in a shard (used only when no index gives the counts)."""
    return sum(1 for _ in iter_records(stream))
