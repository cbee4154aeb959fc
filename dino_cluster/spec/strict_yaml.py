"""Safe, strict, bounded YAML reading for job specs.

PyYAML's SafeLoader is close to what we need but has traps for job specs: duplicate keys
silently keep the last value, `5e-4` is read as a *string* (YAML 1.1 wants a dot in the
mantissa), aliases can expand into a "billion laughs" document, nesting is composed by
recursion (1,000 levels is a RecursionError), a 5,000-digit integer is a ValueError from
int(), and `.inf` / `1e999` are floats that train as NaN. This loader bounds all of them,
refuses every tag, and reports each with the line and, where known, the dotted path of the
value. Nothing here knows about the spec's fields.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from dino_cluster.spec.urls import redact

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB; a megabyte is not a spec
MAX_ALIASES = 64
# Mappings and sequences inside each other, aliases expanded: a spec is 6 deep
# (launcher.ray.runtime_env.env_vars.NAME); composing is recursive, so this also keeps PyYAML
# and pydantic far from Python's recursion limit.
MAX_DEPTH = 32
# Values in the document with every alias expanded: a spec has a few hundred. Counting
# aliases is not enough: 64 aliases, 2 per level, expand to 2^32 values.
MAX_VALUES = 10_000
# Digits of an integer literal: every bounded field is far below 10^30, and int() refuses
# more than 4,300 digits with a traceback.
MAX_INT_DIGITS = 30
# How much of a key or value a message repeats.
_SHOW = 60

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"

# YAML 1.2-style floats: 5e-4, 1E6, .5, 1_000.0 (PyYAML only accepts 1.0e-4 forms).
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def cut(text: str) -> str:
    """`text` for a message: a URL with credentials replaced first (cutting first could keep
    `user:secret` and drop the '@' that marks it), then cut short (one line, not a copy)."""
    text = redact(text)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def show(value: Any) -> str:
    """repr() of a key or value for a message, as `cut` leaves it."""
    return cut(repr(value))


class SpecYAMLError(ValueError):
    """A YAML document that is not a valid job spec document (before field validation).

    `field` is the dotted path of the value at fault when there is one ("optim.epochs").
    """

    def __init__(self, reason: str, line: int | None = None, field: str = "") -> None:
        self.reason = reason
        self.line = line
        self.field = field
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with duplicate-key detection, bounded aliases and YAML 1.2 floats."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise SpecYAMLError(f"more than {MAX_ALIASES} YAML aliases", mark.line + 1)
            return super().compose_node(parent, index)
        # Composing recurses once per level: stop long before Python's recursion limit. And
        # stop building nodes (a few hundred bytes each) once there are more than a spec has.
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_VALUES:
                mark = self.peek_event().start_mark
                raise SpecYAMLError(f"more than {MAX_VALUES} values", mark.line + 1)
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecYAMLError(
                    f"nested deeper than {MAX_DEPTH} levels (a job spec is a few levels deep)",
                    mark.line + 1,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise SpecYAMLError(
                    f"key {show(key)} is not a string", key_node.start_mark.line + 1
                )
            if key in seen:
                raise SpecYAMLError(
                    f"duplicate key {show(key)} (first on line {seen[key]})",
                    key_node.start_mark.line + 1,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# Tags other than the plain core ones are refused: SafeLoader already refuses python/* tags,
# and we remove the timestamp/binary/set/omap resolvers' constructors' reach by not adding any.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _reject_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise SpecYAMLError(f"YAML tag {show(node.tag)} is not allowed", node.start_mark.line + 1)


def _reject_tag_family(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    return _reject_tag(loader, node)


_StrictLoader.add_multi_constructor("!", _reject_tag_family)
_StrictLoader.add_multi_constructor("tag:yaml.org,2002:python", _reject_tag_family)
# (Single-tag constructors take (loader, node): `!!binary` was a TypeError traceback when they
# shared the multi-constructor's signature.)
for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _reject_tag)


class _Checker:
    """One pass over the composed node graph, before any Python value is built: depth and size
    with aliases expanded, no alias cycles, integer length, finite floats. Each node is
    checked once (aliases share nodes); sizes and heights are remembered so an alias costs
    nothing to re-check, and the walk never recurses deeper than MAX_DEPTH."""

    def __init__(self, loader: _StrictLoader) -> None:
        self.loader = loader
        self.done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height)
        self.open: set[int] = set()

    def visit(self, node: yaml.Node, path: str, depth: int) -> tuple[int, int]:
        line = node.start_mark.line + 1
        key = id(node)
        if key in self.open:
            raise SpecYAMLError("a YAML alias refers to a value that contains it", line, path)
        size, height = self.done.get(key) or self._measure(node, path, depth)
        if depth + height > MAX_DEPTH:
            raise SpecYAMLError(
                f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", line, path
            )
        return size, height

    def _measure(self, node: yaml.Node, path: str, depth: int) -> tuple[int, int]:
        line = node.start_mark.line + 1
        if depth > MAX_DEPTH:
            raise SpecYAMLError(f"nested deeper than {MAX_DEPTH} levels", line, path)
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node, path, line)
            result = (1, 0)
        else:
            self.open.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            else:
                children = []
                for k, v in node.value:
                    name = cut(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                    children += [(k, path), (v, f"{path}.{name}" if path else name)]
            size, height = 1, 0
            for child, child_path in children:
                n, h = self.visit(child, child_path, depth + 1)
                size, height = size + n, max(height, h + 1)
                if size > MAX_VALUES:
                    raise SpecYAMLError(
                        f"expands to more than {MAX_VALUES} values (YAML aliases)", line, path
                    )
            self.open.discard(id(node))
            result = (size, height)
        self.done[id(node)] = result
        return result

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int) -> None:
        if node.tag == _INT_TAG:
            digits = node.value.lstrip("+-").replace("_", "")
            if len(digits) > MAX_INT_DIGITS:
                raise SpecYAMLError(
                    f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})", line, path
                )
        elif node.tag == _FLOAT_TAG:
            try:
                value = self.loader.construct_yaml_float(node)
            except (ValueError, OverflowError):
                raise SpecYAMLError("not a number YAML can read", line, path) from None
            if not math.isfinite(value):
                # `.inf`, `.nan` and literals past 1.8e308: no field accepts them, and one in
                # a free-form section would be passed on to Ray or a renderer as is.
                raise SpecYAMLError(
                    f"{node.value[:_SHOW]} is not a finite number (inf and nan are refused)",
                    line,
                    path,
                )


def loads(text: str) -> Any:
    """Parse one YAML document strictly. Raises SpecYAMLError with a line number."""
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecYAMLError(f"larger than {MAX_SPEC_BYTES} bytes (a job spec is a few KB)")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Checker(loader).visit(node, "", 1)
        return loader.construct_document(node)
    except SpecYAMLError:
        raise
    except yaml.reader.ReaderError as exc:
        raise SpecYAMLError(
            f"not YAML text: character {exc.character:#x} at offset {exc.position} "
            "is not allowed (is this a binary file?)"
        ) from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        # "expected a single document in the stream, but found another document": the
        # context is half of the sentence.
        what = ", ".join(p for p in (exc.context, exc.problem) if p)
        what = what if len(what) <= 200 else what[:197] + "..."
        raise SpecYAMLError(f"invalid YAML: {what}", line) from None
    except yaml.YAMLError as exc:
        raise SpecYAMLError(f"invalid YAML: {exc}") from None
    except RecursionError:
        # Defensive: depth is bounded above, but a report beats a traceback if PyYAML recurses
        # somewhere else.
        raise SpecYAMLError("nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as exc:
        # A scalar Python cannot represent (the checks above should have caught it).
        raise SpecYAMLError(f"a value cannot be read ({type(exc).__name__})") from None
    finally:
        loader.dispose()


def parse_scalar(text: str) -> Any:
    """Parse the value of a `--set key=value` override with the same rules (and bounds) as
    files."""
    if text == "":
        return ""
    return loads(text)
