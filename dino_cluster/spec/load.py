"""Reading a job spec: strict YAML, `--set` overrides, validation with messages that name
the file, the dotted field and the reason; and the resolved copy written into a run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dino_cluster.spec import strict_yaml
from dino_cluster.spec.sections import JobSpec


class SpecError(ValueError):
    """A job spec that cannot be used. `str()` names the file, the field and the reason."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [
            f"{source}: {field}: {reason}" if field else f"{source}: {reason}"
            for field, reason in problems
        ]
        super().__init__("\n".join(lines))


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
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
        return f"{msg} (got {err.get('input')!r})"
    return msg


def apply_overrides(doc: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(source, [(f"--set {item}", "expected KEY=VALUE")])
        key, _, raw = item.partition("=")
        path = key.strip().split(".")
        if not all(path):
            raise SpecError(source, [(f"--set {item}", "empty key segment")])
        try:
            value = strict_yaml.parse_scalar(raw)
        except strict_yaml.SpecYAMLError as exc:
            raise SpecError(source, [(f"--set {key}", exc.reason)]) from None
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


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file. Raises SpecError (a ValueError)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [("", f"cannot read: {exc}")]) from None
    try:
        doc = strict_yaml.loads(text)
    except strict_yaml.SpecYAMLError as exc:
        raise SpecError(source, [("", str(exc))]) from None
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
