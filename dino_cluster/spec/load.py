"""Reading a job spec: strict YAML, `--set` overrides, validation with messages that name
the file, the dotted field and the reason; and the resolved copy written into a run folder.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dino_cluster.spec import strict_yaml
from dino_cluster.spec.sections import JobSpec
from dino_cluster.spec.urls import redact

# One line per problem, and not thousands of them: a file of 10,000 unknown keys is reported
# by its first problems and a count.
MAX_PROBLEMS = 50
# `--set a.b.c=...`: sections are a few levels deep; a 10,000-segment key would build a dict
# deeper than the YAML reader allows files to be.
MAX_SET_SEGMENTS = 16
MAX_SET_KEY = 200


# A problem's reason can repeat a value (a validator's "got '...'"); a megabyte of it is not
# a message.
MAX_REASON_CHARS = 1000


def _one_line(text: str) -> str:
    """`text` safe to print as (part of) one line: URLs with credentials replaced (before
    anything is cut), control characters (a newline in a key) escaped, cut short."""
    text = redact(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return text


class SpecError(ValueError):
    """A job spec that cannot be used. `str()` names the file, the field and the reason, one
    line per problem; nothing in it repeats a credential."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        source = _one_line(source)
        shown = [(_one_line(f), _one_line(r)) for f, r in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(("", f"... and {len(problems) - MAX_PROBLEMS} more problems"))
        self.source = source
        self.problems = shown
        lines = [
            f"{source}: {field}: {reason}" if field else f"{source}: {reason}"
            for field, reason in shown
        ]
        super().__init__("\n".join(lines))


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            # A key is repeated as read, cut short (an unknown key can be any length).
            parts.append(("." if parts else "") + strict_yaml.cut(str(p)))
    return "".join(parts)


def _reason(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind in {"literal_error"}:
        # The input is repeated (cut short) so the user sees what was read; SpecError
        # redacts a URL with credentials in it.
        return f"{msg} (got {strict_yaml.show(err.get('input'))})"
    return msg


def apply_overrides(doc: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(source, [(f"--set {strict_yaml.cut(item)}", "expected KEY=VALUE")])
        key, _, raw = item.partition("=")
        if len(key) > MAX_SET_KEY:
            raise SpecError(source, [("--set", f"a key longer than {MAX_SET_KEY} characters")])
        path = key.strip().split(".")
        if not all(path):
            raise SpecError(source, [(f"--set {key}", "empty key segment")])
        if len(path) > MAX_SET_SEGMENTS:
            raise SpecError(
                source, [("--set", f"a key of more than {MAX_SET_SEGMENTS} dotted parts")]
            )
        try:
            value = strict_yaml.parse_scalar(raw)
        except strict_yaml.SpecYAMLError as exc:
            reason = f"{exc.field}: {exc.reason}" if exc.field else exc.reason
            raise SpecError(source, [(f"--set {key}", reason)]) from None
        node = doc
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(
                    source, [(f"--set {key}", f"{'.'.join(path[: i + 1])} is not a section")]
                )
            node = nxt
        node[path[-1]] = value
    return doc


def spec_from_dict(doc: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(doc, dict):
        raise SpecError(source, [("", "a job spec must be a YAML mapping at the top level")])
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as exc:
        problems = [(_dotted(e["loc"]) or "(top level)", _reason(e)) for e in exc.errors()]
        raise SpecError(source, problems) from None


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_spec_text(path: Path) -> str:
    """The text of a spec file, read with bounds. Raises SpecError naming the file.

    Only regular files: /dev/zero was read whole before the size check (22 GB resident) and a
    FIFO without a writer blocked forever. The file is checked before it is opened (opening a
    device can have effects) and again on the open descriptor (it may have been swapped);
    O_NONBLOCK keeps the open itself from waiting for a FIFO's writer. At most
    MAX_SPEC_BYTES + 1 bytes are ever read.
    """
    source = str(path)
    limit = strict_yaml.MAX_SPEC_BYTES

    def fail(reason: str) -> SpecError:
        return SpecError(source, [("", reason)])

    try:
        kind = _kind(os.stat(path).st_mode)
        if kind is not None:
            raise fail(f"cannot read: {kind}, not a spec file")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise fail("file not found") from None
    except PermissionError:
        raise fail("cannot read: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or errno.errorcode.get(exc.errno, exc)}") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise fail(f"cannot read: {kind}, not a spec file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise fail(f"cannot read: larger than {limit} bytes (a job spec is a few KB)")
    return _decode(data, fail)


def _decode(data: bytes, fail: Callable[[str], SpecError]) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Notepad's "Unicode"; also the UTF-32 BOMs start like this.
        raise fail("cannot read: the file is UTF-16 or UTF-32 text; save it as UTF-8")
    if b"\0" in data:
        raise fail("cannot read: the file has NUL bytes (a binary file, not YAML text)")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 BOM is harmless: accepted and dropped
    except UnicodeDecodeError as exc:
        raise fail(
            f"cannot read: not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8"
        ) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file. Raises SpecError (a ValueError)."""
    path = Path(path)
    source = str(path)
    text = read_spec_text(path)
    try:
        doc = strict_yaml.loads(text)
    except strict_yaml.SpecYAMLError as exc:
        raise SpecError(source, [(exc.field, str(exc))]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SpecError(source, [("", "a job spec must be a YAML mapping at the top level")])
    if overrides:
        doc = apply_overrides(doc, overrides, source)
    return spec_from_dict(doc, source)


def write_resolved(spec: JobSpec, run_dir: Path) -> Path:
    """Write the fully resolved spec into the run folder (atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "spec.resolved.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(spec.to_yaml(), encoding="utf-8")
    tmp.replace(target)
    return target
