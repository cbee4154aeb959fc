"""Find the shards of a dataset: an index file, a brace pattern, or a folder/prefix URL.

Every form resolves to a root URL plus shard names relative to it, each with a sample count.
Counts come from index.json (written by `pack`); without one, each shard is read once to count
its samples (slow on large datasets; a warning says so). A shard found broken while counting
(cut short, no end-of-archive block) keeps the records read before the break, and carries
the break in `ShardInfo.problem`, which the readers count as `truncated_shard` (or
`unreadable_shard`). Index files come from buckets and
are untrusted: names must be plain relative paths under the root, counts plausible, the file
bounded in size before it is read whole. Shards are `.tar`, `.tar.gz` or `.tgz` (listing finds
all three); other compressions are refused by name, with a message, rather than read as
garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

from dino_cluster.data.tario import (
    SHARD_SUFFIXES,
    ShardReadError,
    count_records,
    is_gzip_shard,
    unsafe_name,
)
from dino_cluster.storage import StorageOptions, open_store

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_SUFFIX = ".tar"  # what `pack` writes; SHARD_SUFFIXES is what is read
_SUFFIXES_TEXT = "/".join(SHARD_SUFFIXES)
MAX_INDEX_BYTES = 64 << 20
# A shard of more samples than this is a lying index, not a dataset: counts this large would
# make an epoch that never ends (and overflow the plan's arithmetic long before).
MAX_SHARD_SAMPLES = 1 << 40
_UNSUPPORTED_COMPRESSION = (".bz2", ".xz", ".zst", ".zstd", ".lz4", ".br", ".7z", ".zip")
_MAX_EXPANSION = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to ShardSet.root_url; also the shard's identity in the data position
    samples: int
    bytes: int | None = None
    # "truncated_shard: ..." / "unreadable_shard: ...": found broken when counted (no index).
    # A reader may stop at its quota before it reaches the break, so the stream counts this.
    problem: str | None = None


@dataclass(frozen=True)
class ShardSet:
    root_url: str
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] | None = None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def fingerprint(self) -> str:
        """Short digest of names and counts: a saved data position only fits the same dataset."""
        h = hashlib.sha256()
        for s in sorted(self.shards, key=lambda s: s.name):
            h.update(f"{s.name}\t{s.samples}\n".encode())
        return h.hexdigest()[:16]


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..004}` numeric ranges (zero padding kept) and `{a,b}` alternatives."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced braces in shard pattern {pattern!r}")
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo_s, hi_s = range_match.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"empty range {{{body}}} in shard pattern {pattern!r}")
        if hi - lo >= _MAX_EXPANSION:
            raise ValueError(f"range {{{body}}} expands to more than {_MAX_EXPANSION} shards")
        width = len(lo_s) if lo_s.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out: list[str] = []
    for option in options:
        out.extend(expand_braces(head + option + tail))
        if len(out) > _MAX_EXPANSION:
            raise ValueError(f"shard pattern {pattern!r} expands to too many names")
    return out


def _check_url(url: str) -> None:
    if url.startswith("pipe:"):
        # A pipe: URL runs a shell command; only the operator's own configuration may do that,
        # and this project never needs it: storage streams s3:// and file:// itself.
        raise ValueError("pipe: shard URLs are not accepted; use s3://, file:// or a path")
    if not url:
        raise ValueError("empty shard URL")


def _split_parent(url: str) -> tuple[str, str]:
    parent, sep, name = url.rstrip("/").rpartition("/")
    if not sep:
        return ".", name
    if parent.endswith(":/") or parent.endswith("://"):  # "s3://bucket", "file:///x" edges
        return parent + "/", name
    return parent or "/", name


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or unsafe_name(name) or "://" in name or name in (".", ""):
        raise ValueError(f"{where}: invalid shard name {name!r} (must be a relative path)")
    if name.lower().endswith(_UNSUPPORTED_COMPRESSION):
        raise ValueError(
            f"{where}: shard {name!r} is compressed in a format that is not read; shards are "
            f"{_SUFFIXES_TEXT} (recompress it with gzip, or repack it)"
        )
    return name


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def read_index(store, name: str) -> bytes:  # type: ignore[no-untyped-def]
    """The index file's bytes, refused before it is read whole when it is too large."""
    parts: list[bytes] = []
    got = 0
    with store.open_read(name) as f:
        # Raw streams (S3) may return less than asked: read until the bound or the end.
        while got <= MAX_INDEX_BYTES and (part := f.read(MAX_INDEX_BYTES + 1 - got)):
            parts.append(part)
            got += len(part)
    data = b"".join(parts)
    if len(data) > MAX_INDEX_BYTES:
        raise ValueError(f"{store.url_for(name)}: index larger than {MAX_INDEX_BYTES} bytes")
    return data


def parse_index(data: bytes, where: str) -> tuple[list[ShardInfo], tuple[str, ...] | None]:
    if len(data) > MAX_INDEX_BYTES:
        raise ValueError(f"{where}: index larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise ValueError(f"{where}: expected an object with a 'shards' list")
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc["shards"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: shards[{i}] is not an object")
        name = _check_name(entry.get("name"), f"{where}: shards[{i}]")
        samples, nbytes = entry.get("samples"), entry.get("bytes")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ValueError(f"{where}: shards[{i}].samples must be an integer >= 0")
        if samples > MAX_SHARD_SAMPLES:
            raise ValueError(
                f"{where}: shards[{i}].samples = {samples} is not a plausible count "
                f"(at most {MAX_SHARD_SAMPLES})"
            )
        if nbytes is not None and (
            not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0
        ):
            raise ValueError(f"{where}: shards[{i}].bytes must be an integer >= 0")
        if name in seen:
            raise ValueError(f"{where}: shard {name!r} listed twice")
        seen.add(name)
        shards.append(ShardInfo(name, samples, nbytes))
    classes = doc.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise ValueError(f"{where}: 'classes' must be a list of strings")
    return shards, tuple(classes) if classes else None


def _count(store, names: list[str]) -> list[ShardInfo]:
    log.warning(
        "no %s next to the shards under %s: reading all %d shards once to count samples "
        "(run `dino-cluster data pack` or write an index to avoid this)",
        INDEX_NAME,
        store.url,
        len(names),
    )
    out = []
    for name in names:
        try:
            f = store.open_read(name)
        except FileNotFoundError:
            raise ValueError(f"shard {store.url_for(name)} does not exist") from None
        with f:
            problem = None
            try:
                n = count_records(f, compressed=is_gzip_shard(name))
            except ShardReadError as exc:
                # Its complete records stay usable; the break is counted as a bad sample by
                # the readers (ShardInfo.problem), so the loss is never silent.
                n = exc.records
                problem = f"{'truncated_shard' if n else 'unreadable_shard'}: {exc}"
                log.warning(
                    "shard %s is broken after %d samples (%s); those samples are used", name, n, exc
                )
        out.append(ShardInfo(name, n, problem=problem))
    return out


def resolve_shards(url: str, options: StorageOptions | None = None) -> ShardSet:
    """Resolve an index file, brace pattern or folder/prefix URL to a ShardSet."""
    _check_url(url)
    if "{" in url or "}" in url:
        urls = expand_braces(url)
        root, _ = _split_parent(url[: url.index("{")] + "x")
        prefix = root.rstrip("/") + "/"
        names = [_check_name(u[len(prefix) :], url) for u in urls]
        store = open_store(root, options)
        by_name: dict[str, ShardInfo] = {}
        classes = None
        if store.exists(INDEX_NAME):
            indexed, classes = parse_index(read_index(store, INDEX_NAME), store.url_for(INDEX_NAME))
            by_name = {s.name: s for s in indexed}
        missing = [n for n in names if n not in by_name]
        counted = {s.name: s for s in _count(store, missing)} if missing else {}
        shards = tuple(by_name.get(n) or counted[n] for n in names)
        return ShardSet(store.url, shards, classes)
    if url.rstrip("/").endswith(".json"):
        root, index_name = _split_parent(url)
        store = open_store(root, options)
        shards, classes = parse_index(read_index(store, index_name), url)
        if not shards:
            raise ValueError(f"{url}: index lists no shards")
        return ShardSet(store.url, tuple(shards), classes)
    store = open_store(url, options)
    if store.exists(INDEX_NAME):
        shards, classes = parse_index(read_index(store, INDEX_NAME), store.url_for(INDEX_NAME))
        if not shards:
            raise ValueError(f"{store.url_for(INDEX_NAME)}: index lists no shards")
        return ShardSet(store.url, tuple(shards), classes)
    names = sorted(o.key for o in store.list() if is_shard_name(o.key))
    if not names:
        raise ValueError(f"no {_SUFFIXES_TEXT} shards and no {INDEX_NAME} under {url}")
    return ShardSet(store.url, tuple(_count(store, [_check_name(n, url) for n in names])))


def probe_shards(url: str, options: StorageOptions | None = None) -> str:
    """Check, without reading any shard, that `url` names a shard set: its index parses, or
    shards are listed / the pattern's first and last shards exist. Returns a short summary;
    ValueError (what is wrong and how to name the data) or StorageError otherwise."""
    _check_url(url)
    named = "name the folder of the shards, its index.json, or a brace pattern"
    make = "shards are made with `dino-cluster data pack SRC DEST`"
    if "{" in url or "}" in url:
        urls = expand_braces(url)
        root, _ = _split_parent(url[: url.index("{")] + "x")
        prefix = root.rstrip("/") + "/"
        store = open_store(root, options)
        for shard in {urls[0], urls[-1]}:
            if not store.exists(_check_name(shard[len(prefix) :], url)):
                raise ValueError(f"{url}: {shard} does not exist ({make})")
        return f"{len(urls)} shards (pattern)"
    if url.rstrip("/").endswith(".json"):
        root, index_name = _split_parent(url)
        store = open_store(root, options)
        try:
            data = read_index(store, index_name)
        except FileNotFoundError:
            raise ValueError(f"{url} does not exist ({make})") from None
        shards, _ = parse_index(data, url)
        if not shards:
            raise ValueError(f"{url}: index lists no shards")
        return f"{len(shards)} shards, {sum(s.samples for s in shards)} samples (index)"
    store = open_store(url, options)
    if store.exists(INDEX_NAME):
        shards, _ = parse_index(read_index(store, INDEX_NAME), store.url_for(INDEX_NAME))
        if not shards:
            raise ValueError(f"{store.url_for(INDEX_NAME)}: index lists no shards")
        return f"{len(shards)} shards, {sum(s.samples for s in shards)} samples (index)"
    if any(is_shard_name(o.key) for o in store.list()):
        return "shards without an index (their samples are counted at start)"
    parent, name = _split_parent(url)
    if name and open_store(parent, options).exists(name):
        raise ValueError(f"{url} is a file, not a shard set: {named}")
    raise ValueError(
        f"no {_SUFFIXES_TEXT} shards and no {INDEX_NAME} under {url}: {named} ({make})"
    )
