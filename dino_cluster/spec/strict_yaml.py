"""Safe, strict YAML reading for job specs.

PyYAML's SafeLoader is close to what we need but has three traps for job specs:
duplicate keys silently keep the last value, `5e-4` is read as a *string* (YAML 1.1 wants a
dot in the mantissa), and aliases can expand into a "billion laughs" document. This loader
fixes all three and refuses every tag. Nothing here knows about the spec's fields.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB; a megabyte is not a spec
MAX_ALIASES = 64

# YAML 1.2-style floats: 5e-4, 1E6, .5, 1_000.0 (PyYAML only accepts 1.0e-4 forms).
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class SpecYAMLError(ValueError):
    """A YAML document that is not a valid job spec document (before field validation)."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with duplicate-key detection, bounded aliases and YAML 1.2 floats."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise SpecYAMLError(f"more than {MAX_ALIASES} YAML aliases", mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise SpecYAMLError(f"key {key!r} is not a string", key_node.start_mark.line + 1)
            if key in seen:
                raise SpecYAMLError(
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark.line + 1,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# Tags other than the plain core ones are refused: SafeLoader already refuses python/* tags,
# and we remove the timestamp/binary/set/omap resolvers' constructors' reach by not adding any.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _reject_unknown_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    raise SpecYAMLError(f"YAML tag {node.tag!r} is not allowed", node.start_mark.line + 1)


_StrictLoader.add_multi_constructor("!", _reject_unknown_tag)
_StrictLoader.add_multi_constructor("tag:yaml.org,2002:python", _reject_unknown_tag)
for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _reject_unknown_tag)


def loads(text: str) -> Any:
    """Parse one YAML document strictly. Raises SpecYAMLError with a line number."""
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecYAMLError(f"file is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - strict SafeLoader subclass
    except SpecYAMLError:
        raise
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise SpecYAMLError(f"invalid YAML: {exc.problem}", line) from None
    except yaml.YAMLError as exc:
        raise SpecYAMLError(f"invalid YAML: {exc}") from None


def parse_scalar(text: str) -> Any:
    """Parse the value of a `--set key=value` override with the same rules as files."""
    if text == "":
        return ""
    return loads(text)
