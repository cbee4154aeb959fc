"""The one record of an evaluation result, as every reader sees it.

The runner writes one JSON document per checkpoint and kind, `step-N/evals/<kind>.json`
(CheckpointManager.record_eval), whose `results` body is exactly `EvalResult.to_json()`:

    k-NN    {"k": 20, "top1": 67.3, "top5": 98.1,
             "by_k": {"10": {"top1": .., "top5": ..}, "20": {..}}, "info": {...}}
    linear  {"top1": 71.2, "top5": 98.9, "info": {...}}

Accuracies are percentages. The watcher (its printed line and metrics-eval.jsonl), the
`checkpoints` table, `status` and the Prometheus/Ray exporters all read results through
`EvalResult.from_json` and show them with `summary()`; a failed evaluation (the queue's final
status) is the same record with `error` set and no accuracies. No torch, no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ResultError(ValueError):
    """A results document that is not in the layout the runner writes."""


def _percent(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> float | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ResultError(f"{where}: {key!r} must be a finite number, got {value!r}")
    if not 0 <= value <= 100:
        raise ResultError(f"{where}: {key!r} must be a percentage in [0, 100], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EvalResult:
    kind: str  # "knn" | "linear"
    step: int
    top1: float | None = None  # percent; the headline (k-NN: at `k`)
    top5: float | None = None
    k: int | None = None  # k-NN: the headline k
    by_k: Mapping[int, tuple[float, float | None]] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # a failed evaluation: why (no accuracies then)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @classmethod
    def failure(cls, kind: str, step: int, error: str) -> EvalResult:
        return cls(kind, step, error=error[:200] or "failed")

    # -- the stored layout ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The `results` body the runner records (see the module docstring)."""
        if self.failed:
            raise ValueError("a failed evaluation has no results body")
        doc: dict[str, Any] = {}
        if self.k is not None:
            doc["k"] = self.k
        doc["top1"] = self.top1
        doc["top5"] = self.top5
        if self.by_k:
            doc["by_k"] = {
                str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in sorted(self.by_k.items())
            }
        doc["info"] = dict(self.info)
        return doc

    @classmethod
    def from_json(cls, kind: str, step: int, doc: Any) -> EvalResult:
        """Parse a `results` body; ResultError when it is not the runner's layout."""
        where = f"{kind} result of step {step}"
        if not isinstance(doc, Mapping):
            raise ResultError(f"{where}: expected an object, got {type(doc).__name__}")
        top1 = _percent(doc, "top1", where)
        top5 = _percent(doc, "top5", where, required=False)
        k = doc.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ResultError(f"{where}: 'k' must be a positive integer, got {k!r}")
        by_k: dict[int, tuple[float, float | None]] = {}
        raw = doc.get("by_k", {})
        if not isinstance(raw, Mapping):
            raise ResultError(f"{where}: 'by_k' must be an object")
        for key, entry in raw.items():
            if not str(key).isdigit() or not isinstance(entry, Mapping):
                raise ResultError(f"{where}: by_k entry {key!r} is not k -> {{top1, top5}}")
            t1 = _percent(entry, "top1", f"{where} k={key}")
            by_k[int(key)] = (t1, _percent(entry, "top5", f"{where} k={key}", required=False))  # type: ignore[assignment]
        info = doc.get("info", {})
        if not isinstance(info, Mapping):
            raise ResultError(f"{where}: 'info' must be an object")
        return cls(kind, step, top1, top5, k, by_k, dict(info))

    # -- what readers show ---------------------------------------------------------------------
    def top1_by_k(self) -> dict[str, float]:
        """Top-1 (percent) by k as a label value: every k of a k-NN result, "" for linear."""
        if self.failed:
            return {}
        if self.by_k:
            return {str(k): t1 for k, (t1, _) in sorted(self.by_k.items())}
        return {str(self.k) if self.k is not None else "": self.top1}  # type: ignore[dict-item]

    def values(self) -> dict[str, float]:
        """Flat numbers for a metrics log line (`eval/<kind>/<name>`)."""
        if self.failed:
            return {f"eval/{self.kind}/failed": 1.0}
        out = {f"eval/{self.kind}/top1": float(self.top1)}  # type: ignore[arg-type]
        if self.top5 is not None:
            out[f"eval/{self.kind}/top5"] = self.top5
        if self.k is not None:
            out[f"eval/{self.kind}/k"] = float(self.k)
        for k, (t1, _) in sorted(self.by_k.items()):
            out[f"eval/{self.kind}/top1_k{k}"] = t1
        return out

    def summary(self) -> str:
        """One short line: `knn top1 67.30 top5 98.10 (k=20)` or `knn FAILED: why`."""
        if self.failed:
            return f"{self.kind} FAILED: {self.error}"
        text = f"{self.kind} top1 {self.top1:.2f}"
        if self.top5 is not None:
            text += f" top5 {self.top5:.2f}"
        if self.k is not None:
            text += f" (k={self.k})"
        return text


def newest_by_kind(results: list[EvalResult]) -> dict[str, EvalResult]:
    """Per kind, the result of the highest step (a failure of a later step wins)."""
    out: dict[str, EvalResult] = {}
    for r in sorted(results, key=lambda r: (r.step, not r.failed)):
        out[r.kind] = r
    return out
