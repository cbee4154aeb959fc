"""`dino-cluster plot RUN -o FILE.png`: a run's training curves and evaluations, one PNG.

Reads RUN/metrics.jsonl (one row per logged step: `step`, `loss`, `teacher_entropy`,
`student_teacher_kl`, `lr`, ...; non-finite values are written as the strings "nan", "inf",
"-inf") and the evaluations from RUN/metrics-eval.jsonl (the watcher's rows: `step` and
`eval/<kind>/top1`, ...) and from the checkpoint store's records (`step-N/evals/<kind>.json`,
read as `EvalResult`). Draws loss, teacher entropy (with ln(out_dim), the entropy of a uniform
teacher: a curve that reaches it has collapsed to uniform), student-teacher KL, lr and the
top-1 of every evaluated checkpoint against steps. No torch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_cluster.visualize import VisualizeError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "metrics-eval.jsonl"
SPEC_FILE = "spec.resolved.yaml"
# (key in metrics.jsonl, panel title)
TRAIN_PANELS = (
    ("loss", "loss"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("student_teacher_kl", "student-teacher KL (nats)"),
    ("lr", "learning rate"),
)
DEFAULT_SIZE = (1200, 900)
# A metrics file is read whole: bound it (a line per logged step is ~0.5 KB; 1 GB is ~2M rows).
MAX_METRICS_BYTES = 1 << 30


@dataclass
class RunCurves:
    """What one run's files say, as numbers against steps."""

    train: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    evals: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> step -> top1
    out_dim: int | None = None
    name: str = ""
    non_finite: dict[str, int] = field(default_factory=dict)

    def steps(self) -> list[float]:
        xs = [x for xs, _ in self.train.values() for x in xs]
        return xs + [float(s) for by_step in self.evals.values() for s in by_step]


def number(value: Any) -> float | None:
    """A metrics value as a float: numbers, and the strings JSON cannot hold ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf" (and any number written as text)
        except ValueError:
            return None
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON object rows of a .jsonl with an integer `step`; a line being written (the
    last, cut short) or any other unreadable line is skipped."""
    if path.stat().st_size > MAX_METRICS_BYTES:
        raise VisualizeError(f"{path}: larger than {MAX_METRICS_BYTES >> 20} MiB")
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                rows.append(row)
    return rows


def train_curves(rows: list[dict[str, Any]], curves: RunCurves) -> None:
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, _ in TRAIN_PANELS:
            value = number(row.get(key))
            if value is not None:
                by_key.setdefault(key, {})[row["step"]] = value  # a resumed run: last wins
    for key, points in by_key.items():
        steps = sorted(points)
        curves.train[key] = ([float(s) for s in steps], [points[s] for s in steps])
        curves.non_finite[key] = sum(not math.isfinite(points[s]) for s in steps)


def eval_rows(rows: list[dict[str, Any]], curves: RunCurves) -> None:
    for row in rows:
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "top1":
                top1 = number(value)
                if top1 is not None and math.isfinite(top1):
                    curves.evals.setdefault(parts[1], {})[row["step"]] = top1


def store_evals(spec: Any, curves: RunCurves) -> None:
    """Evaluation records beside the checkpoints (what `dino-cluster checkpoints` shows)."""
    from dino_cluster.checkpointing import CheckpointManager
    from dino_cluster.metrics.store import checkpoint_results
    from dino_cluster.storage import StorageOptions

    options = StorageOptions.from_spec(spec.data.storage).interactive()
    manager = CheckpointManager(spec.checkpoint_url, storage_options=options, is_writer=False)
    for result in checkpoint_results(manager.list()):
        if not result.failed and result.top1 is not None:
            curves.evals.setdefault(result.kind, {})[result.step] = result.top1


def load_curves(run_dir: Path, spec_path: Path | None = None, *, store: bool = True) -> RunCurves:
    """Everything `plot` draws for the run in `run_dir`; VisualizeError when there is none."""
    from dino_cluster.spec import SpecError, load_spec

    if not run_dir.is_dir():
        raise VisualizeError(f"{run_dir}: no such run folder")
    curves = RunCurves(name=run_dir.name)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        train_curves(read_rows(metrics), curves)
    if (run_dir / EVAL_FILE).is_file():
        eval_rows(read_rows(run_dir / EVAL_FILE), curves)
    spec_file = spec_path or run_dir / SPEC_FILE
    spec = None
    if spec_file.is_file():
        try:
            spec = load_spec(spec_file)
        except SpecError as exc:
            raise VisualizeError(str(exc)) from None
        curves.out_dim, curves.name = spec.model.out_dim, spec.run.name
    elif spec_path is not None:
        raise VisualizeError(f"{spec_path}: no such spec file")
    if store and spec is not None:
        try:
            store_evals(spec, curves)
        except Exception as exc:  # noqa: BLE001 - the curves are still worth drawing
            log.warning("evaluation records not read from %s: %s", spec.checkpoint_url, exc)
    if not curves.train and not curves.evals:
        raise VisualizeError(
            f"{run_dir}: no metrics to plot ({METRICS_FILE} and {EVAL_FILE} missing or empty; "
            "has the run logged a step?)"
        )
    return curves


def build_panels(curves: RunCurves) -> list[Any]:
    from dino_cluster.visualize.draw import PALETTE, HLine, Panel, Series

    panels = []
    for i, (key, title) in enumerate(TRAIN_PANELS):
        panel = Panel(title)
        if key in curves.train:
            xs, ys = curves.train[key]
            panel.series.append(Series(key, xs, ys, PALETTE[i % len(PALETTE)]))
            if curves.non_finite.get(key):
                panel.title += f"   ({curves.non_finite[key]} non-finite steps)"
        if key == "teacher_entropy" and curves.out_dim:
            ln = math.log(curves.out_dim)
            panel.hlines.append(HLine(ln, f"uniform: ln({curves.out_dim}) = {ln:.2f}"))
        panels.append(panel)
    evals = Panel("evaluation top-1 (%) per checkpoint", empty_text="no evaluation recorded")
    for i, (kind, by_step) in enumerate(sorted(curves.evals.items())):
        steps = sorted(by_step)
        label = "k-NN" if kind == "knn" else kind
        color = PALETTE[(i + len(TRAIN_PANELS)) % len(PALETTE)]
        evals.series.append(
            Series(label, [float(s) for s in steps], [by_step[s] for s in steps], color, True)
        )
    panels.append(evals)
    panels.append(Panel("last values", lines=last_values(curves)))
    return panels


def last_values(curves: RunCurves) -> list[str]:
    """The newest finite value of each curve, and each evaluation's newest and best."""
    lines = []
    for key, _ in TRAIN_PANELS:
        xs, ys = curves.train.get(key, ([], []))
        finite = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
        if finite:
            lines.append(f"{key}: {finite[-1][1]:.4g} at step {finite[-1][0]:.0f}")
    if curves.out_dim:
        lines.append(
            f"uniform teacher entropy: ln({curves.out_dim}) = {math.log(curves.out_dim):.3f}"
        )
    for kind, by_step in sorted(curves.evals.items()):
        last, best = max(by_step), max(by_step, key=lambda s: by_step[s])
        lines.append(
            f"{kind} top-1: {by_step[last]:.1f} % at step {last} (best {by_step[best]:.1f} % "
            f"at step {best})"
        )
    return lines


def summary_line(curves: RunCurves) -> str:
    steps = curves.steps()
    span = f"steps {min(steps):.0f} to {max(steps):.0f}" if steps else ""
    return "   ".join(p for p in (f"run {curves.name}" if curves.name else "", span) if p)


def plot_run(
    run_dir: Path,
    output: Path,
    *,
    spec_path: Path | None = None,
    store: bool = True,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> RunCurves:
    """Draw the run's panels into `output` (PNG); returns what was drawn."""
    from dino_cluster.visualize.draw import draw_panels

    if min(size) < 200 or max(size) > 10_000:
        raise VisualizeError(f"--size {size[0]}x{size[1]}: each side must be 200-10000 px")
    curves = load_curves(run_dir, spec_path, store=store)
    steps = curves.steps()
    x_range = (min(steps), max(steps)) if steps else (0.0, 1.0)
    if x_range[1] <= x_range[0]:
        x_range = (x_range[0] - 1, x_range[1] + 1)
    image = draw_panels(build_panels(curves), size, 2, x_range, title=summary_line(curves))
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output, format="PNG")
    return curves
