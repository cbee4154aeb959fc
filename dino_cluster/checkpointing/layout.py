"""Where a checkpoint's objects live and what its manifest says.

    <root>/step-000000123/<key>.pt ...     one torch.save per top-level state key (a step
                                           committed again with other content: <key>.<gen>.pt)
    <root>/step-000000123/manifest.json    written LAST: every object's name, size, sha256
    <root>/step-000000123/evals/<kind>.json  evaluation results recorded later (not in manifest)
    <root>/latest                          text: step; a hint written after the manifest

Only a manifest makes a checkpoint exist. Manifests come from buckets, so they are parsed as
untrusted input: bounded size, names that cannot leave the step folder, exact field types.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

FORMAT = "dino-cluster-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
EVALS_DIR = "evals"
OBJECT_SUFFIX = ".pt"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a handful of objects; more is not ours
_META_STRING_LIMIT = 256  # long strings (a whole resolved spec) stay in meta.pt, not the manifest

_STEP_DIR_RE = re.compile(r"^step-(\d{9,})$")
# State keys become object names, eval kinds become file names: keep both boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(RuntimeError):
    """Base class of checkpoint errors."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint's objects do not match its manifest (missing, size, sha256)."""


class ManifestError(CheckpointError):
    """A manifest that is not a valid dino-cluster manifest (treated as no manifest)."""


class CheckpointNotFoundError(CheckpointError, ValueError):
    """The caller asked for a step that has no committed checkpoint."""


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is usable as a file name inside a step folder, else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".json"):
        raise ValueError(
            f"{what} {name!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, not ending in .json)"
        )
    return name


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def manifest_key(step: int) -> str:
    return f"{step_dir(step)}/{MANIFEST}"


def object_key(step: int, name: str) -> str:
    return f"{step_dir(step)}/{name}"


def eval_key(step: int, kind: str) -> str:
    return f"{step_dir(step)}/{EVALS_DIR}/{check_name(kind, 'eval kind')}.json"


@dataclass(frozen=True)
class ManifestObject:
    name: str  # relative to the step folder, e.g. "teacher.pt" (a re-commit: "teacher.r1a2.pt")
    size: int
    sha256: str
    key: str = ""  # the state key it holds; "" = the name without ".pt" (older manifests)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name.removesuffix(OBJECT_SUFFIX))

    @property
    def state_key(self) -> str:
        return self.key


@dataclass
class Manifest:
    step: int
    time: float  # commit time, unix seconds
    objects: list[ManifestObject]
    world_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # small JSON scalars (epoch, ...)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "step": self.step,
            "time": self.time,
            "world_size": self.world_size,
            "meta": self.meta,
            "objects": [
                {"name": o.name, "size": o.size, "sha256": o.sha256, "key": o.state_key}
                for o in self.objects
            ],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, expect_step: int | None = None) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"manifest format is not {FORMAT!r}")
        step, when, world = doc.get("step"), doc.get("time"), doc.get("world_size")
        if not _is_int(step) or step < 0:
            raise ManifestError(f"manifest step {step!r} is not a non-negative int")
        if expect_step is not None and step != expect_step:
            raise ManifestError(f"manifest says step {step} but sits in {step_dir(expect_step)}")
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise ManifestError(f"manifest time {when!r} is not a number")
        if world is not None and (not _is_int(world) or world < 1):
            raise ManifestError(f"manifest world_size {world!r} is not a positive int")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise ManifestError("manifest meta is not an object")
        raw = doc.get("objects")
        if not isinstance(raw, list) or not raw:
            raise ManifestError("manifest lists no objects")
        objects: list[ManifestObject] = []
        for item in raw:
            if not isinstance(item, dict):
                raise ManifestError("manifest object entry is not an object")
            name, size, sha = item.get("name"), item.get("size"), item.get("sha256")
            key = item.get("key", "")
            try:
                check_name(name, "manifest object name")
                if key:
                    check_name(key, "manifest object key")
            except ValueError as exc:
                raise ManifestError(str(exc)) from None
            if not _is_int(size) or size < 0:
                raise ManifestError(f"manifest size {size!r} of {name} is not a non-negative int")
            if not isinstance(sha, str) or not _SHA_RE.match(sha):
                raise ManifestError(f"manifest sha256 of {name} is not 64 hex digits")
            objects.append(ManifestObject(name=name, size=size, sha256=sha, key=key))
        if len({o.name for o in objects}) != len(objects):
            raise ManifestError("manifest lists an object twice")
        if len({o.state_key for o in objects}) != len(objects):
            raise ManifestError("manifest lists a state key twice")
        return cls(step=step, time=float(when), objects=objects, world_size=world, meta=dict(meta))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class HashingWriter:
    """A write-only file wrapper that counts and sha256-hashes what passes through it.

    torch.save writes through it, so serialising and checksumming is one pass over the bytes.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)  # hashlib drops the GIL for large buffers
        n = self._f.write(data)
        self.size += len(memoryview(data).cast("B"))
        return n if n is not None else len(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def file_sha256(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a local file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class CheckpointInfo:
    """One committed checkpoint as listed (what `dino-cluster checkpoints RUN` shows)."""

    step: int
    time: float  # commit time, unix seconds
    size: int  # bytes, all objects
    objects: list[str]
    world_size: int | None
    evals: dict[str, dict] = field(default_factory=dict)  # kind -> results


def json_scalar(value: Any) -> Any:
    if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor
        return value.item()
    if hasattr(value, "item") and not hasattr(value, "numel"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def manifest_meta(meta: Any) -> dict[str, Any]:
    """The small JSON scalars of state['meta'] (step, epoch, world_size, ...) for listings."""
    if not isinstance(meta, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, bool | int | float) or value is None:
            out[key] = value
        elif isinstance(value, str) and len(value) <= _META_STRING_LIMIT:
            out[key] = value
    return out
