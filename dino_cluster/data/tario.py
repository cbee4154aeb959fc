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

What counts as broken (every case a counted bad sample in the readers, never a silent loss):

- Duplicate keys. A key names one sample. When a key comes back after another key's members
  (A, B, A), or a sample repeats a field it already has (A.jpg A.cls A.jpg ...: an exact
  repeat), the repeat is a record of its own, `Record.problem == "duplicate_key"`, with no
  fields: the first sample keeps what it had, the repeat is never merged into it. It still
  counts as one record, so record positions do not depend on what a reader does with it.
- A shard that ends early. tarfile treats a stream that stops between members, inside a
  header, or at a corrupt header as a normal end; only the end-of-archive block (512 zero
  bytes; writers add two) says the archive is complete. An archive that ends without it
  raises ShardReadError (after its last sample, whose members are all whole), as a member
  cut short always did, so a truncated shard is reported even when no index gives its
  sample count.
- Compressed shards: `.tar.gz` / `.tgz` (as webdataset writes and reads them) are streamed
  through Python's gzip module over the storage stream, with the same member bounds; a
  corrupt gzip stream is a ShardReadError. Other compressions are refused by name in
  shards.py.

Writing is in pack.py, with webdataset's TarWriter.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from dino_cluster.data.decode import IMAGE_EXTS, LABEL_EXT

# Fields whose bytes we keep; every other member is skipped unread.
WANTED_EXTS = frozenset((*IMAGE_EXTS, LABEL_EXT))
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
_READ_BUFSIZE = 1 << 20
# group_by_keys copies each member's "__url__" into its sample; the reader knows the shard.
_NO_URL = ""
# Names a shard may have (listing finds these); gzip ones are decompressed while streaming.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
GZIP_SUFFIXES = (".tar.gz", ".tgz")
# A duplicate sample is grouped under its key plus this separator and a counter; a tar member
# name never contains NUL (unsafe_name refuses it), so no real key can collide with it.
_DUP_SEP = "\x00"
# Keys remembered per shard to find a key that comes back later; beyond this (a shard of
# millions of tiny members) only adjacent repeats are found, and memory stays bounded.
_MAX_REMEMBERED_KEYS = 1 << 20

OnBad = Callable[[str, str], None]  # (reason, member name)


class ShardReadError(Exception):
    """The shard stream ended in a broken state (truncated tar, connection gone for good)."""

    records: int = 0  # complete records read before the break (set by count_records)


@dataclass
class Record:
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None  # "duplicate_key": a repeat of an earlier sample, no fields


def is_gzip_shard(name: str) -> bool:
    return name.lower().endswith(GZIP_SUFFIXES)


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


class _EndCheckedInfo(tarfile.TarInfo):
    """Notes on the TarFile when the archive ended at an end-of-archive block: tarfile
    returns "no more members" alike for that, for a stream that just stops and for a header
    cut short or corrupt, and only the first is a complete archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a block of zeros where a header would be
            tarfile_.dino_end_of_archive = True  # type: ignore[attr-defined]
            raise


class _Keys:
    """The key group_by_keys groups a member under: its own, or, for a repeated sample, an
    alias of its own (see the module docstring, "Duplicate keys")."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.alias = ""
        self.fields: set[str] = set()
        self.seen: set[str] = set()
        self.repeats = 0

    def _repeat(self, key: str) -> str:
        self.repeats += 1
        self.fields = set()
        return f"{key}{_DUP_SEP}{self.repeats}"

    def group(self, key: str, ext: str) -> str:
        wanted = ext in WANTED_EXTS
        if key != self.current:
            self.current, self.fields = key, set()
            if key in self.seen:
                self.alias = self._repeat(key)
            else:
                self.alias = key
                if len(self.seen) < _MAX_REMEMBERED_KEYS:
                    self.seen.add(key)
        elif wanted and ext in self.fields:
            self.alias = self._repeat(key)
        if wanted:
            self.fields.add(ext)
        return self.alias


class _Gunzip:
    """A gzip stream whose reads return what is decompressed so far (`read1`): a full
    `read(n)` decompresses until it has n bytes, so a cut 1 MiB on would also lose the
    complete samples decompressed before the cut."""

    def __init__(self, gz: gzip.GzipFile) -> None:
        self._gz = gz

    def read(self, size: int = -1) -> bytes:
        return self._gz.read1(size)


def _open_tar(stream: BinaryIO, compressed: bool, stack: ExitStack) -> tarfile.TarFile:
    source: Any = stream
    if compressed:
        source = _Gunzip(stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb")))
    tar = tarfile.open(fileobj=source, mode="r|", bufsize=_READ_BUFSIZE, tarinfo=_EndCheckedInfo)
    return stack.enter_context(tar)


def _members(
    stream: BinaryIO, report: OnBad, max_member_bytes: int, last: list[str], compressed: bool
) -> Iterator[dict[str, Any]]:
    """The members group_by_keys may see, as its {"fname", "data", "__url__"} entries;
    `last[0]` is the name of the last member handed out with data (for reports about it),
    `last[1]` set when the archive ended without its end-of-archive block."""
    keys = _Keys()
    try:
        with ExitStack() as stack:
            tar = _open_tar(stream, compressed, stack)
            for member in tar:
                # Stream mode keeps every TarInfo it has read: a shard of millions of members
                # would grow without bound (webdataset's iterator clears the list too).
                tar.members = []
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
                group = keys.group(key, ext)
                # The key is handed over before any data byte is read: a member of a new key
                # completes the previous sample even if this member's data is then cut short.
                yield _boundary(group)
                if ext not in WANTED_EXTS:
                    continue  # tarfile skips its data when moving on, unread
                if member.size > max_member_bytes:
                    report("member_too_large", name)
                    continue
                last[0] = name
                data = _read_member(tar, member)
                yield {"fname": f"{group}.{ext}", "data": data, "__url__": _NO_URL}
            if not getattr(tar, "dino_end_of_archive", False):
                # Not raised here: every member read so far is whole, so the sample being
                # assembled is complete as far as the archive goes and is still yielded;
                # iter_records raises once group_by_keys has handed it over.
                last[1] = (
                    "the archive ends without its end-of-archive block (truncated, or a "
                    f"corrupt header) after offset {tar.offset}"
                )
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        # OSError covers storage-level failures after retries and gzip's BadGzipFile; zlib.error
        # and EOFError a corrupt or cut gzip stream.
        raise ShardReadError(f"{type(exc).__name__}: {exc}") from exc


def iter_records(
    stream: BinaryIO,
    *,
    on_bad: OnBad | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    compressed: bool = False,
) -> Iterator[Record]:
    """Yield complete samples from a tar stream (gzip-compressed with `compressed`, see
    is_gzip_shard), grouping adjacent members by key; a repeated sample comes out as a
    Record with `problem="duplicate_key"` and no fields.

    Raises ShardReadError when the stream breaks mid-archive (the sample being assembled,
    which may be partial, is dropped) or, after the last sample, when it ends between members
    without the end-of-archive block.
    """
    # Imported here: webdataset's package import loads torch (it imports its PyTorch datasets
    # first); importing this module (shards.py does, to list shards) must not pay for that,
    # only reading a shard does.
    from webdataset.tariterators import group_by_keys

    report: OnBad = on_bad or (lambda reason, name: None)
    last = ["", ""]

    def handler(exc: Exception) -> bool:
        # group_by_keys raises ValueError for a repeated extension within one sample. _Keys
        # gives a repeated field a sample of its own, so this is a last line of defence;
        # True = skip the member.
        if isinstance(exc, ValueError) and "duplicate" in str(exc):
            report("duplicate_key", last[0])
            return True
        raise exc

    members = _members(stream, report, max_member_bytes, last, compressed)
    # A ShardReadError from `members` leaves group_by_keys outside its handler, so it
    # propagates and the partial sample group_by_keys holds is never yielded.
    samples = group_by_keys(
        members, keys=split_name, lcase=True, suffixes=set(WANTED_EXTS), handler=handler
    )
    with closing(members), closing(samples):
        for sample in samples:
            key = sample["__key__"]
            if _DUP_SEP in key:
                yield Record(key.split(_DUP_SEP, 1)[0], problem="duplicate_key")
                continue
            fields = {k: v for k, v in sample.items() if k in WANTED_EXTS}
            yield Record(key, fields)
    if last[1]:
        raise ShardReadError(last[1])


def count_records(stream: BinaryIO, *, compressed: bool = False) -> int:
    """Number of records in a shard (used only when no index gives the counts). A broken
    shard raises ShardReadError with `records` set to the complete records before the break."""
    n = 0
    try:
        for _ in iter_records(stream, compressed=compressed):
            n += 1
    except ShardReadError as exc:
        exc.records = n
        raise
    return n
