"""The package's shape, checked: no import cycles, evaluation reaches backends only through
their interface, heavy libraries only where they are used, and the light entry points
(CLI, spec, run record) import none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dino_cluster"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, lazily or not (TYPE_CHECKING included)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            # `from pkg import sub` depends on the module pkg.sub; `from pkg import name`
            # on pkg itself (its __init__ defines or re-exports the name).
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    # Package __init__ modules count too, when a name is imported from them.
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_evaluation_uses_backends_only_through_their_interface() -> None:
    allowed = {"dino_cluster.launch.base", "dino_cluster.launch.run_record"}
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in _graph().items()
        if m.startswith("dino_cluster.evaluate")
        for t in targets
        if t.startswith("dino_cluster.launch") and t not in allowed
    )
    assert bad == []


@pytest.mark.parametrize(
    ("library", "owners"),
    [
        ("boto3", ("dino_cluster.storage.",)),
        ("botocore", ("dino_cluster.storage.",)),
        ("submitit", ("dino_cluster.launch.slurm.",)),
        ("ray", ("dino_cluster.launch.ray.", "dino_cluster.metrics.ray_sink")),
    ],
)
def test_heavy_libraries_are_imported_only_by_their_owners(library: str, owners: tuple) -> None:
    users = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == library or n.startswith(library + ".") for n in names):
                users.append(name)
    assert users, f"nothing imports {library}: is the check still looking at the right thing?"
    assert sorted(u for u in users if not u.startswith(owners)) == []


def test_light_entry_points_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import dino_cluster.cli, dino_cluster.spec, dino_cluster.launch.run_record\n"
        "import dino_cluster.launch.base, dino_cluster.evaluate.results\n"
        "heavy = ('torch', 'ray', 'boto3', 'botocore', 'timm', 'submitit', 'numpy')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def _imported(args: list[str], cwd: Path) -> set[str]:
    """Top-level packages a `dino-cluster ARGS` run imported (python -X importtime)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dino_cluster.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_read_only_commands_import_no_torch_ray_or_boto3(tmp_path: Path) -> None:
    from dino_cluster.launch.run_record import LocalRecord, write_record
    from dino_cluster.spec import load_spec, write_resolved

    repo = PKG.parent
    spec = load_spec(repo / "jobs" / "quickstart.yaml", [f"run.dir={tmp_path}", "run.name=r"])
    write_resolved(spec, spec.run_dir)
    (spec.run_dir / "logs").mkdir()
    (spec.run_dir / "logs" / "rank-0.log").write_text("step 1\n")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    write_record(spec.run_dir, LocalRecord(pid=int(ended.stdout), world_size=1))
    run = str(spec.run_dir)
    commands = [
        ["--help"],
        ["--version"],
        ["validate", "jobs/vitb8.yaml"],
        ["render", "jobs/vitb8.yaml", "--backend", "slurm"],
        ["render", "jobs/vitb8.yaml", "--backend", "kuberay"],
        ["render", "jobs/vitb8.yaml", "--backend", "ray"],
        ["submit", "jobs/quickstart.yaml", "--dry-run"],
        ["submit", "jobs/vitb8.yaml", "--backend", "slurm", "--dry-run"],
        ["status", run],
        ["logs", run],
        ["cancel", run],
        ["checkpoints", run],
        ["plot", "--help"],
        ["visualize", "--help"],
    ]
    for args in commands:
        heavy = _imported(args, repo) & {"torch", "ray", "boto3", "botocore", "timm"}
        assert heavy == set(), f"dino-cluster {' '.join(args)} imported {sorted(heavy)}"
